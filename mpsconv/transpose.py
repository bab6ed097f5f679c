"""``MPSCNNConvolutionTranspose`` (docs/semantics.md, "Transposed convolution")."""
from __future__ import annotations

from ._api import decode_with, keywords
from .convolution import MPSCNNConvolution, _WeightedKernel
from .descriptor import MPSCNNConvolutionDescriptor
from .errors import MPSTypeError, MPSValueError
from .core.geometry import ConvProblem, allocate, backwards_kernel_offset, source_region_backwards
from .image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from .kernel import MPSImageEdgeMode, MPSOrigin, MPSRegion, MPSSize, kernel_offset_property
from .convolution_state import MPSCNNConvolutionGradientState, MPSCNNConvolutionTransposeGradientState
from .types import MPSDataType, MPSOffset, as_list, as_size


@keywords("device", "weights", "coder")
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
            decode_with(kwargs["coder"], self, kwargs.get("device"))
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

    _placement_fields = ("_offset", "_edgeMode", "_kernel_offset")

    kernelOffsetY = kernel_offset_property(0, "kernelOffsetY")
    kernelOffsetX = kernel_offset_property(1, "kernelOffsetX")

    # -- geometry
    def _resolve(self, source, destination, owner: str) -> ConvProblem:
        return self._resolve_with(source, destination, owner, kernel_offset=self._kernel_offset)

    def _allocated_geometry(self, source, kernel, stride, dilation, rule, owner):
        (h, w), (ky, kx) = allocate((source.height, source.width), kernel, stride, dilation, rule, owner,
                                   backwards=True)
        self._kernel_offset = (ky, kx)
        return (h, w), (0, 0)

    def sourceRegion(self, destinationSize) -> MPSRegion:
        """``sourceRegion(destinationSize:)``: the source pixels a destination of that size reads (only
        every ``s``-th pixel of the zero-inserted source is one)."""
        w, h, d = as_size(destinationSize, self._owner("sourceRegion"), "destinationSize")
        kernel, stride, dilation = self._window()
        (oy, ox), (sh, sw) = source_region_backwards((self._offset.y, self._offset.x), self._kernel_offset, (h, w),
                                                     kernel, stride, dilation)
        return MPSRegion(MPSOrigin(ox, oy, self._offset.z), MPSSize(sw, sh, d))

    # -- encode forms with a convolution gradient state
    def _apply_state(self, state, cb, owner: str) -> None:
        """The forward convolution's state decides the geometry: ``offset = 0`` and
        ``kernelOffset = -o + (1 if Kd is even else 0)`` per axis."""
        if not isinstance(state, MPSCNNConvolutionGradientState):
            raise MPSTypeError(f"{owner}: convolutionGradientState={type(state).__name__} must be an "
                               "MPSCNNConvolutionGradientState from the forward convolution")
        state._check_for_encode(cb, owner, "convolutionGradientState")
        fwd = state._producer
        if not isinstance(fwd, MPSCNNConvolution):
            raise MPSValueError(f"{owner}: convolutionGradientState must be made by an MPSCNNConvolution")
        if (fwd.kernelHeight, fwd.kernelWidth, fwd.dilationRateY, fwd.dilationRateX) != \
                (self.kernelHeight, self.kernelWidth, self.dilationRateY, self.dilationRateX):
            raise MPSValueError(f"{owner}: the forward convolution's window {fwd.kernelWidth}x{fwd.kernelHeight} "
                                f"(dilation {fwd.dilationRateX}x{fwd.dilationRateY}) differs from this transpose's "
                                f"{self.kernelWidth}x{self.kernelHeight} (dilation {self.dilationRateX}x"
                                f"{self.dilationRateY}); the state path needs the same window")
        kernel, _, dilation = self._window()
        offset = state.forward_offset
        self._offset = MPSOffset(0, 0, self._offset.z)
        self._kernel_offset = backwards_kernel_offset((offset.y, offset.x), kernel, dilation)

    # -- training states
    def _result_state_class(self):
        return MPSCNNConvolutionTransposeGradientState

    def _state_snapshot(self) -> tuple:
        return (self._clipRect, self._edgeMode, self._sfo, self._sfmax, self._dfo)  # offset: set by the state path

    def _encode_kw(self, *, commandBuffer, sourceImage, destinationImage=None, convolutionGradientState=None,
                   destinationState=None, destinationStateIsTemporary=None):
        owner = self._owner()
        state = convolutionGradientState
        if state is None:
            return super()._encode_kw(commandBuffer=commandBuffer, sourceImage=sourceImage,
                                      destinationImage=destinationImage, destinationState=destinationState,
                                      destinationStateIsTemporary=destinationStateIsTemporary)
        allocated, result = self._encode_with_state(commandBuffer, sourceImage, state, destinationImage, owner,
                                                    destinationState, destinationStateIsTemporary)
        state._consume_read()
        return (allocated, result) if destinationStateIsTemporary is not None else allocated

    def _encode_with_state(self, commandBuffer, sourceImage, state, destinationImage, owner, result_state=None,
                           result_temporary=None):
        """One state-driven encode; the caller consumes the state's read (once per distinct state).
        With ``result_state`` / ``result_temporary`` it also fills (or makes) this transpose's own state."""
        self._check_cb(commandBuffer, owner)
        saved = (self._offset, self._kernel_offset)
        self._apply_state(state, commandBuffer, owner)
        allocated = None
        try:
            if result_state is not None:
                self._check_state(result_state, commandBuffer, owner)
            elif result_temporary is not None:
                result_state = self._new_state(sourceImage, commandBuffer, bool(result_temporary))
            if destinationImage is None:  # sized like the forward convolution's source
                if not isinstance(sourceImage, MPSImage):
                    raise MPSTypeError(f"{owner}: sourceImage={sourceImage!r} must be an MPSImage")
                fmt = sourceImage.featureChannelFormat
                descriptor = MPSImageDescriptor(channelFormat=fmt, width=state.sourceWidth, height=state.sourceHeight,
                                                featureChannels=self._dfo + self.outputFeatureChannels)
                allocated = destinationImage = self._allocator.image(commandBuffer, imageDescriptor=descriptor,
                                                                     kernel=self)
            self._encode_pairs(commandBuffer, [sourceImage], [destinationImage], owner)
        except Exception:
            self._offset, self._kernel_offset = saved
            if isinstance(allocated, MPSTemporaryImage) and allocated.readCount > 0:
                allocated._read_count = 0
            raise
        if result_state is not None:
            result_state._filled_by(sourceImage, self._problem(sourceImage, destinationImage, owner))
            result_state._source_convolution = state._producer
        return allocated, result_state

    def _check_state_batch(self, cb, sources, states, destinations, owner) -> None:
        """Every element of a state-driven batch, checked before the first is encoded: a refused
        element leaves the others unwritten and the kernel's offsets as they were."""
        if destinations is not None and len(destinations) != len(sources):
            raise MPSValueError(f"{owner}: {len(destinations)} destinationImages for {len(sources)} sourceImages")
        saved = (self._offset, self._kernel_offset)
        try:
            for i, (source, state) in enumerate(zip(sources, states)):
                self._apply_state(state, cb, owner)
                if not isinstance(source, MPSImage):
                    raise MPSTypeError(f"{owner}: sourceImages[{i}]={source!r} must be an MPSImage")
                if destinations is not None:
                    self._check_pair(cb, source, destinations[i], owner, f"[{i}]")
                    self._problem(source, destinations[i], owner)
        finally:
            self._offset, self._kernel_offset = saved

    def encodeBatch(self, *, commandBuffer, sourceImages, destinationImages=None, convolutionGradientStates=None,
                    destinationStates=None, destinationStateIsTemporary=None):
        """``encodeBatch(commandBuffer:sourceImages:convolutionGradientStates:[destinationImages:])``."""
        owner = self._owner("encodeBatch")
        states = as_list(convolutionGradientStates, owner, "convolutionGradientStates", allow_none=True)
        if states is None or all(s is None for s in states):
            return super().encodeBatch(commandBuffer=commandBuffer, sourceImages=sourceImages,
                                       destinationImages=destinationImages, destinationStates=destinationStates,
                                       destinationStateIsTemporary=destinationStateIsTemporary)
        sources = as_list(sourceImages, owner, "sourceImages")
        destinationImages = as_list(destinationImages, owner, "destinationImages", allow_none=True)
        if len(states) != len(sources):
            raise MPSValueError(f"{owner}: {len(states)} convolutionGradientStates for {len(sources)} sourceImages")
        self._check_cb(commandBuffer, owner)
        self._check_state_batch(commandBuffer, sources, states, destinationImages, owner)
        outputs = [self._encode_with_state(commandBuffer, src, state,
                                           None if destinationImages is None else destinationImages[i], owner)[0]
                   for i, (src, state) in enumerate(zip(sources, states))]
        for state in {id(s): s for s in states}.values():
            state._consume_read()
        return outputs if destinationImages is None else None
