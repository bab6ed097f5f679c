"""Small Metal / MPS value types shared by every layer: offsets, regions, data types, kernel options.

They are immutable named tuples: Swift structs are values, so ``kernel.offset`` is replaced
as a whole (``kernel.offset = MPSOffset(x=1, y=1, z=0)``), never mutated in place.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np

from .errors import MPSTypeError, MPSValueError

NSUIntegerMax = 2**64 - 1
NSIntegerMin = -(2**63)


class MPSOffset(NamedTuple):
    """``MPSOffset``: signed pixel offset (x, y) and image index z."""

    x: int = 0
    y: int = 0
    z: int = 0


class MTLOrigin(NamedTuple):
    """``MTLOrigin``: unsigned pixel origin."""

    x: int = 0
    y: int = 0
    z: int = 0


class MTLSize(NamedTuple):
    """``MTLSize``: unsigned extent."""

    width: int = 0
    height: int = 0
    depth: int = 0


class MTLRegion(NamedTuple):
    """``MTLRegion``: an origin and a size."""

    origin: MTLOrigin = MTLOrigin()
    size: MTLSize = MTLSize()


def MTLRegionMake2D(x: int, y: int, width: int, height: int) -> MTLRegion:
    """``MTLRegionMake2D``: a region of depth 1 at z = 0."""
    return MTLRegion(MTLOrigin(x, y, 0), MTLSize(width, height, 1))


def MTLRegionMake3D(x: int, y: int, z: int, width: int, height: int, depth: int) -> MTLRegion:
    """``MTLRegionMake3D``."""
    return MTLRegion(MTLOrigin(x, y, z), MTLSize(width, height, depth))


#: ``MPSRectNoClip``: the clip region that covers the whole destination.
MPSRectNoClip = MTLRegion(MTLOrigin(0, 0, 0), MTLSize(NSUIntegerMax, NSUIntegerMax, NSUIntegerMax))


class MPSKernelOptions(enum.IntFlag):
    """``MPSKernelOptions``."""

    none = 0
    skipAPIValidation = 1 << 0
    allowReducedPrecision = 1 << 1
    disableInternalTiling = 1 << 2
    insertDebugGroups = 1 << 3
    verbose = 1 << 4


class MPSDataType(enum.IntEnum):
    """``MPSDataType``: element types with Apple's raw values."""

    invalid = 0
    float32 = 0x10000020
    float16 = 0x10000010
    int8 = 0x20000008
    int16 = 0x20000010
    int32 = 0x20000020
    uInt8 = 0x00000008
    uInt16 = 0x00000010
    uInt32 = 0x00000020
    unorm1 = 0x40000001
    unorm8 = 0x40000008


def _integers(value, count: int) -> tuple[int, ...] | None:
    """``value``'s ``count`` components as ints, or None unless each is an integer (not a bool, a
    float or a string: Metal's fields are integers, and truncating 1.5 or NaN would hide a bug)."""
    try:
        parts = tuple(value)
    except TypeError:
        return None
    if len(parts) != count or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in parts):
        return None
    return tuple(int(v) for v in parts)


def as_offset(value, owner: str) -> MPSOffset:
    parts = _integers(value, 3)
    if parts is None:
        raise MPSTypeError(f"{owner}: offset={value!r} must be an MPSOffset(x, y, z) of integers")
    if not all(NSIntegerMin <= v <= -NSIntegerMin - 1 for v in parts):
        raise MPSValueError(f"{owner}: offset={value!r} has a component outside Int's range -2**63...2**63-1")
    return MPSOffset(*parts)


def as_region(value, owner: str, prop: str = "clipRect") -> MTLRegion:
    try:
        origin, size = value
    except (TypeError, ValueError):
        origin = size = None
    origin, size = _integers(origin, 3), _integers(size, 3)
    if origin is None or size is None:
        raise MPSTypeError(
            f"{owner}: {prop}={value!r} must be an MTLRegion(origin=MTLOrigin(x, y, z), size=MTLSize(w, h, d)) "
            "of integers"
        )
    if min(origin) < 0 or min(size) < 0:
        raise MPSValueError(f"{owner}: {prop}={value!r} has a negative component; MTLRegion fields are unsigned")
    if max(origin) > NSUIntegerMax or max(size) > NSUIntegerMax:
        raise MPSValueError(f"{owner}: {prop}={value!r} has a component above NSUIntegerMax = 2**64 - 1")
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))
