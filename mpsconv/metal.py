"""The Metal objects the MPS API takes: devices, command queues, command buffers, buffers.

A ``MTLDevice`` is a compute device (the CPU, or a CUDA GPU). A command buffer records the work
that encodes describe; ``commit`` runs it, in the order the queue enqueued its buffers (on CUDA:
launches it on the queue's own stream and returns); completed handlers then run once, in
registration order, on the queue's handler thread (never on the thread that called ``commit``).
Semantics: docs/semantics.md, "Command buffers". Our addition: ``make_replayable`` / ``replay`` (CUDA graphs).
"""
from __future__ import annotations

import concurrent.futures
import enum
import platform
import threading
import warnings
from typing import Callable

import numpy as np
import torch

from ._api import LibraryMade, Strict, Uncopyable, keywords
from . import config
from .backends import onnx as graph_engine
from .core.formats import FORMAT_OF_PIXEL, STORAGE_DTYPE, MTLPixelFormat
from .errors import MPSCommandBufferError, MPSDeviceError, MPSTypeError, MPSValueError
from .types import as_enum, as_flags, as_float, as_int
from .memory import allocation_failed, check_allocation, out_of_memory


class MTLCommandBufferStatus(enum.IntEnum):
    """``MTLCommandBufferStatus``."""

    notEnqueued = 0
    enqueued = 1
    committed = 2
    scheduled = 3
    completed = 4
    error = 5


class MTLCommandBufferError(enum.IntEnum):
    """``MTLCommandBufferError`` codes (domain ``MTLCommandBufferErrorDomain``)."""

    none = 0
    internal = 1
    timeout = 2
    pageFault = 3
    accessRevoked = 4
    blacklisted = 4
    notPermitted = 7
    outOfMemory = 8
    invalidResource = 9
    memoryless = 10
    deviceRemoved = 11
    stackOverflow = 12


MTLCommandBufferErrorDomain = "MTLCommandBufferErrorDomain"


@keywords()  # unavailable: errors come from a failed command buffer's error
class NSError(LibraryMade, Strict):
    """``NSError``: what a failed command buffer reports in ``error``."""

    domain = localizedDescription = underlyingError = None  # public fields, set in __init__
    code = 0

    _made_by = "errors come from a failed command buffer's error"

    def _init(self, domain: str, code: int, localizedDescription: str, underlying: BaseException | None = None):
        self.domain = domain
        self.code = code
        self.localizedDescription = localizedDescription
        self.underlyingError = underlying

    def __repr__(self) -> str:
        return f"NSError(domain={self.domain!r}, code={int(self.code)}, {self.localizedDescription!r})"


class MTLStorageMode(enum.IntEnum):
    """``MTLStorageMode``."""

    shared = 0
    managed = 1
    private = 2
    memoryless = 3


class MTLCPUCacheMode(enum.IntEnum):
    """``MTLCPUCacheMode``."""

    defaultCache = 0
    writeCombined = 1


class MTLResourceOptions(enum.IntFlag):
    """``MTLResourceOptions``."""

    storageModeShared = 0
    cpuCacheModeDefaultCache = 0
    cpuCacheModeWriteCombined = 1
    storageModeManaged = 1 << 4
    storageModePrivate = 2 << 4
    storageModeMemoryless = 3 << 4


class MTLTextureUsage(enum.IntFlag):
    """``MTLTextureUsage``."""

    unknown = 0
    shaderRead = 1
    shaderWrite = 2
    renderTarget = 4
    pixelFormatView = 0x10


class MTLTextureType(enum.IntEnum):
    """``MTLTextureType`` (the two an ``MPSImage`` uses)."""

    type2D = 2
    type2DArray = 3


class MPSDeviceOptions(enum.IntFlag):
    """``MPSDeviceOptions``."""

    default = 0
    lowPower = 1
    skipRemovable = 2


# --------------------------------------------------------------------------------------------
# Devices


