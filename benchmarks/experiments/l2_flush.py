"""How the benchmark's clock weighs on depthwise layers (CUDA): ``triton.testing.do_bench`` empties L2
before each run by writing a 256 MB buffer, which leaves L2 full of dirty lines that the timed kernel
then writes back to memory; a flush that only reads leaves clean lines, which cost nothing to evict.

    python -m benchmarks.experiments.l2_flush mbv2_dw_56:fp16 mbv2_dw_56:fp32 mbv2_dw_14:fp16

For each layer of gpu.py's shape table: a plain contiguous ``copy_`` of as many bytes, and our
triton backend's first three depthwise candidates (no autotuning), each timed both ways (medians),
as a share of the bytes floor at the bandwidth of a 4 GiB copy measured in the same run.
"""
import os
import sys

import torch

os.environ.setdefault("MPSCONV_AUTOTUNE", "0")
from benchmarks.gpu import bench, copy_bandwidth, copy_of  # noqa: E402
from benchmarks.experiments.tiles import layer  # noqa: E402
from mpsconv import MTLCreateSystemDefaultDevice  # noqa: E402
from mpsconv.backends import triton as tb  # noqa: E402
from mpsconv.bench import SHAPES  # noqa: E402


def read_flushed(fn, flush: torch.Tensor, reps: int = 200) -> float:
    """Median ms of ``fn`` with L2 filled with clean lines of ``flush`` before each run."""
    sink = torch.empty((), device=flush.device)
    events = []
    for _ in range(reps + 10):
        torch.sum(flush, dim=0, out=sink)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in events[10:])
    return ms[len(ms) // 2]


def main(specs):
    device = MTLCreateSystemDefaultDevice()
    flush = torch.randn(256 * 1024 ** 2 // 4, device="cuda")
    bandwidth = copy_bandwidth()
    print(f"4 GiB copy: {bandwidth:.2f} TB/s")
    for spec in specs:
        name, dname = spec.split(":")
        op = layer(device, next(s for s in SHAPES if s[0] == name), dname)
        nbytes = (op.x.numel() + op.want.numel()) * op.x.element_size()
        floor = nbytes / (bandwidth * 1e12) * 1e3
        runs = {"copy": copy_of(nbytes, op.x.dtype)}
        for cfg in tb.DEPTHWISE_CONFIGS[:3]:
            bound = tb.Bound(tb.Plan(op.problem, device, cfg), op.src, op.dst)
            runs[f"ours {cfg}"] = lambda bound=bound: tb.run(bound, op.prepared)
        for label, fn in runs.items():
            written = bench(fn)
            read = read_flushed(fn, flush)
            print(f"{name} {dname} {label:24s} do_bench {written * 1e3:6.2f} us {100 * floor / written:5.1f}% | "
                  f"read-only flush {read * 1e3:6.2f} us {100 * floor / read:5.1f}% of the floor", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
