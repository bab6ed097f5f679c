"""Tile sweep (CUDA): one layer of gpu.py's shape table through the triton backend with each given
launch configuration, bypassing the autotuner, against bare cuDNN in the same run. The operation is
gpu.py's (convolution + bias + ReLU into channels [K, 2K) of a 2K-channel destination); each
configuration is checked against float32 F.conv2d, then timed twice with gpu.py's ``bench``
(the better median is kept). ``lib`` stands for the candidates the autotuner would time.

    python -m benchmarks.experiments.tiles 'r50_3x3_56:fp16:lib,128x64x64w4s3' 'r50_1x1_14x:fp16:128x128x64w4s5t1'

Prints the 16 fastest per layer, with the bytes floor at 4.3 TB/s (the H200's measured copy
bandwidth); ``--json PATH`` writes every timing.
"""
import argparse
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("MPSCONV_AUTOTUNE", "0")
from benchmarks.gpu import DTYPES, bench  # noqa: E402
from mpsconv import MPSImage, MPSImageDescriptor, MTLCreateSystemDefaultDevice  # noqa: E402
from mpsconv.backends import triton as tb  # noqa: E402
from mpsconv.bench import SHAPES, operation_kernel  # noqa: E402


def layer(device, shape: tuple, dname: str) -> SimpleNamespace:
    """gpu.py's operation on one row of the shape table (``SHAPES``' tuple, which a caller may shrink),
    with random data on ``device``: the problem, its prepared weights, the source and destination
    storages, and the float32 ``F.conv2d`` + bias + ReLU result the destination's channels ``[K, 2K)``
    must match (NHWC)."""
    _, n, c, h, w, k, r, s, st, pad, dil, g = shape
    dtype, fmt = DTYPES[dname]
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(k, dtype=np.float32)
    wt = rng.standard_normal((k, r, s, c // g), dtype=np.float32) / math.sqrt(r * s * c / g)
    conv, p, q = operation_kernel(device, c, h, w, k, r, s, st, pad, dil, g, wt, bias)
    dev = device.torch_device
    x = torch.randn(n, h, w, c, device=dev).to(dtype)
    src = MPSImage.from_numpy(x, featureChannelFormat=fmt, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(channelFormat=fmt, width=q, height=p,
                                                                     featureChannels=2 * k, numberOfImages=n))
    weights = torch.from_numpy(conv._loaded.weights).to(dev).permute(0, 3, 1, 2)
    want = F.relu(F.conv2d(x.permute(0, 3, 1, 2).float(), weights.float(), torch.from_numpy(bias).to(dev), st, pad,
                           dil, g))
    return SimpleNamespace(problem=conv._problem(src, dst, "tiles"),
                           prepared=conv._encoder.prepared(conv, tb.BACKEND, fmt),
                           src=src._ensure_storage(), dst=dst._ensure_storage(), x=x, weights=weights,
                           want=want.permute(0, 2, 3, 1))


def sweep(device, spec: str) -> list:
    name, dname, wanted = spec.split(":")
    shape = next(shape for shape in SHAPES if shape[0] == name)
    k, (st, pad, dil, g) = shape[5], shape[8:]
    op = layer(device, shape, dname)
    problem, prepared, storage, out, x, want = op.problem, op.prepared, op.src, op.dst, op.x, op.want
    xb = x.permute(0, 3, 1, 2)
    wb = op.weights.to(x.dtype).contiguous(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=dname == "tf32"):
        bare = bench(lambda: F.conv2d(xb, wb, None, st, pad, dil, g))
    configs = []
    for text in wanted.split(","):
        configs += tb.configs(problem) if text == "lib" else [tb.Config.parse(text)]
    times = {}
    for _ in range(2):
        for cfg in configs:
            bound = tb.Bound(tb.Plan(problem, device, cfg), storage, out)
            out[..., k:].zero_()
            tb.run(bound, prepared)
            err = ((out[..., k:].float() - want).norm() / want.norm()).item()
            assert err < 1e-2, f"{name} {dname} {cfg}: relative error {err:.1e}"
            times.setdefault(str(cfg), []).append(bench(lambda: tb.run(bound, prepared)))
    floor = (x.numel() + want.numel()) * x.element_size() / 4.3e9  # ms
    rows = sorted((min(t), cfg) for cfg, t in times.items())
    print(f"{name} {dname}: bare cuDNN {bare * 1e3:.2f} us", flush=True)
    for t, cfg in rows[:16]:
        print(f"  {cfg:22s} {t * 1e3:7.2f} us  x bare {bare / t:5.2f}  {100 * floor / t:5.1f}% of the bytes floor")
    return [dict(shape=name, dtype=dname, config=cfg, ms=t, bare_ms=bare) for t, cfg in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="shape:dtype:config,config,... (config 'lib': the autotuner's)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = MTLCreateSystemDefaultDevice()
    results = [row for spec in args.specs for row in sweep(device, spec)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
