"""What a depthwise layer's bytes allow any kernel under gpu.py's clock (CUDA): copies of as many bytes
as the layer moves, each timed with gpu.py's ``bench`` (``do_bench`` medians, L2 flushed), as a share
of the same bytes floor (the bandwidth of a 4 GiB copy measured in the same run).

    python -m benchmarks.experiments.copy_ceiling mbv2_dw_56:fp16 mbv2_dw_56:fp32

For each layer of gpu.py's shape table (a depthwise one: as many output as input channels, output as
large as the input): PyTorch's contiguous ``copy_``; Triton copies of the same contiguous bytes, over
blocks of 1K-16K elements, 4-16 warps, loads evicted first or not, stores streaming or not; and copies
of the source into channels ``[K, 2K)`` of a ``2K``-channel destination, as the operation writes:
PyTorch's strided ``copy_`` and gpu.py's Triton one. Prints the best few of each kind.
"""
import itertools
import sys

import torch
import triton
import triton.language as tl

from benchmarks.gpu import DTYPES, bench, copy_bandwidth, slice_copy_ms  # noqa: E402
from mpsconv.bench import SHAPES  # noqa: E402


@triton.jit
def _copy(a, b, n, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr, STREAM: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    v = tl.load(a + i, mask=ok, eviction_policy="evict_first" if EVICT_FIRST else "")
    tl.store(b + i, v, mask=ok, cache_modifier=".cs" if STREAM else "")


def main(specs):
    bandwidth = copy_bandwidth()
    print(f"4 GiB copy: {bandwidth:.3f} TB/s")
    for spec in specs:
        name, dname = spec.split(":")
        _, n, c, h, w, k, *_ = next(s for s in SHAPES if s[0] == name)
        dtype = DTYPES[dname][0]
        src = torch.randn(n, h, w, c, device="cuda").to(dtype)
        dst = torch.empty(n, h, w, 2 * k, device="cuda", dtype=dtype)
        flat = torch.empty_like(src)
        floor = 2 * src.numel() * src.element_size() / (bandwidth * 1e12) * 1e3
        runs = {"contiguous, PyTorch copy_": bench(lambda: flat.copy_(src))}
        for block, warps, first, stream in itertools.product((1024, 4096, 16384), (4, 8, 16), (False, True),
                                                             (False, True)):
            grid = (triton.cdiv(src.numel(), block),)
            runs[f"contiguous, Triton {block} w{warps}{' evict_first' * first}{' .cs' * stream}"] = bench(
                lambda: _copy[grid](src, flat, src.numel(), BLOCK=block, EVICT_FIRST=first, STREAM=stream,
                                    num_warps=warps))
        runs["into the slice, PyTorch copy_"] = bench(lambda: dst[..., k:].copy_(src))
        runs["into the slice, Triton (gpu.py)"] = slice_copy_ms(src, dst, k)
        best = sorted(runs.items(), key=lambda kv: kv[1])
        shown = [kv for kv in best if kv[0].startswith("contiguous, Triton")][:3] + [
            kv for kv in best if not kv[0].startswith("contiguous, Triton")]
        print(f"{name} {dname}: floor {floor * 1e3:.2f} us")
        for label, ms in shown:
            print(f"  {label:48s} {ms * 1e3:7.2f} us {100 * floor / ms:5.1f}% of the floor", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["mbv2_dw_56:fp16", "mbv2_dw_56:fp32"])
