"""Backends: functions of a ``ConvProblem`` and tensors. ``select`` is the one dispatch point.

A backend has ``name``, ``supports(problem, device) -> bool``, ``prepare(weights, bias, prelu,
device)`` (converts a kernel's effective parameters once into its layout), ``plan(problem, device)``
(whatever it can work out once per problem), ``bind(plan, src, dst)`` (whatever it can work out
once per encode: views of the source and destination storage) and ``run(bound, prepared)`` (at
commit: reads the source storage, writes the destination storage). Kernels cache plans and
prepared parameters; an encode records one bound call.
"""
from __future__ import annotations

from .. import config
from ..errors import MPSValueError
from . import reference, torch as torch_backend

REGISTRY = {"reference": reference.BACKEND, "torch": torch_backend.BACKEND}


def select(problem, device):
    """The backend that runs ``problem``: the forced one (``MPSCONV_BACKEND`` / ``use_backend``), else
    the fastest that supports it (torch, then the reference)."""
    forced = config.backend()
    if forced != "auto":
        backend = REGISTRY[forced]
        if not backend.supports(problem, device):
            raise MPSValueError(f"backend {forced!r} does not support this problem on {device.torch_device}")
        return backend
    for name in ("torch", "reference"):
        backend = REGISTRY[name]
        if backend.supports(problem, device):
            return backend
    raise MPSValueError(f"no backend supports this problem on {device.torch_device}")