@keywords()  # unavailable: devices come from MTLCreateSystemDefaultDevice()
class MTLDevice(LibraryMade, Strict):
    """``MTLDevice``: a compute device, the CPU or one CUDA GPU. One object per device."""

    label = None

    _made_by = "devices come from MTLCreateSystemDefaultDevice(), MTLCopyAllDevices() or MPSGetPreferredDevice()"

    def _init(self, kind: str, index: int = 0) -> None:
        self._kind = kind
        self._index = index
        self._torch_device = torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)
        if kind == "cpu":
            self._name = f"CPU ({platform.machine() or 'unknown'})"
        else:
            self._name = torch.cuda.get_device_name(index)
        self.label = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def registryID(self) -> int:
        return 0 if self._kind == "cpu" else 1 + self._index

    @property
    def is_cuda(self) -> bool:
        return self._kind == "cuda"

    @property
    def torch_device(self) -> torch.device:
        """The torch device this ``MTLDevice`` stands for (our addition)."""
        return self._torch_device

    def makeCommandQueue(self, maxCommandBufferCount: int | None = None) -> "MTLCommandQueue":
        """``makeCommandQueue()`` / ``makeCommandQueue(maxCommandBufferCount:)``."""
        if maxCommandBufferCount is not None:
            as_int(maxCommandBufferCount, "MTLDevice.makeCommandQueue", "maxCommandBufferCount", 1)
        return MTLCommandQueue._make(self)

    def makeBuffer(self, *, length: int | None = None, bytes=None, bytesNoCopy=None,
                   options: int = MTLResourceOptions.storageModeShared, deallocator=None) -> "MTLBuffer":
        """``makeBuffer(length:options:)``, ``makeBuffer(bytes:length:options:)``,
        ``makeBuffer(bytesNoCopy:length:options:deallocator:)``."""
        if bytes is not None and bytesNoCopy is not None:
            raise MPSTypeError("MTLDevice.makeBuffer: pass bytes= or bytesNoCopy=, not both")
        if length is None:
            raise MPSTypeError("MTLDevice.makeBuffer: length= is required")
        length = as_int(length, "MTLDevice.makeBuffer", "length", 1)
        if bytesNoCopy is not None:
            view = _byte_view(bytesNoCopy, "MTLDevice.makeBuffer(bytesNoCopy:)", writable=True)
            if view.size < length:
                raise MPSValueError(f"MTLDevice.makeBuffer: bytesNoCopy holds {view.size} bytes; length={length}")
            return MTLBuffer._make(self, torch.from_numpy(view[:length]), options, deallocator)
        check_allocation("MTLDevice.makeBuffer", self, length)
        data = torch.zeros(length, dtype=torch.uint8)
        if bytes is not None:
            view = _byte_view(bytes, "MTLDevice.makeBuffer(bytes:)")
            if view.size < length:
                raise MPSValueError(f"MTLDevice.makeBuffer: bytes holds {view.size} bytes; length={length}")
            data.copy_(torch.from_numpy(view[:length].copy()))
        return MTLBuffer._make(self, data, options, None)

    def makeTexture(self, descriptor):
        """``makeTexture(descriptor:)``: a 2D or 2D-array texture (``MTLTextureDescriptor``)."""
        return make_texture(self, descriptor)

    def __repr__(self) -> str:
        return f"<MTLDevice {self._torch_device} {self._name!r}>"

    def __reduce__(self):
        # One object per device: a copied, deep-copied or unpickled kernel, image or buffer must name
        # the same device as the original, or its encodes would be refused as coming from another one.
        return device_from_name, (str(self._torch_device),)


_devices_lock = threading.Lock()
_devices: dict[str, MTLDevice] = {}


def _device(kind: str, index: int = 0) -> MTLDevice:
    key = "cpu" if kind == "cpu" else f"cuda:{index}"
    with _devices_lock:
        if key not in _devices:
            _devices[key] = MTLDevice._make(kind, index)
        return _devices[key]


def _cuda_count() -> int:
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver means no usable GPU, not a crash at import
        return 0


def MTLCopyAllDevices() -> list[MTLDevice]:
    """``MTLCopyAllDevices()``: every CUDA GPU, then the CPU."""
    return [_device("cuda", i) for i in range(_cuda_count())] + [_device("cpu")]


def device_from_name(name: str) -> MTLDevice:
    """``cpu``, ``cuda`` or ``cuda:N`` to its ``MTLDevice`` (our addition; ``MPSCONV_DEVICE`` uses it)."""
    name = name.strip().lower()
    if name == "cpu":
        return _device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = 0 if name == "cuda" else name.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise MPSDeviceError(f"device {name!r} is not cpu, cuda or cuda:N") from None
        count = _cuda_count()
        if index >= count:
            raise MPSDeviceError(f"device {name!r} is not usable: {count} CUDA GPU(s) found; use cpu")
        return _device("cuda", index)
    raise MPSDeviceError(f"device {name!r} is not cpu, cuda or cuda:N")


def MTLCreateSystemDefaultDevice() -> MTLDevice:
    """``MTLCreateSystemDefaultDevice()``: the first usable CUDA GPU, else the CPU.

    ``MPSCONV_DEVICE=cpu|cuda|cuda:N`` overrides the choice.
    """
    override = config.device_override()
    if override is not None:
        return device_from_name(override)
    return _device("cuda", 0) if _cuda_count() else _device("cpu")


def MPSSupportsMTLDevice(device) -> bool:
    """``MPSSupportsMTLDevice``: True for every device mpsconv made, False for None."""
    return isinstance(device, MTLDevice)


def MPSGetPreferredDevice(options: int = MPSDeviceOptions.default) -> MTLDevice:
    """``MPSGetPreferredDevice``: the default device (every device we list is supported)."""
    return MTLCreateSystemDefaultDevice()


def MPSHintTemporaryMemoryHighWaterMark(cmdBuf: "MTLCommandBuffer", bytes: int) -> None:
    """``MPSHintTemporaryMemoryHighWaterMark``: the block that the command buffer's temporary images
    take their bytes from (``image.TemporaryHeap``) is made at least ``bytes`` large when it is first
    made or next grows, so that it need not grow as the images come. A hint: where that much memory
    is not available, the block grows as it would have."""
    check_open_buffer(cmdBuf, "MPSHintTemporaryMemoryHighWaterMark", "cmdBuf")
    nbytes = as_int(bytes, "MPSHintTemporaryMemoryHighWaterMark", "bytes", 0)
    underlying(cmdBuf).__dict__["_temporary_reserve"] = nbytes


#: How long the CPU keeps a command buffer's temporary-image block for the queue's next command
#: buffer once the work has run (``MPSSetHeapCacheDuration`` sets it per buffer).
HEAP_CACHE_S = 5.0


def MPSSetHeapCacheDuration(cmdBuf: "MTLCommandBuffer", seconds: float) -> None:
    """``MPSSetHeapCacheDuration``: how long, once the command buffer's work has run, the block its
    temporary images took (``image.TemporaryHeap``) stays with its queue for the next command buffer's
    (CPU; ``HEAP_CACHE_S`` unless set; 0 or less: not kept). Raises after commit (undefined on Metal)."""
    check_open_buffer(cmdBuf, "MPSSetHeapCacheDuration", "cmdBuf")
    value = as_float(seconds, "MPSSetHeapCacheDuration", "seconds")
    underlying(cmdBuf).__dict__["_heap_cache_s"] = value


