"""``MPSKernel`` and ``MPSCNNKernel``: offset, clipRect, channel offsets, edgeMode, padding, encode.

The public properties are validated when set; ``encode`` validates the rest (devices, command
buffer state, aliasing, temporary read counts, batches), runs the padding policies of the allocating
forms, and hands the validated images to the kernel's encode engine (``encoder.Encoder``), which
resolves the ``ConvProblem`` through ``_resolve`` (``core.geometry.resolve_forward``: channel and
image ranges, edge mode) and records the backend's work. A call that raises records nothing and
changes no image, state or read count.
"""
from __future__ import annotations

import enum
from typing import NamedTuple, Sequence

from ._api import Strict
from . import config
from .errors import (
    MPSDeviceError, MPSTypeError, MPSValueError,
)
from .core.formats import MPSImageFeatureChannelFormat
from .core.geometry import (
    ConvProblem, MPSNNPaddingMethod, NeuronSpec, allocate, decode_padding_method, resolve_forward,
    source_region,
)
from .encoder import Encoder
from .image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from .metal import MTLCommandBuffer, MTLDevice, check_open_buffer
from .types import (
    NSUIntegerMax, MPSKernelOptions, MPSOffset, MPSRectNoClip, MTLRegion, as_bool, as_enum, as_flags, as_int, as_list,
    as_offset, as_region, as_size,
)


class MPSImageEdgeMode(enum.IntEnum):
    """``MPSImageEdgeMode``: what reads outside the source image return."""

    zero = 0
    clamp = 1
    mirror = 2
    mirrorWithEdge = 3
    constant = 4


class MPSOrigin(NamedTuple):
    """``MPSOrigin``: a position in pixels (may be fractional or negative)."""

    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


class MPSSize(NamedTuple):
    """``MPSSize``."""

    width: float = 0.0
    height: float = 0.0
    depth: float = 0.0


class MPSRegion(NamedTuple):
    """``MPSRegion``: the source region a destination size reads."""

    origin: MPSOrigin = MPSOrigin()
    size: MPSSize = MPSSize()


# --------------------------------------------------------------------------------------------
# Padding policies


class MPSNNPadding:
    """``MPSNNPadding`` protocol: subclass it for a custom policy.

    Required: ``paddingMethod() -> MPSNNPaddingMethod``. Optional: ``label()``, ``inverse()``, and,
    when the method has the ``custom`` bit, ``destinationImageDescriptor(sourceImages, sourceStates,
    kernel, suggestedDescriptor) -> MPSImageDescriptor`` (Swift
    ``destinationImageDescriptor(forSourceImages:sourceStates:for:suggestedDescriptor:)``), which may
    change any kernel property, including ``offset``.
    """

    def paddingMethod(self) -> MPSNNPaddingMethod:
        raise NotImplementedError("an MPSNNPadding must implement paddingMethod()")


