"""A/B probe (not part of the library): a TMA implicit GEMM for 3x3 stride-1 layers, against our
current kernels and cuDNN on gpu.py's shapes (fp16 / bf16), conv + bias + ReLU into channels
[K, 2K) of a 2K-channel destination. A tile is a [1, BH, BW, BK] box of the NHWC source per tap
(TMA zero-fills the edges), reshaped to [BH*BW, BK] for the dot; a persistent grid (p132 / p264:
programs; F: tile loop flattened with the reduction) or one program a tile (pall). Each variant is
checked against float32 F.conv2d first. Results: benchmarks/history.md ("1x1 layers through TMA").

    python -m benchmarks.experiments.tma_conv_probe r50_3x3_56,r50_3x3_28 fp16
    TRITON_INTERPRET=1 python -m benchmarks.experiments.tma_conv_probe r50_3x3_56   # index check on small shapes
"""
import json
import math
import os
import sys

import numpy as np
import torch
import triton
import triton.language as tl
import torch.nn.functional as F
from benchmarks.gpu import bench, DTYPES
from mpsconv import MPSImage, MPSImageDescriptor, MTLCreateSystemDefaultDevice
from mpsconv.bench import SHAPES, operation_kernel

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERP else "cuda"
NSM = 4 if INTERP else torch.cuda.get_device_properties(0).multi_processor_count


def alloc(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device=DEV)


triton.set_allocator(alloc)


@triton.jit
def conv_tma(x_ptr, w_ptr, b_ptr, y_ptr, NI, H, W, C, N, GH, GW, sxn, sxh, sxw, syn, syh, syw, pad, NPROG,
             KH: tl.constexpr, KW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, FLATTEN: tl.constexpr):
    xd = tl.make_tensor_descriptor(x_ptr, shape=[NI, H, W, C], strides=[sxn, sxh, sxw, 1],
                                   block_shape=[1, BH, BW, BK])
    wd = tl.make_tensor_descriptor(w_ptr, shape=[KH * KW * C, N], strides=[N, 1], block_shape=[BK, BN])
    yd = tl.make_tensor_descriptor(y_ptr, shape=[NI, GH, GW, N], strides=[syn, syh, syw, 1],
                                   block_shape=[1, BH, BW, BN])
    nn = tl.cdiv(N, BN)
    th = tl.cdiv(GH, BH)
    tw = tl.cdiv(GW, BW)
    tiles = NI * th * tw * nn
    cb = tl.cdiv(C, BK)
    steps = KH * KW * cb
    for t in tl.range(tl.program_id(0), tiles, NPROG, flatten=FLATTEN):
        pn = t % nn
        r = t // nn
        px = r % tw
        r = r // tw
        py = r % th
        img = r // th
        acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
        for s in range(steps):
            tap = s // cb
            c0 = (s - tap * cb) * BK
            ky = tap // KW
            kx = tap - ky * KW
            a = xd.load([img, py * BH + ky - pad, px * BW + kx - pad, c0]).reshape(BH * BW, BK)
            b = wd.load([tap * C + c0, pn * BN])
            acc = tl.dot(a, b, acc)
        cols = pn * BN + tl.arange(0, BN)
        acc = acc + tl.load(b_ptr + cols, mask=cols < N, other=0.0)[None, :]
        acc = tl.maximum(acc, 0.0)
        yd.store([img, py * BH, px * BW, pn * BN], acc.to(y_ptr.dtype.element_ty).reshape(1, BH, BW, BN))


def setup(shape, dname, device):
    name, n, c, h, w, k, r, s, st, pad, dil, g = shape
    dtype, fmt = DTYPES[dname]
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((k, r, s, c), dtype=np.float32) / math.sqrt(r * s * c)
    bias = rng.standard_normal(k, dtype=np.float32)
    x = torch.randn(n, h, w, c, device=DEV).to(dtype)
    wk = torch.from_numpy(wt).to(DEV).permute(1, 2, 3, 0).reshape(r * s * c, k).to(dtype).contiguous()
    bt = torch.from_numpy(bias).to(DEV)
    p, q = (h + 2 * pad - (r - 1) * dil - 1) // st + 1, (w + 2 * pad - (s - 1) * dil - 1) // st + 1
    y = torch.zeros(n, p, q, 2 * k, device=DEV, dtype=dtype)
    w_ref = torch.from_numpy(wt).to(DEV).permute(0, 3, 1, 2).to(dtype).float()
    ref = F.relu(F.conv2d(x.permute(0, 3, 1, 2).float(), w_ref, bt, st, pad, dil)).permute(0, 2, 3, 1)
    return x, wk, bt, y, ref, (n, c, h, w, k, r, s, st, pad, dil, p, q)


