"""What both GPU backends launch through: loading Triton, ``Launcher`` (fast repeated launches of one
compiled kernel) and the epilogue kernel (bias, neuron, depth-to-space, the store into the
destination's slice), which the triton backend runs after split-K sums and the torch backend after
cuDNN's convolution. Neither backend imports the other; both import this.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors too (slowly), which is how CI checks them.
"""
from __future__ import annotations

import functools
import os

import torch

from ..core.geometry import ConvProblem

_kernels = None  # the jit module, imported on first use: importing Triton costs ~1 s


def available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels():
    global _kernels
    if _kernels is None:
        from . import _triton_kernels

        _kernels = _triton_kernels
    return _kernels


_TL_DTYPES = {}


def tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32})
    return _TL_DTYPES[dtype]


class Launcher:
    """One kernel's launches with fixed constexprs and launch options.

    The first call goes through Triton's ``kernel[grid](...)`` (which compiles and specialises);
    later calls hand the arguments straight to the compiled kernel's launcher, skipping the ~40 µs
    of Python that Triton spends re-deriving the same specialisation for ~35 arguments. The
    arguments must keep their specialisation (same tensors' alignment, same integers), which holds
    for a bound encode; ``Epilogue``'s input (cuDNN's output) may change pointer only. After
    the first call tensors may be given as their addresses (``addresses``): Triton's launcher then
    skips a ``data_ptr()`` call and a driver query per tensor, a few µs per launch.
    """

    __slots__ = ("kernel", "kwargs", "compiled", "tail", "device", "scratch")

    def __init__(self, kernel, kwargs: dict, scratch: bool = False):
        # Products and sums fuse into FMAs, as every measurement and tolerance here assumes: Triton 3.10
        # turns that off unless asked (slower, and rounded once more per multiply-add).
        self.kernel, self.kwargs, self.compiled, self.tail = kernel, dict(kwargs, enable_fp_fusion=True), None, ()
        self.device = None
        self.scratch = scratch  # the kernel asks for global scratch at each launch (``_ensure_allocator``)

    def __call__(self, grid, args) -> None:
        if self.scratch:
            _ensure_allocator()
        compiled = self.compiled
        if compiled is None:
            if "GDC" not in self.kwargs:
                follows = dependent_launch(next(a.device for a in args if isinstance(a, torch.Tensor)))
                self.kwargs["GDC"] = follows
                if follows:
                    self.kwargs["launch_pdl"] = True
            compiled = self.kernel[grid](*args, **self.kwargs)
            if FAST_LAUNCH and not interpreting() and hasattr(compiled, "packed_metadata"):
                names = self.kernel.arg_names
                self.tail = tuple(self.kwargs[name] for name in names[len(args):])
                self.device = args[0].device.index
                self.compiled = compiled
            return
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     torch._C._cuda_getCurrentRawStream(self.device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *self.tail)

    def addresses(self, args: tuple) -> tuple:
        """``args`` with each tensor replaced by its address, once the direct launches have begun (the
        caller keeps the tensors alive); as they are before."""
        if self.compiled is None:
            return args
        return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


def _ensure_allocator() -> None:
    """Kernels that make TMA descriptors on the device need a few bytes of global scratch a program,
    which Triton asks of the allocator in force (a context variable): ours unless the caller set one.
    Runs at every such launch, so Triton's variable is looked up once (``_allocator_var``)."""
    var = _allocator_var()
    if var is None or isinstance(var[0].get(), var[1]):
        import triton

        triton.set_allocator(_scratch)


@functools.cache
def _allocator_var() -> tuple | None:
    """``(Triton's allocator context variable, its type for "none set")``, or None for a Triton that keeps
    them elsewhere: then ours is set at every launch, as without it the launch fails."""
    try:
        from triton.runtime import _allocation

        return _allocation._allocator, _allocation.NullAllocator
    except (ImportError, AttributeError):
        return None


