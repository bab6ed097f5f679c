"""A network encoded for each frame with MPSTemporaryImages between its layers (the MPS idiom), on the
CPU: milliseconds per frame (encode + commit + wait), for A/B runs of two checkouts in alternating
processes. Each frame makes its temporary images anew; from the second frame on they take the block
the last frame's work left (``image.TemporaryHeap``), placed as packed.

    python -m benchmarks.experiments.temporary_frames [--network mobilenetv2] [--batch 8] [ROOT]

ROOT: the checkout whose mpsconv to import (default this one). Measured 2026-12-08, 2-core AMD EPYC,
2 threads, MobileNetV2 at batch 8, alternating with the tree before the block was kept (8ff918e, as
``git archive 8ff918e | tar -x -C /tmp/head``): 73.6 and 80.9 ms a frame against 102.9 and 102.3 (at
batch 1 the block is 6 MiB, and making it took about 1.8 ms of a 19 ms frame).
"""
import argparse
import os
import statistics
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="mobilenetv2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("root", nargs="?", default=None)
    args = parser.parse_args()
    if args.root:
        sys.path.insert(0, os.path.abspath(args.root))  # the checkout under test, before any installed mpsconv
    from mpsconv import MTLCreateSystemDefaultDevice
    from mpsconv.networks import NETWORKS, Ours, random_weights

    torch.set_num_threads(2 if os.cpu_count() >= 2 else 1)
    net = NETWORKS[args.network]()
    ours = Ours(net, random_weights(net), args.batch, MTLCreateSystemDefaultDevice(), torch.float32, temporary=True)
    ours.load(torch.randn(args.batch, *net.size))
    for _ in range(3):
        ours()
    loops = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(5):
            ours()
        loops.append((time.perf_counter() - start) / 5 * 1e3)
    print(f"{args.network} batch {args.batch}: {statistics.median(loops):.2f} ms a frame "
          f"({min(loops):.2f}..{max(loops):.2f}) from {os.path.dirname(sys.modules['mpsconv'].__file__)}")


if __name__ == "__main__":
    main()
