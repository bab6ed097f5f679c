"""Named knobs: an environment default plus a context-manager override.

``MPSCONV_BACKEND``    ``auto`` (default), ``reference``, ``torch`` or ``triton``: which backend computes.
``MPSCONV_DEVICE``     ``cpu``, ``cuda`` or ``cuda:N``: the default ``MTLDevice``.
``MPSCONV_AUTOTUNE``   ``1`` (default) or ``0``: on CUDA, time the eligible backends once per problem
                       signature and keep the winner on disk; ``0`` takes the first eligible one.
``MPSCONV_CACHE_DIR``  where the autotuner's choices live (default ``$XDG_CACHE_HOME/mpsconv``).
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

_BACKENDS = ("auto", "reference", "torch", "triton")
_local = threading.local()


def _check_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"MPSCONV_BACKEND={name!r} is not a backend; use one of {', '.join(_BACKENDS)}")
    return name


_env_cache: tuple[str | None, str] = (None, "auto")


def backend() -> str:
    """The backend forced by ``use_backend`` or ``MPSCONV_BACKEND``; ``auto`` lets dispatch choose."""
    global _env_cache
    forced = getattr(_local, "backend", None)
    if forced is not None:
        return forced
    raw = os.environ.get("MPSCONV_BACKEND")
    if raw != _env_cache[0]:  # parsed once per value: this runs on every encode
        _env_cache = (raw, _check_backend((raw or "auto").strip().lower() or "auto"))
    return _env_cache[1]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the encodes made inside the block (on this thread)."""
    previous = getattr(_local, "backend", None)
    _local.backend = _check_backend(name)
    try:
        yield
    finally:
        _local.backend = previous


def device_override() -> str | None:
    value = os.environ.get("MPSCONV_DEVICE", "").strip().lower()
    return value or None


def autotune() -> bool:
    return os.environ.get("MPSCONV_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """The user cache directory: ``$MPSCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpsconv``, else
    ``~/.cache/mpsconv``."""
    explicit = os.environ.get("MPSCONV_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpsconv"
