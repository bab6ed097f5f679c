"""CPU benchmark: the MPS operation against PyTorch eager on the same work, in one run.

The unit is the whole MPS operation: convolution + bias + ReLU written into a channel slice of a
larger image (``destinationFeatureChannelOffset``). PyTorch's equivalent is what a user would
write: channels-last ``conv2d`` with bias, ``relu_``, copy into the slice. Both read the same
NHWC data. Each measurement is the median of repeated runs, alternating ours and PyTorch's so
that drift hits both. Also measured: the per-kernel cost of encode + commit on a 1x1x8x8 problem.

    python benchmarks/cpu.py [--quick] [--batch N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import mpsconv  # noqa: E402
from mpsconv import (  # noqa: E402
    MPSCNNConvolution, MPSCNNConvolutionDataSource, MPSCNNConvolutionDescriptor, MPSCNNNeuronType, MPSDataType,
    MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MPSOffset,
    MTLCreateSystemDefaultDevice,
)
from shapes import SHAPES  # noqa: E402


class Weights(MPSCNNConvolutionDataSource):
    def __init__(self, desc, w, b):
        self.desc, self.w, self.b = desc, w, b

    def dataType(self):
        return MPSDataType.float32

    def descriptor(self):
        return self.desc

    def weights(self):
        return self.w

    def biasTerms(self):
        return self.b


def timed(fn, budget_s: float, max_reps: int = 200) -> list[float]:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def paired_medians(a, b, budget_s: float) -> tuple[float, float]:
    """Medians of ``a`` and ``b`` timed in alternating rounds (seconds)."""
    ta, tb = [], []
    for _ in range(3):
        ta += timed(a, budget_s / 6)
        tb += timed(b, budget_s / 6)
    return statistics.median(ta), statistics.median(tb)


def mps_operation(device, queue, n, c, h, w, k, r, s, stride, pad, dil, groups, dtype, rng):
    fmt = MPSImageFeatureChannelFormat.float16 if dtype == torch.float16 else MPSImageFeatureChannelFormat.float32
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    wt = (rng.standard_normal((k, r, s, c // groups), dtype=np.float32) * 0.1)
    bias = rng.standard_normal(k, dtype=np.float32)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=s, kernelHeight=r, inputFeatureChannels=c, outputFeatureChannels=k)
    desc.strideInPixelsX = desc.strideInPixelsY = stride
    desc.dilationRateX = desc.dilationRateY = dil
    desc.groups = groups
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    conv = MPSCNNConvolution(device=device, weights=Weights(desc, wt, bias))
    kd = (r - 1) * dil + 1
    conv.offset = MPSOffset((kd >> 1) - pad, (kd >> 1) - pad, 0)
    conv.destinationFeatureChannelOffset = k  # write the second half of a 2K-channel image
    p = (h + 2 * pad - kd) // stride + 1
    q = (w + 2 * pad - kd) // stride + 1
    src = MPSImage.from_numpy(x, featureChannelFormat=fmt, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=fmt, width=q, height=p, featureChannels=2 * k, numberOfImages=n))

    def ours():
        cb = queue.makeCommandBuffer()
        conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()

    # PyTorch eager on the same NHWC data: channels-last conv with bias, relu_, copy into the slice.
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels-last NCHW view
    tw = torch.from_numpy(conv._loaded.weights).permute(0, 3, 1, 2)
    tb = torch.from_numpy(bias)
    out = torch.zeros(n, p, q, 2 * k).permute(0, 3, 1, 2)
    if dtype == torch.float16:  # PyTorch CPU has no fast half conv; compute in float32 as we do
        tx16 = tx.half()
        out = out.half()

        def torch_eager():
            y = F.conv2d(tx16.float(), tw, tb, stride, pad, dil, groups)
            y.relu_()
            out[:, k:].copy_(y)
    else:
        def torch_eager():
            y = F.conv2d(tx, tw, tb, stride, pad, dil, groups)
            y.relu_()
            out[:, k:].copy_(y)

    torch_eager()
    ours()
    got = dst.torch()[..., k:].permute(0, 3, 1, 2).float()
    tol = 2e-2 if dtype == torch.float16 else 1e-3
    assert torch.allclose(got, out[:, k:].float(), rtol=tol, atol=tol), "mpsconv and PyTorch disagree"
    flops = 2 * n * k * p * q * (c // groups) * r * s
    return ours, torch_eager, flops


def encode_overhead(device, queue, budget_s):
    """Per-kernel cost of encode + commit on a 1x1x8x8 problem, against the bare torch op."""
    rng = np.random.default_rng(0)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=8, outputFeatureChannels=8)
    conv = MPSCNNConvolution(device=device, weights=Weights(desc, rng.standard_normal(64, dtype=np.float32), None))
    src = MPSImage.from_numpy(rng.standard_normal((1, 1, 8), dtype=np.float32), device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=1, height=1, featureChannels=8))
    tx = torch.from_numpy(src.numpy()).permute(0, 3, 1, 2)
    tw = torch.from_numpy(conv._loaded.weights).permute(0, 3, 1, 2)
    tout = torch.zeros(1, 8, 1, 1)
    batch = 100

    def one():
        cb = queue.makeCommandBuffer()
        conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()

    def many():
        cb = queue.makeCommandBuffer()
        for _ in range(batch):
            conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()

    def bare():
        tout.copy_(F.conv2d(tx, tw))

    def encode_only():
        cb = queue.makeCommandBuffer()
        for _ in range(batch):
            conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)

    t_one, t_bare = paired_medians(one, bare, budget_s)
    t_many = statistics.median(timed(many, budget_s / 2)) / batch
    t_encode = statistics.median(timed(encode_only, budget_s / 2)) / batch
    return dict(one_commit_each_us=t_one * 1e6, shared_commit_us=t_many * 1e6, encode_only_us=t_encode * 1e6,
                torch_op_us=t_bare * 1e6, overhead_one_us=(t_one - t_bare) * 1e6,
                overhead_shared_us=(t_many - t_bare) * 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="images per shape (the table uses 32; we scale to 1-2)")
    parser.add_argument("--quick", action="store_true", help="a short time budget per shape")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = MTLCreateSystemDefaultDevice()
    queue = device.makeCommandQueue()
    budget = 0.6 if args.quick else 3.0
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    rng = np.random.default_rng(0)
    print(f"mpsconv {mpsconv.__version__}, torch {torch.__version__}, {device.name}, {torch.get_num_threads()} "
          f"threads, {platform.platform()}")
    print(f"{'shape':<14} {'N':>2} {'dtype':>5} {'ours ms':>9} {'eager ms':>9} {'ratio':>6} {'GFLOP/s':>8}")
    rows = []
    for (name, _n, c, h, w, k, r, s, stride, pad, dil, groups) in SHAPES:
        if groups == c:
            print(f"{name:<14} depthwise: needs MPSCNNDepthWiseConvolutionDescriptor (issue 3)")
            continue
        n = args.batch
        ours, eager, flops = mps_operation(device, queue, n, c, h, w, k, r, s, stride, pad, dil, groups, dtype, rng)
        t_ours, t_eager = paired_medians(ours, eager, budget)
        ratio = t_eager / t_ours
        rows.append(dict(shape=name, batch=n, dtype=args.dtype, ours_ms=t_ours * 1e3, eager_ms=t_eager * 1e3,
                         ratio=ratio, gflops=flops / t_ours / 1e9))
        print(f"{name:<14} {n:>2} {args.dtype:>5} {t_ours * 1e3:>9.3f} {t_eager * 1e3:>9.3f} {ratio:>6.2f} "
              f"{flops / t_ours / 1e9:>8.1f}", flush=True)
    geo = math.exp(sum(math.log(row["ratio"]) for row in rows) / len(rows))
    print(f"geometric mean ratio (PyTorch eager time / ours): {geo:.3f}")
    overhead = encode_overhead(device, queue, budget)
    print("1x1x8x8 per kernel: one commit each {one_commit_each_us:.1f} us, 100 per commit {shared_commit_us:.1f} us, "
          "encode only {encode_only_us:.1f} us; bare torch op {torch_op_us:.1f} us; overhead {overhead_one_us:.1f} us "
          "(one commit each), {overhead_shared_us:.1f} us (shared commit)".format(**overhead))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device.name, torch=torch.__version__, mpsconv=mpsconv.__version__,
                           threads=torch.get_num_threads(), rows=rows, geomean=geo, overhead=overhead,
                           command=" ".join(sys.argv)), f, indent=1)


if __name__ == "__main__":
    main()
