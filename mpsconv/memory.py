"""Memory for an encode: what it will allocate, whether that fits, and the tiles that make it fit.

Metal would fail a command buffer that runs out of memory; we refuse the encode instead, before it
records anything or allocates a storage (docs/reliability.md "Memory"). An encode allocates the
storage of images it is the first to touch (an allocating encode's destination, a never-written
source) and the backend's scratch memory (``scratch_bytes``). Scratch grows with the image, so a
problem whose scratch exceeds the tile budget runs as bands of rows (``geometry.tiles``): the
images must fit, their scratch need not.

CPU: the limit is ``config.memory_limit()`` (``MPSCONV_MEMORY_LIMIT``, else the memory the system
reports available). CUDA: the GPU's free memory plus what PyTorch's allocator holds unused, asked
for when an encode allocates images (``available``). Encodes needing less than ``SMALL`` are not
measured against the system (reading it costs more than such an encode).
"""
from __future__ import annotations

import torch

from . import config
from .errors import MPSMemoryError
from .core.geometry import ConvProblem, tiles

SMALL = 64 << 20
#: The largest scratch one tile may take: a quarter of the limit, at most this.
TILE_BYTES = 1 << 30


def limit(device) -> int:
    """Bytes an encode on ``device`` may allocate now."""
    if device.is_cuda:
        free, _ = torch.cuda.mem_get_info(device.torch_device)
        cached = torch.cuda.memory_reserved(device.torch_device) - torch.cuda.memory_allocated(device.torch_device)
        return free + cached
    return config.memory_limit()


def available(device, new: int, scratch: int) -> int | None:
    """Bytes an encode that allocates ``new`` bytes of storage and ``scratch`` bytes of scratch may
    use, or None when it need not look. CPU: an explicit limit always applies; the system's figure
    from ``SMALL`` bytes up. CUDA: the GPU is asked only when the encode allocates ``SMALL`` bytes of
    storage or more; a steady-state encode (its images exist) makes no driver call, and running out
    of memory in the work fails its command buffer instead (``outOfMemory``)."""
    if device.is_cuda:
        return limit(device) if new >= SMALL else None
    explicit = config.explicit_memory_limit()
    if explicit is not None:
        return explicit
    return limit(device) if new + scratch >= SMALL else None


def tile_budget(device, available: int) -> int:
    """The scratch one tile may take: a quarter of what is available, at most ``TILE_BYTES`` on the
    CPU (bands of a few hundred MB cost the CPU's convolutions nothing); half of it on CUDA."""
    return max(1, available // 2 if device.is_cuda else min(TILE_BYTES, available // 4))


def split(problem: ConvProblem, backend, budget: int) -> list[ConvProblem]:
    """``problem`` cut so that each piece's scratch fits ``budget``: into groups of whole images
    when one image fits, else into row bands of one image (one grid row at the finest, which may
    still not fit: ``check`` then refuses the encode). ``[problem]`` when it fits whole."""
    scratch = backend.scratch_bytes
    if scratch(problem) <= budget or problem.empty:
        return [problem]
    per_image = scratch(tiles(problem, problem.grid[0], 1)[0])
    if per_image <= budget:
        return tiles(problem, problem.grid[0], max(1, budget // per_image))
    per_row = scratch(tiles(problem, 1, 1)[0])
    return tiles(problem, max(1, budget // per_row), 1)


def check(owner: str, device, new_bytes: int, scratch: int, available: int | None) -> None:
    """Raise ``MPSMemoryError`` unless ``new_bytes`` of storage plus ``scratch`` fit in ``available``
    (None: nothing to check)."""
    required = new_bytes + scratch
    if available is not None and required > available:
        where = "on the GPU" if device.is_cuda else "(MPSCONV_MEMORY_LIMIT or mpsconv.use_memory_limit)"
        raise MPSMemoryError(
            f"{owner}: the encode needs {_size(required)} ({_size(new_bytes)} for image storage it allocates, "
            f"{_size(scratch)} of scratch); {_size(available)} is available {where}. Nothing was encoded; "
            "use smaller or fewer images, or raise the limit")


def check_allocation(owner: str, device, nbytes: int) -> None:
    """Refuse, before allocating, ``nbytes`` of storage that cannot fit (``SMALL`` bytes and up are
    measured, as an encode's are)."""
    room = available(device, nbytes, 0)
    if room is not None and nbytes > room:
        where = "on the GPU" if device.is_cuda else "(MPSCONV_MEMORY_LIMIT or mpsconv.use_memory_limit)"
        raise MPSMemoryError(f"{owner}: needs {_size(nbytes)}; {_size(room)} is available {where}. Nothing was "
                             "allocated")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (the CPU allocator raises RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "alloc" in str(exc))


def allocation_failed(owner: str, nbytes: int | None, exc: BaseException) -> MPSMemoryError:
    """The allocator's own out-of-memory error, as ours."""
    if nbytes is None:
        return MPSMemoryError(f"{owner} ran out of memory: {type(exc).__name__}: {exc}")
    return MPSMemoryError(f"{owner}: allocating {_size(nbytes)} failed: {type(exc).__name__}: {exc}")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def packed(pieces: list[tuple[int, int, int]]) -> tuple[list[int], int]:
    """Offsets for ``pieces`` of ``(bytes, first, last)`` (each in use from step ``first`` to step
    ``last``, both included) such that no two in use at a same step overlap, and the bytes they take
    in all. The largest first, each at the start of the smallest gap that fits between the pieces
    placed so far that are in use with it, else above them ("greedy by size", the planner of
    TensorFlow Lite's arena): with every lifetime known in advance this takes the bytes in use at
    once for chains of layers, where placing as they come cannot know what comes later."""
    offsets: list[int | None] = [None] * len(pieces)
    placed: list[int] = []
    for i in sorted(range(len(pieces)), key=lambda i: (-pieces[i][0], pieces[i][1])):
        size, first, last = pieces[i]
        end, best, best_gap = 0, None, None
        for start, stop in sorted((offsets[j], offsets[j] + pieces[j][0]) for j in placed
                                  if pieces[j][1] <= last and first <= pieces[j][2]):
            gap = start - end
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = end, gap
            end = max(end, stop)
        offsets[i] = end if best is None else best
        placed.append(i)
    return offsets, max((offsets[i] + pieces[i][0] for i in placed), default=0)
