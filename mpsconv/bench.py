"""CPU benchmark: the MPS operation against PyTorch eager on the same work, in one run.

The unit is the whole MPS operation: convolution + bias + ReLU written into a channel slice of a
larger image (``destinationFeatureChannelOffset``). PyTorch's equivalent is what a user would
write: channels-last ``conv2d`` with bias, ``relu_``, copy into the slice. Both read the same
NHWC data. Each measurement is the median of repeated runs, alternating ours and PyTorch's so
that drift hits both. Also measured: the per-kernel cost of encode + commit on a 1x1x8x8 problem.

    mpsconv bench [--quick] [--batch N] [--json PATH] [--plot PATH]   (or python benchmarks/cpu.py ...)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import mpsconv
from mpsconv import (
    MPSCNNBinaryConvolution, MPSCNNBinaryConvolutionType, MPSCNNConvolution, MPSCNNConvolutionDataSource,
    MPSCNNConvolutionGradient,
    MPSCNNConvolutionDescriptor, MPSCNNConvolutionTranspose, MPSCNNDepthWiseConvolutionDescriptor, MPSCNNNeuronType,
    MPSDataType, MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MPSOffset,
    MTLCreateSystemDefaultDevice,
)
from mpsconv.core.geometry import kernel_offset_for_padding, offset_for_padding, torch_output_size
from mpsconv.networks import NETWORKS, compare
from mpsconv.timing import busy, spread, spread_warning  # noqa: F401  (busy: re-exported)

#: name, N, C, H, W, K, R, S, stride, pad, dilation, groups (ResNet-50 and MobileNetV2 layers at batch 32)

SHAPES = [
    ("r50_conv1", 32, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1),
    ("r50_3x3_56", 32, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1),
    ("r50_1x1_56", 32, 64, 56, 56, 256, 1, 1, 1, 0, 1, 1),
    ("r50_3x3_28", 32, 128, 28, 28, 128, 3, 3, 1, 1, 1, 1),
    ("r50_3x3_14", 32, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1),
    ("r50_3x3_7", 32, 512, 7, 7, 512, 3, 3, 1, 1, 1, 1),
    ("r50_1x1_14x", 32, 256, 14, 14, 1024, 1, 1, 1, 0, 1, 1),
    ("r50_3x3_s2", 32, 128, 56, 56, 128, 3, 3, 2, 1, 1, 1),
    ("mbv2_dw_56", 32, 144, 56, 56, 144, 3, 3, 1, 1, 1, 144),
    ("mbv2_dw_14", 32, 384, 14, 14, 384, 3, 3, 1, 1, 1, 384),
    ("resnext_g32", 32, 128, 56, 56, 128, 3, 3, 1, 1, 1, 32),
    ("dilated_d2", 8, 512, 64, 64, 512, 3, 3, 1, 2, 2, 1),
    ("b1_3x3_56", 1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1),
    ("big_3x3", 64, 256, 64, 64, 256, 3, 3, 1, 1, 1, 1),
]


class Weights(MPSCNNConvolutionDataSource):
    def __init__(self, desc, w, b, data_type=MPSDataType.float32):
        self.desc, self.w, self.b, self.data_type = desc, w, b, data_type

    def dataType(self):
        return self.data_type

    def descriptor(self):
        return self.desc

    def weights(self):
        return self.w

    def biasTerms(self):
        return self.b


def encode_and_wait(queue, kernel, src, dst):
    """Our side of a row: encode into a new command buffer, commit, wait."""
    def ours():
        cb = queue.makeCommandBuffer()
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()
    return ours


def timed(fn, budget_s: float, max_reps: int = 200) -> list[float]:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def paired_times(a, b, budget_s: float) -> tuple[list[float], list[float]]:
    """Per-call times of ``a`` and ``b`` (seconds), timed in alternating rounds."""
    ta, tb = [], []
    for _ in range(3):
        ta += timed(a, budget_s / 6)
        tb += timed(b, budget_s / 6)
    return ta, tb


def paired_medians(a, b, budget_s: float) -> tuple[float, float]:
    """Medians of ``a`` and ``b`` timed in alternating rounds (seconds)."""
    ta, tb = paired_times(a, b, budget_s)
    return statistics.median(ta), statistics.median(tb)


def operation_kernel(device, c, h, w, k, r, s, stride, pad, dil, groups, wt, bias):
    """The MPS side of a shape-table row: conv + bias + ReLU with PyTorch's padding ``pad`` (as an
    ``offset``), writing channels ``[K, 2K)``; returns ``(kernel, output height, output width)``."""
    depthwise = groups == c == k
    cls = MPSCNNDepthWiseConvolutionDescriptor if depthwise else MPSCNNConvolutionDescriptor
    desc = cls(kernelWidth=s, kernelHeight=r, inputFeatureChannels=c, outputFeatureChannels=k)
    desc.strideInPixelsX = desc.strideInPixelsY = stride
    desc.dilationRateX = desc.dilationRateY = dil
    desc.groups = 1 if depthwise else groups
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    conv = MPSCNNConvolution(device=device, weights=Weights(desc, wt, bias))
    conv.offset = MPSOffset(offset_for_padding(s, dil, pad), offset_for_padding(r, dil, pad), 0)
    conv.destinationFeatureChannelOffset = k  # write the second half of a 2K-channel image
    return conv, torch_output_size(h, r, stride, pad, dil), torch_output_size(w, s, stride, pad, dil)


def mps_operation(device, queue, n, c, h, w, k, r, s, stride, pad, dil, groups, dtype, rng):
    fmt = MPSImageFeatureChannelFormat.float16 if dtype == torch.float16 else MPSImageFeatureChannelFormat.float32
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    wt = (rng.standard_normal((k, r, s, c // groups), dtype=np.float32) * 0.1)
    bias = rng.standard_normal(k, dtype=np.float32)
    conv, p, q = operation_kernel(device, c, h, w, k, r, s, stride, pad, dil, groups, wt, bias)
    src = MPSImage.from_numpy(x, featureChannelFormat=fmt, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=fmt, width=q, height=p, featureChannels=2 * k, numberOfImages=n))

    ours = encode_and_wait(queue, conv, src, dst)

    # PyTorch eager on the same NHWC data: channels-last conv with bias, relu_, copy into the slice.
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels-last NCHW view
    tw = torch.from_numpy(conv._loaded.weights).permute(0, 3, 1, 2).contiguous()
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


# name, N, C, H, W, K, R, S, stride, pad (PyTorch conv_transpose2d: output = (H - 1)·stride - 2·pad + R + output_pad)
TRANSPOSE_SHAPES = [
    ("tconv_s2_28", 1, 128, 28, 28, 64, 3, 3, 2, 1),
    ("tconv_s2_56", 1, 64, 56, 56, 32, 4, 4, 2, 1),
    ("tconv_s1_28", 1, 128, 28, 28, 128, 3, 3, 1, 1),
]
# name, N, C, H, W, K, R, S (stride 1, same-size)
BINARY_SHAPES = [
    ("bin_3x3_28", 1, 128, 28, 28, 128, 3, 3),
    ("bin_3x3_14", 1, 256, 14, 14, 256, 3, 3),
]


def transpose_operation(device, queue, n, c, h, w, k, r, s, stride, pad, rng):
    """Transposed convolution + bias + ReLU into a channel slice; PyTorch: conv_transpose2d, relu_, copy."""
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    w_t = rng.standard_normal((c, k, r, s), dtype=np.float32) * 0.1  # PyTorch layout [in][out][kh][kw]
    bias = rng.standard_normal(k, dtype=np.float32)
    out_pad = stride - 1
    p = torch_output_size(h, r, stride, pad, transposed=True, output_padding=out_pad)
    q = torch_output_size(w, s, stride, pad, transposed=True, output_padding=out_pad)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=s, kernelHeight=r, inputFeatureChannels=c, outputFeatureChannels=k)
    desc.strideInPixelsX = desc.strideInPixelsY = stride
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    ours_w = np.ascontiguousarray(w_t[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))  # rotated 180°, in and out swapped
    kernel = MPSCNNConvolutionTranspose(device=device, weights=Weights(desc, ours_w, bias))
    kernel.kernelOffsetY = kernel_offset_for_padding(r, 1, pad)
    kernel.kernelOffsetX = kernel_offset_for_padding(s, 1, pad)
    kernel.destinationFeatureChannelOffset = k
    src = MPSImage.from_numpy(x, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=q, height=p, featureChannels=2 * k, numberOfImages=n))
    tx, tw, tb = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(kernel._loaded.weights), torch.from_numpy(bias)
    tw = tw.permute(3, 0, 1, 2).flip(2, 3).contiguous()  # back to PyTorch's layout, fp16-rounded like ours
    out = torch.zeros(n, p, q, 2 * k).permute(0, 3, 1, 2)

    ours = encode_and_wait(queue, kernel, src, dst)

    def torch_eager():
        y = F.conv_transpose2d(tx, tw, tb, stride, pad, out_pad)
        y.relu_()
        out[:, k:].copy_(y)

    ours()
    torch_eager()
    got = dst.torch()[..., k:].permute(0, 3, 1, 2)
    assert torch.allclose(got, out[:, k:], rtol=1e-3, atol=1e-3), "mpsconv and PyTorch disagree"
    return ours, torch_eager, 2 * n * k * h * w * c * r * s


def binary_operation(device, queue, n, c, h, w, k, r, s, rng):
    """XNOR binary convolution + bias + ReLU into a channel slice; PyTorch: a float convolution of ±1 values
    (binarize the input, conv2d with ±1 weights), relu_, copy."""
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    bits = rng.integers(0, 2, (k, r, s, c)).astype(np.uint32)
    words = np.zeros((k, r, s, (c + 31) // 32), np.uint32)
    for ch in range(c):
        words[..., ch // 32] |= bits[..., ch] << np.uint32(ch % 32)
    bias = rng.standard_normal(k, dtype=np.float32)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=s, kernelHeight=r, inputFeatureChannels=c, outputFeatureChannels=k)
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    kernel = MPSCNNBinaryConvolution(device=device, convolutionData=Weights(desc, words, bias, MPSDataType.uInt32),
                                     scaleValue=1.0, type=MPSCNNBinaryConvolutionType.xnor, flags=0)
    kernel.offset = MPSOffset(offset_for_padding(s, 1, 0), offset_for_padding(r, 1, 0), 0)  # valid-only windows
    p, q = torch_output_size(h, r), torch_output_size(w, s)
    kernel.destinationFeatureChannelOffset = k
    src = MPSImage.from_numpy(x, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=q, height=p, featureChannels=2 * k, numberOfImages=n))
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)
    tw = torch.from_numpy(2.0 * bits.astype(np.float32) - 1).permute(0, 3, 1, 2).contiguous()
    tb = torch.from_numpy(bias)
    out = torch.zeros(n, p, q, 2 * k).permute(0, 3, 1, 2)

    ours = encode_and_wait(queue, kernel, src, dst)

    def torch_eager():
        y = F.conv2d(torch.where(tx >= 0, 1.0, -1.0), tw, tb)
        y.relu_()
        out[:, k:].copy_(y)

    ours()
    torch_eager()
    got = dst.torch()[..., k:].permute(0, 3, 1, 2)
    assert torch.allclose(got, out[:, k:], rtol=1e-4, atol=1e-4), "mpsconv and PyTorch disagree"
    return ours, torch_eager, 2 * n * k * p * q * c * r * s


# name, N, C, H, W, K, R, S (stride 1, pad R // 2)
TRAINING_SHAPES = [
    ("train_3x3_28", 1, 64, 28, 28, 64, 3, 3),
    ("train_3x3_14", 1, 128, 14, 14, 128, 3, 3),
]


def training_step(device, queue, n, c, h, w, k, r, s, rng):
    """One training step of a conv + bias: forward (recording a state), data gradient, weight and bias
    gradients. PyTorch: the same conv2d forward and its autograd backward."""
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    wt = rng.standard_normal((k, r, s, c), dtype=np.float32) * 0.1
    bias = rng.standard_normal(k, dtype=np.float32)
    e = rng.standard_normal((n, h, w, k), dtype=np.float32)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=s, kernelHeight=r, inputFeatureChannels=c, outputFeatureChannels=k)
    data = Weights(desc, wt, bias)
    conv, grad = MPSCNNConvolution(device=device, weights=data), MPSCNNConvolutionGradient(device=device, weights=data)
    src = MPSImage.from_numpy(x, device=device)
    err = MPSImage.from_numpy(e, device=device)
    fmt = MPSImageFeatureChannelFormat.float32
    out = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(channelFormat=fmt, width=w, height=h,
                                                                      featureChannels=k, numberOfImages=n))
    d_src = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(channelFormat=fmt, width=w, height=h,
                                                                        featureChannels=c, numberOfImages=n))

    def ours():
        cb = queue.makeCommandBuffer()
        state = conv.resultState(sourceImage=src)
        conv.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=out)
        grad.destinationImageDescriptor(sourceImages=[err, src], sourceStates=[state])  # sets the offsets
        grad.encode(commandBuffer=cb, sourceGradient=err, sourceImage=src, gradientState=state,
                    destinationGradient=d_src)
        cb.commit()
        cb.waitUntilCompleted()

    tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    tw = torch.from_numpy(conv._loaded.weights).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    tb = torch.from_numpy(bias).requires_grad_(True)
    te = torch.from_numpy(e).permute(0, 3, 1, 2)

    def torch_eager():
        tx.grad = tw.grad = tb.grad = None
        F.conv2d(tx, tw, tb, 1, r // 2).backward(te)

    return ours, torch_eager, 3 * 2 * n * k * h * w * c * r * s


def encode_overhead(device, queue, budget_s):
    """Per-kernel cost of encode + commit on a 1x1x8x8 problem, against the bare torch op."""
    rng = np.random.default_rng(0)
    desc = MPSCNNConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=8, outputFeatureChannels=8)
    conv = MPSCNNConvolution(device=device, weights=Weights(desc, rng.standard_normal(64, dtype=np.float32), None))
    src = MPSImage.from_numpy(rng.standard_normal((1, 1, 8), dtype=np.float32), device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=1, height=1, featureChannels=8))
    tx = torch.from_numpy(src.numpy()).permute(0, 3, 1, 2)
    tw = torch.from_numpy(conv._loaded.weights).permute(0, 3, 1, 2).contiguous()
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


def plot(rows, family, device_name: str, path: str) -> None:
    """A bar chart of PyTorch eager time / ours per shape (above 1: mpsconv is faster)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["shape"] for r in rows] + [f"{r['shape']} ({r['kind']})" for r in family]
    ratios = [r["ratio"] for r in rows] + [r["ratio"] for r in family]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5), dpi=100)
    ax.bar(range(len(names)), ratios, color=["#3a7" if v >= 1 else "#c54" for v in ratios])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speed-up against PyTorch eager")
    ax.set_title(f"mpsconv {mpsconv.__version__} on {device_name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpsconv bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="images per shape (the table uses 32; we scale to 1-2)")
    parser.add_argument("--quick", action="store_true", help="a short time budget per shape")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG of the speed-ups here")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--networks", default=None,
                        help=f"whole networks instead of the shape table: comma-separated from {', '.join(NETWORKS)}, "
                             "or all (ours plain, replayed and with temporary images, against PyTorch eager)")
    return parser


