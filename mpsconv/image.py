"""Images: ``MPSImageDescriptor``, ``MPSImage``, ``MPSTemporaryImage``, batches and allocators.

Storage: one tensor per allocation, NHWC (``numberOfImages, height, width, channels``) on the
image's device, channels rounded up to a multiple of 4 (Metal's texture slices; the padding lanes
stay 0). Each feature-channel format is stored as its raw element type and converted on read and
write as Metal does (``core.formats``).
"""
from __future__ import annotations

import enum
import time
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ._api import Strict, keywords
from .core.formats import (
    FLOAT_FORMATS, FORMAT_OF_PIXEL, ImageLayout, NUMPY_DTYPE, PIXEL_FORMATS, PRECISION, STORAGE_DTYPE, MPSImageFeatureChannelFormat,
    MTLPixelFormat, check_format, lanes_for, slices_for, storage_to_values, values_to_storage,
)
from .errors import MPSCommandBufferError, MPSDeviceError, MPSTypeError, MPSValueError
from . import memory
from .memory import allocation_failed, check_allocation, out_of_memory
from .metal import (
    CommandBufferTemporary, MTLCommandBuffer, MTLCPUCacheMode, MTLDevice, MTLStorageMode, MTLTexture,
    MTLTextureType, MTLTextureUsage, MTLCreateSystemDefaultDevice, _byte_view, check_open_buffer, underlying,
)
from .types import (
    NSIntegerMin, MTLOrigin, MTLRegion, MTLSize, _integers, as_enum, as_flags, as_int, as_list, as_region,
)

F = MPSImageFeatureChannelFormat


class MPSDataLayout(enum.IntEnum):
    """``MPSDataLayout``: HWC (channels innermost) or CHW (one plane per channel)."""

    HeightxWidthxFeatureChannels = 0
    featureChannelsxHeightxWidth = 1


class MPSImageReadWriteParams(NamedTuple):
    """``MPSImageReadWriteParams``: the channel window ``[offset, offset + count)`` of a CPU access."""

    featureChannelOffset: int = 0
    numberOfFeatureChannelsToReadWrite: int = 0


class MPSPurgeableState(enum.IntEnum):
    """``MPSPurgeableState``."""

    allocationDeferred = 0
    keepCurrent = 1
    nonVolatile = 2
    volatile = 3
    empty = 4


# --------------------------------------------------------------------------------------------
# Descriptor


class MPSImageDescriptor(Strict):
    """``MPSImageDescriptor``: the size, channel count and format of an image to make."""

    # public fields, set in __init__ (Strict refuses what the class does not have)
    width = height = featureChannels = numberOfImages = 1
    cpuCacheMode = MTLCPUCacheMode.defaultCache
    storageMode = MTLStorageMode.shared

    def __init__(self, *, channelFormat=F.none, width: int = 1, height: int = 1, featureChannels: int = 1,
                 numberOfImages: int = 1, usage=MTLTextureUsage.shaderRead | MTLTextureUsage.shaderWrite):
        self.channelFormat = channelFormat
        self.width = width
        self.height = height
        self.featureChannels = featureChannels
        self.numberOfImages = numberOfImages
        self.usage = usage
        self.cpuCacheMode = MTLCPUCacheMode.defaultCache
        self.storageMode = MTLStorageMode.shared

    @classmethod
    def imageDescriptor(cls, *, channelFormat, width, height, featureChannels, numberOfImages=1,
                        usage=MTLTextureUsage.shaderRead | MTLTextureUsage.shaderWrite) -> "MPSImageDescriptor":
        """ObjC ``+imageDescriptorWithChannelFormat:width:height:featureChannels:[numberOfImages:usage:]``."""
        return cls(channelFormat=channelFormat, width=width, height=height, featureChannels=featureChannels,
                   numberOfImages=numberOfImages, usage=usage)

    @property
    def channelFormat(self) -> MPSImageFeatureChannelFormat:
        return self._channelFormat

    @channelFormat.setter
    def channelFormat(self, value) -> None:
        self._channelFormat = as_enum(value, MPSImageFeatureChannelFormat, "MPSImageDescriptor", "channelFormat")

    @property
    def usage(self) -> MTLTextureUsage:
        return self._usage

    @usage.setter
    def usage(self, value) -> None:
        self._usage = as_flags(value, MTLTextureUsage, "MPSImageDescriptor", "usage")

    @property
    def pixelFormat(self) -> MTLPixelFormat:
        fmt = F.float16 if self._channelFormat == F.none else self._channelFormat
        if fmt not in PIXEL_FORMATS:
            return MTLPixelFormat.invalid
        return PIXEL_FORMATS[fmt][(1, 2, 4).index(lanes_for(max(1, int(self.featureChannels))))]

    def copy(self) -> "MPSImageDescriptor":
        """NSCopying."""
        other = MPSImageDescriptor.__new__(MPSImageDescriptor)
        other.__dict__.update(self.__dict__)
        return other

    def _validated(self, owner: str) -> tuple[int, int, int, int, MPSImageFeatureChannelFormat]:
        dims = {}
        for name in ("width", "height", "featureChannels", "numberOfImages"):
            dims[name] = as_int(getattr(self, name), owner, f"imageDescriptor.{name}", 1)
        fmt = check_format(self._channelFormat, owner)
        if fmt == F.none:
            fmt = F.float16  # "none" means "let MPS pick"; MPS graphs pick float16
        return dims["numberOfImages"], dims["height"], dims["width"], dims["featureChannels"], fmt

    def __repr__(self) -> str:
        return (f"MPSImageDescriptor(channelFormat={self._channelFormat.name}, width={self.width}, "
                f"height={self.height}, featureChannels={self.featureChannels}, numberOfImages={self.numberOfImages})")


# --------------------------------------------------------------------------------------------
# MPSImage