def launch_conv(x, wk, bt, y, dims, BH, BW, BN, BK, warps, stages, progs, flatten):
    n, c, h, w, k, r, s, st, pad, dil, p, q = dims
    ys = y[..., k:]
    tiles = n * -(-p // BH) * -(-q // BW) * -(-k // BN)
    grid = (min(tiles, progs),)
    return lambda: conv_tma[grid](x, wk, bt, ys, n, h, w, c, k, p, q, *x.stride()[:3], *y.stride()[:3], pad, grid[0],
                                  KH=r, KW=s, BH=BH, BW=BW, BN=BN, BK=BK, FLATTEN=flatten, num_warps=warps,
                                  num_stages=stages)


def ours(shape, dname, device):
    name, n, c, h, w, k, r, s, st, pad, dil, g = shape
    dtype, fmt = DTYPES[dname]
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((k, r, s, c // g), dtype=np.float32) / math.sqrt(r * s * c / g)
    bias = rng.standard_normal(k, dtype=np.float32)
    conv, p, q = operation_kernel(device, c, h, w, k, r, s, st, pad, dil, g, wt, bias)
    src = MPSImage.from_numpy(torch.randn(n, h, w, c, device="cuda").to(dtype), featureChannelFormat=fmt, device=device)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(channelFormat=fmt, width=q, height=p,
                                                                      featureChannels=2 * k, numberOfImages=n))
    queue = device.makeCommandQueue()

    def run():
        cb = queue.makeCommandBuffer()
        conv.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
    with torch.cuda.stream(queue.stream):
        run()
        torch.cuda.synchronize()
        t = bench(run)
    planned = next(iter(conv._encoder.plans.values()))
    return t, planned.backend.name + (f":{planned.plan.config}" if hasattr(planned.plan, "config") else "")


def check(fn, y, ref, k):
    y.zero_()
    fn()
    got = y[..., k:].float()
    err = ((got - ref).norm() / ref.norm()).item()
    return err, y[..., :k].abs().max().item()


def main():
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    dnames = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fp16"]
    device = None if INTERP else MTLCreateSystemDefaultDevice()
    out = []
    for shape in SHAPES:
        name, n, c, h, w, k, r, s, st, pad, dil, g = shape
        if only and name not in only:
            continue
        if INTERP:  # shrink
            shape = (name, 2, c, 6, 9, k, r, s, st, pad, dil, g)
        for dname in dnames:
            x, wk, bt, y, ref, dims = setup(shape, dname, device)
            res = {}
            if not INTERP:
                xc = x.permute(0, 3, 1, 2)
                wt_t = wk.reshape(r, s, c, k).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
                res["bare"] = bench(lambda: F.conv2d(xc, wt_t, None, st, pad, dil, g))
                res["ours"], res["choice"] = ours(shape, dname, device)
            variants = []
            if st == 1 and dil == 1 and g == 1 and c % 64 == 0:
                for BH, BW, BN, BK, wa, sg in [(16, 8, 64, 64, 4, 3), (8, 16, 64, 64, 4, 3), (16, 8, 128, 64, 4, 3),
                                               (8, 16, 128, 64, 8, 3), (8, 8, 128, 64, 4, 4), (8, 8, 64, 64, 4, 4),
                                               (16, 8, 128, 64, 8, 3), (4, 16, 128, 64, 4, 4), (16, 16, 128, 64, 8, 3)]:
                    if BN > max(64, k) or (INTERP and BH * BW > 64):
                        continue
                    for progs, flat in [(NSM, True), (2 * NSM, True), (10 ** 9, False)]:
                        grid = progs if progs < 10 ** 9 else "all"
                        tag = f"conv{BH}x{BW}x{BN}x{BK}w{wa}s{sg}p{grid}{'F' if flat else ''}"
                        variants.append((tag, launch_conv(x, wk, bt, y, dims, BH, BW, BN, BK, wa, sg, progs, flat)))
            for tag, fn in variants:
                try:
                    err, spill = check(fn, y, ref, k)
                    t = None if INTERP else bench(fn)
                    res[tag] = t
                    print(f"{name} {dname} {tag} err={err:.2e} spill={spill} t={t}", flush=True)
                    if err > 1e-3 or spill:  # a right fp16 result is ~2e-4 from the float32 one
                        res[tag] = f"BAD {err} {spill}"
                except Exception as e:  # noqa
                    print(f"{name} {dname} {tag} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    res[tag] = "failed"
            timed = [(v, t) for t, v in res.items() if isinstance(v, float) and t not in ("bare", "ours")]
            best = min(timed, default=None)
            print(f"== {name} {dname} bare={res.get('bare')} ours={res.get('ours')} {res.get('choice')} best={best}",
                  flush=True)
            out.append(dict(shape=name, dtype=dname, **{kk: v for kk, v in res.items()}))
    if os.environ.get("OUT"):
        json.dump(out, open(os.path.join(os.environ["OUT"], "tma.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