def run_networks(names: list[str], batch: int, device, budget: float) -> list[dict]:
    """``--networks``: each network as one command buffer against eager, at ``batch``."""
    print(f"{'network':<12} {'N':>2} {'layers':>6} " + " ".join(f"{c + ' ms (min..max)':>26}" for c in (
        "ours", "ours replayed", "temporary+replay", "eager")) + f" {'eager/best':>10}")
    rows = []
    for name in names:
        row = compare(name, batch, device, budget)
        t = row["times"]
        best = min(t["ours"][0], t["ours_replay"][0], t["ours_temporary_replay"][0])
        cells = [f"{m * 1e3:.2f} ({lo * 1e3:.2f}..{hi * 1e3:.2f})" for m, lo, hi in (
            t["ours"], t["ours_replay"], t["ours_temporary_replay"], t["eager"])]
        print(f"{row['network']:<12} {batch:>2} {row['layers']:>6} " + " ".join(f"{c:>26}" for c in cells)
              + f" {t['eager'][0] / best:>10.2f}", flush=True)
        rows.append(dict(network=row["network"], batch=batch, layers=row["layers"], rel_err=row["rel_err"],
                         times_ms={k: [v * 1e3 for v in times] for k, times in t.items()}))
    warning = spread_warning({f"{row['network']} {k}": v for row in rows
                              for k, v in ((k, [x / 1e3 for x in ms]) for k, ms in row["times_ms"].items())})
    if warning:
        print(f"WARNING: {warning}")
    return rows


