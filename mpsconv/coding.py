"""Secure archives: ``NSKeyedArchiver`` / ``NSKeyedUnarchiver`` over safetensors (our ``NSSecureCoding``).

An archive is one safetensors file: arrays (weights, biases, batch-norm and PReLU data) as tensors,
every other field as JSON in the metadata, and a SHA-256 digest of both. Nothing is ever
unpickled: decoding parses JSON and raw little-endian arrays, checks the digest and the class, and
rebuilds the object through its normal initializer. A truncated, tampered or wrong-class archive
raises ``MPSArchiveError``, and so does one whose digest was recomputed over hostile fields: every
field is checked by the initializers, and every error they raise while decoding becomes an
``MPSArchiveError``.

Memory: an archive larger than ``config.max_archive_bytes()`` is refused before it is read; every
array is as large as the archive's header declares, and safetensors checks that the archive holds
those bytes; descriptor sizes are checked against the archive's weights before anything is sized by
them. Decoding allocates at most about three times the archive's size (docs/reliability.md).

Swift:  ``let a = NSKeyedArchiver(requiringSecureCoding: true); conv.encode(with: a)``
        ``let u = try NSKeyedUnarchiver(forReadingFrom: a.encodedData)``
        ``let c = MPSCNNConvolution(coder: u, device: device)``
Python: ``a = NSKeyedArchiver(requiringSecureCoding=True); conv.encode(a)``
        ``u = NSKeyedUnarchiver(forReadingFrom=a.encodedData)``
        ``c = MPSCNNConvolution(coder=u, device=device)``;  or ``mpsconv.save(conv, path)`` /
        ``mpsconv.load(path, device=device)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import safetensors.numpy

from ._api import Strict
from . import _codecs, config
from .errors import MPSArchiveError, MPSConvError, MPSTypeError

FORMAT = "mpsconv.archive"
VERSION = "1"


class NSCoder(Strict):
    """Base of the archiver and unarchiver."""

    requiresSecureCoding = True


def _digest(class_name: str, fields_json: str, tensors: dict) -> str:
    h = hashlib.sha256()
    h.update(class_name.encode())
    h.update(b"\0")
    h.update(fields_json.encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}:{arr.dtype.str}:{arr.shape}\0".encode())
        h.update(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")  # no copy of the array
    return h.hexdigest()


class NSKeyedArchiver(NSCoder):
    """``NSKeyedArchiver(requiringSecureCoding:)``: collects one root object's fields."""

    def __init__(self, requiringSecureCoding: bool = True):
        if not requiringSecureCoding:
            raise MPSTypeError("NSKeyedArchiver: mpsconv archives are always secure (requiringSecureCoding=True)")
        self._data: bytes | None = None

    def encodeRootObject(self, obj) -> None:
        class_name, fields, tensors = _codecs.encode_object(obj)
        fields_json = json.dumps(fields, sort_keys=True)
        metadata = {"format": FORMAT, "version": VERSION, "class": class_name, "fields": fields_json,
                    "digest": _digest(class_name, fields_json, tensors)}
        self._data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                            metadata=metadata)

    def finishEncoding(self) -> None:
        """Nothing to flush: the data is complete after ``encode``."""

    @property
    def encodedData(self) -> bytes:
        if self._data is None:
            raise MPSArchiveError("NSKeyedArchiver.encodedData: nothing was encoded; call obj.encode(archiver)")
        return self._data

    @classmethod
    def archivedData(cls, *, withRootObject, requiringSecureCoding: bool = True) -> bytes:
        """``NSKeyedArchiver.archivedData(withRootObject:requiringSecureCoding:)``."""
        archiver = cls(requiringSecureCoding)
        archiver.encodeRootObject(withRootObject)
        return archiver.encodedData