def underlying(cb: "MTLCommandBuffer") -> "MTLCommandBuffer":
    """The command buffer the next encodes into ``cb`` go into: an MPSCommandBuffer's current
    underlying one, else ``cb`` itself."""
    return cb.commandBuffer if isinstance(cb, MPSCommandBuffer) else cb


def check_open_buffer(cb, owner: str, prop: str = "commandBuffer") -> None:
    """``cb`` is a command buffer that can still be encoded into."""
    if not isinstance(cb, MTLCommandBuffer):
        raise MPSTypeError(f"{owner}: {prop}={cb!r} must be an MTLCommandBuffer")
    cb._check_open(owner)


# --------------------------------------------------------------------------------------------
# Buffers


def _byte_view(obj, owner: str, writable: bool = False) -> np.ndarray:
    """A flat uint8 NumPy view of a buffer-like object (NumPy array, tensor, bytes, MTLBuffer)."""
    if isinstance(obj, MTLBuffer):
        return obj.contents()
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise MPSTypeError(f"{owner}: a {obj.device} tensor has no host bytes; pass a CPU tensor")
        if not obj.is_contiguous():
            raise MPSTypeError(f"{owner}: the tensor must be contiguous")
        obj = obj.detach().numpy()
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise MPSTypeError(f"{owner}: the array must be C-contiguous")
        if writable and not obj.flags.writeable:
            raise MPSTypeError(f"{owner}: the array is read-only")
        return obj.reshape(-1).view(np.uint8)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise MPSTypeError(f"{owner}: {type(obj).__name__} is not a buffer (use a NumPy array, tensor or bytes)") from None
    if writable and mv.readonly:
        raise MPSTypeError(f"{owner}: the buffer is read-only; pass a bytearray or a writable array")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8) if not mv.readonly else np.frombuffer(mv.tobytes(), np.uint8)


@keywords()  # unavailable: buffers come from device.makeBuffer(...)
class MTLBuffer(LibraryMade, Strict):
    """``MTLBuffer``: bytes on a device. ``contents()`` is a writable host view (shared storage)."""

    label = None

    _made_by = "buffers come from device.makeBuffer(...)"

    def _init(self, device: MTLDevice, data: torch.Tensor, options: int, deallocator: Callable | None):
        self._device = device
        self._data = data
        self._options = MTLResourceOptions(int(options))
        self._deallocator = deallocator
        self.label = None

    @property
    def device(self) -> MTLDevice:
        return self._device

    @property
    def length(self) -> int:
        return self._data.numel()

    @property
    def resourceOptions(self) -> MTLResourceOptions:
        return self._options

    @property
    def storageMode(self) -> MTLStorageMode:
        return MTLStorageMode((int(self._options) >> 4) & 3)

    @property
    def cpuCacheMode(self) -> MTLCPUCacheMode:
        return MTLCPUCacheMode(int(self._options) & 1)

    def contents(self) -> np.ndarray:
        """A writable uint8 NumPy view of the buffer's bytes."""
        if self.storageMode == MTLStorageMode.private:
            raise MPSValueError("MTLBuffer.contents: a buffer with private storage (storageModePrivate) has no CPU view")
        return self._data.numpy()

    def didModifyRange(self, range) -> None:
        """``didModifyRange(_:)``: accepted; our storage needs no flush."""

    def as_float32(self, offset: int, count: int, owner: str) -> torch.Tensor:
        """``count`` float32 values from byte ``offset`` (a view, our addition)."""
        if offset % 4:
            raise MPSValueError(f"{owner}: byte offset {offset} must be a multiple of 4")
        if offset + 4 * count > self.length:
            raise MPSValueError(f"{owner}: {count} floats from byte {offset} need {offset + 4 * count} bytes; "
                                f"the buffer has {self.length}")
        return self._data[offset: offset + 4 * count].view(torch.float32)

    _deallocator = None  # (a buffer whose initializer was refused has none either)

    def __del__(self):
        if self._deallocator is not None:
            try:
                self._deallocator(self._data, self.length)
            except Exception:
                pass


# --------------------------------------------------------------------------------------------
# Textures (just enough to wrap and to report what an MPSImage's texture would be)


class MTLTextureDescriptor(Strict):
    """``MTLTextureDescriptor`` (2D and 2D-array textures only)."""

    # public fields, set in __init__
    textureType = pixelFormat = usage = storageMode = None
    width = height = arrayLength = depth = 1

    def __init__(self, *, textureType=MTLTextureType.type2D, pixelFormat=MTLPixelFormat.rgba16Float, width: int = 1,
                 height: int = 1, arrayLength: int = 1, usage=MTLTextureUsage.shaderRead,
                 storageMode=MTLStorageMode.shared, depth: int = 1):
        owner = "MTLTextureDescriptor"
        self.textureType = as_enum(textureType, MTLTextureType, owner, "textureType")
        self.pixelFormat = as_enum(pixelFormat, MTLPixelFormat, owner, "pixelFormat")
        self.width, self.height, self.arrayLength, self.depth = (
            as_int(v, owner, name, 1) for v, name in ((width, "width"), (height, "height"),
                                                     (arrayLength, "arrayLength"), (depth, "depth")))
        self.usage = as_flags(usage, MTLTextureUsage, owner, "usage")
        self.storageMode = as_enum(storageMode, MTLStorageMode, owner, "storageMode")

    @classmethod
    def texture2DDescriptor(cls, *, pixelFormat, width, height, mipmapped=False) -> "MTLTextureDescriptor":
        return cls(pixelFormat=pixelFormat, width=width, height=height)


