"""Host time per MPS operation on CUDA, for A/B runs of two checkouts in alternating processes.

A batch-1 3x3x64 float16 layer (conv + bias + ReLU, 56x56) on the triton backend: one encode +
commit per operation, with the queue's stream current and from the default stream (a commit then
orders the queue's stream after the caller's); and a 20-layer ping-pong chain, 20 encodes into one
command buffer and a commit. The GPU work is a few µs a layer, so these loops time the host. Each
number is the median of 5 loops (2000 operations, 100 chains).

    python benchmarks/host_time.py [ROOT]     (ROOT: the checkout whose mpsconv to import; default this one)

An earlier commit to compare with: ``git archive <rev> mpsconv | tar -x -C /tmp/old``, then
``python benchmarks/host_time.py /tmp/old``.
"""
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def layer(dev):
    """The 3x3x64 conv + bias + ReLU kernel these host-time scripts encode (``overhead.py`` too)."""
    # imported here: main puts the checkout under test on the path first
    from mpsconv import MPSCNNConvolution, MPSCNNConvolutionDescriptor, MPSCNNNeuronType, MPSNNNeuronDescriptor
    from mpsconv.bench import Weights

    d = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=64, outputFeatureChannels=64)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    rng = np.random.default_rng(0)
    return MPSCNNConvolution(device=dev, weights=Weights(d, rng.standard_normal((64, 3, 3, 64), dtype=np.float32) / 24,
                                                         rng.standard_normal(64, dtype=np.float32)))


def median_per_call(fn, n):
    fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        loops.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(loops)[2]


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..")
    sys.path.insert(0, root)
    from mpsconv import MPSImage, MPSImageFeatureChannelFormat as FMT, MTLCreateSystemDefaultDevice, use_backend

    dev = MTLCreateSystemDefaultDevice()
    if not dev.is_cuda:
        sys.exit("benchmarks/host_time.py needs a CUDA GPU")
    q = dev.makeCommandQueue()
    conv = layer(dev)
    x0 = torch.randn(1, 56, 56, 64, device="cuda").half()
    a = MPSImage.from_numpy(x0, featureChannelFormat=FMT.float16, device=dev)
    b = MPSImage.from_numpy(x0, featureChannelFormat=FMT.float16, device=dev)

    def one():
        cb = q.makeCommandBuffer()
        conv.encode(commandBuffer=cb, sourceImage=a, destinationImage=b)
        cb.commit()

    def chain():
        cb = q.makeCommandBuffer()
        for i in range(20):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()

    res = {}
    with use_backend("triton"):
        with torch.cuda.stream(q.stream):
            res["one, queue stream"] = median_per_call(one, 2000)
            res["chain20, queue stream"] = median_per_call(chain, 100)
        res["one, default stream"] = median_per_call(one, 2000)
        res["chain20, default stream"] = median_per_call(chain, 100)
    print(root, " | ".join(f"{k} {v:.1f} us" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
