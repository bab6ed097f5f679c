"""Feature-channel formats: what each ``MPSImageFeatureChannelFormat`` stores, and Metal's conversions
between stored elements and feature values (one place, used by images and every backend).

An image stores each format as its raw element type (uint8, uint16, float16, float32, bfloat16);
``storage_to_values`` and ``values_to_storage`` convert on read and write as a GPU read or write
would on Metal.
"""
from __future__ import annotations

import enum
import math
from typing import NamedTuple

import numpy as np
import torch

from ..errors import MPSValueError


class MPSImageFeatureChannelFormat(enum.IntEnum):
    """``MPSImageFeatureChannelFormat``."""

    none = 0
    unorm8 = 1
    unorm16 = 2
    float16 = 3
    float32 = 4
    _reserved0 = 5
    count = 6
    #: Our addition, not Apple's: bfloat16 storage (1 sign, 8 exponent, 7 mantissa bits), for
    #: models trained in bf16. Raw value 16 keeps clear of Apple's range.
    bfloat16 = 16


class MTLPixelFormat(enum.IntEnum):
    """The ``MTLPixelFormat`` values an ``MPSImage`` reports."""

    invalid = 0
    r8Unorm = 10
    r16Unorm = 20
    r16Float = 25
    rg8Unorm = 30
    r32Float = 55
    rg16Unorm = 60
    rg16Float = 65
    rgba8Unorm = 70
    rg32Float = 105
    rgba16Unorm = 110
    rgba16Float = 115
    rgba32Float = 125


F = MPSImageFeatureChannelFormat
STORAGE_DTYPE = {F.unorm8: torch.uint8, F.unorm16: torch.uint16, F.float16: torch.float16, F.float32: torch.float32,
                 F.bfloat16: torch.bfloat16}
#: The element type of raw bytes (readBytes / writeBytes); NumPy has no bfloat16: its bits as uint16.
NUMPY_DTYPE = {F.unorm8: np.uint8, F.unorm16: np.uint16, F.float16: np.float16, F.float32: np.float32,
               F.bfloat16: np.uint16}
FLOAT_FORMATS = (F.float16, F.float32, F.bfloat16)
UNORM_SCALE = {F.unorm8: 255.0, F.unorm16: 65535.0}
PRECISION = {F.unorm8: 8, F.unorm16: 16, F.float16: 11, F.float32: 24, F.bfloat16: 8}
PIXEL_FORMATS = {
    F.unorm8: (MTLPixelFormat.r8Unorm, MTLPixelFormat.rg8Unorm, MTLPixelFormat.rgba8Unorm),
    F.unorm16: (MTLPixelFormat.r16Unorm, MTLPixelFormat.rg16Unorm, MTLPixelFormat.rgba16Unorm),
    F.float16: (MTLPixelFormat.r16Float, MTLPixelFormat.rg16Float, MTLPixelFormat.rgba16Float),
    F.float32: (MTLPixelFormat.r32Float, MTLPixelFormat.rg32Float, MTLPixelFormat.rgba32Float),
}
FORMAT_OF_PIXEL = {pf: (fmt, lanes) for fmt, pfs in PIXEL_FORMATS.items() for pf, lanes in zip(pfs, (1, 2, 4))}


def lanes_for(channels: int) -> int:
    """Lanes per pixel of the texture: 1 or 2 for images of 1 or 2 channels, else 4."""
    return channels if channels <= 2 else 4


def slices_for(channels: int) -> int:
    return (channels + 3) // 4


class ImageLayout(NamedTuple):
    """What an image's storage is: ``images x height x width`` pixels of ``channels`` feature channels
    in ``format``, stored NHWC with the channels rounded up to whole 4-lane slices."""

    images: int
    height: int
    width: int
    channels: int
    format: MPSImageFeatureChannelFormat

    @property
    def storage_shape(self) -> tuple[int, int, int, int]:
        return self.images, self.height, self.width, 4 * slices_for(self.channels)

    @property
    def storage_bytes(self) -> int:
        return math.prod(self.storage_shape) * STORAGE_DTYPE[self.format].itemsize


# --------------------------------------------------------------------------------------------
# Conversions (Metal's rules)


def storage_to_values(raw: torch.Tensor, fmt: MPSImageFeatureChannelFormat, dtype=torch.float32) -> torch.Tensor:
    """Stored elements to feature values: unorm ``k`` reads ``k / 255`` (``k / 65535``)."""
    if fmt in UNORM_SCALE:
        return raw.to(dtype) / UNORM_SCALE[fmt]
    return raw.to(dtype)


def values_to_storage(values: torch.Tensor, fmt: MPSImageFeatureChannelFormat) -> torch.Tensor:
    """Feature values to stored elements: float16 rounds to nearest even (overflow to inf); unorm
    clamps to [0, 1], scales and rounds half to even; NaN written to unorm stores 0."""
    if fmt in UNORM_SCALE:
        scaled = torch.nan_to_num(values, nan=0.0).clamp(0.0, 1.0) * UNORM_SCALE[fmt]
        return torch.round(scaled).to(STORAGE_DTYPE[fmt])
    if fmt == F.float16 and values.dtype == torch.float64:
        # numpy rounds float64 -> float16 once; torch goes through float32 (double rounding).
        with np.errstate(over="ignore"):  # overflow to +-inf is the specified result
            return torch.from_numpy(values.cpu().numpy().astype(np.float16)).to(values.device)
    return values.to(STORAGE_DTYPE[fmt])


def check_format(fmt, owner: str) -> MPSImageFeatureChannelFormat:
    try:
        fmt = MPSImageFeatureChannelFormat(int(fmt))
    except (TypeError, ValueError):
        raise MPSValueError(f"{owner}: featureChannelFormat={fmt!r} is not an MPSImageFeatureChannelFormat") from None
    if fmt in (F._reserved0, F.count):
        raise MPSValueError(
            f"{owner}: featureChannelFormat={fmt.name} cannot make an image; use unorm8, unorm16, float16, float32 "
            "or bfloat16"
        )
    return fmt