#: Direct launches of compiled kernels after the first (``Launcher``); False: always through Triton.
FAST_LAUNCH = True
#: Programmatic dependent launch where the GPU has it (``dependent_launch``). Off until it has been
#: timed on a GPU against launches without it (``tests/test_cuda.py`` checks both ways give the
#: reference's values); True turns it on.
DEPENDENT_LAUNCH = False


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents of the kernel before them
    (``_triton_kernels._follow``): CUDA devices of compute capability 9.0 on (Hopper), not under the
    interpreter, while ``DEPENDENT_LAUNCH`` is on. Each kernel then waits on the GPU for the one before
    it instead of being launched after it: meant for batch 1, where a network's layers take a few µs
    each and the gaps between launches are a large share of a replay."""
    return (DEPENDENT_LAUNCH and device.type == "cuda" and not interpreting()
            and _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device()))


EPILOGUE_TILE = (32, 64, 4)  # pixels, channels, warps


def needs_wide_index(*tensors) -> bool:
    """Whether any storage has 2**31 elements or more: then offsets are computed in 64 bits."""
    return any(t is not None and t.untyped_storage().nbytes() // t.element_size() >= 2 ** 31 - 1 for t in tensors)


def epilogue_launcher(p: ConvProblem, has_bias: bool, wide: bool, parts: int = 1) -> tuple:
    """``(launcher, (pixels, channels) tile)`` of the epilogue kernel for ``p`` (torch backend on CUDA:
    after cuDNN; split-K launches: adding ``parts`` partial sums)."""
    bp, bc, warps = (16, 16, 1) if interpreting() else EPILOGUE_TILE
    return Launcher(kernels().epilogue_nhwc, dict(SUBPIXEL=p.subpixel, NEURON=int(p.neuron.type), HAS_BIAS=has_bias,
                                                  BP=bp, BC=bc, PARTS=parts, WIDE=wide, num_warps=warps)), (bp, bc)


def epilogue_args(tile, z, y, p, bias, prelu, neuron, part_stride=0) -> tuple:
    """``(grid, args)`` of an epilogue launch reading ``z`` ``[n, gh, gw, O]`` (any strides) and writing
    the destination view ``y`` (NHWC at the first clip pixel and channel)."""
    bp, bc = tile
    n, gh, gw, oc = z.shape
    rows = n * gh * gw
    _, a, b, c, p2 = neuron
    grid = (-(-rows // bp), -(-oc // bc))
    return grid, (z, y if bias is None else bias, y if prelu is None else prelu, y, rows, gh, gw, oc,
                  *z.stride(), *y.stride(), *p.out_size, a, b, c, p2, part_stride)


class Epilogue:
    """The torch backend's CUDA epilogue for one bound encode and its weights: bias, neuron and
    (sub-pixel kernels) depth-to-space from the convolution's output ``z`` ``[n, gh, gw, O]`` (any
    strides) into the destination view ``y`` (NHWC at the first clip pixel and channel).

    The first call compiles through Triton; later calls, while ``z`` keeps its strides, launch with
    every other argument already resolved to addresses and integers: ``z`` is new each run (cuDNN's
    output), nothing else is. ``prepared`` is the owner of ``bias`` and ``prelu``: the caller makes a
    new Epilogue when the weights change."""

    __slots__ = ("problem", "bias", "prelu", "y", "neuron", "prepared", "launch", "grid", "strides", "rest")

    def __init__(self, p: ConvProblem, bias, prelu, y: torch.Tensor, neuron, prepared):
        self.problem, self.bias, self.prelu, self.y, self.neuron, self.prepared = p, bias, prelu, y, neuron, prepared
        self.launch = self.grid = self.strides = self.rest = None

    def __call__(self, z: torch.Tensor) -> None:
        if self.rest is not None and z.stride() == self.strides:
            self.launch[0](self.grid, (z.data_ptr(), *self.rest))
            return
        if self.launch is None:  # 64-bit offsets once the output could reach 2**31 elements
            self.launch = epilogue_launcher(self.problem, self.bias is not None, needs_wide_index(self.y, z))
        launcher, tile = self.launch
        self.grid, args = epilogue_args(tile, z, self.y, self.problem, self.bias, self.prelu, self.neuron)
        launcher(self.grid, args)
        if launcher.compiled is not None:
            self.strides, self.rest = z.stride(), launcher.addresses(args[1:])