def _parse(data) -> tuple[str, dict, dict]:
    """Validate an archive and return ``(class name, fields, tensors)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MPSTypeError(f"NSKeyedUnarchiver: archive data must be bytes, not {type(data).__name__}")
    limit = config.max_archive_bytes()
    if len(data) > limit:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive has {len(data)} bytes; the limit is {limit} "
                              "(MPSCONV_MAX_ARCHIVE_BYTES)")
    data = bytes(data)
    if len(data) < 8:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive is truncated ({len(data)} bytes; not a safetensors file)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive is truncated (header of {header_len} bytes, "
                              f"{len(data) - 8} present)")
    try:
        header = json.loads(data[8:8 + header_len])
        metadata = header["__metadata__"]
        dtypes = {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MPSArchiveError("NSKeyedUnarchiver: the archive header is not valid safetensors JSON with metadata") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise MPSArchiveError("NSKeyedUnarchiver: this is not an mpsconv archive (metadata format "
                              f"{metadata.get('format') if isinstance(metadata, dict) else None!r})")
    if metadata.get("version") != VERSION:
        raise MPSArchiveError(f"NSKeyedUnarchiver: archive version {metadata.get('version')!r}; this mpsconv reads "
                              f"version {VERSION}")
    if not dtypes <= _DTYPES:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive holds arrays of type {sorted(dtypes - _DTYPES)}; "
                              f"mpsconv archives hold only {sorted(_DTYPES)}")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own error type for bad offsets and sizes
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive's tensors are corrupt: {exc}") from None
    class_name, fields_json = metadata.get("class", ""), metadata.get("fields", "")
    if _digest(class_name, fields_json, tensors) != metadata.get("digest"):
        raise MPSArchiveError("NSKeyedUnarchiver: the archive's digest does not match its contents "
                              "(it was modified or damaged)")
    try:
        fields = json.loads(fields_json)
    except (ValueError, RecursionError):
        raise MPSArchiveError("NSKeyedUnarchiver: the archive's fields are not valid JSON") from None
    if not isinstance(fields, dict):
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive's fields are a {type(fields).__name__}, not an object")
    return class_name, fields, tensors


_DTYPES = {"F32", "I64"}  # what encodeRootObject writes


def _decode(class_name: str, obj, fields: dict, tensors: dict, device) -> None:
    """``_codecs.decode_into`` with every error an initializer raises over a field made an
    ``MPSArchiveError`` (a hostile archive can carry a valid digest over any fields)."""
    try:
        _codecs.decode_into(obj, fields, tensors, device)
    except MPSArchiveError:
        raise
    except (MPSConvError, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError) as exc:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archived {class_name} has an invalid field: "
                              f"{type(exc).__name__}: {exc}") from exc


class NSKeyedUnarchiver(NSCoder):
    """``NSKeyedUnarchiver(forReadingFrom:)``: validates the archive at once.

    Pass it as ``coder=`` to a class initializer (``MPSCNNConvolution(coder=u, device=d)``), or use
    ``NSKeyedUnarchiver.unarchivedObject(ofClass, data, device=)``. A decoder without a device uses
    ``mpsMTLDevice()`` when it has one (``MPSDeviceProvider``), else the system default device.
    """

    def __init__(self, forReadingFrom, *, device=None):
        self._class_name, self._fields, self._tensors = _parse(forReadingFrom)
        self._device = device

    def mpsMTLDevice(self):
        """``MPSDeviceProvider``: the device given at creation, if any."""
        return self._device

    @property
    def className(self) -> str:
        return self._class_name

    def decodeInto(self, obj, device=None) -> None:
        """Fill ``obj`` (a fresh instance of the archived class or a base class of it)."""
        cls = _codecs.class_named(self._class_name)
        if cls is None or not issubclass(cls, type(obj)):
            raise MPSArchiveError(f"NSKeyedUnarchiver: the archive holds a {self._class_name}; cannot decode it as "
                                  f"{type(obj).__name__}")
        if type(obj) is not cls:
            obj.__class__ = cls  # decoding as a base class yields the archived subclass
        _decode(self._class_name, obj, self._fields, self._tensors, device or self._device)

    @classmethod
    def unarchivedObject(cls, ofClass, data, /, *, device=None):
        """``NSKeyedUnarchiver.unarchivedObject(ofClass:from:)``; ``device=`` chooses the device."""
        unarchiver = cls(data, device=device)
        stored = _codecs.class_named(unarchiver._class_name)
        if stored is None or not issubclass(stored, ofClass):
            raise MPSArchiveError(f"NSKeyedUnarchiver.unarchivedObject: the archive holds a "
                                  f"{unarchiver._class_name}, not a {ofClass.__name__}")
        obj = stored.__new__(stored)
        _decode(unarchiver._class_name, obj, unarchiver._fields, unarchiver._tensors, device)
        return obj


def save(obj, path: str | os.PathLike) -> None:
    """Write ``obj``'s secure archive to ``path`` (our addition)."""
    _check_path(path, "save")
    data = NSKeyedArchiver.archivedData(withRootObject=obj)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise MPSArchiveError(f"save: cannot write {os.fspath(path)!r}: {exc.strerror}") from None


def _check_path(path, owner: str) -> None:
    """A file name (``str``, ``bytes`` or ``os.PathLike``); not an integer, which ``open`` would take as
    a file descriptor of the process (and close)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise MPSTypeError(f"{owner}: path={path!r} must be a file name (str or os.PathLike)")


def _read_bounded(f, limit: int, name: str) -> bytes:
    """An archive's bytes, as many as its header declares and no more (a device file or a pipe has no
    size to check first: ``/dev/zero`` is refused after 8 bytes, not a gigabyte)."""
    head = f.read(8)
    if len(head) < 8:
        return head  # too short: the parser says so
    (header_len,) = struct.unpack("<Q", head)
    if header_len > limit - 8:
        raise MPSArchiveError(f"load: {name!r} declares a header of {header_len} bytes; the limit is {limit} "
                              "(MPSCONV_MAX_ARCHIVE_BYTES)")
    header = f.read(header_len)
    try:
        entries = json.loads(header)
        ends = [int(entry["data_offsets"][1]) for key, entry in entries.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        ends = []  # not a valid header: the parser says what is wrong with it
    total = 8 + len(header) + max(ends, default=0)
    if total > limit:
        raise MPSArchiveError(f"load: {name!r} declares {total} bytes; the limit is {limit} (MPSCONV_MAX_ARCHIVE_BYTES)")
    rest = f.read(total - 8 - len(header))
    if f.read(1):
        raise MPSArchiveError(f"load: {name!r} holds more bytes than its header declares")
    return head + header + rest


def load(path: str | os.PathLike, *, ofClass=object, device=None):
    """Read a secure archive written by ``save`` (our addition)."""
    _check_path(path, "load")
    limit = config.max_archive_bytes()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise MPSArchiveError(f"load: {os.fspath(path)!r} has {size} bytes; the limit is {limit} "
                                      "(MPSCONV_MAX_ARCHIVE_BYTES)")
            data = _read_bounded(f, limit, os.fspath(path))
    except OSError as exc:
        raise MPSArchiveError(f"load: cannot read {os.fspath(path)!r}: {exc.strerror}") from None
    return NSKeyedUnarchiver.unarchivedObject(ofClass, data, device=device)