@keywords()  # unavailable: textures come from makeTexture
class MTLTexture(LibraryMade, Strict):
    """``MTLTexture``: ``arrayLength`` slices of ``width x height`` pixels with up to 4 lanes.

    Its storage is one tensor ``[1, height, width, 4·arrayLength]`` or an image's NHWC tensor;
    an ``MPSImage`` made from it is a view of that tensor.
    """

    label = textureType = pixelFormat = usage = storageMode = None  # public fields, set by _make

    _made_by = "textures come from device.makeTexture(descriptor:) or an image's texture"

    def _init(self, device: MTLDevice, storage: torch.Tensor, images: int, textureType, pixelFormat, usage, root,
              storageMode=MTLStorageMode.shared) -> None:
        self._device = device
        self._storage = storage  # [images, H, W, 4·slices_per_image]
        self._images = images
        self.textureType = MTLTextureType(int(textureType))
        self.pixelFormat = MTLPixelFormat(int(pixelFormat))
        self.usage = MTLTextureUsage(int(usage))
        self.storageMode = MTLStorageMode(int(storageMode))
        self._root = root
        self.label = None

    @property
    def device(self) -> MTLDevice:
        return self._device

    @property
    def width(self) -> int:
        return self._storage.shape[2]

    @property
    def height(self) -> int:
        return self._storage.shape[1]

    @property
    def depth(self) -> int:
        return 1

    @property
    def arrayLength(self) -> int:
        return self._images * (self._storage.shape[3] // 4)


def make_texture(device: MTLDevice, descriptor: MTLTextureDescriptor) -> MTLTexture:
    """``MTLDevice.makeTexture(descriptor:)`` (the device method calls this)."""
    if descriptor.textureType not in (MTLTextureType.type2D, MTLTextureType.type2DArray):
        raise MPSValueError(f"makeTexture: textureType={descriptor.textureType!r}; only type2D and type2DArray")
    if descriptor.pixelFormat not in FORMAT_OF_PIXEL:
        raise MPSValueError(f"makeTexture: pixelFormat={descriptor.pixelFormat!r} is not a feature-channel format")
    fmt, _ = FORMAT_OF_PIXEL[descriptor.pixelFormat]
    owner = "makeTexture"
    width, height, array_length, depth = (as_int(getattr(descriptor, name), owner, f"descriptor.{name}", 1, 2**31 - 1)
                                          for name in ("width", "height", "arrayLength", "depth"))
    if depth != 1:
        raise MPSValueError(f"{owner}: descriptor.depth={depth}; 2D textures have depth 1")
    slices = array_length if descriptor.textureType == MTLTextureType.type2DArray else 1
    check_allocation(owner, device, height * width * 4 * slices * STORAGE_DTYPE[fmt].itemsize)
    storage = torch.zeros(1, height, width, 4 * slices, dtype=STORAGE_DTYPE[fmt],
                          device=device.torch_device)
    tex = MTLTexture._make(device, storage, 1, descriptor.textureType, descriptor.pixelFormat, descriptor.usage, None,
                     descriptor.storageMode)
    tex._root = tex
    return tex


# --------------------------------------------------------------------------------------------
# Queues and command buffers


@keywords()  # unavailable: queues come from device.makeCommandQueue()
class MTLCommandQueue(LibraryMade, Uncopyable, Strict):
    """``MTLCommandQueue``: runs its command buffers in the order they were enqueued."""

    label = None
    _copy_instead = "make another queue with device.makeCommandQueue()"

    _made_by = "queues come from device.makeCommandQueue()"

    def _init(self, device: MTLDevice):
        self._device = device
        self.label = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a buffer of this queue changed status
        self._waiting = 0  # threads waiting on ``_changed`` (most commits have none to wake)
        self._pending: list[MTLCommandBuffer] = []
        self._handlers: concurrent.futures.ThreadPoolExecutor | None = None
        self._stream = None  # CUDA: the queue's own stream, made on first commit
        self._temporary_plans: dict = {}  # where its buffers' temporary images go (image.TemporaryHeap)
        self._temporary_block = None  # CPU: (block, until) a finished buffer's temporary images left free

    @property
    def stream(self):
        """The ``torch.cuda.Stream`` this queue's command buffers run on (our addition; None on the CPU)."""
        if self._device.is_cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self._device.torch_device)
        return self._stream

    @property
    def device(self) -> MTLDevice:
        return self._device

    def makeCommandBuffer(self) -> "MTLCommandBuffer":
        """``makeCommandBuffer()``."""
        return MTLCommandBuffer(self, retained=True)

    def makeCommandBufferWithUnretainedReferences(self) -> "MTLCommandBuffer":
        """``makeCommandBufferWithUnretainedReferences()``."""
        return MTLCommandBuffer(self, retained=False)

    def commandBuffer(self) -> "MTLCommandBuffer":
        """ObjC spelling of ``makeCommandBuffer()``."""
        return self.makeCommandBuffer()

    def _enqueue(self, cb: "MTLCommandBuffer") -> None:
        with self._lock:
            self._pending.append(cb)

    def _notify(self) -> None:
        """Wake the threads waiting for a buffer of this queue (the caller holds ``_lock``)."""
        if self._waiting:
            self._changed.notify_all()

    def _drain(self) -> None:
        """Run every committed buffer at the head of the queue, in order."""
        with self._lock:
            while self._pending and self._pending[0]._status >= _COMMITTED:
                self._pending.pop(0)._run()

    def _handler_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._handlers is None:
                self._handlers = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="mpsconv-handlers")
            return self._handlers


