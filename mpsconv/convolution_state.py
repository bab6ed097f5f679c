"""The convolution family's states: what a forward convolution records for its gradient pass
(``MPSCNNConvolutionGradientState``, ``MPSCNNConvolutionTransposeGradientState``) and its weights and
biases in buffers (``MPSCNNConvolutionWeightsAndBiasesState``)."""
from __future__ import annotations

from ._api import keywords
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNConvolutionWeightsLayout
from .errors import MPSTypeError, MPSValueError
from .types import as_int
from .metal import MTLBuffer
from .state import MPSImageSizeEncodingState, MPSNNGradientState, MPSState


class MPSCNNConvolutionGradientState(MPSNNGradientState, MPSImageSizeEncodingState):
    """``MPSCNNConvolutionGradientState``: the forward convolution's geometry and the buffers its
    weight and bias gradients go into.

    Made by ``MPSCNNConvolution.resultState`` / ``temporaryResultState`` (or the state-returning
    encodes), filled by the forward encode that takes it. ``sourceWidth`` / ``sourceHeight`` are the
    forward source's size (``MPSImageSizeEncodingState``), which sizes a paired transpose.
    """

    def _init_gradient_state(self, convolution, source) -> None:
        super()._init_gradient_state(convolution, source)
        d = convolution._desc
        weights = d.outputFeatureChannels * d.kernelHeight * d.kernelWidth * (d.inputFeatureChannels // d._kernel_groups())
        self._sizes = [4 * weights, 4 * d.outputFeatureChannels]
        self._resources = [None, None]
        self._forward_offset = convolution.offset

    convolution = property(lambda self: self._producer)
    sourceWidth = property(lambda self: self._source_size[0])
    sourceHeight = property(lambda self: self._source_size[1])
    gradientForWeightsLayout = property(lambda self: MPSCNNConvolutionWeightsLayout.OHWI)

    @property
    def gradientForWeights(self):
        """float32 ``[O][kH][kW][I/G]`` buffer (depthwise ``[O][kH][kW]``)."""
        return self.resource(at=0)

    @property
    def gradientForBiases(self):
        """float32 ``[O]`` buffer."""
        return self.resource(at=1)

    @property
    def forward_offset(self):
        """The forward kernel's ``offset`` when the state was made (our addition)."""
        return self._forward_offset


@keywords("weights", "biases", "device", "cnnConvolutionDescriptor", "weightsOffset", "biasesOffset")
class MPSCNNConvolutionWeightsAndBiasesState(MPSState):
    """``MPSCNNConvolutionWeightsAndBiasesState``: float32 weights ``[O][kH][kW][I/G]`` (depthwise
    ``[O][kH][kW]``) and biases ``[O]`` in buffers, from byte offsets.

    ``(weights=, biases=)``: existing buffers (biases may be None).
    ``(device=, cnnConvolutionDescriptor=)``: new zero-filled buffers of the descriptor's sizes.
    ``(weights=, weightsOffset=, biases=, biasesOffset=, cnnConvolutionDescriptor=)``: sub-ranges of
    caller buffers (may be one buffer). ``temporaryCNNConvolutionWeightsAndBiasesState(commandBuffer=,
    cnnConvolutionDescriptor=)``: temporary.
    """

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        owner = "MPSCNNConvolutionWeightsAndBiasesState"
        if keys == {"weights", "biases"}:
            weights, biases = kwargs["weights"], kwargs["biases"]
            _check_buffer(weights, owner, "weights")
            self._init_wb(weights, 0, weights.length, biases, 0, None if biases is None else biases.length, False)
        elif keys == {"device", "cnnConvolutionDescriptor"}:
            w_len, b_len = _lengths(kwargs["cnnConvolutionDescriptor"], owner)
            device = kwargs["device"]
            self._init_wb(device.makeBuffer(length=w_len), 0, w_len, device.makeBuffer(length=b_len), 0, b_len, False)
        elif keys == {"weights", "weightsOffset", "biases", "biasesOffset", "cnnConvolutionDescriptor"}:
            w_len, b_len = _lengths(kwargs["cnnConvolutionDescriptor"], owner)
            weights, biases = kwargs["weights"], kwargs["biases"]
            _check_buffer(weights, owner, "weights")
            w_off, b_off = (as_int(kwargs[name], owner, name, 0) for name in ("weightsOffset", "biasesOffset"))
            for name, off, buf, length in (("weights", w_off, weights, w_len), ("biases", b_off, biases, b_len)):
                if buf is None:
                    continue
                if off % 4 or off < 0:
                    raise MPSValueError(f"{owner}: {name}Offset={off} must be a non-negative multiple of 4")
                if off + length > buf.length:
                    raise MPSValueError(f"{owner}: {name}Offset={off} + {name}Length={length} exceeds the "
                                        f"{buf.length}-byte buffer")
            self._init_wb(weights, w_off, w_len, biases, b_off, b_len, False)
        else:
            raise MPSTypeError(f"{owner}({', '.join(sorted(keys))}): valid initializers are (weights=, biases=), "
                               "(device=, cnnConvolutionDescriptor=), (weights=, weightsOffset=, biases=, "
                               "biasesOffset=, cnnConvolutionDescriptor=)")

    @classmethod
    def temporaryCNNConvolutionWeightsAndBiasesState(cls, *, commandBuffer, cnnConvolutionDescriptor):
        """A temporary state of the descriptor's sizes, bound to ``commandBuffer`` (``readCount`` 1)."""
        owner = "MPSCNNConvolutionWeightsAndBiasesState.temporaryCNNConvolutionWeightsAndBiasesState"
        commandBuffer._check_open(owner)
        w_len, b_len = _lengths(cnnConvolutionDescriptor, owner)
        device = commandBuffer.device
        state = cls.__new__(cls)
        state._init_wb(device.makeBuffer(length=w_len), 0, w_len, device.makeBuffer(length=b_len), 0, b_len, True)
        state._cb = commandBuffer
        return state

    def _init_wb(self, weights, w_off, w_len, biases, b_off, b_len, temporary: bool) -> None:
        resources = [weights] + ([biases] if biases is not None else [])
        self._init_state(weights.device, [], resources, temporary)
        self._weights, self._biases = weights, biases
        self._offsets = (w_off, b_off)
        self._w_len, self._b_len = w_len, b_len

    weights = property(lambda self: self._weights)
    biases = property(lambda self: self._biases)
    weightsOffset = property(lambda self: self._offsets[0])
    biasesOffset = property(lambda self: self._offsets[1])

    def weight_values(self, count: int, owner: str):
        """``count`` float32 weights from ``weightsOffset`` (a view of the buffer; our addition)."""
        return self._weights.as_float32(self._offsets[0], count, owner)

    def bias_values(self, count: int, owner: str):
        """``count`` float32 biases from ``biasesOffset``, or None without a biases buffer."""
        return None if self._biases is None else self._biases.as_float32(self._offsets[1], count, owner)


def _lengths(descriptor, owner: str) -> tuple[int, int]:
    """Bytes of weights and biases a descriptor implies."""
    if not isinstance(descriptor, MPSCNNConvolutionDescriptor):
        raise MPSTypeError(f"{owner}: cnnConvolutionDescriptor={descriptor!r} must be an MPSCNNConvolutionDescriptor")
    o, kh, kw, ig = descriptor._weight_shape()
    return 4 * o * kh * kw * ig, 4 * o


def _check_buffer(buffer, owner: str, name: str) -> None:
    if not isinstance(buffer, MTLBuffer):
        raise MPSTypeError(f"{owner}: {name}={buffer!r} must be an MTLBuffer")


class MPSCNNConvolutionTransposeGradientState(MPSCNNConvolutionGradientState):
    """``MPSCNNConvolutionTransposeGradientState``: made by a transpose's ``resultState…`` or training
    encode. ``convolutionTranspose`` is that transpose; ``convolution`` the
    ``MPSCNNConvolution`` whose gradient state configured it, if one did."""

    _source_convolution = None
    convolution = property(lambda self: self._source_convolution)
    convolutionTranspose = property(lambda self: self._producer)