@keywords("device", "imageDescriptor", "texture", "featureChannels", "parentImage", "sliceRange")
class MPSImage(Strict):
    """``MPSImage``: ``numberOfImages`` images of ``width x height`` pixels with ``featureChannels``.

    Initializers (keyword sets, as Swift's overloads):
      ``MPSImage(device=, imageDescriptor=)``: a new image; storage is allocated on first use.
      ``MPSImage(texture=, featureChannels=)``: a view of an existing texture.
      ``MPSImage(parentImage=, sliceRange=, featureChannels=)``: a view of a parent's slices.
    Our additions: ``MPSImage.from_numpy``, ``numpy()``, ``torch()``, ``__array__``, ``__dlpack__``.
    """

    label = None

    _temporary = False

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        if keys == {"device", "imageDescriptor"}:
            self._init_descriptor(kwargs["device"], kwargs["imageDescriptor"], "MPSImage")
        elif keys == {"texture", "featureChannels"}:
            self._init_texture(kwargs["texture"], kwargs["featureChannels"])
        elif keys == {"parentImage", "sliceRange", "featureChannels"}:
            self._init_parent(kwargs["parentImage"], kwargs["sliceRange"], kwargs["featureChannels"])
        else:
            raise MPSTypeError(
                f"MPSImage({', '.join(sorted(keys)) or ''}): valid initializers are "
                "MPSImage(device=, imageDescriptor=), MPSImage(texture=, featureChannels=), "
                "MPSImage(parentImage=, sliceRange=, featureChannels=); MPSImage() is unavailable"
            )

    # -- initializers
    def _init_common(self, device, n, h, w, c, fmt, usage, storage_mode):
        self._device = device
        self._n, self._h, self._w, self._c = n, h, w, c
        self._format = fmt
        self._layout = ImageLayout(n, h, w, c, fmt)  # what encodes key their plans on
        self._usage = MTLTextureUsage(int(usage))
        self._storage_mode = MTLStorageMode(int(storage_mode))
        self._storage: torch.Tensor | None = None
        self._parent: MPSImage | None = None
        self._root = self
        self._owns_allocation = True
        self.label = None

    def _init_descriptor(self, device, descriptor, owner):
        if not isinstance(device, MTLDevice):
            raise MPSTypeError(f"{owner}: device={device!r} must be an MTLDevice (e.g. MTLCreateSystemDefaultDevice())")
        if not isinstance(descriptor, MPSImageDescriptor):
            raise MPSTypeError(f"{owner}: imageDescriptor={descriptor!r} must be an MPSImageDescriptor")
        n, h, w, c, fmt = descriptor._validated(owner)
        self._init_common(device, n, h, w, c, fmt, descriptor.usage, descriptor.storageMode)

    def _init_texture(self, texture, featureChannels):
        if not isinstance(texture, MTLTexture):
            raise MPSTypeError(f"MPSImage(texture=): {texture!r} is not an MTLTexture")
        c = as_int(featureChannels, "MPSImage(texture=)", "featureChannels", 1)
        spi = slices_for(c)
        if texture.textureType == MTLTextureType.type2D:
            if c > 4:
                raise MPSValueError(
                    f"MPSImage(texture=): a type2D texture holds at most 4 feature channels; featureChannels={c} "
                    "needs a type2DArray texture"
                )
            n = 1
        else:
            if texture.arrayLength % spi:
                raise MPSValueError(
                    f"MPSImage(texture=): arrayLength={texture.arrayLength} is not a multiple of "
                    f"ceil(featureChannels/4)={spi}"
                )
            n = texture.arrayLength // spi
        fmt, _ = FORMAT_OF_PIXEL.get(texture.pixelFormat, (None, 0))
        if fmt is None:
            raise MPSValueError(f"MPSImage(texture=): pixelFormat={texture.pixelFormat!r} has no feature-channel format")
        src = texture._storage
        self._init_common(texture.device, n, src.shape[1], src.shape[2], c, fmt, texture.usage, texture.storageMode)
        if src.shape[0] == n and src.shape[3] == 4 * spi:
            storage = src
        elif src.shape[0] == 1:
            # All slices on the channel axis: any split into images is a strided view.
            hh, ww = src.shape[1], src.shape[2]
            storage = src[0, :, :, : 4 * spi * n].reshape(hh, ww, n, 4 * spi).permute(2, 0, 1, 3)
        else:
            raise MPSValueError(
                f"MPSImage(texture=): the texture holds {src.shape[0]} images of {src.shape[3]} channels; "
                f"regrouping it into {n} images of {c} channels is not supported"
            )
        self._storage = storage
        self._root = texture._root
        self._owns_allocation = False

    def _init_parent(self, parent, sliceRange, featureChannels):
        if not isinstance(parent, MPSImage):
            raise MPSTypeError(f"MPSImage(parentImage=): {parent!r} is not an MPSImage")
        start, length = _as_range(sliceRange, "MPSImage(parentImage=).sliceRange")
        parent_spi = slices_for(parent._c)
        if parent._n != 1:
            raise MPSValueError("MPSImage(parentImage=): slice views of multi-image parents are not supported; "
                                "use batchRepresentation() first")
        if start + length > parent_spi or length < 1:
            raise MPSValueError(f"MPSImage(parentImage=): sliceRange {start}..<{start + length} is outside the "
                                f"parent's {parent_spi} slices")
        c = as_int(featureChannels, "MPSImage(parentImage=)", "featureChannels")
        if not 1 <= c <= 4 * length:
            raise MPSValueError(f"MPSImage(parentImage=): featureChannels={c} must be 1...{4 * length}")
        self._make_view(parent, 0, 1, 4 * start, c)

    def _make_view(self, parent: "MPSImage", n0: int, n: int, c0: int, c: int) -> None:
        storage = parent._ensure_storage()
        self._init_common(parent._device, n, parent._h, parent._w, c, parent._format, parent._usage,
                          parent._storage_mode)
        self._storage = storage[n0:n0 + n, :, :, c0:c0 + 4 * slices_for(c)]
        self._parent = parent
        self._root = parent._root
        self._owns_allocation = False

    @classmethod
    def from_numpy(cls, array, *, featureChannelFormat=F.float32, device: MTLDevice | None = None) -> "MPSImage":
        """A new image holding ``array``'s values (our addition).

        ``array`` is ``(H, W, C)`` or ``(N, H, W, C)`` (a NumPy array, tensor or nested list) of
        feature values; they are converted to the format as a GPU write would (float16 rounds,
        unorm clamps to [0, 1] and scales).
        """
        owner = "MPSImage.from_numpy"
        if isinstance(array, torch.Tensor):
            values = array.detach()
        else:
            try:
                values = np.asarray(array)
            except (TypeError, ValueError) as exc:
                raise MPSTypeError(f"{owner}: array must be numbers (an array, a tensor or nested lists): {exc}") from None
            if values.dtype.kind not in "fiub":
                raise MPSTypeError(f"{owner}: array has dtype {values.dtype}; feature values are real numbers")
        shape = tuple(values.shape)
        if len(shape) == 3:
            shape = (1, *shape)
        if len(shape) != 4:
            raise MPSValueError(f"{owner}: array of shape {tuple(values.shape)} must be (H, W, C) or (N, H, W, C)")
        n, h, w, c = shape
        if h <= 4 and c == w >= 16:  # (N, 3, 224, 224): NCHW, as PyTorch holds images
            raise MPSValueError(
                f"{owner}: array of shape {tuple(values.shape)} looks like NCHW ({h} channels of "
                f"{w}x{c} pixels); images are NHWC: pass array.transpose(0, 2, 3, 1) (a tensor: "
                f".permute(0, 2, 3, 1)). If it really is {h} rows of {w} pixels with {c} channels, make the image "
                "with MPSImage(device=, imageDescriptor=) and copy the values into image.torch()")
        device = device or MTLCreateSystemDefaultDevice()
        image = cls(device=device, imageDescriptor=MPSImageDescriptor(
            channelFormat=featureChannelFormat, width=w, height=h, featureChannels=c, numberOfImages=n))
        # the storage, and the values converted to float64 on the way (refused before either exists)
        check_allocation(owner, device, image._layout.storage_bytes + 8 * n * h * w * c)
        if not isinstance(values, torch.Tensor):
            values = torch.from_numpy(np.ascontiguousarray(values))
        values = values.reshape(shape)
        if not values.is_floating_point():
            values = values.to(torch.float64)
        image._ensure_storage()[..., :c].copy_(values_to_storage(values.to(device.torch_device), image._format))
        return image

    # -- storage
    def _ensure_storage(self) -> torch.Tensor:
        if self._storage is None:
            self._check_alive("MPSImage")
            layout = self._layout
            try:
                self._storage = self._allocate(layout)
            except RuntimeError as exc:
                if not out_of_memory(exc):
                    raise
                raise allocation_failed(f"{type(self).__name__} ({self._w}x{self._h}, {self._c} channels, "
                                        f"{self._n} images)", layout.storage_bytes, exc) from exc
        return self._storage

    def _allocate(self, layout) -> torch.Tensor:
        """New storage, zeroed (its padding lanes stay zero: some backends read whole slices)."""
        return torch.zeros(layout.storage_shape, dtype=STORAGE_DTYPE[self._format], device=self._device.torch_device)

    def _check_alive(self, owner: str) -> None:
        pass

    # -- read-only properties
    @property
    def device(self) -> MTLDevice:
        return self._device

    @property
    def width(self) -> int:
        return self._w

    @property
    def height(self) -> int:
        return self._h

    @property
    def featureChannels(self) -> int:
        return self._c

    @property
    def numberOfImages(self) -> int:
        return self._n

    @property
    def featureChannelFormat(self) -> MPSImageFeatureChannelFormat:
        return self._format

    @property
    def textureType(self) -> MTLTextureType:
        return MTLTextureType.type2D if self._c <= 4 and self._n == 1 else MTLTextureType.type2DArray

    @property
    def pixelFormat(self) -> MTLPixelFormat:
        if self._format not in PIXEL_FORMATS:  # bfloat16: Metal has no such texture format
            return MTLPixelFormat.invalid
        return PIXEL_FORMATS[self._format][(1, 2, 4).index(lanes_for(self._c))]

    @property
    def precision(self) -> int:
        return PRECISION[self._format]

    @property
    def usage(self) -> MTLTextureUsage:
        return self._usage

    @property
    def pixelSize(self) -> int:
        return lanes_for(self._c) * torch.tensor([], dtype=STORAGE_DTYPE[self._format]).element_size()

    @property
    def storageMode(self) -> MTLStorageMode:
        return self._storage_mode

    @property
    def parent(self) -> "MPSImage | None":
        return self._parent

    @property
    def texture(self) -> MTLTexture:
        """The backing storage as a texture; requesting it allocates."""
        return MTLTexture._make(self._device, self._ensure_storage(), self._n, self.textureType, self.pixelFormat,
                          self._usage, self._root, self._storage_mode)

    def resourceSize(self) -> int:
        """Bytes of backing storage (0 for views and wrapped textures); never allocates."""
        if not self._owns_allocation:
            return 0
        return self._n * slices_for(self._c) * self._w * self._h * self.pixelSize

    def setPurgeableState(self, state) -> MPSPurgeableState:
        """``setPurgeableState(_:)``: returns the previous state."""
        state = as_enum(state, MPSPurgeableState, "MPSImage.setPurgeableState", "state")
        if self._storage is None:
            return MPSPurgeableState.allocationDeferred
        previous = getattr(self, "_purgeable", MPSPurgeableState.nonVolatile)
        if state != MPSPurgeableState.keepCurrent:
            self._purgeable = state
        return previous

    def synchronize(self, on: MTLCommandBuffer) -> None:
        """``synchronize(on:)``: our storage needs no flush; accepted on any open command buffer."""
        check_open_buffer(on, "MPSImage.synchronize", "on")

    # -- views
    def subImage(self, featureChannelRange) -> "MPSImage":
        """``subImage(featureChannelRange:)``: a view of channels ``[loc, loc + len)`` (multiples of 4)."""
        loc, length = _as_range(featureChannelRange, "MPSImage.subImage")
        if loc % 4 or length % 4:
            raise MPSValueError(
                f"MPSImage.subImage: featureChannelRange {loc}..<{loc + length} must start and have a length "
                "that are multiples of 4"
            )
        if loc >= self._c or length < 1:
            raise MPSValueError(f"MPSImage.subImage: featureChannelRange {loc}..<{loc + length} is outside the "
                                f"image's {self._c} feature channels")
        view = self._view_class()
        view._make_view(self, 0, self._n, loc, min(length, self._c - loc))
        view._adopt_parent_lifetime(self)
        return view

    def batchRepresentation(self, withSubRange=None) -> list["MPSImage"]:
        """``batchRepresentation()`` / ``batchRepresentation(withSubRange:)``: one view per image."""
        if withSubRange is None:
            start, length = 0, self._n
        else:
            start, length = _as_range(withSubRange, "MPSImage.batchRepresentation")
            if start + length > self._n or length < 0:
                raise MPSValueError(f"MPSImage.batchRepresentation: subRange {start}..<{start + length} is outside "
                                    f"the image's {self._n} images")
        views = []
        for i in range(start, start + length):
            view = self._view_class()
            view._make_view(self, i, 1, 0, self._c)
            view._adopt_parent_lifetime(self)
            views.append(view)
        return views

    def _view_class(self) -> "MPSImage":
        return MPSImage.__new__(MPSImage)

    def _adopt_parent_lifetime(self, parent: "MPSImage") -> None:
        pass

    # -- encode-time checks (used by kernels)
    def _check_for_encode(self, cb: MTLCommandBuffer, owner: str, role: str) -> None:
        if self._device is not cb._device:
            raise MPSDeviceError(f"{owner}: {role} is on {self._device.torch_device}, the command buffer on "
                                 f"{cb.device.torch_device}")
        needed = 1 if role[0] == "s" else 2  # shaderRead for sources, shaderWrite for destinations
        if not int(self._usage) & needed:
            raise MPSValueError(f"{owner}: {role} was made without {MTLTextureUsage(needed).name} usage")

    def _consume_read(self) -> None:
        pass

    # -- CPU access
    def _cpu_check(self, owner: str) -> None:
        if self._storage_mode == MTLStorageMode.private:
            raise MPSValueError(f"{owner}: the image has private storage; the CPU cannot read or write it")

    def readBytes(self, dataBytes, /, *, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex: int = 0,
                  bytesPerRow: int | None = None, bytesPerImage: int | None = None, region=None,
                  featureChannelInfo: MPSImageReadWriteParams | None = None) -> None:
        """``readBytes(_:dataLayout:[bytesPerRow:[bytesPerImage:]region:featureChannelInfo:]imageIndex:)``.

        Copies raw stored elements (uint8, uint16, float16 or float32; no conversion) into
        ``dataBytes`` (a writable NumPy array, tensor, bytearray or ``MTLBuffer``).
        """
        self._access("MPSImage.readBytes", dataBytes, dataLayout, imageIndex, None, bytesPerRow, bytesPerImage,
                     region, featureChannelInfo, write=False)

    def writeBytes(self, dataBytes, /, *, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex: int = 0,
                   bytesPerColumn: int | None = None, bytesPerRow: int | None = None,
                   bytesPerImage: int | None = None, region=None,
                   featureChannelInfo: MPSImageReadWriteParams | None = None) -> None:
        """``writeBytes(_:dataLayout:[bytesPerColumn:][bytesPerRow:[bytesPerImage:]region:featureChannelInfo:]imageIndex:)``."""
        self._access("MPSImage.writeBytes", dataBytes, dataLayout, imageIndex, bytesPerColumn, bytesPerRow,
                     bytesPerImage, region, featureChannelInfo, write=True)

    def _access(self, owner, data, layout, image_index, bpc, bpr, bpi, region, info, write):
        self._cpu_check(owner)
        self._check_element_type(owner, data)
        layout = as_enum(layout, MPSDataLayout, owner, "dataLayout")
        hwc = layout == MPSDataLayout.HeightxWidthxFeatureChannels
        region = MTLRegion(MTLOrigin(0, 0, 0), MTLSize(self._w, self._h, 1)) if region is None \
            else as_region(region, owner, "region")
        (x0, y0, z0), (w, h, depth) = region
        if x0 + w > self._w or y0 + h > self._h:
            raise MPSValueError(f"{owner}: region x {x0}..<{x0 + w}, y {y0}..<{y0 + h} is outside the "
                                f"{self._w}x{self._h} image")
        image_index = as_int(image_index, owner, "imageIndex")
        first = image_index + z0
        if image_index < 0 or first + depth > self._n:
            raise MPSValueError(f"{owner}: imageIndex={image_index} (+ region.origin.z={z0}, depth {depth}) is "
                                f"outside the image's {self._n} images")
        if info is None:
            off, cnt = 0, self._c
        else:
            pair = _integers(info, 2)
            if pair is None:
                raise MPSTypeError(f"{owner}: featureChannelInfo={info!r} must be an MPSImageReadWriteParams "
                                   "(featureChannelOffset, numberOfFeatureChannelsToReadWrite) of integers")
            off, cnt = pair
            if off % 4:
                raise MPSValueError(f"{owner}: featureChannelInfo.featureChannelOffset={off} must be a multiple of 4")
            if cnt <= 0:
                raise MPSValueError(f"{owner}: featureChannelInfo.numberOfFeatureChannelsToReadWrite={cnt} must be > 0")
            if off + cnt > self._c:
                raise MPSValueError(f"{owner}: channels {off}..<{off + cnt} exceed the image's {self._c} channels")
            if off > 0 and cnt % 4 and off + cnt != self._c:
                raise MPSValueError(f"{owner}: numberOfFeatureChannelsToReadWrite={cnt} must be a multiple of 4 "
                                    "when featureChannelOffset > 0 (unless it reaches the last channel)")
        e = np.dtype(NUMPY_DTYPE[self._format]).itemsize
        bpc, bpr, bpi = (None if v is None else as_int(v, owner, name, 0, 2**48) for v, name in (
            (bpc, "bytesPerColumn"), (bpr, "bytesPerRow"), (bpi, "bytesPerImage")))
        if bpc is None:
            bpc = cnt * e if hwc else e
        if bpr is None:
            bpr = (w * bpc) if hwc else w * bpc
        if bpi is None:
            bpi = h * bpr if hwc else cnt * h * bpr
        if hwc and bpc < cnt * e:
            raise MPSValueError(f"{owner}: bytesPerColumn={bpc} is smaller than one pixel ({cnt * e} bytes)")
        if bpr < w * bpc:
            raise MPSValueError(f"{owner}: bytesPerRow={bpr} is smaller than one row of data ({w * bpc} bytes)")
        k = np.arange(depth).reshape(-1, 1, 1, 1)
        r = np.arange(h).reshape(1, -1, 1, 1)
        q = np.arange(w).reshape(1, 1, -1, 1)
        j = np.arange(cnt).reshape(1, 1, 1, -1)
        if hwc:
            offsets = k * bpi + r * bpr + q * bpc + j * e
        else:
            offsets = k * bpi + j * (h * bpr) + r * bpr + q * bpc
        buf = _byte_view(data, owner, writable=not write)
        if offsets.size and offsets.max() + e > buf.size:
            raise MPSValueError(f"{owner}: the data needs {int(offsets.max()) + e} bytes; the buffer holds {buf.size}")
        byte_index = (offsets[..., None] + np.arange(e)).reshape(-1)
        storage = self._ensure_storage()
        window = storage[first:first + depth, y0:y0 + h, x0:x0 + w, off:off + cnt]
        if write:
            raw = buf[byte_index].view(NUMPY_DTYPE[self._format]).reshape(depth, h, w, cnt)
            window.copy_(torch.from_numpy(raw.copy()).view(window.dtype).to(storage.device))  # bits, not values
        else:
            raw = window.cpu().contiguous().view(torch.uint8).numpy().reshape(-1)
            buf[byte_index] = raw

    def _check_element_type(self, owner: str, data) -> None:
        """An array with an element type (NumPy, torch) must have the one this image stores: its
        bytes are copied as they are, so a float64 array into a float32 image would be read as other
        numbers. Raw bytes (bytes, bytearray, memoryview, a uint8 array, an MTLBuffer) go as they are,
        as through Apple's raw pointer."""
        if isinstance(data, torch.Tensor):
            have, want = data.dtype, STORAGE_DTYPE[self._format]
        elif isinstance(data, np.ndarray):
            have, want = data.dtype, np.dtype(NUMPY_DTYPE[self._format])
        else:
            return
        if have == want or have in (torch.uint8, np.dtype(np.uint8)):
            return
        name = str(want).replace("torch.", "")
        convert = f"tensor.to(torch.{name})" if isinstance(data, torch.Tensor) else f"np.asarray(array, np.{name})"
        bits = " (bfloat16 bits: NumPy has no bfloat16)" if self._format == MPSImageFeatureChannelFormat.bfloat16 \
            and not isinstance(data, torch.Tensor) else ""
        raise MPSTypeError(
            f"{owner}: dataBytes holds {str(have).replace('torch.', '')} elements; this image stores "
            f"{self._format.name} as {name}{bits}. Convert it ({convert}) or pass raw bytes (bytes, bytearray, "
            "memoryview, a uint8 array or an MTLBuffer); nothing was copied")

    # -- interop (our additions)
    def torch(self) -> torch.Tensor:
        """The feature values as an NHWC tensor on the image's device (a view for float formats)."""
        self._cpu_check("MPSImage.torch")
        view = self._ensure_storage()[..., : self._c]
        return view if self._format in FLOAT_FORMATS else storage_to_values(view, self._format)

    def numpy(self) -> np.ndarray:
        """The feature values as an NHWC NumPy array (float32 for unorm and bfloat16 formats)."""
        values = self.torch().detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()

    def __array__(self, dtype=None, copy=None):
        values = self.numpy()
        return values if dtype is None else values.astype(dtype)

    def __dlpack__(self, *args, **kwargs):
        return self.torch().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.torch().__dlpack_device__()

    def __repr__(self) -> str:
        kind = type(self).__name__
        return (f"<{kind} {self._w}x{self._h}x{self._c} {self._format.name} x{self._n} "
                f"on {self._device.torch_device}{' label=' + repr(self.label) if self.label else ''}>")

    # -- allocators
    @classmethod
    def defaultAllocator(cls) -> "MPSImageAllocator":
        """``MPSImage.defaultAllocator()``: makes non-temporary images."""
        return _DEFAULT_ALLOCATOR


