"""``MPSState``: opaque data passed between kernels, with a read count; and the convolution family's
states: what a forward convolution records for its gradient pass (``MPSCNNConvolutionGradientState``,
``MPSCNNConvolutionTransposeGradientState``) and its weights and biases in buffers
(``MPSCNNConvolutionWeightsAndBiasesState``)."""
from __future__ import annotations

import abc
import enum
from typing import Sequence

from ._api import Strict, keywords
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNConvolutionWeightsLayout
from .errors import MPSTypeError, MPSValueError
from .metal import CommandBufferTemporary, MTLBuffer, MTLCommandBuffer, MTLDevice


class MPSStateResourceType(enum.IntEnum):
    """``MPSStateResourceType``."""

    none = 0
    buffer = 1
    texture = 2


@keywords("device", "bufferSize", "resource", "resources")
class MPSState(Strict, CommandBufferTemporary):
    """``MPSState``: zero or more buffers; temporary states live on one command buffer and are
    released when their ``readCount`` reaches 0.

    ``MPSState(device=, bufferSize=)``, ``MPSState(resource=)``, ``MPSState(resources=)``,
    ``MPSState.temporaryState(commandBuffer=[, bufferSize=])``; ``MPSState()`` is unavailable.
    Buffers are allocated lazily (``resource(at:allocateMemory:)``).
    """

    label = None

    _kind = "temporary state"

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        if keys == {"device", "bufferSize"}:
            self._init_state(kwargs["device"], [int(kwargs["bufferSize"])], None, temporary=False)
        elif keys == {"resource"}:
            resource = kwargs["resource"]
            self._init_state(getattr(resource, "device", None), [], [] if resource is None else [resource], False)
        elif keys == {"resources"}:
            resources = list(kwargs["resources"] or [])
            self._init_state(resources[0].device if resources else None, [], resources, False)
        else:
            raise MPSTypeError(f"MPSState({', '.join(sorted(keys))}): valid initializers are MPSState(device=, "
                               "bufferSize=), MPSState(resource=), MPSState(resources=) and "
                               "MPSState.temporaryState(commandBuffer=[, bufferSize=]); MPSState() is unavailable")

    @classmethod
    def temporaryState(cls, *, commandBuffer: MTLCommandBuffer, bufferSize: int | None = None) -> "MPSState":
        """``temporaryState(commandBuffer:[bufferSize:])``: ``readCount`` starts at 1."""
        if not isinstance(commandBuffer, MTLCommandBuffer):
            raise MPSTypeError(f"MPSState.temporaryState: commandBuffer={commandBuffer!r} must be an MTLCommandBuffer")
        commandBuffer._check_open("MPSState.temporaryState")
        state = cls.__new__(cls)
        state._init_state(commandBuffer.device, [] if bufferSize is None else [int(bufferSize)], None, temporary=True)
        state._cb = commandBuffer
        return state

    def _init_state(self, device: MTLDevice | None, sizes: Sequence[int], resources, temporary: bool) -> None:
        for size in sizes:
            if size < 1:
                raise MPSValueError(f"MPSState: bufferSize={size} must be >= 1")
        self._device = device
        self._sizes = list(sizes) if resources is None else [getattr(r, "length", 0) for r in resources]
        self._resources: list[MTLBuffer | None] = [None] * len(sizes) if resources is None else list(resources)
        self._temporary = temporary
        self._read_count = 1 if temporary else 0
        self._cb: MTLCommandBuffer | None = None
        self._known_size = resources is None
        self.label = None

    # -- members
    @property
    def isTemporary(self) -> bool:
        return self._temporary

    @property
    def readCount(self) -> int:
        return self._read_count

    @readCount.setter
    def readCount(self, value: int) -> None:
        if self._temporary:
            self._set_read_count(value)
        elif int(value) < 0:
            raise MPSValueError(f"{type(self).__name__}.readCount={value} must be >= 0")
        else:  # no effect on a non-temporary state's lifetime
            self._read_count = int(value)

    def _release(self) -> None:
        self._resources = [None] * len(self._resources)

    @property
    def resourceCount(self) -> int:
        return len(self._resources)

    def _check_index(self, index: int, owner: str) -> None:
        if not 0 <= index < len(self._resources):
            raise MPSValueError(f"{type(self).__name__}.{owner}: index {index} is outside its "
                                f"{len(self._resources)} resources")

    def resource(self, at: int = 0, allocateMemory: bool = True):
        """``resource(at:allocateMemory:)``: the buffer, allocated on request."""
        self._check_index(at, "resource")
        if self._resources[at] is None and allocateMemory:
            self._resources[at] = self._device.makeBuffer(length=self._sizes[at])
        return self._resources[at]

    def bufferSize(self, at: int = 0) -> int:
        """``bufferSize(at:)``: bytes of a buffer resource; never allocates."""
        self._check_index(at, "bufferSize")
        return self._sizes[at]

    def resourceType(self, at: int = 0) -> MPSStateResourceType:
        self._check_index(at, "resourceType")
        return MPSStateResourceType.buffer

    def resourceSize(self) -> int:
        """Bytes of backing storage of all resources (0 when made from existing resources)."""
        return sum(self._sizes) if self._known_size else 0

    def synchronize(self, on: MTLCommandBuffer) -> None:
        """``synchronize(on:)``: our buffers need no flush."""
        on._check_open(f"{type(self).__name__}.synchronize")

    def destinationImageDescriptor(self, sourceImages, sourceStates, kernel, suggestedDescriptor):
        """Hook of the descriptor pipeline (after the padding policy's size): the base state changes nothing."""
        return suggestedDescriptor

    # -- encode-time checks (used by kernels)
    def _check_for_encode(self, cb: MTLCommandBuffer, owner: str, role: str) -> None:
        if self._temporary:
            self._check_temporary(cb, owner, role)

    def _consume_read(self) -> None:
        if self._temporary:
            super()._consume_read()


