"""Named knobs: an environment default plus a context-manager override.

``MPSCONV_BACKEND``    ``auto`` (default), ``reference``, ``torch`` or ``triton``: which backend computes.
``MPSCONV_DEVICE``     ``cpu``, ``cuda`` or ``cuda:N``: the default ``MTLDevice``.
``MPSCONV_AUTOTUNE``   ``1`` (default) or ``0``: on CUDA, time the eligible backends once per problem
                       signature and keep the winner on disk; ``0`` takes the first eligible one.
``MPSCONV_CACHE_DIR``  where the autotuner's choices live (default ``$XDG_CACHE_HOME/mpsconv``).
``MPSCONV_MAX_ARCHIVE_BYTES``  the largest secure archive that is read (default 1 GiB; ``K``, ``M``,
                       ``G`` suffixes allowed).
``MPSCONV_MEMORY_LIMIT``  bytes one encode may allocate on the CPU, images it allocates included
                       (default: the memory the system reports available; suffixes as above).
``MPSCONV_NUM_THREADS``  threads the CPU runs a command buffer's work with: a number, or ``auto``
                       (default): PyTorch's own count, less the cores other processes kept busy
                       over the last second or so.
``MPSCONV_REPLAY_SPIN``  ``0`` (default) or ``1``: whether the CPU replay engine's threads (ONNX
                       Runtime's) keep spinning after a replay, as ONNX Runtime's do by default.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path

from .errors import MPSValueError
from .types import as_int

_BACKENDS = ("auto", "reference", "torch", "triton")
class _Local(threading.local):
    backend = None  # a class default: a missing thread-local attribute costs an exception to find


_local = _Local()


def _check_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise MPSValueError(f"MPSCONV_BACKEND={name!r} is not a backend; use one of {', '.join(_BACKENDS)}")
    return name


class _Knob:
    """One environment variable, parsed once per value: encodes read some on every call. Reading
    ``os.environ`` costs ~1 µs (it encodes the key and decodes the value each time); on POSIX CPython
    it is a view of a dict of bytes that it updates in place, where a look-up costs ~30 ns."""

    __slots__ = ("name", "key", "parse", "raw", "value")
    _data = getattr(os.environ, "_data", None) if os.name == "posix" else None
    if not isinstance(_data, dict):
        _data = None

    def __init__(self, name: str, parse):
        self.name, self.key, self.parse = name, os.fsencode(name), parse
        self.raw, self.value = self, None  # ``raw`` starts as a value no environment holds

    def __call__(self):
        data = self._data
        raw = data.get(self.key) if data is not None else os.environ.get(self.name)
        if raw != self.raw:
            self.value, self.raw = self.parse(os.environ.get(self.name)), raw
        return self.value


_BACKEND = _Knob("MPSCONV_BACKEND", lambda raw: _check_backend((raw or "auto").strip().lower() or "auto"))


def backend() -> str:
    """The backend forced by ``use_backend`` or ``MPSCONV_BACKEND``; ``auto`` lets dispatch choose."""
    forced = _local.backend
    return _BACKEND() if forced is None else forced


def use_backend(name: str):
    """Force a backend for the encodes made inside the block (on this thread): ``with use_backend("torch"):``.
    An unknown name is refused here, not when the block starts."""
    if not isinstance(name, str):
        raise MPSValueError(f"use_backend: name={name!r} must be one of {', '.join(_BACKENDS)}")
    return _backend_block(_check_backend(name))


@contextlib.contextmanager
def _backend_block(name: str):
    previous = _local.backend
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def device_override() -> str | None:
    value = os.environ.get("MPSCONV_DEVICE", "").strip().lower()
    return value or None


def autotune() -> bool:
    return os.environ.get("MPSCONV_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


_FLAGS = {"": False, "0": False, "false": False, "no": False, "off": False,
          "1": True, "true": True, "yes": True, "on": True}


def replay_spin() -> bool:
    """``MPSCONV_REPLAY_SPIN``: whether the threads of a CPU replay's ONNX Runtime session keep
    spinning after the replay returns, ready for the next one. Off (default), they stop when it
    returns, so that PyTorch work right after it has its cores: a 3x3 convolution run after each
    replay of MobileNetV2 took 1.3-1.6 ms where it takes 0.8-1.0 alone, and 3.8-5.8 ms with them
    spinning (2 cores). On, replays run back to back 10-15% faster there
    (``benchmarks/experiments/replay_spin.py``). Read when a replayable command buffer is first
    replayed."""
    raw = os.environ.get("MPSCONV_REPLAY_SPIN", "")
    value = _FLAGS.get(raw.strip().lower())
    if value is None:
        raise MPSValueError(f"MPSCONV_REPLAY_SPIN={raw!r}: give 1 (spin after a replay) or 0 (stop, the default)")
    return value


def cache_dir() -> Path:
    """The user cache directory: ``$MPSCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpsconv``, else
    ``~/.cache/mpsconv``."""
    explicit = os.environ.get("MPSCONV_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpsconv"


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(name: str, raw: str | None, default: int | None) -> int | None:
    text = (raw or "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return default
    number, suffix = (text[:-1], text[-1]) if text[-1] in _SUFFIXES else (text, "")
    try:
        value = int(float(number) * _SUFFIXES[suffix])
    except ValueError:
        raise MPSValueError(f"{name}={raw!r} is not a byte count (e.g. 512M, 8G, 1073741824)") from None
    if value <= 0:
        raise MPSValueError(f"{name}={raw!r} must be a positive byte count")
    return value


_MAX_ARCHIVE = _Knob("MPSCONV_MAX_ARCHIVE_BYTES", lambda raw: _parse_bytes("MPSCONV_MAX_ARCHIVE_BYTES", raw, 1 << 30))
_MEMORY_LIMIT = _Knob("MPSCONV_MEMORY_LIMIT", lambda raw: _parse_bytes("MPSCONV_MEMORY_LIMIT", raw, None))


def max_archive_bytes() -> int:
    """The largest archive ``NSKeyedUnarchiver`` and ``load`` read: ``$MPSCONV_MAX_ARCHIVE_BYTES``,
    default 1 GiB (a 3x3 convolution of 4096 -> 4096 channels in float32 is 604 MB)."""
    return _MAX_ARCHIVE()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_limit_override = None


def explicit_memory_limit() -> int | None:
    """The CPU limit set by ``use_memory_limit`` or ``$MPSCONV_MEMORY_LIMIT``, else None."""
    return _MEMORY_LIMIT() if _limit_override is None else _limit_override


def memory_limit() -> int:
    """Bytes one CPU encode may allocate: the explicit limit, else the memory the system reports
    available now."""
    return explicit_memory_limit() or _available_memory()


def use_memory_limit(nbytes: int):
    """Set the CPU memory limit for the block (process-wide, e.g. for tests): a byte count >= 1, as
    ``MPSCONV_MEMORY_LIMIT`` takes."""
    return _memory_limit_block(as_int(nbytes, "use_memory_limit", "nbytes", 1))


@contextlib.contextmanager
def _memory_limit_block(nbytes: int):
    global _limit_override
    previous, _limit_override = _limit_override, nbytes
    try:
        yield
    finally:
        _limit_override = previous


def _parse_threads(raw: str | None) -> int | None:
    text = (raw or "auto").strip().lower()
    if text in ("", "auto"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise MPSValueError(f"MPSCONV_NUM_THREADS={raw!r} is not a thread count; give a number >= 1 or auto") from None
    if value < 1:
        raise MPSValueError(f"MPSCONV_NUM_THREADS={raw!r} must be >= 1 (or auto)")
    return value


_THREADS = _Knob("MPSCONV_NUM_THREADS", _parse_threads)


class _Load:
    """What ``auto`` sees, read at most once a second: the cores this process may run on, and how many
    cores other processes kept busy since the last reading (the system's busy time from
    ``/proc/stat`` less this process's own CPU time, over the same interval). Where ``/proc/stat``
    cannot be read, none."""

    def __init__(self):
        self.lock = threading.Lock()
        self.at = self.stat = self.cpu = None
        self.others = 0
        try:
            self.cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cores = os.cpu_count() or 1

    @staticmethod
    def _system() -> tuple[int, int] | None:
        """``(busy, total)`` jiffies of every CPU since boot."""
        try:
            with open("/proc/stat", "rb") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    def busy_cores(self) -> int:
        now = time.monotonic()
        if self.at is not None and now - self.at < 1.0:
            return self.others
        with self.lock:
            stat, times = self._system(), os.times()
            cpu = times.user + times.system
            if stat is not None and self.stat is not None and stat[1] > self.stat[1]:
                cores = os.cpu_count() or 1
                everyone = (stat[0] - self.stat[0]) / (stat[1] - self.stat[1]) * cores
                mine = (cpu - self.cpu) / max(now - self.at, 1e-3)
                self.others = max(0, math.floor(everyone - mine + 0.25))  # a busy core, not stray ticks
            self.at, self.stat, self.cpu = now, stat, cpu
        return self.others


_LOAD = _Load()


def cpu_threads(default: int) -> int:
    """The threads a command buffer's work runs with on the CPU: ``MPSCONV_NUM_THREADS``, else
    ``default`` (PyTorch's count) less the cores other processes keep busy, at least 1. OpenMP's
    threads wait for each other at every step of an operation, so one that shares its core with a
    busy process holds the others up: fewer threads are faster there (the demo: 9.3 s with 2 threads
    against 4.5 s with 1, two busy processes on 2 cores)."""
    explicit = _THREADS()
    if explicit is not None:
        return explicit
    return max(1, min(default, _LOAD.cores - _LOAD.busy_cores()))
