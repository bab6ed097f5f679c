"""GPU benchmark: the MPS operation on CUDA against PyTorch, in one run (issue 5's targets).

The unit is the whole MPS operation: convolution + bias + ReLU written into channels ``[K, 2K)`` of
a ``2K``-channel destination (``destinationFeatureChannelOffset = K``). Peers, on the same NHWC
data and the same effective weights:

- eager: channels-last ``F.conv2d`` with bias, ``relu_``, copy into the slice (what a user writes;
  ``shared/bench/pytorch_baseline.py``'s ``conv_bias_relu_into_slice``);
- bare cuDNN: ``F.conv2d`` alone, no bias, no activation, no slice (the floor the fused epilogue
  is measured against);
- ``torch.compile`` (default mode) of the eager function (``--compile-dtypes``; compiling costs
  seconds a shape);
- the roofline floor: max(FLOPs / matmul peak, bytes / copy bandwidth), peaks measured in this run
  (the bandwidth of a 4 GiB copy); on depthwise rows also the share of that floor which a plain
  contiguous ``copy_`` of as many bytes reaches (what a layer of that size allows any kernel), and
  the share a copy of the source into the destination's channel slice reaches (what the operation's
  own reads and writes allow: its writes are runs of half a destination pixel).

Ours: ``conv.encode`` into a new command buffer + ``commit``, timed on the queue's stream; dispatch
autotunes on the first encode (not timed; ``--cache-dir`` keeps the choices). Every row first checks
our output against eager PyTorch's. All times: ``triton.testing.do_bench`` medians (ms).

Also the 20-layer batch-1 3x3x64 float16 chain: 20 encodes into one command buffer and a commit,
against PyTorch eager; and the same command buffer replayed as a CUDA graph
(``make_replayable``), against PyTorch's own CUDA graph.

    python benchmarks/gpu.py [--dtypes fp16,bf16,tf32,fp32] [--shapes a,b] [--compile-dtypes fp16,bf16]
                             [--no-chain] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpsconv import (  # noqa: E402
    MPSCNNConvolution, MPSCNNConvolutionDescriptor, MPSCNNNeuronType, MPSImage, MPSImageDescriptor,
    MPSImageFeatureChannelFormat, MPSKernelOptions, MPSNNNeuronDescriptor, MTLCreateSystemDefaultDevice,
)
from mpsconv.bench import SHAPES, Weights, operation_kernel  # noqa: E402

FMT = MPSImageFeatureChannelFormat
DTYPES = {"fp16": (torch.float16, FMT.float16), "bf16": (torch.bfloat16, FMT.bfloat16),
          "tf32": (torch.float32, FMT.float32), "fp32": (torch.float32, FMT.float32)}


def bench(fn, rep=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peaks():
    res = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    res["fp16"] = 2 * 8192 ** 3 / bench(lambda: a @ b, 300) / 1e9
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        torch.backends.cuda.matmul.allow_tf32 = True
        a32, b32 = a.float(), b.float()
        res["tf32"] = 2 * 8192 ** 3 / bench(lambda: a32 @ b32, 300) / 1e9
        torch.backends.cuda.matmul.allow_tf32 = False
        res["fp32"] = 2 * 8192 ** 3 / bench(lambda: a32 @ b32, 100) / 1e9
    res["bw_TBps"] = copy_bandwidth()
    return res


def copy_bandwidth() -> float:
    """TB/s of a 4 GiB copy (2 GiB read, 2 GiB written): the floor's bandwidth."""
    x = torch.empty(2 * 1024 ** 3 // 4, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / bench(lambda: y.copy_(x), 300) / 1e9


def copy_of(nbytes: int, dtype: torch.dtype):
    """A contiguous ``copy_`` that moves ``nbytes`` (half read, half written) in ``dtype``."""
    a = torch.empty(nbytes // (2 * torch.tensor([], dtype=dtype).element_size()), device="cuda", dtype=dtype)
    b = torch.empty_like(a)
    return lambda: b.copy_(a)


@triton.jit
def _slice_copy(a, b, pixels, K, CP: tl.constexpr, BP: tl.constexpr):
    """``BP`` pixels of ``K`` channels from ``a`` to channels ``[K, 2K)`` of ``b``'s (``CP``: ``K``'s power of 2)."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)[:, None]
    c = tl.arange(0, CP)[None, :]
    ok = (p < pixels) & (c < K)
    tl.store(b + p * (2 * K) + K + c, tl.load(a + p * K + c, mask=ok), mask=ok)


def slice_copy_ms(src: torch.Tensor, dst: torch.Tensor, k: int) -> float:
    """Median ms of the best of a few tilings of a Triton copy of the NHWC ``src`` (``k`` channels) into
    channels ``[k, 2k)`` of the NHWC ``dst``: a depthwise layer's reads and writes without its
    arithmetic (the writes are runs of half a destination pixel). PyTorch's strided ``copy_`` reaches
    about half of this kernel's speed there (H200, float16), so it would understate what the layer allows."""
    pixels, cp = src.numel() // k, triton.next_power_of_2(k)
    times = []
    for rows, warps in ((8, 4), (16, 4), (16, 8), (32, 8)):
        grid = (triton.cdiv(pixels, rows),)
        times.append(bench(lambda: _slice_copy[grid](src, dst, pixels, k, CP=cp, BP=rows, num_warps=warps)))
    return min(times)


def row(device, queue, shape, dname, compile_peer, rng, pk):
    name, n, c, h, w, k, r, s, st, pad, dil, g = shape
    dtype, fmt = DTYPES[dname]
    depthwise = g == c == k
    wt = rng.standard_normal((k, r, s, c // g), dtype=np.float32) * (1.0 / math.sqrt(r * s * c / g))
    bias = rng.standard_normal(k, dtype=np.float32)
    conv, p, q = operation_kernel(device, c, h, w, k, r, s, st, pad, dil, g, wt, bias)
    if dname == "tf32":
        conv.options = MPSKernelOptions.allowReducedPrecision
    x_nhwc = torch.randn(n, h, w, c, device="cuda").to(dtype)
    src = MPSImage.from_numpy(x_nhwc, featureChannelFormat=fmt, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=fmt, width=q, height=p, featureChannels=2 * k, numberOfImages=n))

    # PyTorch on the same data and the same effective weights (rounded as the kernel rounds them).
    weights = torch.from_numpy(conv._loaded.weights).to("cuda")
    x = src.torch().permute(0, 3, 1, 2)  # channels-last view of our NHWC source
    wt_t = weights.permute(0, 3, 1, 2).to(dtype).contiguous(memory_format=torch.channels_last)
    b_t = torch.from_numpy(bias).to("cuda", dtype)
    out = torch.empty(n, 2 * k, p, q, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)

    def eager():
        out[:, k:] = F.relu_(F.conv2d(x, wt_t, b_t, st, pad, dil, g))

    def bare():
        return F.conv2d(x, wt_t, None, st, pad, dil, g)

    def ours():
        cb = queue.makeCommandBuffer()
        conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()

    tf32 = dname == "tf32"
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=tf32):
        t0 = time.perf_counter()
        with torch.cuda.stream(queue.stream):
            ours()  # autotunes (once per signature) and compiles
        torch.cuda.synchronize()
        tune_s = time.perf_counter() - t0
        eager()
        torch.cuda.synchronize()
        got, want = dst.torch()[..., k:].float(), out[:, k:].permute(0, 2, 3, 1).float()
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        with torch.cuda.stream(queue.stream):
            t_ours = bench(ours)
        t_eager = bench(eager)
        t_bare = bench(bare)
        t_compile = None
        if compile_peer:
            torch._dynamo.reset()  # a fresh compile per row: the recompile limit would fall back to eager
            compiled = torch.compile(eager)
            compiled()
            t_compile = bench(compiled)
    flops = 2 * n * k * p * q * (c // g) * r * s
    esz = torch.tensor([], dtype=dtype).element_size()
    nbytes = (n * c * h * w + k * (c // g) * r * s + n * k * p * q) * esz
    peak = pk["fp16" if dname in ("fp16", "bf16") else dname] * 1e12
    floor = max(flops / peak, nbytes / (pk["bw_TBps"] * 1e12)) * 1e3
    # how near a plain copy of as many bytes comes to the same floor, on a layer this size; and a copy of
    # the source into the destination's channel slice, the bytes moved as the operation moves them
    copy_ms = bench(copy_of(nbytes, dtype)) if depthwise else None
    slice_ms = slice_copy_ms(x_nhwc, out.permute(0, 2, 3, 1), k) if depthwise and (h, w) == (p, q) else None
    planned = next(iter(conv._encoder.plans.values()))
    plan = planned.plan
    choice = planned.backend.name + (f":{plan.config}" if hasattr(plan, "config") else "")
    return dict(shape=name, dtype=dname, ours_ms=t_ours, eager_ms=t_eager, bare_ms=t_bare, compile_ms=t_compile,
                floor_ms=floor, pct_floor=100 * floor / t_ours, rel_err=err, choice=choice, tune_s=tune_s,
                depthwise=depthwise, copy_pct_floor=copy_ms and 100 * floor / copy_ms,
                slice_copy_pct_floor=slice_ms and 100 * floor / slice_ms)


def chain(device, queue):
    """20 layers of batch-1 3x3x64 float16 conv + bias + ReLU, ping-ponging between two images."""
    rng = np.random.default_rng(0)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=64,
                                       outputFeatureChannels=64)
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    wt = rng.standard_normal((64, 3, 3, 64), dtype=np.float32) / 24
    bias = rng.standard_normal(64, dtype=np.float32) * 0.1
    conv = MPSCNNConvolution(device=device, weights=Weights(desc, wt, bias))
    x0 = torch.randn(1, 56, 56, 64, device="cuda").half()
    a = MPSImage.from_numpy(x0, featureChannelFormat=FMT.float16, device=device)
    b = MPSImage.from_numpy(x0, featureChannelFormat=FMT.float16, device=device)

    def encode(cb):
        for i in range(20):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)

    def plain():
        cb = queue.makeCommandBuffer()
        encode(cb)
        cb.commit()

    with torch.cuda.stream(queue.stream):
        plain()
        torch.cuda.synchronize()
        t_plain = bench(plain)
        graph_cb = queue.makeCommandBuffer()
        encode(graph_cb)
        graph_cb.make_replayable()
        graph_cb.commit()
        graph_cb.waitUntilCompleted()
        t_graph = bench(lambda: graph_cb.replay())
    # PyTorch: the baseline script's chain
    x = x0.permute(0, 3, 1, 2)
    w = torch.from_numpy(conv._loaded.weights).cuda().permute(0, 3, 1, 2).half().contiguous(
        memory_format=torch.channels_last)
    bt = torch.from_numpy(bias).cuda().half()

    def net():
        y = x
        for _ in range(20):
            y = F.relu_(F.conv2d(y, w, bt, 1, 1))
        return y
    t_eager = bench(net)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            net()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        net()
    t_tgraph = bench(lambda: g.replay())
    return dict(shape="chain20_b1", plain_us=t_plain * 1e3, graph_us=t_graph * 1e3, eager_us=t_eager * 1e3,
                torch_graph_us=t_tgraph * 1e3)


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="fp16,bf16,tf32,fp32")
    ap.add_argument("--shapes", default=None, help="comma-separated names from the shape table")
    ap.add_argument("--compile-dtypes", default="fp16,bf16")
    ap.add_argument("--no-chain", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = MTLCreateSystemDefaultDevice()
    if not device.is_cuda:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    queue = device.makeCommandQueue()
    pk = peaks()
    print("peaks", json.dumps({k: round(v, 1) for k, v in pk.items()}), flush=True)
    wanted = set(args.shapes.split(",")) if args.shapes else None
    compile_dtypes = set(filter(None, args.compile_dtypes.split(",")))
    rows = []
    rng = np.random.default_rng(0)
    for dname in args.dtypes.split(","):
        for shape in SHAPES:
            if wanted and shape[0] not in wanted:
                continue
            r = row(device, queue, shape, dname, dname in compile_dtypes, rng, pk)
            rows.append(r)
            if args.json:  # after every row: a run cut short still leaves what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(rows=rows, peaks=pk, partial=True), f, indent=1)
            comp = f"{r['eager_ms'] and r['compile_ms'] and r['compile_ms'] / r['ours_ms']:.2f}" \
                if r["compile_ms"] else "  - "
            print(f"{r['shape']:12s} {dname:5s} ours {r['ours_ms']:8.4f} eager {r['eager_ms']:8.4f} "
                  f"bare {r['bare_ms']:8.4f} | x eager {r['eager_ms'] / r['ours_ms']:5.2f} x bare "
                  f"{r['bare_ms'] / r['ours_ms']:5.2f} x compile {comp} | {r['pct_floor']:5.1f}% floor "
                  f"err {r['rel_err']:.1e} {r['choice']} (tune {r['tune_s']:.1f}s)"
                  + (f" | a copy of as many bytes: {r['copy_pct_floor']:.1f}% floor" if r["depthwise"] else "")
                  + (f", into the slice: {r['slice_copy_pct_floor']:.1f}%" if r["slice_copy_pct_floor"] else ""),
                  flush=True)
    summary = {}
    for dname in args.dtypes.split(","):
        rs = [r for r in rows if r["dtype"] == dname]
        if rs:
            summary[dname] = dict(
                vs_eager=geomean([r["eager_ms"] / r["ours_ms"] for r in rs]),
                min_vs_eager=min(r["eager_ms"] / r["ours_ms"] for r in rs),
                vs_bare=geomean([r["bare_ms"] / r["ours_ms"] for r in rs]),
                vs_compile=geomean([r["compile_ms"] / r["ours_ms"] for r in rs if r["compile_ms"]]),
                depthwise_pct_floor=[round(r["pct_floor"], 1) for r in rs if r["depthwise"]],
                depthwise_copy_pct_floor=[round(r["copy_pct_floor"], 1) for r in rs if r["depthwise"]],
                depthwise_slice_copy_pct_floor=[round(r["slice_copy_pct_floor"], 1) for r in rs
                                                if r["slice_copy_pct_floor"]])
            print(dname, json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                     for k, v in summary[dname].items()}), flush=True)
    if not args.no_chain:
        c = chain(device, queue)
        rows.append(c)
        print(f"chain20: plain {c['plain_us']:.1f} us (eager {c['eager_us']:.1f}, ratio "
              f"{c['plain_us'] / c['eager_us']:.2f}); graph {c['graph_us']:.1f} us (torch graph "
              f"{c['torch_graph_us']:.1f}, ratio {c['graph_us'] / c['torch_graph_us']:.2f})", flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), peaks=pk, summary=summary,
                command="python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
