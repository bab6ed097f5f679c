"""What makes a network's CUDA memory beyond its weights and images, and what split-K buys for it.

``benchmarks/networks.py --memory`` gives one number per network (the caching allocator's peak above
the weights and images). This breaks it down, for one network of ``mpsconv.networks`` run as plain
encodes into whole images (float16 by default):

- per layer, the backend and launch configuration the autotuner chose, and the scratch a run of
  the triton backend draws (split-K partial sums in float32, or the packed copy of a few-channel
  source), which since a3c20a5 lives only while its run does;
- how many torch-backend layers replay per-layer CUDA graphs (since 276ebc3 the graphs of one
  stream share one memory pool);
- the memory the kernels keep after the runs (prepared weights, graphs' pools) and the peak of a
  run above that;
- with ``--time``, the network plain and replayed against eager's CUDA graph;
- with ``--no-split``, all of the above with the split-K configurations withheld from the
  autotuner: what a split's workspace buys in time (give ``--no-split`` runs their own
  ``MPSCONV_CACHE_DIR``, or the stored choices of the other run are reused).

It asks: should the autotuner weigh a split's memory against its gain (``benchmarks/RESULTS.md``,
CUDA memory)? Runs on the CPU too, where no layer takes the triton backend.

    python -m benchmarks.experiments.cuda_memory [--network resnet50] [--batch 32] [--dtype fp16]
        [--time] [--no-split]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from benchmarks.networks import DTYPES, cuda_graph
from mpsconv import MTLCreateSystemDefaultDevice
from mpsconv.backends import triton as triton_backend
from mpsconv.networks import NETWORKS, Eager, Ours, random_weights, synchronizer, timing

MIB = 2 ** 20


def allocated(tdev) -> int:
    if tdev.type != "cuda":
        return 0
    torch.cuda.synchronize(tdev)
    return torch.cuda.memory_allocated(tdev)


def layers(ours: Ours) -> list[tuple]:
    """``(layer, backend, configuration, scratch bytes a run draws, graphs)`` of each bound encode."""
    rows = []
    for (kernel, _, _), layer in zip(ours.kernels, ours.net.layers):
        for _, bound, *_ in kernel._encoder.bound.values():
            if isinstance(bound, triton_backend.Bound):
                scratch = 0
                if bound.scratch is not None:
                    shape, dtype = bound.scratch
                    scratch = math.prod(shape) * dtype.itemsize
                rows.append((layer.name, "triton", str(bound.plan.config), scratch, 0))
            else:
                graphs = sum(map(bool, getattr(bound, "graphs", {}).values()))
                rows.append((layer.name, type(bound).__module__.rsplit(".", 1)[-1], "-", 0, graphs))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--network", default="resnet50", choices=sorted(NETWORKS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--no-split", action="store_true")
    args = ap.parse_args(argv)
    if args.no_split:
        triton_backend.SPLIT_CONFIGS[:] = []
    device = MTLCreateSystemDefaultDevice()
    tdev, dtype = device.torch_device, DTYPES[args.dtype]
    net = NETWORKS[args.network]()
    weights = random_weights(net)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((args.batch, *net.size)).astype(np.float32)).to(tdev, dtype)
    ours = Ours(net, weights, args.batch, device, dtype)
    ours.load(x)
    built = allocated(tdev)
    with torch.no_grad():
        ours()  # plans, autotunes, prepares the weights
        kept = allocated(tdev)
        if tdev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tdev)
        ours()
        ours()
    after = allocated(tdev)
    peak = torch.cuda.max_memory_allocated(tdev) if tdev.type == "cuda" else 0
    rows = layers(ours)
    for name, backend, config, scratch, graphs in rows:
        if scratch or backend != "triton":
            print(f"{name:<22} {backend:<8} {config:<30} scratch {scratch / MIB:6.1f} MiB  graphs {graphs}")
    scratches = [r[3] for r in rows]
    splits = sorted({r[2] for r in rows if r[1] == "triton" and triton_backend.Config.parse(r[2]).split > 1})
    print(f"{net.name} b{args.batch} {args.dtype}{' (no split-K)' if args.no_split else ''} on {device.name}: "
          f"{sum(r[1] == 'triton' for r in rows)} of {len(rows)} layers on triton, "
          f"{sum(r[3] > 0 for r in rows)} drawing scratch (largest {max(scratches, default=0) / MIB:.1f} MiB, "
          f"all together {sum(scratches) / MIB:.1f}), {sum(r[4] for r in rows)} torch graphs; split configurations: "
          f"{', '.join(splits) or 'none'}")
    print(f"kept after the first run {(kept - built) / MIB:.1f} MiB, after three {(after - built) / MIB:.1f}; "
          f"peak of the last two above what the first kept {(peak - kept) / MIB:.1f} MiB")
    if args.time:
        eager = Eager(net, weights, tdev, dtype)
        xe = x.permute(0, 3, 1, 2)
        with torch.no_grad():
            contenders = {"ours": ours, "ours_replay": ours.replay}
            if tdev.type == "cuda":
                contenders["eager_graph"] = cuda_graph(eager, xe)
            else:
                contenders["eager"] = lambda: eager(xe)
            times = timing(contenders, 5, 1.0, synchronizer(tdev))
        print("ms: " + "  ".join(f"{k} {v[0] * 1e3:.3f} ({v[1] * 1e3:.3f}..{v[2] * 1e3:.3f})" for k, v in times.items()))


if __name__ == "__main__":
    main()