class MPSNNDefaultPadding(Strict, MPSNNPadding):
    """``MPSNNDefaultPadding``: a policy that is just a ``MPSNNPaddingMethod``.

    ``MPSNNDefaultPadding(method=...)`` (ObjC ``+paddingWithMethod:``).
    """

    def __init__(self, method=MPSNNPaddingMethod.sizeSame, *, _custom_edge: bool = False):
        self._method = MPSNNPaddingMethod(as_int(method, "MPSNNDefaultPadding", "method", 0, NSUIntegerMax))
        self._custom_edge = _custom_edge

    @classmethod
    def padding(cls, method) -> "MPSNNDefaultPadding":
        """ObjC ``+paddingWithMethod:``."""
        return cls(method)

    @classmethod
    def paddingForTensorflowAveragePooling(cls) -> "MPSNNDefaultPadding":
        """TensorFlow average-pooling SAME policy: ``0x401C``; sets ``edgeMode = clamp``."""
        return cls(MPSNNPaddingMethod.custom | MPSNNPaddingMethod.sizeSame
                   | MPSNNPaddingMethod.addRemainderToBottomRight, _custom_edge=True)

    @classmethod
    def paddingForTensorflowAveragePoolingValidOnly(cls) -> "MPSNNDefaultPadding":
        """TensorFlow average-pooling VALID policy: ``0x400C``; sets ``edgeMode = clamp``."""
        return cls(MPSNNPaddingMethod.custom | MPSNNPaddingMethod.sizeValidOnly
                   | MPSNNPaddingMethod.addRemainderToBottomRight, _custom_edge=True)

    def paddingMethod(self) -> MPSNNPaddingMethod:
        return self._method

    def label(self) -> str:
        m = int(self._method)
        align = ("centered", "topLeft", "bottomRight", "reserved")[m & 3]
        rem = ("topLeft", "topRight", "bottomLeft", "bottomRight")[(m >> 2) & 3]
        size = ("validOnly", "same", "full", "reserved")[(m >> 4) & 3]
        flags = [name for name, bit in (("custom", 1 << 14), ("excludeEdges", 1 << 15), ("allowFusion", 1 << 13))
                 if m & bit]
        return f"MPSNNDefaultPadding(align {align}, remainder {rem}, size {size}{''.join(', ' + f for f in flags)})"

    def inverse(self) -> "MPSNNDefaultPadding":
        """Swaps valid-only and full, keeps same, alignment and remainder (our reading)."""
        m = int(self._method)
        size = m & 0x30
        swapped = {0x00: 0x20, 0x20: 0x00}.get(size, size)
        return MPSNNDefaultPadding((m & ~0x30) | swapped, _custom_edge=self._custom_edge)

    def destinationImageDescriptor(self, sourceImages, sourceStates, kernel, suggestedDescriptor):
        if not self._custom_edge:
            raise MPSValueError(
                f"MPSNNDefaultPadding: paddingMethod 0x{int(self._method):X} has the custom bit, but "
                "MPSNNDefaultPadding implements no custom descriptor method; drop the custom bit or use your "
                "own MPSNNPadding"
            )
        kernel.edgeMode = MPSImageEdgeMode.clamp
        return suggestedDescriptor

    def __eq__(self, other) -> bool:
        return isinstance(other, MPSNNDefaultPadding) and (self._method, self._custom_edge) == \
            (other._method, other._custom_edge)

    def __hash__(self) -> int:
        return hash((int(self._method), self._custom_edge))

    def __repr__(self) -> str:
        return self.label()


_DEFAULT_METHOD = MPSNNPaddingMethod.alignCentered | MPSNNPaddingMethod.addRemainderToTopLeft | \
    MPSNNPaddingMethod.sizeSame


# --------------------------------------------------------------------------------------------
# MPSKernel


class MPSKernel(Strict):
    """``MPSKernel``: the root of every kernel: device, options, label, copying, archiving."""

    label = None  # a public field (Strict refuses what the class does not have)

    _archivable = True

    def _init_kernel(self, device) -> None:
        if not isinstance(device, MTLDevice):
            raise MPSTypeError(f"{type(self).__name__}: device={device!r} must be an MTLDevice "
                               "(e.g. MTLCreateSystemDefaultDevice())")
        self._device = device
        self._options = MPSKernelOptions.none
        self._encoder = Encoder()
        self.label = None

    @property
    def device(self) -> MTLDevice:
        return self._device

    @property
    def options(self) -> MPSKernelOptions:
        return self._options

    @options.setter
    def options(self, value) -> None:
        self._options = as_flags(value, MPSKernelOptions, type(self).__name__, "options", ignore_unknown=True)

    @classmethod
    def supportsSecureCoding(cls) -> bool:
        return True

    def copy(self, zone=None, /, device: MTLDevice | None = None):
        """``copy(with:device:)`` / ``copy()``: an independent kernel with the same configuration."""
        if device is not None and not isinstance(device, MTLDevice):
            raise MPSTypeError(f"{type(self).__name__}.copy: device={device!r} must be an MTLDevice or None")
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._device = device or self._device
        other._drop_caches()  # plans and prepared weights are bound to one kernel and one device
        self._copy_into(other, device)
        return other

    def _drop_caches(self) -> None:
        """A new encode engine: what the old one cached was worked out for other weights, another
        descriptor or another kernel."""
        self._encoder = Encoder()

    def _copy_into(self, other, device) -> None:
        """Subclass hook: make the copy independent where a shallow copy would share mutable state."""

    def encode(self, *args, **kwargs):
        """``encode(with:)`` (positional ``NSCoder``) archives the kernel; the MPS encode forms take keywords."""
        if args:
            # any NSCoder: archives sit above the kernels (coding.py), so the protocol, not the class
            if len(args) == 1 and not kwargs and callable(getattr(args[0], "encodeRootObject", None)):
                args[0].encodeRootObject(self)
                return None
            raise MPSTypeError(f"{type(self).__name__}.encode: pass commandBuffer=, sourceImage=, ... as keywords "
                               "(or one NSCoder positionally to archive)")
        try:
            return self._encode_kw(**kwargs)
        except TypeError as exc:
            if exc.__traceback__.tb_next is None:  # the keywords fit no encode form (nothing ran)
                raise MPSTypeError(f"{type(self).__name__}.encode: {str(exc).replace('_encode_kw()', 'encode()')}"
                                   " (see the class's encode forms)") from None
            raise

    def _encode_kw(self, **kwargs):
        raise MPSTypeError(f"{type(self).__name__} has no encode method")


