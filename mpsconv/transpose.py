"""``MPSCNNConvolutionTranspose`` (spec ``convolution.md`` §10)."""
from __future__ import annotations

from .convolution import _WeightedKernel
from .descriptor import MPSCNNConvolutionDescriptor
from .errors import MPSTypeError, MPSValueError, not_implemented
from .geometry import ConvProblem, allocate_reverse
from .kernel import MPSImageEdgeMode
from .types import MPSDataType, MPSOffset


class MPSCNNConvolutionTranspose(_WeightedKernel):
    """``MPSCNNConvolutionTranspose``: zero-insertion upsampling by the stride, then a unit-stride
    convolution with the weights as stored (no 180° rotation).

    With ``Z`` the source with ``s - 1`` zeros inserted between pixels and ``T = offset·s +
    kernelOffset``, local destination pixel ``(u, v)`` is centred on ``Z(Tx + u, Ty + v)``::

        D(X, Y, dfo + o) = f(B'[o] + Σ_{q,p,c} W'[o][q][p][c] · Z(Tx + u - (KdX >> 1) + p·dX, ..., sfo + grp(o)·Ig + c))

    ``inputFeatureChannels`` are the source's channels, ``outputFeatureChannels`` the destination's;
    weights ``[O][kH][kW][I/G]`` as for convolution. ``isBackwards`` is True: the stride is the
    upsampling factor, and the allocating encode sizes by ``DestSizeReverse`` (it sets ``offset`` to 0
    and ``kernelOffset`` to the policy's value). The data source's ``dataType()`` must be float32.
    Only the zero edge mode is defined.

    Initializers: ``MPSCNNConvolutionTranspose(device=, weights=dataSource)``,
    ``MPSCNNConvolutionTranspose(coder=, device=)``; ``init(device:)`` is unavailable.
    """

    _data_types = (MPSDataType.float32,)
    _edge_modes = (MPSImageEdgeMode.zero,)

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        if keys == {"device", "weights"}:
            self._kernel_offset = (0, 0)
            self._init_data_source(kwargs["device"], kwargs["weights"])
        elif keys in ({"coder", "device"}, {"coder"}):
            kwargs["coder"].decodeInto(self, kwargs.get("device"))
        else:
            unavailable = " (init(device:) alone is unavailable)" if keys == {"device"} else ""
            raise MPSTypeError(f"MPSCNNConvolutionTranspose({', '.join(sorted(keys))}){unavailable}: valid "
                               "initializers are MPSCNNConvolutionTranspose(device=, weights=dataSource) and "
                               "MPSCNNConvolutionTranspose(coder=, device=)")

    def _check_descriptor(self, descriptor) -> None:
        if type(descriptor) is not MPSCNNConvolutionDescriptor:
            raise MPSTypeError(f"MPSCNNConvolutionTranspose: takes a plain MPSCNNConvolutionDescriptor, not "
                               f"{type(descriptor).__name__}")

    # -- properties
    isBackwards = property(lambda self: True)

    def _offset_prop(axis: int, name: str):
        def get(self):
            return self._kernel_offset[axis]

        def set_(self, value):
            if isinstance(value, bool) or not isinstance(value, int):
                raise MPSTypeError(f"MPSCNNConvolutionTranspose: {name}={value!r} must be an integer")
            offsets = list(self._kernel_offset)
            offsets[axis] = value
            self._kernel_offset = tuple(offsets)

        return property(get, set_)

    kernelOffsetY = _offset_prop(0, "kernelOffsetY")
    kernelOffsetX = _offset_prop(1, "kernelOffsetX")
    del _offset_prop

    # -- geometry
    def _resolve(self, source, destination, owner: str) -> ConvProblem:
        return self._resolve_with(source, destination, owner, kernel_offset=self._kernel_offset)

    def _allocated_geometry(self, source, kernel, stride, dilation, rule, owner):
        (h, w), (ky, kx) = allocate_reverse((source.height, source.width), kernel, stride, dilation, rule, owner)
        self._kernel_offset = (ky, kx)
        return (h, w), (0, 0)

    def sourceRegion(self, destinationSize):
        raise not_implemented("MPSCNNConvolutionTranspose.sourceRegion (the source region of a backwards kernel)", 3)

    # -- encode forms with a convolution gradient state (spec §10.5)
    def _encode_kw(self, *, commandBuffer, sourceImage, destinationImage=None, convolutionGradientState=None,
                   destinationState=None, destinationStateIsTemporary=None):
        if convolutionGradientState is not None:
            raise not_implemented("MPSCNNConvolutionTranspose.encode with a convolutionGradientState "
                                  "(MPSCNNConvolutionGradientState)", 4)
        return super()._encode_kw(commandBuffer=commandBuffer, sourceImage=sourceImage,
                                  destinationImage=destinationImage, destinationState=destinationState,
                                  destinationStateIsTemporary=destinationStateIsTemporary)

    def encodeBatch(self, *, commandBuffer, sourceImages, destinationImages=None, convolutionGradientStates=None,
                    destinationStates=None, destinationStateIsTemporary=None):
        if convolutionGradientStates is not None and any(s is not None for s in convolutionGradientStates):
            raise not_implemented("MPSCNNConvolutionTranspose.encodeBatch with convolutionGradientStates", 4)
        return super().encodeBatch(commandBuffer=commandBuffer, sourceImages=sourceImages,
                                   destinationImages=destinationImages, destinationStates=destinationStates,
                                   destinationStateIsTemporary=destinationStateIsTemporary)