def _run_on_cpu(work) -> None:
    """A command buffer's work on the CPU, with the threads ``config.cpu_threads`` chooses (PyTorch's own
    setting comes back afterwards)."""
    threads = torch.get_num_threads()
    wanted = config.cpu_threads(threads)
    if wanted != threads:
        torch.set_num_threads(wanted)
    try:
        for item in work:
            item()
    finally:
        if wanted != threads:
            torch.set_num_threads(threads)


def _capture(work, stream):
    """``work`` captured as a CUDA graph on ``stream`` (which has just run it once, so every lazy
    initialisation, Triton compile and autotune is done and nothing synchronises during capture)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for item in work:
            item()
    return graph


@keywords()  # unavailable: encoders come from commandBuffer.makeComputeCommandEncoder()
class MTLComputeCommandEncoder(LibraryMade, Strict):
    """``MTLComputeCommandEncoder``: user work on a command buffer; end it before an MPS encode."""

    label = None

    _made_by = "encoders come from commandBuffer.makeComputeCommandEncoder()"

    def _init(self, cb: "MTLCommandBuffer"):
        self._cb = cb
        self.label = None

    @property
    def device(self) -> MTLDevice:
        return self._cb.device

    def endEncoding(self) -> None:
        if self._cb._open_encoder is self:
            self._cb._open_encoder = None


class CommandBufferTemporary(Uncopyable):
    """Read-count rules of temporary images and states : bound to
    one command buffer (``_cb``), read ``readCount`` times, released at 0, frozen after that.
    Subclasses say what they are (``_kind``) and what releasing frees (``_release``)."""

    _kind = "temporary object"

    def _set_read_count(self, value: int) -> None:
        value = as_int(value, type(self).__name__, "readCount")
        if self._read_count == 0:
            raise MPSCommandBufferError(f"{type(self).__name__}.readCount: the {self._kind} was released "
                                        "(readCount is 0); its readCount cannot change any more")
        if value < 0:
            raise MPSValueError(f"{type(self).__name__}.readCount={value} must be >= 0")
        self._read_count = value
        if value == 0:
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def _copyable(self) -> bool:
        return not self._temporary  # a temporary lives and dies with one command buffer, not copied either

    @property
    def _copy_instead(self) -> str:
        return (f"a {self._kind} lives inside one command buffer: read what it holds (or write it into an "
                "MPSImage) instead")

    def _check_temporary(self, cb: "MTLCommandBuffer", owner: str, role: str) -> None:
        if cb is not self._cb:
            raise MPSCommandBufferError(f"{owner}: {role} is a {self._kind} of another command buffer")
        if self._read_count == 0:
            raise MPSCommandBufferError(f"{owner}: {role} was released (readCount reached 0)")

    def _consume_read(self) -> None:
        """One encode read it (once per distinct temporary per encode call)."""
        if self._read_count > 0:
            self._set_read_count(self._read_count - 1)


_handler_thread = threading.local()
_NOT_ENQUEUED, _ENQUEUED, _COMMITTED, _SCHEDULED, _COMPLETED, _ERROR = MTLCommandBufferStatus


class MTLCommandBuffer(Uncopyable, Strict):
    """``MTLCommandBuffer``: encodes record work here; ``commit`` runs it."""

    _copy_instead = "make another with queue.makeCommandBuffer(), or replay this one (make_replayable)"

    # What most command buffers never change: class-level values until they do (a command buffer a
    # layer is made per encode in many programs, so its construction is part of the host path).
    _error: NSError | None = None
    _scheduled_handlers: tuple = ()
    _completed_handlers: tuple = ()
    _handlers_done = False
    _open_encoder: MTLComputeCommandEncoder | None = None
    _replayable = False
    _event = None  # CUDA, no handlers: completion is read off this event when asked for
    _inflight = None
    _graph = None
    _replay_work = None
    _cpu_replay = None  # the replay engine's compiled work (backends.onnx), False where there is none
    label = None

    def __init__(self, queue: MTLCommandQueue, retained: bool = True):
        # one update, not Strict.__setattr__ per field: a command buffer is made for every encode in
        # many programs. _encoding is held by the one encode running into this buffer; _state_lock
        # makes enqueue / commit atomic against other threads.
        if type(queue) is not MTLCommandQueue and not isinstance(queue, MTLCommandQueue):
            raise MPSTypeError(f"MTLCommandBuffer: queue={queue!r} must be an MTLCommandQueue "
                               "(command buffers come from queue.makeCommandBuffer())")
        self.__dict__.update(_queue=queue, _device=queue._device, _retained=retained, _status=_NOT_ENQUEUED,
                             _work=[], _encoding=threading.Lock(), _state_lock=threading.Lock())

    # -- properties
    @property
    def device(self) -> MTLDevice:
        return self._device

    @property
    def commandQueue(self) -> MTLCommandQueue:
        return self._queue

    @property
    def retainedReferences(self) -> bool:
        return self._retained

    @property
    def status(self) -> MTLCommandBufferStatus:
        if self._event is not None:
            self._settle(block=False)
        return self._status

    @property
    def error(self) -> NSError | None:
        return self._error

    # -- encoding (internal API used by kernels)
    def _check_open(self, what: str) -> None:
        if self._status >= _COMMITTED:
            raise MPSCommandBufferError(
                f"{what}: the command buffer is already committed (status {self._status.name}); "
                "make a new one with queue.makeCommandBuffer()"
            )

    def _begin_encode(self, what: str) -> None:
        """Start an MPS encode: raises if committed, if a user encoder is open, or if another encode is running."""
        self._check_open(what)
        if self._open_encoder is not None:
            raise MPSCommandBufferError(
                f"{what}: a compute command encoder is still open on this command buffer; call endEncoding() first"
            )
        if not self._encoding.acquire(blocking=False):
            raise MPSCommandBufferError(
                f"{what}: another encode into this command buffer is in progress; a command buffer is encoded "
                "by one thread at a time (give each thread its own command buffer)"
            )
        if self._status >= _COMMITTED:  # committed by another thread meanwhile
            self._encoding.release()
            self._check_open(what)

    def _end_encode(self) -> None:
        self._encoding.release()

    def _record(self, work: Callable[[], None]) -> None:
        self._work.append(work)

    # -- Metal API
    def computeCommandEncoder(self) -> MTLComputeCommandEncoder:
        """``makeComputeCommandEncoder()``: an encoder for user work (must be ended before MPS encodes)."""
        self._check_open("MTLCommandBuffer.computeCommandEncoder")
        if self._open_encoder is not None:
            raise MPSCommandBufferError("MTLCommandBuffer.computeCommandEncoder: another encoder is still open")
        self._open_encoder = MTLComputeCommandEncoder._make(self)
        return self._open_encoder

    makeComputeCommandEncoder = computeCommandEncoder

    def addScheduledHandler(self, block: Callable) -> None:
        """``addScheduledHandler(_:)``: must be called before ``commit()``."""
        self._check_open("MTLCommandBuffer.addScheduledHandler")
        if not callable(block):
            raise MPSTypeError(f"MTLCommandBuffer.addScheduledHandler: {block!r} is not callable")
        self._scheduled_handlers += (block,)

    def addCompletedHandler(self, block: Callable) -> None:
        """``addCompletedHandler(_:)``: must be called before ``commit()``; runs once, after the work."""
        self._check_open("MTLCommandBuffer.addCompletedHandler")
        if not callable(block):
            raise MPSTypeError(f"MTLCommandBuffer.addCompletedHandler: {block!r} is not callable")
        self._completed_handlers += (block,)

    def enqueue(self) -> None:
        """``enqueue()``: reserve this buffer's place in its queue's order."""
        with self._state_lock:
            self._enqueue()

    def _enqueue(self) -> None:
        if self._status != _NOT_ENQUEUED:
            if self._status >= _COMMITTED:
                raise MPSCommandBufferError("MTLCommandBuffer.enqueue: the command buffer is already committed")
            return
        self._status = _ENQUEUED
        self._queue._enqueue(self)

    def commit(self) -> None:
        """``commit()``: submit. Buffers of one queue run in enqueue order."""
        with self._state_lock:
            if self._status >= _COMMITTED:
                raise MPSCommandBufferError("MTLCommandBuffer.commit: the command buffer was already committed")
            if self._open_encoder is not None:
                raise MPSCommandBufferError("MTLCommandBuffer.commit: a compute command encoder is still open")
            if not self._encoding.acquire(blocking=False):
                raise MPSCommandBufferError("MTLCommandBuffer.commit: an encode into this command buffer is still "
                                            "running on another thread; commit after it returns")
            try:
                self._enqueue()
                self.__dict__["_status"] = _COMMITTED  # (the hot path: no Strict.__setattr__)
            finally:
                self._encoding.release()
        self._queue._drain()

    def _fail(self, exc: BaseException) -> None:
        """The error lands in status / error, as on Metal; running out of memory is ``outOfMemory``,
        with an ``MPSMemoryError`` as the underlying error (and PyTorch's unused cached blocks are
        released, so that later command buffers have the memory this one could not get)."""
        code = MTLCommandBufferError.internal
        if out_of_memory(exc):
            code = MTLCommandBufferError.outOfMemory
            cause, exc = exc, allocation_failed("MTLCommandBuffer: the work", None, exc)
            exc.__cause__ = cause
            if self._device.is_cuda:
                torch.cuda.empty_cache()
        self._error = NSError._make(MTLCommandBufferErrorDomain, code, f"{type(exc).__name__}: {exc}", exc)
        self._status = _ERROR

    def _complete(self) -> None:
        """The work has finished: completed, unless it failed."""
        if self._status != _ERROR:
            self.__dict__["_status"] = _COMPLETED

    def _run(self) -> None:
        """Run the recorded work (called by the queue, in order, holding its lock).

        On the CPU the work runs here. On CUDA it is launched on the queue's stream (after whatever
        the caller's current stream has queued, e.g. image uploads) and an event marks its end, so
        ``commit`` returns without waiting for the GPU. A buffer with handlers (or to be replayed) is
        completed by the queue's handler thread once the event has passed, then its handlers run
        there, in commit order; one without is completed when ``status`` or ``waitUntilCompleted``
        reads the event (no thread hand-off per commit: that cost more than a small kernel).
        """
        state = self.__dict__  # its fields, set without Strict.__setattr__ on the path of every commit
        state["_status"] = _SCHEDULED
        work, state["_work"] = self._work, []
        heap = state.pop("_temporary_heap", None)  # the work holds what its temporary images still need
        if heap is not None:
            heap.finish()
        event = None
        try:
            if self._device.is_cuda:
                event = self._launch(work)
            else:
                _run_on_cpu(work)
        except Exception as exc:
            self._fail(exc)
        if heap is not None and not self._device.is_cuda:  # the work has run: its block may serve the next buffer
            heap.keep(state.get("_heap_cache_s", HEAP_CACHE_S))
        if event is None:
            self._complete()
            self._finish(work)
        elif self._scheduled_handlers or self._completed_handlers or self._replayable:
            # the handler thread completes it; ``work`` keeps the storages alive until then
            self._queue._handler_pool().submit(self._await_gpu, event, work)
        else:  # nothing to run after the GPU: completion is read off the event when someone asks
            self._event, self._inflight, self._handlers_done = event, work, True

    def _settle(self, block: bool) -> None:
        """Complete a handler-less CUDA buffer whose event has passed (waiting for it if ``block``)."""
        with self._queue._changed:
            event = self._event
            if event is None:
                return
            try:
                if block:
                    event.synchronize()
                elif not event.query():
                    return
            except Exception as exc:  # a failed kernel reports here
                self._fail(exc)
            self._complete()
            self._event = self._inflight = None
            self._queue._notify()

    def _launch(self, work):
        stream = self._queue.stream
        caller = None
        if torch._C._cuda_getCurrentRawStream(self._device.torch_device.index) != stream.cuda_stream:
            # run after the caller's uploads and other work on its own stream. set_stream, not the
            # torch.cuda.stream context: with it, such a commit cost ~10-15 µs more host time (H200,
            # benchmarks/host_time.py)
            caller = torch.cuda.current_stream(self._device.torch_device)
            stream.wait_stream(caller)
            torch.cuda.set_stream(stream)
        try:
            for item in work:
                item()
            if self._replayable:
                self._graph = _capture(work, stream)
            event = torch.cuda.Event()
            event.record(stream)
        finally:
            if caller is not None:
                torch.cuda.set_stream(caller)
        return event

    def _await_gpu(self, event, work) -> None:
        try:
            event.synchronize()  # a failed kernel raises here
        except Exception as exc:
            self._fail(exc)
        with self._queue._changed:
            self._complete()
            self._finish(work)

    def _finish(self, work) -> None:
        if self._replayable and self._status == _COMPLETED:
            self._replay_work = work
        if self._scheduled_handlers or self._completed_handlers:
            self._queue._handler_pool().submit(self._run_handlers, self._scheduled_handlers + self._completed_handlers)
        else:
            self.__dict__["_handlers_done"] = True
        self._queue._notify()

    # -- graph replay (our addition)
    def make_replayable(self) -> None:
        """Keep this command buffer's work for ``replay()`` (our addition; call before ``commit``).

        On CUDA, ``commit`` runs the work once and captures it as a CUDA graph; each ``replay()``
        then launches the whole graph at once, so a network of small kernels pays the launch cost
        once. Replays read the images' current contents: write new inputs, replay, read new results.
        """
        self._check_open("MTLCommandBuffer.make_replayable")
        self._replayable = True

    def replay(self) -> "MTLCommandBuffer":
        """Run the work of a completed replayable buffer again (our addition): the CUDA graph on CUDA,
        the recorded work on the CPU. Returns a new, already committed command buffer of the same
        queue, in its order; ``waitUntilCompleted()`` on it waits for the replay, ``status`` and
        ``error`` report it."""
        if not self._replayable:
            raise MPSCommandBufferError("MTLCommandBuffer.replay: call make_replayable() before commit()")
        if self._replay_work is None:
            raise MPSCommandBufferError(
                f"MTLCommandBuffer.replay: the command buffer has not completed (status {self._status.name}); "
                "commit() it and let it complete first")
        run = MTLCommandBuffer(self._queue)
        run.label = self.label
        graph = self._graph
        if graph is None and self._cpu_replay is None:  # the first replay on the CPU: compile once
            work = list(self._replay_work)
            self._cpu_replay = graph_engine.compile([getattr(item, "step", None) for item in work], work,
                                                    torch.get_num_threads()) or False
        if graph is not None:
            run._work = [graph.replay]
        else:
            run._work = [self._cpu_replay] if self._cpu_replay else list(self._replay_work)
        run._replay_source = self  # keeps the captured storages alive while the replay runs
        run.commit()
        return run

    def _run_handlers(self, handlers) -> None:
        _handler_thread.active = True
        try:
            for handler in handlers:
                try:
                    handler(self)
                except Exception as exc:  # a user handler's failure must not stop the others
                    warnings.warn(f"mpsconv: a command buffer handler raised {type(exc).__name__}: {exc}")
        finally:
            _handler_thread.active = False
            with self._queue._changed:
                self._handlers_done = True
                self._queue._notify()

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        if self._status < _COMMITTED:
            raise MPSCommandBufferError(f"MTLCommandBuffer.{what}: commit() the command buffer first")
        if self._event is not None and what == "waitUntilCompleted":
            self._settle(block=True)
        if not done():
            with self._queue._changed:
                self._queue._waiting += 1
                try:
                    self._queue._changed.wait_for(done)
                finally:
                    self._queue._waiting -= 1

    def waitUntilScheduled(self) -> None:
        """``waitUntilScheduled()``."""
        self._wait(lambda: self._status >= _SCHEDULED, "waitUntilScheduled")

    def waitUntilCompleted(self) -> None:
        """``waitUntilCompleted()``: blocks until the work and its completed handlers are done.

        Raises ``MPSCommandBufferError`` before ``commit()`` (Metal would deadlock) and when the
        buffer failed (``status == .error``; the cause is in ``error``). Called from a completed
        handler, it does not wait for the handlers themselves.
        """
        if self._status is _COMPLETED and self._handlers_done:  # done already (the CPU, no handlers)
            return
        in_handler = getattr(_handler_thread, "active", False)
        self._wait(lambda: self._status >= _COMPLETED and (self._handlers_done or in_handler),
                   "waitUntilCompleted")
        if self._status == _ERROR:
            raise MPSCommandBufferError(
                f"MTLCommandBuffer: the command buffer failed: {self._error.localizedDescription}"
            ) from self._error.underlyingError

    def __repr__(self) -> str:
        return f"<MTLCommandBuffer {self.label or ''} status={self._status.name} on {self.device.torch_device}>"


# --------------------------------------------------------------------------------------------
# MPSCommandBuffer


class MPSCommandBuffer(MTLCommandBuffer):
    """``MPSCommandBuffer``: a command buffer MPS code encodes into, which can commit the work so far
    and go on (``commitAndContinue``). It stands for its current underlying ``MTLCommandBuffer``
    (``commandBuffer``): encodes record there, and ``commit``, ``waitUntilCompleted``, handlers,
    ``status`` and ``error`` are that buffer's. Temporary images and states made on it stay valid
    across ``commitAndContinue``, as in MPS, since they belong to this object, not to one
    underlying buffer.

    ``MPSCommandBuffer(queue)`` (Swift ``init(from:)``, ObjC ``commandBufferFromCommandQueue:``) and
    ``MPSCommandBuffer(commandBuffer=cb)`` (``init(commandBuffer:)``, wrapping an existing one).
    """

    def __init__(self, from_=None, /, *, commandBuffer=None):
        if (from_ is None) == (commandBuffer is None):
            raise MPSTypeError("MPSCommandBuffer: pass a command queue (MPSCommandBuffer(queue), Swift init(from:)) "
                               "or commandBuffer= (init(commandBuffer:)), one of the two")
        if commandBuffer is None:
            if not isinstance(from_, MTLCommandQueue):
                raise MPSTypeError(f"MPSCommandBuffer: {from_!r} is not an MTLCommandQueue")
            commandBuffer = from_.makeCommandBuffer()
        elif not isinstance(commandBuffer, MTLCommandBuffer) or isinstance(commandBuffer, MPSCommandBuffer):
            raise MPSTypeError(f"MPSCommandBuffer: commandBuffer={commandBuffer!r} must be an MTLCommandBuffer")
        self.__dict__.update(_current=commandBuffer, _root=commandBuffer, _queue=commandBuffer._queue,
                             _device=commandBuffer._device, _heap_provider=None, _predicate=None)

    @classmethod
    def commandBufferFromCommandQueue(cls, commandQueue) -> "MPSCommandBuffer":
        """ObjC ``+commandBufferFromCommandQueue:``."""
        return cls(commandQueue)

    @classmethod
    def commandBufferWithCommandBuffer(cls, commandBuffer) -> "MPSCommandBuffer":
        """ObjC ``+commandBufferWithCommandBuffer:``."""
        return cls(commandBuffer=commandBuffer)

    @property
    def commandBuffer(self) -> MTLCommandBuffer:
        """The underlying command buffer the next encodes go into."""
        return self._current

    @property
    def rootCommandBuffer(self) -> MTLCommandBuffer:
        """The command buffer this one was made from (the first underlying one)."""
        return self._root

    @property
    def predicate(self):
        """``predicate``: kept, not evaluated (MPS kernels here always run)."""
        return self._predicate

    @predicate.setter
    def predicate(self, value) -> None:
        self._predicate = value

    @property
    def heapProvider(self):
        """``heapProvider``: kept; storage comes from PyTorch's allocator here."""
        return self._heap_provider

    @heapProvider.setter
    def heapProvider(self, value) -> None:
        self._heap_provider = value

    def prefetchHeap(self, forWorkloadSize: int = 0) -> None:
        """``prefetchHeap(forWorkloadSize:)``: as ``MPSHintTemporaryMemoryHighWaterMark`` on the
        current underlying buffer (a hint)."""
        self._current._check_open("MPSCommandBuffer.prefetchHeap")
        nbytes = as_int(forWorkloadSize, "MPSCommandBuffer.prefetchHeap", "forWorkloadSize", 0)
        self._current.__dict__["_temporary_reserve"] = nbytes

    def commitAndContinue(self) -> None:
        """``commitAndContinue()``: commit the work encoded so far and go on encoding into a new
        underlying command buffer of the same queue (run after this one)."""
        self._current.commit()
        self.__dict__["_current"] = MTLCommandBuffer(self._queue, self._current._retained)

    # -- the current underlying buffer's
    @property
    def label(self) -> str | None:
        return self._current.label

    @label.setter
    def label(self, value) -> None:
        if value is not None and not isinstance(value, str):
            raise MPSTypeError(f"MPSCommandBuffer: label={value!r} must be a string or None")
        self._current.label = value
    status = property(lambda self: self._current.status)
    error = property(lambda self: self._current.error)
    retainedReferences = property(lambda self: self._current.retainedReferences)
    _status = property(lambda self: self._current._status)

    def _check_open(self, what: str) -> None:
        self._current._check_open(what)

    def _begin_encode(self, what: str) -> None:
        self._current._begin_encode(what)

    def _end_encode(self) -> None:
        self._current._end_encode()

    def _record(self, work) -> None:
        self._current._record(work)

    def computeCommandEncoder(self) -> MTLComputeCommandEncoder:
        return self._current.computeCommandEncoder()

    makeComputeCommandEncoder = computeCommandEncoder

    def addScheduledHandler(self, block: Callable) -> None:
        self._current.addScheduledHandler(block)

    def addCompletedHandler(self, block: Callable) -> None:
        self._current.addCompletedHandler(block)

    def enqueue(self) -> None:
        self._current.enqueue()

    def commit(self) -> None:
        self._current.commit()

    def waitUntilScheduled(self) -> None:
        self._current.waitUntilScheduled()

    def waitUntilCompleted(self) -> None:
        self._current.waitUntilCompleted()

    def make_replayable(self) -> None:
        self._current.make_replayable()

    def replay(self) -> MTLCommandBuffer:
        return self._current.replay()

    def __repr__(self) -> str:
        return f"<MPSCommandBuffer over {self._current!r}>"
