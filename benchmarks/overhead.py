"""Where the host time of one MPS operation goes on CUDA: encode, commit, the launch itself.

    python benchmarks/overhead.py      (prints per-call microseconds and a cProfile of 2000 calls)
"""
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from host_time import layer  # noqa: E402
from mpsconv import (  # noqa: E402
    MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat as FMT, MTLCreateSystemDefaultDevice, use_backend,
)


def per_call(fn, n=2000):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    dev = MTLCreateSystemDefaultDevice()
    q = dev.makeCommandQueue()
    conv = layer(dev)
    src = MPSImage.from_numpy(torch.randn(1, 8, 8, 64, device="cuda"), featureChannelFormat=FMT.float16, device=dev)
    dst = MPSImage(device=dev, imageDescriptor=MPSImageDescriptor(channelFormat=FMT.float16, width=8, height=8,
                                                                   featureChannels=64))
    with torch.cuda.stream(q.stream):
        for backend in ("triton", "torch"):
            with use_backend(backend):
                cbs = []

                def encode_only():
                    cb = q.makeCommandBuffer()
                    conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
                    cbs.append(cb)

                def full():
                    cb = q.makeCommandBuffer()
                    conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
                    cb.commit()

                t_enc = per_call(encode_only)
                cbs.clear()
                t_full = per_call(full)
                cb = q.makeCommandBuffer()
                conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
                work = cb._work[0]
                t_run = per_call(work)
                print(f"{backend}: encode {t_enc:.1f} us, encode+commit {t_full:.1f} us, the recorded run alone "
                      f"{t_run:.1f} us", flush=True)
                if backend == "triton":
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(2000):
                        full()
                    prof.disable()
                    torch.cuda.synchronize()
                    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    x = src.torch().permute(0, 3, 1, 2)
    w = torch.randn(64, 64, 3, 3, device="cuda").half().contiguous(memory_format=torch.channels_last)
    b = torch.randn(64, device="cuda").half()
    print(f"torch eager conv+bias+relu_: {per_call(lambda: torch.relu_(torch.nn.functional.conv2d(x, w, b, 1, 1))):.1f} us")


if __name__ == "__main__":
    main()
