"""``MPSState``: opaque data passed between kernels, with a read count; ``MPSNNGradientState``, what a
forward kernel records for its gradient pass; the ``MPSImageSizeEncodingState`` protocol. The
convolution family's own states are in ``convolution_state.py``."""
from __future__ import annotations

import abc
import enum
from typing import Sequence

from ._api import Strict, keywords
from .errors import MPSTypeError, MPSValueError
from .types import as_bool, as_int, as_list
from .metal import CommandBufferTemporary, MTLBuffer, MTLCommandBuffer, MTLDevice, check_open_buffer


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
            self._init_state(kwargs["device"], [as_int(kwargs["bufferSize"], "MPSState", "bufferSize", 1)], None,
                             temporary=False)
        elif keys == {"resource"}:
            resource = kwargs["resource"]
            _check_resources([] if resource is None else [resource], "resource")
            self._init_state(getattr(resource, "device", None), [], [] if resource is None else [resource], False)
        elif keys == {"resources"}:
            resources = kwargs["resources"]
            if resources is not None and not isinstance(resources, (list, tuple)):
                raise MPSTypeError(f"MPSState: resources={resources!r} must be a list of MTLBuffers")
            resources = list(resources or [])
            _check_resources(resources, "resources")
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
        sizes = [] if bufferSize is None else [as_int(bufferSize, "MPSState.temporaryState", "bufferSize", 1)]
        state._init_state(commandBuffer.device, sizes, None, temporary=True)
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
        else:  # no effect on a non-temporary state's lifetime
            self._read_count = as_int(value, type(self).__name__, "readCount", 0)

    def _release(self) -> None:
        self._resources = [None] * len(self._resources)

    @property
    def resourceCount(self) -> int:
        return len(self._resources)

    def _check_index(self, index: int, owner: str) -> int:
        index = as_int(index, f"{type(self).__name__}.{owner}", "at")
        if not 0 <= index < len(self._resources):
            raise MPSValueError(f"{type(self).__name__}.{owner}: index {index} is outside its "
                                f"{len(self._resources)} resources")
        return index

    def resource(self, at: int = 0, allocateMemory: bool = True):
        """``resource(at:allocateMemory:)``: the buffer, allocated on request."""
        at = self._check_index(at, "resource")
        if self._resources[at] is None and as_bool(allocateMemory, f"{type(self).__name__}.resource", "allocateMemory"):
            self._resources[at] = self._device.makeBuffer(length=self._sizes[at])
        return self._resources[at]

    def bufferSize(self, at: int = 0) -> int:
        """``bufferSize(at:)``: bytes of a buffer resource; never allocates."""
        at = self._check_index(at, "bufferSize")
        return self._sizes[at]

    def resourceType(self, at: int = 0) -> MPSStateResourceType:
        at = self._check_index(at, "resourceType")
        return MPSStateResourceType.buffer

    def resourceSize(self) -> int:
        """Bytes of backing storage of all resources (0 when made from existing resources)."""
        return sum(self._sizes) if self._known_size else 0

    def synchronize(self, on: MTLCommandBuffer) -> None:
        """``synchronize(on:)``: our buffers need no flush."""
        check_open_buffer(on, f"{type(self).__name__}.synchronize", "on")

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


def _check_resources(resources: list, prop: str) -> None:
    for i, resource in enumerate(resources):
        if not isinstance(resource, MTLBuffer):
            where = f"[{i}]" if prop == "resources" else ""
            raise MPSTypeError(f"MPSState: {prop}{where}={resource!r} must be an MTLBuffer (textures are not "
                               "state resources here)")


class MPSNNGradientState(MPSState):
    """``MPSNNGradientState``: a snapshot of a forward kernel for its gradient pass (made by the
    forward kernel's ``resultState…`` methods, never directly): an ``MPSCNNNeuron``'s is read by
    ``MPSCNNNeuronGradient``."""

    _producer = None  # the kernel that made it
    _problem = None  # the forward encode's resolved problem, once one filled the state

    def _init_gradient_state(self, kernel, source) -> None:
        self._producer = kernel
        self._source_size = (source.width, source.height)
        self._recorded = kernel._state_snapshot()  # the properties the encode must still have

    def _filled_by(self, source, problem=None) -> None:
        """The forward encode recorded into this state: the source size it read and the
        resolved forward problem (window origin, clip size, edge mode, channel and image ranges)."""
        self._source_size = (source.width, source.height)
        self._problem = problem


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
    amount = as_int(amount, "MPSStateBatchIncrementReadCount", "amount")
    seen = {}
    for state in as_list(batch, "MPSStateBatchIncrementReadCount", "batch", allow_none=True) or ():
        if not isinstance(state, MPSState):
            raise MPSTypeError(f"MPSStateBatchIncrementReadCount: {state!r} is not an MPSState")
        seen.setdefault(id(state), state)
    for state in seen.values():
        state.readCount = state.readCount + amount
    return len(seen)
