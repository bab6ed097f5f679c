"""Backends: functions of a ``ConvProblem`` and tensors. ``choose`` / ``select`` are the dispatch points.

A backend has ``name``, ``supports(problem, device) -> bool``, ``prepare(weights, bias, prelu,
device)`` (converts a kernel's effective parameters once into its layout; ``weights`` is a
``KeptWeights``, a ``BinaryParams`` or None), ``plan(problem, device)``
(whatever it can work out once per problem), ``bind(plan, src, dst)`` (whatever it can work out
once per encode: views of the source and destination storage), ``run(bound, prepared)`` (at
commit: reads the source storage, writes the destination storage), ``scratch_bytes(problem)``
(at most the temporary memory ``run`` allocates; ``memory`` tiles problems by it) and
``gradient`` (or None): ``gradient(plan, src, e, weights, device) -> (dS, dW, dB)`` for the incoming
gradient ``e`` of a forward problem, with ``gradient_scratch_bytes(problem)`` bounding what it
allocates, and ``neuron_gradient(problem, src, e, e_format, dst, prelu)``: a neuron's ``dS`` written
into ``dst`` (``select_neuron_gradient`` picks the backend). They import ``core`` (the semantics),
``launch`` (what the GPU backends share) and nothing else of the package.
A backend with launch configurations also has ``variants(problem)`` and takes one as ``plan``'s
third argument. Kernels cache plans and prepared parameters; an encode records one bound call.
"""
from __future__ import annotations

from .. import config
from ..errors import MPSValueError
from . import launch, reference, torch as torch_backend, triton as triton_backend

REGISTRY = {"reference": reference.BACKEND, "torch": torch_backend.BACKEND, "triton": triton_backend.BACKEND}


def usable(device) -> list[str]:
    """The backends that can run anything on ``device``: triton needs a CUDA GPU (or its interpreter)."""
    return [name for name in REGISTRY
            if name != "triton" or (launch.available() and (device.is_cuda or launch.interpreting()))]


def _forced(problem, device, gradient: bool):
    forced = config.backend()
    if forced == "auto":
        return None
    backend = REGISTRY[forced]
    if not backend.supports(problem, device) or (gradient and backend.gradient is None):
        what = "the gradient of this problem" if gradient else "this problem"
        raise MPSValueError(f"backend {forced!r} does not support {what} on {device.torch_device}")
    return backend


def candidates(problem, device) -> list:
    """The backends dispatch may pick for a forward problem, fastest first by default: on CUDA the
    fused Triton kernels and cuDNN with a Triton epilogue; elsewhere torch, then the reference."""
    names = ("triton", "torch", "reference") if device.is_cuda else ("torch", "reference")
    return [REGISTRY[name] for name in names if REGISTRY[name].supports(problem, device)]


def select(problem, device, gradient: bool = False):
    """The backend that runs ``problem`` without timing anything: the forced one (``MPSCONV_BACKEND`` /
    ``use_backend``), else the first candidate (with a gradient, when ``gradient``)."""
    backend = _forced(problem, device, gradient)
    if backend is not None:
        return backend
    for backend in candidates(problem, device):
        if not gradient or backend.gradient is not None:
            return backend
    raise MPSValueError(f"no backend supports this problem on {device.torch_device}")


def select_neuron_gradient(problem, e_format: int, device):
    """The backend for a neuron's gradient: the forced one, else on CUDA the fused Triton pass where it
    applies, else torch. A forced triton falls back to torch where its one pass does not apply."""
    forced = config.backend()
    if forced == "reference":
        return REGISTRY["reference"]
    triton = REGISTRY["triton"]
    if forced in ("auto", "triton") and (device.is_cuda or forced == "triton") and \
            triton.neuron_gradient_supported(problem, e_format, device):
        return triton
    return REGISTRY["torch"]


def choose(problem, device):
    """``(backend, plan)`` for a forward problem. On CUDA, unless ``MPSCONV_AUTOTUNE=0``, the eligible
    backends (the forced one only, if one is forced) and their launch configurations are timed once
    per problem signature and the winner is remembered on disk (``tuning``)."""
    backend = _forced(problem, device, False)
    if device.is_cuda and config.autotune() and not problem.empty:
        from . import tuning

        # a forced backend still gets its launch configuration tuned
        eligible = [backend] if backend is not None else [b for b in candidates(problem, device)
                                                          if b.name != "reference"]
        backend, variant = tuning.choose(problem, device, eligible)
        return backend, plan(backend, problem, device, variant)
    backend = backend or select(problem, device)
    return backend, None if problem.empty else plan(backend, problem, device)


def plan(backend, problem, device, variant=None):
    """``backend``'s plan for ``problem``, in its launch configuration ``variant`` if one is given."""
    return backend.plan(problem, device, variant) if variant else backend.plan(problem, device)
