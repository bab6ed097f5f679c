"""The largest image an encode processes on this machine (issue 7, docs/reliability.md "Memory").

A 3x3 float16 convolution (16 -> 16 channels, bias, ReLU) over one image whose source and
destination together take ``--fraction`` of the memory available. The torch backend's scratch
(float32 copies of the window and the output) would be 3x the images; the encode runs it as row
bands instead. Reports the images' size, the tiles, the time, the peak resident memory, and checks
random patches of the result against the reference backend.

    python benchmarks/memory.py                  # 0.8 of the memory available
    python benchmarks/memory.py --fraction 0.5
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time

import numpy as np
import torch

import mpsconv
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDescriptor, MPSImage,
    MPSImageDescriptor, MPSImageFeatureChannelFormat as F, MPSNNNeuronDescriptor, MPSCNNNeuronType, MPSOffset,
    MTLCreateSystemDefaultDevice, config, use_backend,
)
from mpsconv.backends import REGISTRY
from mpsconv.bench import Weights

C = 16


def weights(rng):
    """The benchmark's data source: a 3x3 convolution of C -> C channels, bias, ReLU."""
    desc = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=C, outputFeatureChannels=C)
    desc.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    return Weights(desc, rng.uniform(-0.3, 0.3, C * 9 * C).astype(np.float32),
                   rng.uniform(-0.1, 0.1, C).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.8, help="of the memory available, for both images")
    args = parser.parse_args()
    device = MTLCreateSystemDefaultDevice()
    available = config.memory_limit()
    side = int(math.sqrt(args.fraction * available / (2 * 2 * C)))  # two float16 images of C channels
    rng = np.random.default_rng(0)
    kernel = MPSCNNConvolution(device=device, weights=weights(rng))
    desc = MPSImageDescriptor(channelFormat=F.float16, width=side, height=side, featureChannels=C, numberOfImages=1)
    src, dst = MPSImage(device=device, imageDescriptor=desc), MPSImage(device=device, imageDescriptor=desc)
    gen = torch.Generator().manual_seed(0)
    values = src.torch()
    for y in range(0, side, 1024):  # filled in bands: a float32 copy of the whole image would not fit
        values[:, y:y + 1024].uniform_(-1, 1, generator=gen)
    dst.torch()  # allocated before the encode, like a network's activations
    image_bytes = 2 * side * side * C * 2
    problem = kernel._problem(src, dst, "benchmark")

    queue = device.makeCommandQueue()
    start = time.perf_counter()
    with use_backend("torch"):
        cb = queue.makeCommandBuffer()
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        tiles = len(cb._work)
        cb.commit()
        cb.waitUntilCompleted()
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # random 16x16 patches against the reference, through a "valid"-offset copy of the kernel on the
    # source crop around each patch (with the zero edge where the patch touches the border)
    check = MPSCNNConvolution(device=device, weights=weights(np.random.default_rng(0)))
    check.offset = MPSOffset(1, 1, 0)
    worst = 0.0
    for y, x in [(0, 0), (side - 16, side - 16)] + [tuple(rng.integers(0, side - 16, 2)) for _ in range(6)]:
        crop = torch.zeros(1, 18, 18, C, dtype=torch.float16)
        y0, x0, y1, x1 = max(y - 1, 0), max(x - 1, 0), min(y + 17, side), min(x + 17, side)
        crop[0, y0 - y + 1:y1 - y + 1, x0 - x + 1:x1 - x + 1] = values[0, y0:y1, x0:x1]
        small = MPSImage.from_numpy(crop, featureChannelFormat=F.float16, device=device)
        out = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
            channelFormat=F.float16, width=16, height=16, featureChannels=C, numberOfImages=1))
        with use_backend("reference"):
            cb = queue.makeCommandBuffer()
            check.encode(commandBuffer=cb, sourceImage=small, destinationImage=out)
            cb.commit()
            cb.waitUntilCompleted()
        got = dst.torch()[0, y:y + 16, x:x + 16].float()
        worst = max(worst, float((got - out.torch()[0].float()).abs().max()))
    result = {
        "image": f"{side}x{side}x{C} float16, source and destination", "image_bytes": image_bytes,
        "available_bytes": available, "scratch_bytes_untiled": REGISTRY["torch"].scratch_bytes(problem),
        "tiles": tiles, "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss,
        "max_abs_error_vs_reference": worst, "torch": torch.__version__, "mpsconv": mpsconv.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/memory.py --fraction %g" % args.fraction,
    }
    print(json.dumps(result, indent=1))
    assert worst <= 2e-3 * 16, "the tiled result differs from the reference"


if __name__ == "__main__":
    main()
