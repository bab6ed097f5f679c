"""Small Metal / MPS value types shared by every layer: offsets, regions, data types, kernel options.

They are immutable named tuples: Swift structs are values, so ``kernel.offset`` is replaced
as a whole (``kernel.offset = MPSOffset(x=1, y=1, z=0)``), never mutated in place.
"""
from __future__ import annotations

import enum
import numbers
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
    return as_region(((x, y, 0), (width, height, 1)), "MTLRegionMake2D", "region")


def MTLRegionMake3D(x: int, y: int, z: int, width: int, height: int, depth: int) -> MTLRegion:
    """``MTLRegionMake3D``."""
    return as_region(((x, y, z), (width, height, depth)), "MTLRegionMake3D", "region")


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


NSIntegerMax = 2**63 - 1


# --------------------------------------------------------------------------------------------
# The one coercion rule for numbers: every public argument and property setter goes through these.


def is_integer(value) -> bool:
    """An integer for the API: ``int``, a NumPy integer, or any object with ``__index__`` (a 0-d
    integer array). Not a bool (Swift's ``Bool`` is no ``Int``), a float (truncating 1.5 or NaN would
    hide a bug), a string or bytes."""
    return not isinstance(value, (bool, np.bool_)) and hasattr(type(value), "__index__")


def as_int(value, owner: str, prop: str, minimum: int = NSIntegerMin, maximum: int = NSIntegerMax) -> int:
    """``value`` as a Python int in ``[minimum, maximum]`` (Swift ``Int``'s range unless narrower), or
    an ``MPSTypeError`` / ``MPSValueError`` naming the owner, the property, the value and the range."""
    if not is_integer(value):
        raise MPSTypeError(f"{owner}: {prop}={value!r} must be an integer, not {type(value).__name__}")
    number = value.__index__()
    if number < minimum:
        raise MPSValueError(f"{owner}: {prop}={number} must be >= {_bound(minimum)}")
    if number > maximum:
        raise MPSValueError(f"{owner}: {prop}={number} must be <= {_bound(maximum)}")
    return number


def _bound(n: int) -> str:
    names = {NSIntegerMin: "-2**63", NSIntegerMax: "2**63 - 1", NSUIntegerMax: "2**64 - 1", 2**31 - 1: "2**31 - 1"}
    return names.get(n, str(n))


def as_enum(value, kind: type[enum.IntEnum], owner: str, prop: str):
    """One of ``kind``'s cases, by its raw value (an integer, as ``as_int`` takes it)."""
    number = as_int(value, owner, prop)
    try:
        return kind(number)
    except ValueError:
        cases = ", ".join(f"{case.name} ({int(case)})" for case in kind)
        raise MPSValueError(f"{owner}: {prop}={number} is not an {kind.__name__} ({cases})") from None


def as_flags(value, kind: type[enum.IntFlag], owner: str, prop: str, ignore_unknown: bool = False):
    """An option set of ``kind``: a non-negative integer whose bits are ``kind``'s (``ignore_unknown``:
    other bits are dropped, as Metal ignores bits it does not know)."""
    number = as_int(value, owner, prop, 0, NSUIntegerMax)
    known = 0
    for case in kind:
        known |= int(case)
    if number & ~known and not ignore_unknown:
        raise MPSValueError(f"{owner}: {prop}={number:#x} has bits that are not {kind.__name__} options "
                            f"(known bits {known:#x})")
    return kind(number & known)


def as_float(value, owner: str, prop: str) -> float:
    """A real number (``int``, ``float``, NumPy scalars; NaN and the infinities are values too).
    Strings, bytes, bools, None and complex numbers are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise MPSTypeError(f"{owner}: {prop}={value!r} must be a real number, not {type(value).__name__}")
    return float(value)


def as_list(value, owner: str, prop: str, allow_none: bool = False) -> list | None:
    """A Swift array argument as a list: a list, a tuple or another iterable of items (not a string,
    bytes or a mapping); None only where ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes, bytearray, memoryview, dict)) or not hasattr(type(value), "__iter__"):
        raise MPSTypeError(f"{owner}: {prop}={value!r} must be a list, not {type(value).__name__}")
    return list(value)


def as_bool(value, owner: str, prop: str) -> bool:
    """A ``Bool``: ``True`` / ``False`` (or NumPy's); integers, strings and None are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise MPSTypeError(f"{owner}: {prop}={value!r} must be True or False, not {type(value).__name__}")


def _integers(value, count: int) -> tuple[int, ...] | None:
    """``value``'s ``count`` components as ints, or None unless each is an integer (not a bool, a
    float or a string: Metal's fields are integers, and truncating 1.5 or NaN would hide a bug)."""
    try:
        parts = tuple(value)
    except Exception:  # not a sequence, or one that fails while read: not an offset either way
        return None
    if len(parts) != count or not all(is_integer(v) for v in parts):
        return None
    return tuple(v.__index__() for v in parts)


def as_offset(value, owner: str) -> MPSOffset:
    parts = _integers(value, 3)
    if parts is None:
        raise MPSTypeError(f"{owner}: offset={value!r} must be an MPSOffset(x, y, z) of integers")
    if not all(NSIntegerMin <= v <= NSIntegerMax for v in parts):
        raise MPSValueError(f"{owner}: offset={value!r} has a component outside Int's range -2**63...2**63-1")
    return MPSOffset(*parts)


def as_size(value, owner: str, prop: str) -> tuple[int, int, int]:
    """An ``MTLSize`` ``(width, height, depth)`` of non-negative integers."""
    parts = _integers(value, 3)
    if parts is None:
        raise MPSTypeError(f"{owner}: {prop}={value!r} must be an MTLSize(width, height, depth) of integers")
    if min(parts) < 0 or max(parts) > NSUIntegerMax:
        raise MPSValueError(f"{owner}: {prop}={value!r} has a component outside 0...2**64 - 1")
    return parts


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