# --------------------------------------------------------------------------------------------
# MPSCNNKernel


class MPSCNNKernel(MPSKernel):
    """``MPSCNNKernel``: a kernel reading one source image and writing one destination image.

    Encode forms (keywords, as Swift labels):
      ``encode(commandBuffer=, sourceImage=, destinationImage=)``: uses the current ``offset``.
      ``encode(commandBuffer=, sourceImage=) -> MPSImage``: runs the padding policy (sets ``offset``),
      allocates through ``destinationImageAllocator``.
      ``encodeBatch(commandBuffer=, sourceImages=, destinationImages=)`` and
      ``encodeBatch(commandBuffer=, sourceImages=) -> [MPSImage]``.
      The ``destinationState`` forms fill a training state.
    """

    _default_padding_method = _DEFAULT_METHOD
    _edge_modes = (MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp)

    def _init_cnn_kernel(self, device) -> None:
        self._init_kernel(device)
        self._offset = MPSOffset(0, 0, 0)
        self._clipRect = MPSRectNoClip
        self._dfo = 0
        self._sfo = 0
        self._sfmax = NSUIntegerMax
        self._edgeMode = MPSImageEdgeMode.zero
        self._padding = MPSNNDefaultPadding(self._default_padding_method)
        self._allocator = MPSTemporaryImage.defaultAllocator()

    # -- properties
    @property
    def offset(self) -> MPSOffset:
        return self._offset

    @offset.setter
    def offset(self, value) -> None:
        self._offset = as_offset(value, type(self).__name__)

    @property
    def clipRect(self) -> MTLRegion:
        return self._clipRect

    @clipRect.setter
    def clipRect(self, value) -> None:
        self._clipRect = as_region(value, type(self).__name__)

    def _channel_prop(attr: str, name: str, minimum: int = 0):
        def get(self):
            return getattr(self, attr)

        def set_(self, value):
            setattr(self, attr, as_int(value, type(self).__name__, name, minimum, NSUIntegerMax))

        return property(get, set_)

    destinationFeatureChannelOffset = _channel_prop("_dfo", "destinationFeatureChannelOffset")
    sourceFeatureChannelOffset = _channel_prop("_sfo", "sourceFeatureChannelOffset")
    sourceFeatureChannelMaxCount = _channel_prop("_sfmax", "sourceFeatureChannelMaxCount")
    del _channel_prop

    @property
    def edgeMode(self) -> MPSImageEdgeMode:
        return self._edgeMode

    @edgeMode.setter
    def edgeMode(self, value) -> None:
        self._edgeMode = as_enum(value, MPSImageEdgeMode, type(self).__name__, "edgeMode")

    @property
    def padding(self) -> MPSNNPadding:
        return self._padding

    @padding.setter
    def padding(self, value) -> None:
        if value is None or not callable(getattr(value, "paddingMethod", None)):
            raise MPSTypeError(f"{type(self).__name__}: padding={value!r} must be an MPSNNPadding (never None)")
        self._padding = value

    @property
    def destinationImageAllocator(self):
        return self._allocator

    @destinationImageAllocator.setter
    def destinationImageAllocator(self, value) -> None:
        if value is None or not callable(getattr(value, "image", None)):
            raise MPSTypeError(f"{type(self).__name__}: destinationImageAllocator={value!r} must implement "
                               "image(commandBuffer, imageDescriptor=, kernel=) (never None)")
        self._allocator = value

    # Window geometry: 1 for kernels without a window (subclasses override).
    kernelWidth = property(lambda self: 1)
    kernelHeight = property(lambda self: 1)
    strideInPixelsX = property(lambda self: 1)
    strideInPixelsY = property(lambda self: 1)
    dilationRateX = property(lambda self: 1)
    dilationRateY = property(lambda self: 1)
    isBackwards = property(lambda self: False)
    isStateModified = property(lambda self: False)

    # -- subclass interface
    def _window(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(kernel, stride, dilation)`` as ``(y, x)`` pairs."""
        return (self.kernelHeight, self.kernelWidth), (self.strideInPixelsY, self.strideInPixelsX), \
            (self.dilationRateY, self.dilationRateX)

    def _channels(self) -> tuple[int | None, int | None, int]:
        """``(in_channels, out_channels, groups)``; ``None`` channels follow the source."""
        raise NotImplementedError

    def _output_channels(self, source: MPSImage) -> int:
        """Channels the kernel writes into the destination."""
        cin, cout, _ = self._channels()
        if cout is not None:
            return cout // self._subpixel() ** 2
        return max(0, min(self._sfmax, source.featureChannels - self._sfo))

    def _neuron(self) -> NeuronSpec:
        return NeuronSpec()

    def _subpixel(self) -> int:
        """``r`` of a sub-pixel kernel (its output is rearranged into r x r blocks), else 1."""
        return 1

    def _binary(self) -> tuple[int, bool]:
        """``(MPSCNNBinaryConvolutionType, useBetaScaling)`` of a binary kernel, else ``(-1, False)``."""
        return -1, False

    def _float32_weights(self) -> bool:
        """Whether the weights stay float32 (``kernelWeightsDataType`` float32) instead of MPS's float16."""
        return False

    def _params(self):
        """``(weights, bias, prelu)`` as effective float32 arrays (``None`` weights: identity)."""
        raise NotImplementedError

    _fully_connected = False

    # -- geometry queries
    def sourceRegion(self, destinationSize) -> MPSRegion:
        """``sourceRegion(destinationSize:)``: the source pixels a destination of that size reads."""
        w, h, d = as_size(destinationSize, self._owner("sourceRegion"), "destinationSize")
        kernel, stride, dilation = self._window()
        (oy, ox), (sh, sw) = source_region((self._offset.y, self._offset.x), (h, w), kernel, stride, dilation)
        return MPSRegion(MPSOrigin(ox, oy, self._offset.z), MPSSize(sw, sh, d))

    def sourceRegionForDestinationSize(self, destinationSize) -> MPSRegion:
        """ObjC spelling of ``sourceRegion(destinationSize:)``."""
        return self.sourceRegion(destinationSize)

    # -- states
    def appendBatchBarrier(self) -> bool:
        return False

    def encodingStorageSize(self, *, sourceImage, sourceStates=None, destinationImage=None) -> int:
        """Bytes of scratch memory the encode allocates: none for the base class (subclasses say theirs)."""
        return 0

    def batchEncodingStorageSize(self, *, sourceImage, sourceStates=None, destinationImage=None) -> int:
        sources = as_list(sourceImage, self._owner("batchEncodingStorageSize"), "sourceImage")
        return sum(self.encodingStorageSize(sourceImage=s) for s in sources)

    # -- descriptor pipeline
    def destinationImageDescriptor(self, *, sourceImages: Sequence[MPSImage], sourceStates=None) -> MPSImageDescriptor:
        """``destinationImageDescriptor(sourceImages:sourceStates:)``: runs the padding policy, **sets
        ``offset``** and returns the descriptor an allocating encode would use."""
        owner = f"{type(self).__name__}.destinationImageDescriptor"
        sources = as_list(sourceImages, owner, "sourceImages", allow_none=True) or []
        if len(sources) != 1 or not isinstance(sources[0], MPSImage):
            raise MPSValueError(f"{owner}: sourceImages must hold exactly one MPSImage for a unary kernel; "
                                f"got {len(sources)}")
        source = sources[0]
        method = self._padding.paddingMethod()
        rule = decode_padding_method(method, owner)
        kernel, stride, dilation = self._window()
        (h, w), (oy, ox) = self._allocated_geometry(source, kernel, stride, dilation, rule, owner)
        self._offset = MPSOffset(ox, oy, 0)
        fmt = source.featureChannelFormat
        descriptor = MPSImageDescriptor(
            channelFormat=fmt if fmt != MPSImageFeatureChannelFormat.none else MPSImageFeatureChannelFormat.float16,
            width=w, height=h, featureChannels=self._dfo + self._output_channels(source), numberOfImages=1)
        for state in sourceStates or ():
            hook = getattr(state, "destinationImageDescriptor", None)
            if hook is not None:
                descriptor = hook(sources, sourceStates, self, descriptor)
        if rule.custom:
            custom = getattr(self._padding, "destinationImageDescriptor", None)
            if custom is None:
                raise MPSValueError(f"{owner}: the padding policy sets the custom bit (0x4000) but does not "
                                    "implement destinationImageDescriptor(sourceImages, sourceStates, kernel, "
                                    "suggestedDescriptor)")
            descriptor = custom(sources, sourceStates, self, descriptor)
            if not isinstance(descriptor, MPSImageDescriptor):
                raise MPSTypeError(f"{owner}: the custom padding policy returned {descriptor!r}, not an "
                                   "MPSImageDescriptor")
        return descriptor

    def _allocated_geometry(self, source, kernel, stride, dilation, rule, owner):
        return allocate((source.height, source.width), kernel, stride, dilation, rule, owner)

    # -- encode: validation and recording
    def _owner(self, what: str = "encode") -> str:
        return f"{type(self).__name__}.{what}"

    def _resolve(self, source: MPSImage, destination: MPSImage, owner: str) -> ConvProblem:
        return self._resolve_with(source, destination, owner)

    def _resolve_with(self, source: MPSImage, destination: MPSImage, owner: str, kernel_offset=None) -> ConvProblem:
        if self._edgeMode not in self._edge_modes:
            allowed = " and ".join(m.name for m in self._edge_modes)
            raise MPSValueError(f"{owner}: edgeMode={self._edgeMode.name} is not defined for this kernel; use "
                                f"{allowed}")
        cin, cout, groups = self._channels()
        kernel, stride, dilation = self._window()
        return resolve_forward(
            owner=owner,
            src_shape=(source.numberOfImages, source.height, source.width, source.featureChannels),
            dst_shape=(destination.numberOfImages, destination.height, destination.width,
                       destination.featureChannels),
            offset=tuple(self._offset), clip=(tuple(self._clipRect.origin), tuple(self._clipRect.size)),
            kernel=kernel, stride=stride, dilation=dilation,
            src_channel_offset=self._sfo, src_channel_max=self._sfmax, dst_channel_offset=self._dfo,
            in_channels=cin, out_channels=cout, groups=groups, edge=int(self._edgeMode), neuron=self._neuron(),
            fully_connected=self._fully_connected,
            formats=(int(source.featureChannelFormat), int(destination.featureChannelFormat)),
            subpixel=self._subpixel(),
            kernel_offset=kernel_offset,
            binary=self._binary(),
            reduced_precision=bool(self._options & MPSKernelOptions.allowReducedPrecision),
            float32_weights=self._float32_weights(),
        )

    def _check_pair(self, cb, source, destination, owner: str, index: str = "") -> None:
        if not isinstance(source, MPSImage):
            raise MPSTypeError(f"{owner}: sourceImage{index}={source!r} must be an MPSImage")
        if not isinstance(destination, MPSImage):
            raise MPSTypeError(f"{owner}: destinationImage{index}={destination!r} must be an MPSImage")
        for image, role in ((source, "sourceImage" + index), (destination, "destinationImage" + index)):
            if image.device is not self._device:
                raise MPSDeviceError(f"{owner}: {role} is on {image.device.torch_device}; the kernel is on "
                                     f"{self._device.torch_device}")
            image._check_for_encode(cb, owner, role)

    def _check_cb(self, cb, owner: str) -> None:
        if not isinstance(cb, MTLCommandBuffer):
            raise MPSTypeError(f"{owner}: commandBuffer={cb!r} must be an MTLCommandBuffer")
        if cb._device is not self._device:
            raise MPSDeviceError(f"{owner}: the command buffer is on {cb.device.torch_device}; the kernel is on "
                                 f"{self._device.torch_device}")

    def _settings(self) -> tuple:
        """The kernel's side of the engine's plan key (``Encoder.plan``): the properties an encode reads that can change without
        dropping the caches, and the backend setting."""
        return (self._offset, self._clipRect, self._sfo, self._sfmax, self._dfo, self._edgeMode,
                getattr(self, "_kernel_offset", None), config.backend(), self._options)

    def _problem(self, source: MPSImage, destination: MPSImage, owner: str) -> ConvProblem:
        """The resolved problem of encoding ``source`` into ``destination`` now (the engine's plan)."""
        return self._encoder.plan(self, source, destination, owner).problem

    def _encode_pairs(self, cb, sources, destinations, owner) -> None:
        """Validate every pair, then hand them to the encode engine, which records them all (nothing is
        recorded if any pair is bad). A pair this kernel encoded last time with the same settings
        repeats what it recorded then (``Encoder.repeat``)."""
        self._check_cb(cb, owner)
        cb._begin_encode(owner)
        try:
            engine = self._encoder
            if len(sources) == 1 and engine.repeat(self, cb, sources[0], destinations[0]):
                return
            batch = len(sources) > 1
            roots = {id(s._root) for s in sources if isinstance(s, MPSImage)}
            pairs = list(zip(sources, destinations))
            for i, (src, dst) in enumerate(pairs):
                index = f"[{i}]" if batch else ""
                self._check_pair(cb, src, dst, owner, index)
                if id(dst._root) in roots:
                    what = "a source image of the batch" if batch else "the source image"
                    raise MPSValueError(f"{owner}: destinationImage{index} shares storage with {what}; the "
                                        "destination may not alias a source")
            if batch:
                _check_uniform_batch(sources, owner, "sourceImages")
            engine.encode(self, cb, pairs, owner)
        finally:
            cb._end_encode()

    # -- training states: what the forward encode records for the gradient pass (kernels that make one
    # name its class in _result_state_class)
    def _state_snapshot(self) -> tuple:
        return (self._offset, self._clipRect, self._edgeMode, self._sfo, self._sfmax, self._dfo)

    def _result_state_class(self):
        """The state this kernel's training encodes fill; None for kernels that make none."""
        return None

    def _new_state(self, source, commandBuffer, temporary: bool):
        state_class = self._result_state_class()
        if state_class is None:
            raise MPSTypeError(f"{type(self).__name__} makes no training state: mpsconv has no gradient kernel for it")
        if not isinstance(source, MPSImage):
            raise MPSTypeError(f"{type(self).__name__}: sourceImage={source!r} must be an MPSImage")
        if temporary:
            state = state_class.temporaryState(commandBuffer=commandBuffer)
        else:
            state = state_class.__new__(state_class)
            state._init_state(source.device, [], None, temporary=False)
        state._init_gradient_state(self, source)
        return state

    def resultState(self, *, sourceImage, sourceStates=None, destinationImage=None):
        """``resultState(sourceImage:sourceStates:destinationImage:)``: a new (non-temporary) gradient
        state for the encode that takes it (None for a kernel that makes none). Make it after every
        property (and the padding policy's ``offset``) is final."""
        if self._result_state_class() is None:
            return None
        return self._new_state(sourceImage, None, temporary=False)

    def temporaryResultState(self, *, commandBuffer, sourceImage, sourceStates=None, destinationImage=None):
        """``temporaryResultState(commandBuffer:sourceImage:sourceStates:destinationImage:)``."""
        if self._result_state_class() is None:
            return None
        return self._new_state(sourceImage, commandBuffer, temporary=True)

    def resultStateBatch(self, *, sourceImage, sourceStates=None, destinationImage=None):
        """One state per source; where ``isResultStateReusedAcrossBatch()``, one object for the batch."""
        if self._result_state_class() is None:
            return None
        return self._new_states(as_list(sourceImage, self._owner("resultStateBatch"), "sourceImage"), None, False)

    def temporaryResultStateBatch(self, *, commandBuffer, sourceImage, sourceStates=None, destinationImage=None):
        if self._result_state_class() is None:
            return None
        check_open_buffer(commandBuffer, self._owner("temporaryResultStateBatch"))
        return self._new_states(as_list(sourceImage, self._owner("temporaryResultStateBatch"), "sourceImage"),
                                commandBuffer, True)

    #: What the padding policy of an allocating encode may set (restored when the encode is refused).
    _placement_fields = ("_offset", "_edgeMode")

    #: Whether a batch's training encodes share one state (a convolution's sums its weight gradients).
    _state_reused_across_batch = True

    def isResultStateReusedAcrossBatch(self) -> bool:
        return self._result_state_class() is not None and self._state_reused_across_batch

    def _new_states(self, sources: list, commandBuffer, temporary: bool) -> list:
        if not sources:
            raise MPSValueError(f"{type(self).__name__}: a batch of no source images has no states")
        if self.isResultStateReusedAcrossBatch():
            return [self._new_state(sources[0], commandBuffer, temporary)] * len(sources)
        return [self._new_state(source, commandBuffer, temporary) for source in sources]

    @staticmethod
    def _fill_states(states, sources, destinations, problem_of) -> None:
        """Each distinct state records the first encode that wrote it."""
        seen = set()
        for state, source, destination in zip(states, sources, destinations):
            if state is not None and id(state) not in seen:
                seen.add(id(state))
                state._filled_by(source, problem_of(source, destination))

    def _check_state(self, state, cb, owner: str) -> None:
        state_class = self._result_state_class()
        if state_class is None or not isinstance(state, state_class):
            expected = "no state" if state_class is None else f"an {state_class.__name__}"
            raise MPSTypeError(f"{owner}: destinationState={type(state).__name__}; this kernel takes {expected} "
                               "(from its resultState)")
        if state._producer is not self:
            raise MPSValueError(f"{owner}: destinationState was made by another kernel; make it with this "
                                "kernel's resultState / temporaryResultState")
        if state._recorded != self._state_snapshot():
            raise MPSValueError(f"{owner}: the kernel's offset, clipRect, edgeMode or channel offsets changed "
                                "after destinationState was made; make the state after configuring the kernel")
        state._check_for_encode(cb, owner, "destinationState")

    def _encode_kw(self, *, commandBuffer, sourceImage, destinationImage=None, destinationState=None,
                   destinationStateIsTemporary=None):
        owner = self._owner()
        if destinationStateIsTemporary is not None:
            destinationStateIsTemporary = as_bool(destinationStateIsTemporary, owner, "destinationStateIsTemporary")
        if destinationImage is None:
            if destinationStateIsTemporary is None:
                return self._encode_allocating(commandBuffer, [sourceImage], owner)[0]
            images, states = self._encode_allocating(commandBuffer, [sourceImage], owner,
                                                     state_temporary=bool(destinationStateIsTemporary))
            return images[0], states[0]
        if destinationStateIsTemporary is not None:
            raise MPSTypeError(f"{owner}: destinationStateIsTemporary= goes with the allocating encode (no "
                               "destinationImage=); the manual form takes destinationState=")
        if destinationState is not None:
            self._check_cb(commandBuffer, owner)
            self._check_state(destinationState, commandBuffer, owner)
        self._encode_pairs(commandBuffer, [sourceImage], [destinationImage], owner)
        if destinationState is not None:
            destinationState._filled_by(sourceImage, self._problem(sourceImage, destinationImage, owner))
        return None

    def encodeBatch(self, *, commandBuffer, sourceImages, destinationImages=None, destinationStates=None,
                    destinationStateIsTemporary=None):
        """``encodeBatch(commandBuffer:sourceImages:[destinationImages:])``."""
        owner = self._owner("encodeBatch")
        sources = as_list(sourceImages, owner, "sourceImages")
        if destinationStateIsTemporary is not None:
            destinationStateIsTemporary = as_bool(destinationStateIsTemporary, owner, "destinationStateIsTemporary")
        destinationStates = as_list(destinationStates, owner, "destinationStates", allow_none=True)
        if destinationImages is None:
            if destinationStateIsTemporary is None:
                return self._encode_allocating(commandBuffer, sources, owner)
            return self._encode_allocating(commandBuffer, sources, owner,
                                           state_temporary=bool(destinationStateIsTemporary))
        if destinationStateIsTemporary is not None:
            raise MPSTypeError(f"{owner}: destinationStateIsTemporary= goes with the allocating encode (no "
                               "destinationImages=); the manual form takes destinationStates=")
        destinations = as_list(destinationImages, owner, "destinationImages")
        if len(sources) != len(destinations):
            raise MPSValueError(f"{owner}: sourceImages has {len(sources)} images, destinationImages "
                                f"{len(destinations)}; they must have the same length")
        states = {id(s): s for s in destinationStates or () if s is not None}.values()
        if destinationStates is not None:
            if len(destinationStates) != len(sources):
                raise MPSValueError(f"{owner}: destinationStates has {len(destinationStates)} states for "
                                    f"{len(sources)} sourceImages")
            self._check_cb(commandBuffer, owner)
            for state in states:
                self._check_state(state, commandBuffer, owner)
        if sources:
            self._encode_pairs(commandBuffer, sources, destinations, owner)
        if destinationStates is not None:
            self._fill_states(destinationStates, sources, destinations,
                              lambda source, destination: self._problem(source, destination, owner))
        return None

    def _encode_allocating(self, cb, sources: list, owner: str, state_temporary: bool | None = None):
        """Padding policy -> allocator -> manual encode, per source. With
        ``state_temporary`` set, also makes the result states after allocating and returns
        ``(images, states)``."""
        self._check_cb(cb, owner)
        cb._check_open(owner)
        for i, source in enumerate(sources):
            if not isinstance(source, MPSImage):
                raise MPSTypeError(f"{owner}: sourceImage={source!r} must be an MPSImage")
            if source.numberOfImages != 1:
                raise MPSValueError(f"{owner}: the allocating encode needs sources with numberOfImages == 1; "
                                    f"sourceImage{'[%d]' % i if len(sources) > 1 else ''} has "
                                    f"{source.numberOfImages} (use batchRepresentation())")
        if len(sources) > 1:
            _check_uniform_batch(sources, owner, "sourceImages")
        saved = {name: getattr(self, name) for name in self._placement_fields}
        destinations = []
        try:
            descriptor = self.destinationImageDescriptor(sourceImages=sources[:1])
            batch_alloc = getattr(self._allocator, "imageBatch", None)
            if len(sources) > 1 and batch_alloc is not None:
                destinations = list(batch_alloc(cb, imageDescriptor=descriptor, kernel=self, count=len(sources)))
            else:
                destinations = [self._allocator.image(cb, imageDescriptor=descriptor, kernel=self) for _ in sources]
            states = None if state_temporary is None else self._new_states(sources, cb, state_temporary)
            self._encode_pairs(cb, sources, destinations, owner)
            if states is not None:
                self._fill_states(states, sources, destinations,
                                  lambda source, destination: self._problem(source, destination, owner))
        except Exception:
            self.__dict__.update(saved)  # a refused encode leaves the placement the policy set as it was
            for image in destinations:  # never used: release without a leak warning
                if isinstance(image, MPSTemporaryImage) and image.readCount > 0:
                    image._read_count = 0
            raise
        return destinations if state_temporary is None else (destinations, states)


def kernel_offset_property(axis: int, name: str) -> property:
    """``kernelOffsetY`` (axis 0) or ``kernelOffsetX`` (axis 1) of a backwards kernel: an integer
    kept in ``_kernel_offset`` ``(y, x)``."""
    def get(self) -> int:
        return self._kernel_offset[axis]

    def set_(self, value) -> None:
        offsets = list(self._kernel_offset)
        offsets[axis] = as_int(value, type(self).__name__, name)
        self._kernel_offset = tuple(offsets)

    return property(get, set_, doc=f"``{name}``: the window's placement on the zero-inserted source.")


def _check_uniform_batch(images: list, owner: str, name: str) -> None:
    first = images[0]
    for i, image in enumerate(images[1:], 1):
        if (image.width, image.height, image.featureChannels, image.featureChannelFormat) != \
                (first.width, first.height, first.featureChannels, first.featureChannelFormat):
            raise MPSValueError(f"{owner}: {name}[{i}] is {image.width}x{image.height}x{image.featureChannels} "
                                f"{image.featureChannelFormat.name}; {name}[0] is {first.width}x{first.height}x"
                                f"{first.featureChannels} {first.featureChannelFormat.name}; a batch must agree")