def main(argv=None, device=None):
    args = parser().parse_args(argv)
    if args.networks is not None:
        names = list(NETWORKS) if args.networks == "all" else args.networks.split(",")
        unknown = [name for name in names if name not in NETWORKS]
        if unknown:
            raise SystemExit(f"mpsconv bench: no network named {', '.join(unknown)}; known: {', '.join(NETWORKS)}")
        device = device or MTLCreateSystemDefaultDevice()
        print(f"mpsconv {mpsconv.__version__}, torch {torch.__version__}, {device.name}, {torch.get_num_threads()} "
              f"threads, {platform.platform()}")
        rows = run_networks(names, args.batch, device, 0.6 if args.quick else 2.0)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=device.name, torch=torch.__version__, mpsconv=mpsconv.__version__,
                               threads=torch.get_num_threads(), networks=rows, command=" ".join(sys.argv)), f, indent=1)
        return rows, []
    wanted = None if args.shapes is None else set(args.shapes.split(","))
    known = {row[0] for row in SHAPES + TRANSPOSE_SHAPES + BINARY_SHAPES + TRAINING_SHAPES}
    if wanted is not None and wanted - known:
        raise SystemExit(f"mpsconv bench: no shape named {', '.join(sorted(wanted - known))}; "
                         f"known: {', '.join(sorted(known))}")
    torch.manual_seed(0)
    device = device or MTLCreateSystemDefaultDevice()
    queue = device.makeCommandQueue()
    budget = 0.6 if args.quick else 3.0
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    rng = np.random.default_rng(0)
    print(f"mpsconv {mpsconv.__version__}, torch {torch.__version__}, {device.name}, {torch.get_num_threads()} "
          f"threads, {platform.platform()}")
    print(f"{'shape':<14} {'N':>2} {'dtype':>5} {'ours ms (quartiles)':>24} {'eager ms (quartiles)':>24} "
          f"{'ratio':>6} {'GFLOP/s':>8}")
    rows, timings = [], {}
    for (name, _n, c, h, w, k, r, s, stride, pad, dil, groups) in SHAPES:
        if wanted is not None and name not in wanted:
            continue
        n = args.batch
        ours, eager, flops = mps_operation(device, queue, n, c, h, w, k, r, s, stride, pad, dil, groups, dtype, rng)
        (t_ours, *q_ours), (t_eager, *q_eager) = (spread(ts) for ts in paired_times(ours, eager, budget))
        timings[name] = ((t_ours, *q_ours), (t_eager, *q_eager))
        ratio = t_eager / t_ours
        rows.append(dict(shape=name, batch=n, dtype=args.dtype, ours_ms=t_ours * 1e3, eager_ms=t_eager * 1e3,
                         ours_quartiles_ms=[v * 1e3 for v in q_ours], eager_quartiles_ms=[v * 1e3 for v in q_eager],
                         ratio=ratio, gflops=flops / t_ours / 1e9))
        cells = [f"{m * 1e3:.3f} ({lo * 1e3:.3f}..{hi * 1e3:.3f})" for m, lo, hi in ((t_ours, *q_ours),
                                                                                  (t_eager, *q_eager))]
        print(f"{name:<14} {n:>2} {args.dtype:>5} {cells[0]:>24} {cells[1]:>24} {ratio:>6.2f} "
              f"{flops / t_ours / 1e9:>8.1f}", flush=True)
    geo = math.exp(sum(math.log(row["ratio"]) for row in rows) / len(rows)) if rows else float("nan")
    print(f"geometric mean ratio (PyTorch eager time / ours): {geo:.3f}")
    warning = spread_warning({f"{name} {side}": times for name, pair in timings.items()
                              for side, times in zip(("ours", "eager"), pair)})
    if warning:
        print(f"WARNING: {warning}")
    family = []
    if args.dtype == "fp32":
        cases = [(name, "transpose", lambda sh=sh: transpose_operation(device, queue, *sh[1:], rng))
                 for sh in TRANSPOSE_SHAPES for name in [sh[0]]]
        cases += [(name, "binary", lambda sh=sh: binary_operation(device, queue, *sh[1:], rng))
                  for sh in BINARY_SHAPES for name in [sh[0]]]
        cases += [(name, "training", lambda sh=sh: training_step(device, queue, *sh[1:], rng))
                  for sh in TRAINING_SHAPES for name in [sh[0]]]
        for name, kind, make in cases:
            if wanted is not None and name not in wanted:
                continue
            ours, eager, flops = make()
            t_ours, t_eager = paired_medians(ours, eager, budget)
            family.append(dict(shape=name, kind=kind, ours_ms=t_ours * 1e3, eager_ms=t_eager * 1e3,
                               ratio=t_eager / t_ours))
            print(f"{name:<14} {kind:>9} {t_ours * 1e3:>9.3f} {t_eager * 1e3:>9.3f} {t_eager / t_ours:>6.2f}", flush=True)
    overhead = encode_overhead(device, queue, budget)
    print("1x1x8x8 per kernel: one commit each {one_commit_each_us:.1f} us, 100 per commit {shared_commit_us:.1f} us, "
          "encode only {encode_only_us:.1f} us; bare torch op {torch_op_us:.1f} us; overhead {overhead_one_us:.1f} us "
          "(one commit each), {overhead_shared_us:.1f} us (shared commit)".format(**overhead))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device.name, torch=torch.__version__, mpsconv=mpsconv.__version__,
                           threads=torch.get_num_threads(), rows=rows, geomean=geo, overhead=overhead, family=family,
                           warning=warning, command=" ".join(sys.argv)), f, indent=1)
    if args.plot:
        plot(rows, family, device.name, args.plot)
    return rows, family


if __name__ == "__main__":
    main()