class MPSNNGradientState(MPSState):
    """``MPSNNGradientState``: a snapshot of a forward kernel for its gradient pass (made by the
    forward kernel's ``resultState…`` methods, never directly)."""


class MPSImageSizeEncodingState(metaclass=abc.ABCMeta):
    """``MPSImageSizeEncodingState`` protocol: a state that knows the size of the image it was made
    for, ``sourceWidth`` and ``sourceHeight`` (the forward source, for a gradient state), so that a
    kernel that undoes that one (a transposed convolution) can size its destination from it.

    ``MPSCNNConvolutionGradientState`` conforms. A class of yours conforms by subclassing this and
    providing the two properties; ``isinstance(state, MPSImageSizeEncodingState)`` also holds for any
    object that has both (as Objective-C's ``conformsToProtocol`` would for a class declaring them)."""

    @property
    def sourceWidth(self) -> int:
        raise NotImplementedError("an MPSImageSizeEncodingState must provide sourceWidth")

    @property
    def sourceHeight(self) -> int:
        raise NotImplementedError("an MPSImageSizeEncodingState must provide sourceHeight")

    @classmethod
    def __subclasshook__(cls, other):
        if cls is MPSImageSizeEncodingState:
            return all(any(name in vars(base) for base in other.__mro__) for name in ("sourceWidth", "sourceHeight"))
        return NotImplemented


def MPSStateBatchIncrementReadCount(batch, amount: int) -> int:
    """Adds ``amount`` once per distinct state; returns the number of distinct states."""
    seen = {}
    for state in batch or ():
        seen.setdefault(id(state), state)
    for state in seen.values():
        state.readCount = state.readCount + int(amount)
    return len(seen)


# --------------------------------------------------------------------------------------------
# The convolution family's states


class MPSCNNConvolutionGradientState(MPSNNGradientState, MPSImageSizeEncodingState):
    """``MPSCNNConvolutionGradientState``: the forward convolution's geometry and the buffers its
    weight and bias gradients go into.

    Made by ``MPSCNNConvolution.resultState`` / ``temporaryResultState`` (or the state-returning
    encodes), filled by the forward encode that takes it. ``sourceWidth`` / ``sourceHeight`` are the
    forward source's size (``MPSImageSizeEncodingState``), which sizes a paired transpose.
    """

    def _init_gradient_state(self, convolution, source) -> None:
        self._producer = convolution  # the kernel that made it
        d = convolution._desc
        weights = d.outputFeatureChannels * d.kernelHeight * d.kernelWidth * (d.inputFeatureChannels // d._kernel_groups())
        self._sizes = [4 * weights, 4 * d.outputFeatureChannels]
        self._resources = [None, None]
        self._source_size = (source.width, source.height)
        self._recorded = convolution._state_snapshot()  # the properties the encode must still have
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

    def _filled_by(self, source, problem=None) -> None:
        """The forward encode recorded into this state: the source size it read and the
        resolved forward problem (window origin, clip size, edge mode, channel and image ranges)."""
        self._source_size = (source.width, source.height)
        self._problem = problem

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
            w_off, b_off = int(kwargs["weightsOffset"]), int(kwargs["biasesOffset"])
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
