"""Host time of one tiny MPS operation on the CPU, for A/B runs of two checkouts in alternating processes.

A 3x3x8 float32 convolution on a 4x4 image, one thread: encode + commit + waitUntilCompleted, so the
loop times the host path (validation, recording, the command buffer), not arithmetic. Prints the
median of 7 loops of 2000 operations, with the fastest and slowest loop, and the same for PyTorch
eager's ``conv2d`` of the same layer (channels-last, its weights' own copy), in alternating loops.

    python benchmarks/host_time_cpu.py [ROOT]   (ROOT: the checkout whose mpsconv to import; default this one)

An earlier commit to compare with: ``git archive <rev> mpsconv | tar -x -C /tmp/old``, then alternate
``python benchmarks/host_time_cpu.py /tmp/old`` and ``python benchmarks/host_time_cpu.py``.
"""
import os
import sys
import time

import numpy as np
import torch

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # the checkout under test, before any installed mpsconv

from mpsconv import (  # noqa: E402
    MPSCNNConvolution, MPSCNNConvolutionDataSource, MPSCNNConvolutionDescriptor, MPSDataType, MPSImage,
    MPSImageDescriptor, MPSImageFeatureChannelFormat, MTLCreateSystemDefaultDevice,
)


class Weights(MPSCNNConvolutionDataSource):
    def __init__(self, descriptor, weights):
        self.d, self.w = descriptor, weights

    def dataType(self):
        return MPSDataType.float32

    def descriptor(self):
        return self.d

    def weights(self):
        return self.w

    def biasTerms(self):
        return None

    def load(self):
        return True

    def purge(self):
        pass

    def label(self):
        return None


def main():
    torch.set_num_threads(1)
    device = MTLCreateSystemDefaultDevice()
    queue = device.makeCommandQueue()
    d = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=8, outputFeatureChannels=8)
    rng = np.random.default_rng(0)
    ohwi = rng.uniform(-1, 1, (8, 3, 3, 8)).astype(np.float32)  # MPS's [O][kH][kW][I]
    conv = MPSCNNConvolution(device=device, weights=Weights(d, ohwi.reshape(-1)))
    src = MPSImage.from_numpy(rng.uniform(-1, 1, (1, 4, 4, 8)).astype(np.float32), device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=4, height=4, featureChannels=8))

    def one():
        cb = queue.makeCommandBuffer()
        conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()

    x = torch.from_numpy(src.numpy()).permute(0, 3, 1, 2)
    w = torch.from_numpy(ohwi).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def eager():
        torch.nn.functional.conv2d(x, w, None, 1, 1)

    for _ in range(500):
        one()
        eager()
    loops = {one: [], eager: []}
    for _ in range(7):
        for fn, times in loops.items():
            start = time.perf_counter()
            for _ in range(2000):
                fn()
            times.append((time.perf_counter() - start) / 2000 * 1e6)
    ours, theirs = loops[one], loops[eager]
    print(f"{ROOT}: median {np.median(ours):.2f} us per operation (fastest loop {min(ours):.2f}, "
          f"slowest {max(ours):.2f}); eager conv2d {np.median(theirs):.2f} us ({min(theirs):.2f}..{max(theirs):.2f}), "
          f"ours / eager {np.median(ours) / np.median(theirs):.2f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
