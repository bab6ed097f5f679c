"""``MPSKernel`` and ``MPSCNNKernel``: offset, clipRect, channel offsets, edgeMode, padding, encode.

The public properties are validated when set; ``encode`` validates everything else (devices,
command buffer state, aliasing, temporary read counts, channel and image ranges, edge mode), asks
``geometry.resolve_forward`` for the ``ConvProblem`` and only then records the backend call in the
command buffer. A call that raises records nothing and changes no image, state or read count.
Spec: ``kernel-image.md`` §2, §3.
"""
from __future__ import annotations

import enum
import os
import sys
from typing import NamedTuple, Sequence

import numpy as np
import torch

from . import backends, config, memory
from .errors import (
    MPSDeviceError, MPSTypeError, MPSValueError,
)
from .geometry import (
    ConvProblem, MPSNNPaddingMethod, NeuronSpec, allocate, decode_padding_method, resolve_forward,
    source_region,
)
from .image import MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSTemporaryImage
from .metal import MTLCommandBuffer, MTLDevice
from .types import NSUIntegerMax, MPSOffset, MPSRectNoClip, MTLRegion, as_offset, as_region


class MPSImageEdgeMode(enum.IntEnum):
    """``MPSImageEdgeMode``: what reads outside the source image return."""

    zero = 0
    clamp = 1
    mirror = 2
    mirrorWithEdge = 3
    constant = 4


class MPSKernelOptions(enum.IntFlag):
    """``MPSKernelOptions``."""

    none = 0
    skipAPIValidation = 1 << 0
    allowReducedPrecision = 1 << 1
    disableInternalTiling = 1 << 2
    insertDebugGroups = 1 << 3
    verbose = 1 << 4


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


class MPSNNDefaultPadding(MPSNNPadding):
    """``MPSNNDefaultPadding``: a policy that is just a ``MPSNNPaddingMethod``.

    ``MPSNNDefaultPadding(method=...)`` (ObjC ``+paddingWithMethod:``).
    """

    def __init__(self, method=MPSNNPaddingMethod.sizeSame, *, _custom_edge: bool = False):
        try:
            self._method = MPSNNPaddingMethod(int(method))
        except (TypeError, ValueError):
            raise MPSTypeError(f"MPSNNDefaultPadding: method={method!r} must be an MPSNNPaddingMethod") from None
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
        """Swaps valid-only and full, keeps same, alignment and remainder (spec §3.4 OPEN)."""
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


class MPSKernel:
    """``MPSKernel``: the root of every kernel: device, options, label, copying, archiving."""

    _archivable = True

    def _init_kernel(self, device) -> None:
        if not isinstance(device, MTLDevice):
            raise MPSTypeError(f"{type(self).__name__}: device={device!r} must be an MTLDevice "
                               "(e.g. MTLCreateSystemDefaultDevice())")
        self._device = device
        self._options = MPSKernelOptions.none
        self.label = None

    @property
    def device(self) -> MTLDevice:
        return self._device

    @property
    def options(self) -> MPSKernelOptions:
        return self._options

    @options.setter
    def options(self, value) -> None:
        self._options = MPSKernelOptions(int(value) & 0x1F)  # unknown bits are ignored

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
        for cache in ("_plan_cache", "_prepared_cache", "_bound_cache", "_repeat"):
            self.__dict__.pop(cache, None)

    def _copy_into(self, other, device) -> None:
        """Subclass hook: make the copy independent where a shallow copy would share mutable state."""

    def encode(self, *args, **kwargs):
        """``encode(with:)`` (positional ``NSCoder``) archives the kernel; the MPS encode forms take keywords."""
        if args:
            from .coding import NSCoder  # here, not per encode: a function-level import costs ~0.6 µs a call

            if len(args) == 1 and not kwargs and isinstance(args[0], NSCoder):
                args[0].encodeRootObject(self)
                return None
            raise MPSTypeError(f"{type(self).__name__}.encode: pass commandBuffer=, sourceImage=, ... as keywords "
                               "(or one NSCoder positionally to archive)")
        return self._encode_kw(**kwargs)

    def _encode_kw(self, **kwargs):
        raise MPSTypeError(f"{type(self).__name__} has no encode method")


# --------------------------------------------------------------------------------------------
# MPSCNNKernel