def unallocated(images) -> list[ImageLayout]:
    """The storages that ``images`` (and the views among them) will allocate when first used: one
    layout per distinct root image whose storage does not exist yet."""
    roots = {id(image._root): image._root for image in images if image._root._storage is None}
    return [root._layout for root in roots.values()]


def _as_range(value, owner: str) -> tuple[int, int]:
    """An ``NSRange``: a ``range`` with step 1 or a ``(location, length)`` pair."""
    if isinstance(value, range):
        if value.step != 1:
            raise MPSValueError(f"{owner}: range {value!r} must have step 1")
        return value.start, max(0, value.stop - value.start)
    pair = _integers(value, 2)
    if pair is None:
        raise MPSTypeError(f"{owner}: {value!r} must be a range or a (location, length) pair of integers")
    loc, length = pair
    if loc < 0 or length < 0:
        raise MPSValueError(f"{owner}: range ({loc}, {length}) must not be negative")
    return loc, length


# --------------------------------------------------------------------------------------------
# Temporary images


class TemporaryHeap:
    """The memory of one command buffer's temporary images, as MPS's heap behind them: when an image
    is released (its ``readCount`` reaches 0), its bytes serve the later temporary images of the same
    command buffer. The work runs in the order it was encoded, so a later image's writes come after
    every read of the earlier one: a network's temporaries take about the memory of the images alive
    at once, not of all of them.

    One block (``arena``) holds them all. It grows in place: its storage is reallocated under the
    images already placed, whose views (and everything bound to them) follow it, since nothing has
    been written to them before the commit; so released images' bytes merge with the free end of the
    block, where separate blocks could not.

    A new image goes where the last command buffer of the queue with the same sequence of images
    (``TemporaryPlan``: the same sizes made and released in the same order, as a network encoded
    again for each frame makes them) had them packed, once it had run, with every lifetime known
    (``memory.packed``): a block of the bytes alive at once, made once. Images placed that way keep
    clear of each other for as long as the sequence repeats; from the first image made or released
    out of it, the rest are placed as they come: in the smallest gap between the images still alive
    that fits, else after the highest of them.

    On the CPU the block outlives its buffer for a while (``keep``): the queue's next buffer takes it
    instead of new memory where nothing holds it any more and it has the size asked."""

    #: Where a piece may start, in bytes: the caching allocator's own alignment, which vector and TMA
    #: loads rely on.
    ALIGN = 512

    def __init__(self, queue):
        self.queue = queue
        self.arena: torch.Tensor | None = None  # uint8, the bytes of every temporary image of the buffer
        self.live: dict[int, tuple[int, int, int]] = {}  # id(storage) -> (start, bytes, take) of those not released
        self.top = 0  # the end of the highest piece handed out: the bytes above it were never written
        self.events: list[tuple[str, int]] = []  # ("take", bytes) and ("give", which take), in order
        self.offsets: list[int] = []  # where each take went
        self.plans = queue._temporary_plans  # by their first event
        self.plan: TemporaryPlan | None = None  # followed while this buffer repeats its events

    @staticmethod
    def of(cb) -> "TemporaryHeap":
        """The heap of the command buffer the next encodes into ``cb`` go into: an MPSCommandBuffer's
        current underlying one, so that images made after a ``commitAndContinue`` never grow a block
        whose work has run (those made before keep their bytes, which later images do not reuse)."""
        cb = underlying(cb)
        heap = cb.__dict__.get("_temporary_heap")
        if heap is None:
            heap = cb.__dict__["_temporary_heap"] = TemporaryHeap(cb._queue)
        return heap

    def take(self, layout, device, cb) -> torch.Tensor:
        """Storage for ``layout`` in the block (zeroed where no image has been before)."""
        need = -(-layout.storage_bytes // self.ALIGN) * self.ALIGN
        event = ("take", need)
        plan = self._plan_with(event)
        if plan is not None:
            start, size = plan.offsets[len(self.offsets)], plan.size
        else:
            start = self._place(need)
            size = start + need
        if self.arena is None or start + need > self.arena.numel():
            self._grow(max(size, start + need, self._hinted(cb, device, start + need)), device.torch_device,
                       exact=plan is not None)
        storage = self.arena[start:start + layout.storage_bytes].view(STORAGE_DTYPE[layout.format])
        storage = storage.view(layout.storage_shape)
        if start < self.top and layout.channels < storage.shape[3]:  # the padding lanes read zero, as in a new image
            cb._record(_ZeroLanes(storage[..., layout.channels:]))
        self.top = max(self.top, start + need)
        self.live[id(storage)] = (start, need, len(self.offsets))
        self.offsets.append(start)
        self._note(event, plan)
        return storage

    @staticmethod
    def _hinted(cb, device, nbytes: int) -> int:
        """The size ``MPSHintTemporaryMemoryHighWaterMark`` asked of the block, where it is more than
        ``nbytes`` and the memory is there; else 0."""
        hint = underlying(cb).__dict__.get("_temporary_reserve", 0)
        if hint <= nbytes:
            return 0
        room = memory.available(device, hint, 0)
        return hint if room is None or hint <= room else 0

    def give(self, storage: torch.Tensor) -> None:
        piece = self.live.pop(id(storage), None)
        if piece is not None:
            event = ("give", piece[2])
            self._note(event, self._plan_with(event))

    def _plan_with(self, event: tuple[str, int]) -> "TemporaryPlan | None":
        """The plan, if it still holds with ``event`` next (the first event picks it)."""
        step = len(self.events)
        plan = self.plans.get(event) if step == 0 else self.plan
        return plan if plan is not None and step < len(plan.events) and plan.events[step] == event else None

    def _note(self, event: tuple[str, int], plan: "TemporaryPlan | None") -> None:
        """``event`` happened (only once it has: a take that failed made no image)."""
        self.events.append(event)
        self.plan = plan

    def _place(self, need: int) -> int:
        """The start of the smallest gap of ``need`` bytes or more between the live images, else the
        end of the highest one."""
        end, best, best_gap = 0, None, None
        for start, size, _ in sorted(self.live.values()):
            gap = start - end
            if gap >= need and (best_gap is None or gap < best_gap):
                best, best_gap = end, gap
            end = max(end, start + size)
        return end if best is None else best

    def _grow(self, nbytes: int, device: torch.device, exact: bool = False) -> None:
        """The block at ``nbytes``: at first the one the queue kept where it serves (``_kept``), else a
        new zeroed one. Grown zeroed, and freed before it is allocated again (so that growing never
        holds both), which is safe as nothing placed in it holds values yet; if the new size cannot be
        had, the old one comes back and the error goes on."""
        if self.arena is None:
            self.arena = self._kept(nbytes, device, exact)
            if self.arena is None:
                self.arena = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            else:  # the last buffer's images were there: every piece is a reused one (``take``)
                self.top = self.arena.numel()
            return
        storage = self.arena.untyped_storage()
        old = storage.nbytes()
        storage.resize_(0)
        try:
            storage.resize_(nbytes)
        except BaseException:
            storage.resize_(old)
            self.arena.zero_()
            raise
        self.arena = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        self.arena.zero_()

    def _kept(self, nbytes: int, device: torch.device, exact: bool) -> torch.Tensor | None:
        """The block a finished buffer of the queue left (``keep``), if it is still kept, no image,
        recorded work or replay holds it any more, and it has ``nbytes`` (``exact``: the size of the
        plan this buffer follows), or at least that many. It leaves the queue either way: one that
        does not serve is freed before a new block is made."""
        with self.queue._lock:
            kept, self.queue._temporary_block = self.queue._temporary_block, None
        if kept is None:
            return None
        block, until = kept
        del kept
        if time.monotonic() > until or block.device != device or not _unheld(block):
            return None
        if block.numel() == nbytes or (not exact and block.numel() > nbytes):
            return block
        return None

    def keep(self, seconds: float) -> None:
        """The buffer's work has run (CPU): its block stays with the queue for ``seconds``
        (``MPSSetHeapCacheDuration``), for the next buffer's temporary images, which then need not
        allocate and touch new memory (a 6 MiB block took 1.8 ms to make on a 2-core CPU, 46 MiB 13
        ms: most of that the first touch of fresh pages)."""
        block, self.arena = self.arena, None
        if block is not None and seconds > 0:
            with self.queue._lock:
                self.queue._temporary_block = (block, time.monotonic() + seconds)

    def finish(self) -> None:
        """The buffer has been committed: its sequence, packed now that every lifetime is known,
        becomes the plan of the queue's next buffers that begin as it did (unless it followed the
        plan there is to the end, or made no temporary image). The packing is kept only where it
        takes fewer bytes than the places this buffer's images had."""
        if not self.events or (self.plan is not None and len(self.events) == len(self.plan.events)):
            return
        pieces = []  # [bytes, first step, last step] of each take
        for step, (kind, value) in enumerate(self.events):
            if kind == "take":
                pieces.append([value, step, len(self.events)])  # alive to the end unless released
            else:
                pieces[value][2] = step
        offsets, size = memory.packed([tuple(piece) for piece in pieces])
        if size >= self.arena.numel():
            offsets, size = self.offsets, self.arena.numel()
        self.plans.pop(self.events[0], None)
        if len(self.plans) >= TemporaryPlan.KEPT:
            del self.plans[next(iter(self.plans))]  # the one least recently made
        self.plans[self.events[0]] = TemporaryPlan(tuple(self.events), tuple(offsets), size)


def _unheld(block: torch.Tensor) -> bool:
    """Whether nothing but ``block`` itself refers to its memory (no image, view, recorded work or
    replay): the storage's count of references, this tensor's and the storage object asked for
    here. Where PyTorch does not say, held."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is not None and count(block.untyped_storage()._cdata) <= 2


class TemporaryPlan(NamedTuple):
    """Where a command buffer's temporary images went, for the next buffers that make the same ones
    (``TemporaryHeap``)."""

    events: tuple  # ("take", bytes) and ("give", which take), in order
    offsets: tuple  # the block offset of each take
    size: int  # the block's bytes

    #: Plans a queue keeps (by their first image's bytes): the networks it runs in turn.
    KEPT = 4


class _ZeroLanes:
    """Recorded work: zero the padding lanes of a reused temporary image's storage."""

    step = None

    def __init__(self, lanes: torch.Tensor):
        self.lanes = lanes

    def __call__(self) -> None:
        self.lanes.zero_()



@keywords("commandBuffer", "imageDescriptor", "textureDescriptor", "featureChannels")
class MPSTemporaryImage(CommandBufferTemporary, MPSImage):
    """``MPSTemporaryImage``: an image that lives inside one command buffer, read ``readCount`` times.

    ``MPSTemporaryImage(commandBuffer=, imageDescriptor=)``,
    ``MPSTemporaryImage(commandBuffer=, textureDescriptor=[, featureChannels=])``.
    """

    _temporary = True
    _kind = "temporary image"

    def __init__(self, **kwargs):
        keys = frozenset(kwargs)
        cb = kwargs.get("commandBuffer")
        if keys == {"commandBuffer", "imageDescriptor"}:
            check_open_buffer(cb, "MPSTemporaryImage")
            self._init_descriptor(cb.device, kwargs["imageDescriptor"], "MPSTemporaryImage")
        elif keys in ({"commandBuffer", "textureDescriptor"}, {"commandBuffer", "textureDescriptor", "featureChannels"}):
            check_open_buffer(cb, "MPSTemporaryImage")
            td = kwargs["textureDescriptor"]
            if td.textureType not in (MTLTextureType.type2D, MTLTextureType.type2DArray) or td.depth != 1:
                raise MPSValueError("MPSTemporaryImage: textureDescriptor must be type2D or type2DArray with depth 1")
            if not td.usage & (MTLTextureUsage.shaderRead | MTLTextureUsage.shaderWrite):
                raise MPSValueError("MPSTemporaryImage: textureDescriptor.usage must include shaderRead or shaderWrite")
            if td.pixelFormat not in FORMAT_OF_PIXEL:
                raise MPSValueError(f"MPSTemporaryImage: pixelFormat={td.pixelFormat!r} is not a feature-channel format")
            fmt, lanes = FORMAT_OF_PIXEL[td.pixelFormat]
            slices = td.arrayLength if td.textureType == MTLTextureType.type2DArray else 1
            c = as_int(kwargs.get("featureChannels", lanes if slices == 1 else 4 * slices), "MPSTemporaryImage",
                       "featureChannels", 1)
            if slices % slices_for(c):
                raise MPSValueError(f"MPSTemporaryImage: arrayLength={slices} is not a multiple of "
                                    f"ceil(featureChannels/4)={slices_for(c)}")
            self._init_descriptor(cb.device, MPSImageDescriptor(
                channelFormat=fmt, width=td.width, height=td.height, featureChannels=c,
                numberOfImages=slices // slices_for(c), usage=td.usage), "MPSTemporaryImage")
        else:
            raise MPSTypeError(
                f"MPSTemporaryImage({', '.join(sorted(keys))}): valid initializers are "
                "MPSTemporaryImage(commandBuffer=, imageDescriptor=) and "
                "MPSTemporaryImage(commandBuffer=, textureDescriptor=[, featureChannels=]); "
                "init(device:imageDescriptor:) and init(texture:featureChannels:) are unavailable"
            )
        self._cb = cb
        self._storage_mode = MTLStorageMode.private
        self._read_count = 1
        self._lifetime_parent: MPSTemporaryImage | None = None

    @classmethod
    def temporaryImage(cls, *, commandBuffer, imageDescriptor) -> "MPSTemporaryImage":
        """ObjC ``+temporaryImageWithCommandBuffer:imageDescriptor:``."""
        return cls(commandBuffer=commandBuffer, imageDescriptor=imageDescriptor)

    @classmethod
    def prefetchStorage(cls, *, commandBuffer, imageDescriptorList) -> None:
        """``prefetchStorage(with:imageDescriptorList:)``: a hint; no effect."""

    @classmethod
    def defaultAllocator(cls) -> "MPSImageAllocator":
        """``MPSTemporaryImage.defaultAllocator()``: makes temporary images with ``readCount == 1``."""
        return _TEMPORARY_ALLOCATOR

    @property
    def readCount(self) -> int:
        return self._read_count

    @readCount.setter
    def readCount(self, value: int) -> None:
        self._set_read_count(value)

    def _allocate(self, layout) -> torch.Tensor:
        return TemporaryHeap.of(self._cb).take(layout, self._device, self._cb)

    def _release(self) -> None:
        if self._storage is not None and self._owns_allocation:
            TemporaryHeap.of(self._cb).give(self._storage)
        self._storage = None
        parent = self._lifetime_parent
        if parent is not None and parent._read_count > 0:
            parent.readCount = parent._read_count - 1

    def _check_alive(self, owner: str) -> None:
        if getattr(self, "_read_count", 1) == 0:
            raise MPSCommandBufferError(f"{owner}: the temporary image was released (readCount reached 0)")

    def _view_class(self) -> "MPSImage":
        return MPSTemporaryImage.__new__(MPSTemporaryImage)

    def _adopt_parent_lifetime(self, parent: "MPSImage") -> None:
        self._cb = parent._cb
        self._storage_mode = MTLStorageMode.private
        self._read_count = 1
        self._lifetime_parent = parent
        parent._read_count += 1  # each view holds one read of its parent

    def _check_for_encode(self, cb: MTLCommandBuffer, owner: str, role: str) -> None:
        super()._check_for_encode(cb, owner, role)
        self._check_temporary(cb, owner, role)

    def _cpu_check(self, owner: str) -> None:
        raise MPSValueError(
            f"{owner}: an MPSTemporaryImage has no CPU access (its contents live only inside its command buffer). "
            "An allocating encode makes one through the kernel's destinationImageAllocator, "
            "MPSTemporaryImage.defaultAllocator() unless you set it: to read the result, set "
            "kernel.destinationImageAllocator = MPSImage.defaultAllocator() before that encode, or encode into an "
            "MPSImage you made")

    def __del__(self):
        if getattr(self, "_read_count", 0) > 0 and getattr(self, "_lifetime_parent", None) is None:
            cb = getattr(self, "_cb", None)
            if cb is not None and cb.status < 2:
                warnings.warn("MPSTemporaryImage destroyed with readCount > 0 before its command buffer was "
                              "committed: a leak on Metal", ResourceWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# Allocators and batches


class MPSImageAllocator:
    """``MPSImageAllocator`` protocol: ``image(cmdBuf, imageDescriptor=, kernel=)`` makes an image.

    Optional: ``imageBatch(cmdBuf, imageDescriptor=, kernel=, count=)``.
    """

    def image(self, commandBuffer, /, imageDescriptor, kernel):
        raise NotImplementedError("an MPSImageAllocator must implement image(commandBuffer, imageDescriptor=, kernel=)")


class _DefaultAllocator(MPSImageAllocator):
    def __init__(self, temporary: bool):
        self.temporary = temporary

    def image(self, commandBuffer, /, imageDescriptor, kernel=None):
        if self.temporary:
            return MPSTemporaryImage(commandBuffer=commandBuffer, imageDescriptor=imageDescriptor)
        return MPSImage(device=commandBuffer.device, imageDescriptor=imageDescriptor)

    def imageBatch(self, commandBuffer, /, imageDescriptor, kernel=None, count=1):
        return [self.image(commandBuffer, imageDescriptor=imageDescriptor, kernel=kernel) for _ in range(count)]

    def __repr__(self) -> str:
        return "MPSTemporaryImage.defaultAllocator()" if self.temporary else "MPSImage.defaultAllocator()"


_DEFAULT_ALLOCATOR = _DefaultAllocator(temporary=False)
_TEMPORARY_ALLOCATOR = _DefaultAllocator(temporary=True)

MPSImageBatch = list  # ``MPSImageBatch`` is ``[MPSImage]``


def _distinct(batch: Sequence, owner: str) -> list:
    """The distinct images of a batch, each checked to be an MPSImage."""
    seen, out = set(), []
    for item in as_list(batch, owner, "batch", allow_none=True) or ():
        if not isinstance(item, MPSImage):
            raise MPSTypeError(f"{owner}: batch holds {item!r}; an MPSImageBatch holds MPSImages")
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def MPSImageBatchIncrementReadCount(batch: Sequence[MPSImage], amount: int) -> int:
    """Adds ``amount`` to each distinct temporary image's ``readCount`` (skipping released ones)."""
    amount = as_int(amount, "MPSImageBatchIncrementReadCount", "amount")
    distinct = _distinct(batch, "MPSImageBatchIncrementReadCount")
    for image in distinct:
        if isinstance(image, MPSTemporaryImage) and image.readCount > 0:
            image.readCount = image.readCount + amount
    return len(distinct)


def MPSImageBatchSynchronize(batch: Sequence[MPSImage], commandBuffer: MTLCommandBuffer) -> None:
    check_open_buffer(commandBuffer, "MPSImageBatchSynchronize")
    for image in _distinct(batch, "MPSImageBatchSynchronize"):
        image.synchronize(on=commandBuffer)


def MPSImageBatchResourceSize(batch: Sequence[MPSImage]) -> int:
    return sum(image.resourceSize() for image in _distinct(batch, "MPSImageBatchResourceSize"))


def MPSImageBatchIterate(batch: Sequence[MPSImage], block: Callable[[MPSImage, int], int]) -> int:
    """Calls ``block(image, firstIndex)`` per distinct image; stops when it returns > ``NSIntegerMin``."""
    if not callable(block):
        raise MPSTypeError(f"MPSImageBatchIterate: block={block!r} is not callable")
    _distinct(batch, "MPSImageBatchIterate")
    result = NSIntegerMin
    seen = set()
    for index, image in enumerate(batch or ()):
        if id(image) in seen:
            continue
        seen.add(id(image))
        result = block(image, index)
        if result > NSIntegerMin:
            break
    return result