class _Pending(NamedTuple):
    problem: ConvProblem
    backend: object
    plan: object
    scratch: int  # the backend's scratch bytes for the whole problem
    source: MPSImage
    destination: MPSImage


class _Repeat(NamedTuple):
    """A validated encode kept for ``_encode_repeat``: its images and their storages when it ran, the
    kernel's ``_settings()`` then, its scratch bytes, and what it recorded (``(backend, bound,
    prepared)``, None for an empty problem)."""
    source: MPSImage
    destination: MPSImage
    src_storage: object
    dst_storage: object
    settings: tuple
    scratch: int
    work: tuple | None


class MPSCNNKernel(MPSKernel):
    """``MPSCNNKernel``: a kernel reading one source image and writing one destination image.

    Encode forms (keywords, as Swift labels):
      ``encode(commandBuffer=, sourceImage=, destinationImage=)``: uses the current ``offset``.
      ``encode(commandBuffer=, sourceImage=) -> MPSImage``: runs the padding policy (sets ``offset``),
      allocates through ``destinationImageAllocator``.
      ``encodeBatch(commandBuffer=, sourceImages=, destinationImages=)`` and
      ``encodeBatch(commandBuffer=, sourceImages=) -> [MPSImage]``.
      The ``destinationState`` forms record training state (issue 4).
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
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise MPSTypeError(f"{type(self).__name__}: {name}={value!r} must be an integer")
            if not minimum <= value <= NSUIntegerMax:
                raise MPSValueError(f"{type(self).__name__}: {name}={value} must be in 0...2**64-1")
            setattr(self, attr, int(value))

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
        try:
            self._edgeMode = MPSImageEdgeMode(int(value))
        except (TypeError, ValueError):
            raise MPSValueError(f"{type(self).__name__}: edgeMode={value!r} is not an MPSImageEdgeMode (0...4)") from None

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

    def _params(self):
        """``(weights, bias, prelu)`` as effective float32 arrays (``None`` weights: identity)."""
        raise NotImplementedError

    _fully_connected = False

    # -- geometry queries
    def sourceRegion(self, destinationSize) -> MPSRegion:
        """``sourceRegion(destinationSize:)``: the source pixels a destination of that size reads."""
        w, h, d = (int(v) for v in destinationSize)
        kernel, stride, dilation = self._window()
        (oy, ox), (sh, sw) = source_region((self._offset.y, self._offset.x), (h, w), kernel, stride, dilation)
        return MPSRegion(MPSOrigin(ox, oy, self._offset.z), MPSSize(sw, sh, d))

    def sourceRegionForDestinationSize(self, destinationSize) -> MPSRegion:
        """ObjC spelling of ``sourceRegion(destinationSize:)``."""
        return self.sourceRegion(destinationSize)

    # -- states (training comes with issue 4)
    def isResultStateReusedAcrossBatch(self) -> bool:
        return False

    def appendBatchBarrier(self) -> bool:
        return False

    def resultState(self, *, sourceImage, sourceStates=None, destinationImage=None):
        """Base class: this kernel makes no state."""
        return None

    def resultStateBatch(self, *, sourceImage, sourceStates=None, destinationImage=None):
        return None

    def temporaryResultState(self, *, commandBuffer, sourceImage, sourceStates=None, destinationImage=None):
        return None

    def temporaryResultStateBatch(self, *, commandBuffer, sourceImage, sourceStates=None, destinationImage=None):
        return None

    def encodingStorageSize(self, *, sourceImage, sourceStates=None, destinationImage=None) -> int:
        """Bytes of scratch memory the encode allocates: none for the base class (subclasses say theirs)."""
        return 0

    def batchEncodingStorageSize(self, *, sourceImage, sourceStates=None, destinationImage=None) -> int:
        return sum(self.encodingStorageSize(sourceImage=s) for s in sourceImage)

    # -- descriptor pipeline
    def destinationImageDescriptor(self, *, sourceImages: Sequence[MPSImage], sourceStates=None) -> MPSImageDescriptor:
        """``destinationImageDescriptor(sourceImages:sourceStates:)``: runs the padding policy, **sets
        ``offset``** and returns the descriptor an allocating encode would use."""
        owner = f"{type(self).__name__}.destinationImageDescriptor"
        sources = list(sourceImages) if sourceImages is not None else []
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
        """The kernel's side of ``_plan``'s key: the properties an encode reads that can change without
        dropping the caches, and the backend setting."""
        return (self._offset, self._clipRect, self._sfo, self._sfmax, self._dfo, self._edgeMode,
                getattr(self, "_kernel_offset", None), config.backend(), self._options)

    def _plan(self, source: MPSImage, destination: MPSImage, owner: str) -> tuple:
        """``(problem, backend, plan)`` for this encode, resolved once per distinct configuration.

        The key holds everything ``_resolve`` and backend selection read apart from the kernel's
        weights and descriptor, whose changes drop the cache (``_drop_caches``); so a hit is exactly
        what resolving again would give. Only successful resolutions are cached.
        """
        key = (source._n, source._h, source._w, source._c, source._format, destination._n, destination._h,
               destination._w, destination._c, destination._format, self._settings())
        cache = self.__dict__.setdefault("_plan_cache", {})
        entry = cache.get(key)
        if entry is None:
            problem = self._resolve(source, destination, owner)
            backend, plan = backends.choose(problem, self._device)
            entry = (problem, backend, plan, 0 if problem.empty else backend.scratch_bytes(problem))
            if len(cache) >= 64:
                cache.clear()
            cache[key] = entry
        return entry

    def _fit(self, pending: list[_Pending], owner: str, new: int) -> list:
        """Per pending item, None (run it whole) or its tiles' ``(backend, plan)``: the tiles that keep
        the scratch memory under the budget (``memory``). Raises ``MPSMemoryError`` when the ``new``
        bytes of storage the encode allocates plus its largest scratch would not fit."""
        available = memory.available(self._device, new, max(item.scratch for item in pending))
        if available is None:
            return [None] * len(pending)
        budget, pieces, peak = memory.tile_budget(self._device, available), [], 0
        for item in pending:
            if item.scratch <= budget:
                pieces.append(None)
                peak = max(peak, item.scratch)
                continue
            parts = memory.split(item.problem, item.backend, budget)
            peak = max(peak, *(item.backend.scratch_bytes(part) for part in parts))
            pieces.append([(item.backend, backends.plan(item.backend, part, self._device)) for part in parts])
        memory.check(owner, self._device, new, peak, available)
        return pieces

    def _record(self, cb: MTLCommandBuffer, pending: list[_Pending], pieces: list) -> None:
        """Record validated work (whole, or as the tiles ``_fit`` chose), then consume one read of
        each distinct temporary source."""
        for item, tiles in zip(pending, pieces):
            if item.problem.empty:
                continue
            prepared = self._prepared(item.backend, item.problem.src_format)
            if tiles is None:
                cb._record(_Work(item.backend, self._bound(item), prepared, self))
                continue
            src, dst = item.source._ensure_storage(), item.destination._ensure_storage()
            for backend, plan in tiles:
                cb._record(_Work(backend, backend.bind(plan, src, dst), prepared, self))
        seen = set()
        for item in pending:
            if id(item.source) not in seen:
                seen.add(id(item.source))
                item.source._consume_read()

    def _bound(self, item: _Pending):
        """The backend's views of this encode's storages; reused while the kernel encodes the same images
        (each entry holds its storages, so their ids cannot be reused while it is cached)."""
        src, dst = item.source._ensure_storage(), item.destination._ensure_storage()
        cache = self.__dict__.setdefault("_bound_cache", {})
        key = (id(item.plan), id(src), id(dst))
        entry = cache.get(key)
        if entry is None or entry[0] is not item.plan:
            if len(cache) >= 8:
                cache.clear()
            entry = cache[key] = (item.plan, item.backend.bind(item.plan, src, dst))
        return entry[1]

    def _prepared(self, backend, src_format: int):
        """The kernel's parameters in ``backend``'s layout for sources of ``src_format`` (kept until the
        weights change): bfloat16 sources take bfloat16-rounded weights (``round_for_source``)."""
        cache = self.__dict__.setdefault("_prepared_cache", {})
        bfloat16 = src_format == MPSImageFeatureChannelFormat.bfloat16
        key = (backend.name, bfloat16)
        prepared = cache.get(key)  # one look-up: another thread's _drop_caches may empty the dict
        if prepared is None:
            from .datasource import round_for_source  # datasource -> descriptor -> neuron imports this module

            weights, *rest = self._params()
            if isinstance(weights, np.ndarray):
                weights = round_for_source(weights, src_format)
            prepared = cache[key] = backend.prepare(weights, *rest, self._device)
        return prepared

    def _encode_pairs(self, cb, sources, destinations, owner) -> None:
        """Validate every pair, then record them all (nothing is recorded if any pair is bad)."""
        self._check_cb(cb, owner)
        cb._begin_encode(owner)
        try:
            if len(sources) == 1 and self._encode_repeat(cb, sources[0], destinations[0]):
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
            # images that cannot exist are refused before planning (on CUDA, planning may autotune)
            new = memory.unallocated_bytes([image for pair in pairs for image in pair])
            if new:
                memory.check(owner, self._device, new, 0, memory.available(self._device, new, 0))
            pending = [_Pending(*self._plan(src, dst, owner), src, dst) for src, dst in pairs]
            if batch:
                _check_uniform_batch(sources, owner, "sourceImages")
            pieces = self._fit(pending, owner, new)
            self._record(cb, pending, pieces)
            if not batch:
                self._remember(pending[0], pieces[0])
        finally:
            cb._end_encode()

    def _remember(self, item: _Pending, tiles) -> None:
        """Keep what this validated encode recorded, for ``_encode_repeat``: when it ran whole, of plain
        images with storage (a temporary image's read count and command buffer are checked on every
        encode, and allocating storage is checked against the memory there is). A few (source,
        destination) pairs are kept, so that a kernel that alternates between images (ping-pong
        buffers) repeats too; each entry holds its images, so their ids cannot be reused meanwhile."""
        cache = self.__dict__.setdefault("_repeat", {})
        key = (id(item.source), id(item.destination))
        cache.pop(key, None)
        images = (item.source, item.destination)
        if tiles is not None or any(isinstance(i, MPSTemporaryImage) or i._storage is None for i in images):
            return
        work = None
        if not item.problem.empty:
            work = (item.backend, self._bound(item), self._prepared(item.backend, item.problem.src_format))
        if len(cache) >= 8:
            cache.clear()
        cache[key] = _Repeat(item.source, item.destination, item.source._storage, item.destination._storage,
                             self._settings(), item.scratch, work)

    def _encode_repeat(self, cb, source, destination) -> bool:
        """The steady-state encode (most encodes of a network after its first pass): a source and
        destination (same storages) this kernel has encoded with the same settings (weights and
        descriptor changes drop these), so validation and planning would give what they gave then;
        only the command buffer (already checked) and the memory budget can differ. Records the same
        work and returns True, else returns False and the full encode runs."""
        last = self.__dict__.get("_repeat", {}).get((id(source), id(destination)))
        if last is None or last.source is not source or last.destination is not destination or \
                source._storage is not last.src_storage or destination._storage is not last.dst_storage or \
                last.settings != self._settings() or memory.available(self._device, 0, last.scratch) is not None:
            return False
        if last.work is not None:
            backend, bound, prepared = last.work
            cb._record(_Work(backend, bound, prepared, self))
        return True

    # -- states (kernels that make one override _new_state and _check_state)
    def _new_state(self, source, commandBuffer, temporary: bool):
        raise NotImplementedError(f"{type(self).__name__} makes no training state here yet: its gradient kernel "
                                  "is not in any issue")

    def _check_state(self, state, cb, owner: str) -> None:
        """A destination state must come from this kernel, with the properties the encode uses."""
        self._new_state(None, cb, False)

    def _encode_kw(self, *, commandBuffer, sourceImage, destinationImage=None, destinationState=None,
                   destinationStateIsTemporary=None):
        owner = self._owner()
        if destinationImage is None:
            if destinationStateIsTemporary is None:
                return self._encode_allocating(commandBuffer, [sourceImage], owner)[0]
            images, state = self._encode_allocating(commandBuffer, [sourceImage], owner,
                                                    state_temporary=bool(destinationStateIsTemporary))
            return images[0], state
        if destinationStateIsTemporary is not None:
            raise MPSTypeError(f"{owner}: destinationStateIsTemporary= goes with the allocating encode (no "
                               "destinationImage=); the manual form takes destinationState=")
        if destinationState is not None:
            self._check_cb(commandBuffer, owner)
            self._check_state(destinationState, commandBuffer, owner)
        self._encode_pairs(commandBuffer, [sourceImage], [destinationImage], owner)
        if destinationState is not None:
            destinationState._filled_by(sourceImage, self._plan(sourceImage, destinationImage, owner)[0])
        return None

    def encodeBatch(self, *, commandBuffer, sourceImages, destinationImages=None, destinationStates=None,
                    destinationStateIsTemporary=None):
        """``encodeBatch(commandBuffer:sourceImages:[destinationImages:])``."""
        owner = self._owner("encodeBatch")
        sources = list(sourceImages)
        if destinationImages is None:
            if destinationStateIsTemporary is None:
                return self._encode_allocating(commandBuffer, sources, owner)
            images, state = self._encode_allocating(commandBuffer, sources, owner,
                                                    state_temporary=bool(destinationStateIsTemporary))
            return images, [state] * len(sources)  # one state for the batch (isResultStateReusedAcrossBatch)
        if destinationStateIsTemporary is not None:
            raise MPSTypeError(f"{owner}: destinationStateIsTemporary= goes with the allocating encode (no "
                               "destinationImages=); the manual form takes destinationStates=")
        destinations = list(destinationImages)
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
        for state in states:
            state._filled_by(sources[0], self._plan(sources[0], destinations[0], owner)[0])
        return None

    def _encode_allocating(self, cb, sources: list, owner: str, state_temporary: bool | None = None):
        """Padding policy -> allocator -> manual encode, per source (spec §2.7). With
        ``state_temporary`` set, also makes the result state after allocating and returns
        ``(images, state)`` (one state for the whole batch)."""
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
        saved = (self._offset, self._edgeMode)
        destinations = []
        try:
            descriptor = self.destinationImageDescriptor(sourceImages=sources[:1])
            batch_alloc = getattr(self._allocator, "imageBatch", None)
            if len(sources) > 1 and batch_alloc is not None:
                destinations = list(batch_alloc(cb, imageDescriptor=descriptor, kernel=self, count=len(sources)))
            else:
                destinations = [self._allocator.image(cb, imageDescriptor=descriptor, kernel=self) for _ in sources]
            state = None if state_temporary is None else self._new_state(sources[0], cb, state_temporary)
            self._encode_pairs(cb, sources, destinations, owner)
            if state is not None:
                state._filled_by(sources[0], self._plan(sources[0], destinations[0], owner)[0])
        except Exception:
            self._offset, self._edgeMode = saved
            for image in destinations:  # never used: release without a leak warning
                if isinstance(image, MPSTemporaryImage) and image.readCount > 0:
                    image._read_count = 0
            raise
        return destinations if state_temporary is None else (destinations, state)


def _check_uniform_batch(images: list, owner: str, name: str) -> None:
    first = images[0]
    for i, image in enumerate(images[1:], 1):
        if (image.width, image.height, image.featureChannels, image.featureChannelFormat) != \
                (first.width, first.height, first.featureChannels, first.featureChannelFormat):
            raise MPSValueError(f"{owner}: {name}[{i}] is {image.width}x{image.height}x{image.featureChannels} "
                                f"{image.featureChannelFormat.name}; {name}[0] is {first.width}x{first.height}x"
                                f"{first.featureChannels} {first.featureChannelFormat.name}; a batch must agree")


class _Work:
    """One recorded backend call; runs when its command buffer is committed."""

    __slots__ = ("run", "bound", "prepared", "label")

    def __init__(self, backend, bound, prepared, kernel):
        self.run, self.bound, self.prepared = backend.run, bound, prepared
        options = int(kernel._options)
        self.label = (kernel.label or type(kernel).__name__) if options & _DEBUG_GROUPS else None
        if options & _VERBOSE or _LOG_INFO:
            print(f"mpsconv: {kernel.label or type(kernel).__name__}: {bound} on {backend.name}", file=sys.stderr)

    def __call__(self) -> None:
        if self.label is None:
            self.run(self.bound, self.prepared)
        else:
            with torch.autograd.profiler.record_function(self.label):  # debug group -> profiler range
                self.run(self.bound, self.prepared)


_LOG_INFO = bool(os.environ.get("MPS_LOG_INFO"))
_DEBUG_GROUPS, _VERBOSE = int(MPSKernelOptions.insertDebugGroups), int(MPSKernelOptions.verbose)
