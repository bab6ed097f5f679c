"""A/B probe (not part of the library): depthwise 3x3 with register blocking along the row, against
the rolling depthwise kernel's three fastest tiles, on gpu.py's depthwise shapes. A program takes
``G`` groups of ``PW`` consecutive output pixels by ``BC`` channels, rolling down ``BH`` output rows
``ROLL`` source rows at a time; each group loads a source row's ``PW + KW - 1`` pixels once
(``[G, BC]`` tiles, channels contiguous) and every tap column reuses them from registers, where the
rolling kernel loads one shifted run per tap column. Every variant is checked against float32
F.conv2d. Results: benchmarks/history.md ("depthwise: two kernels that lost").

    python -m benchmarks.experiments.depthwise_rows_probe mbv2_dw_56:fp16 mbv2_dw_14:fp16 mbv2_dw_56:fp32
    TRITON_INTERPRET=1 python -m benchmarks.experiments.depthwise_rows_probe mbv2_dw_56:fp16   # index check, small shapes
"""
import os
import sys

import triton
import triton.language as tl

os.environ["MPSCONV_AUTOTUNE"] = "0"
from mpsconv import MTLCreateSystemDefaultDevice
from mpsconv.backends import triton as tb
from mpsconv.backends._triton_kernels import _tap_axis, _epilogue, _index
from mpsconv.bench import SHAPES
from benchmarks.experiments.tiles import layer
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERP:
    from benchmarks.gpu import bench


@triton.jit
def dw_reg(x_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
           GH, GW, HE, WE, C, BANDS, COLS, CHANS,
           sxn, sxh, sxw, sxc, syn, syh, syw, syc, OUT_H, OUT_W,
           tap0y, tap0x, na, nb, nc, np2,
           KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
           BH: tl.constexpr, G: tl.constexpr, PW: tl.constexpr, BC: tl.constexpr, ROLL: tl.constexpr,
           WIDE: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % CHANS
    rest = pid // CHANS
    colb = rest % COLS
    rest = rest // COLS
    band = rest % BANDS
    img = rest // BANDS
    c = cb * BC + tl.arange(0, BC)[None, :]
    c_ok = c < C
    u = colb * (G * PW) + tl.arange(0, G)[:, None] * PW  # [G, 1]: each group's first output pixel
    x_img = x_ptr + _index(img, WIDE) * sxn + c * sxc
    cols = ()
    oks = ()
    for e in tl.static_range(PW + KW - 1):
        ix, ok = _tap_axis(tap0x + u + e, c_ok, WE, 1, CLAMP, False)
        cols = cols + (ix * sxw,)
        oks = oks + (ok,)
    ws = ()
    for t in tl.static_range(KH * KW):
        ws = ws + (tl.load(w_ptr + t * C + c, mask=c_ok, other=0.0).to(tl.float32),)
    pend = ()
    for m in tl.static_range((KH - 1) * PW):
        pend = pend + (tl.zeros((G, BC), dtype=tl.float32),)
    v0 = band * BH
    last = tl.minimum(v0 + BH, GH)
    end = last + KH - 1
    for i0 in range(v0, end, ROLL):
        rows = ()
        for q in tl.static_range(ROLL):
            iy, row_ok = _tap_axis(i0 + q + tap0y, i0 + q < end, HE, 1, CLAMP, False)
            x_row = x_img + iy * sxh
            xs = ()
            for e in tl.static_range(PW + KW - 1):
                xs = xs + (tl.load(x_row + cols[e], mask=tl.where(row_ok, oks[e], False), other=0.0),)
            rows = rows + (xs,)
        for q in tl.static_range(ROLL):
            xf = ()
            for e in tl.static_range(PW + KW - 1):
                xf = xf + (rows[q][e].to(tl.float32),)
            o = i0 + q - (KH - 1)
            keep = (o >= v0) & (o < last)
            new = ()
            for j in tl.static_range(PW):
                rolled = ()
                for r in tl.static_range(KH):
                    if r == 0:
                        p = xf[j] * ws[0]
                    else:
                        p = pend[(KH - 1 - r) * PW + j] + xf[j] * ws[r * KW]
                    for s in tl.static_range(1, KW):
                        p += xf[j + s] * ws[r * KW + s]
                    if r == KH - 1:
                        done = p
                    else:
                        rolled = (p,) + rolled
                new = new + (rolled,)
                _epilogue(done, img, o, u + j, tl.where(keep, u + j < GW, False), c, c_ok, bias_ptr, prelu_ptr,
                          y_ptr, syn, syh, syw, syc, OUT_H, OUT_W, C, na, nb, nc, np2, NEURON, HAS_BIAS, 1, WIDE)
            flat = ()
            for m in tl.static_range(KH - 1):
                for j in tl.static_range(PW):
                    flat = flat + (new[j][m],)
            pend = flat


dev = MTLCreateSystemDefaultDevice()
shapes = {s[0]: s for s in SHAPES}
VARIANTS = [(32, 8, 7, 16, 4, 1), (32, 8, 7, 16, 2, 1), (32, 8, 7, 32, 4, 2), (32, 8, 7, 32, 2, 1), (56, 8, 7, 16, 4, 1),
            (16, 8, 7, 16, 4, 1), (32, 16, 4, 16, 4, 2), (32, 16, 4, 16, 2, 1), (32, 8, 4, 32, 4, 2), (32, 4, 7, 32, 4, 1),
            (32, 2, 7, 64, 4, 1), (32, 8, 7, 64, 2, 4), (32, 8, 7, 8, 4, 1), (56, 8, 7, 32, 2, 2), (32, 8, 7, 16, 8, 1),
            (32, 16, 2, 16, 4, 1),
            (8, 8, 7, 16, 2, 1), (8, 8, 7, 16, 1, 1), (4, 8, 7, 16, 2, 1), (8, 4, 7, 16, 2, 1),
            (8, 8, 7, 8, 2, 1), (14, 8, 7, 16, 2, 1), (8, 8, 4, 16, 2, 1), (4, 8, 7, 16, 1, 1), (8, 4, 7, 8, 2, 1),
            (8, 8, 7, 32, 2, 2), (8, 16, 4, 16, 2, 2), (4, 4, 7, 16, 2, 1), (8, 2, 7, 32, 2, 1)]
if INTERP:
    VARIANTS = [(3, 2, 3, 4, 2, 1), (4, 1, 5, 8, 1, 1)]
if os.environ.get("PROBE_FIRST"):  # one variant, one round (for ncu)
    VARIANTS = VARIANTS[:1]
for name, dname in [(a.split(":")[0], a.split(":")[1]) for a in sys.argv[1:]]:
    shape = shapes[name]
    if INTERP:  # 2 images of 7x11 pixels, 8 channels
        shape = shape[:1] + (2, 8, 7, 11, 8) + shape[6:11] + (8,)
    _, n, c, h, w, k, r, s, st, pad, dil, g = shape
    op = layer(dev, shape, dname)
    problem, prepared, S, D, want = op.problem, op.prepared, op.src, op.dst, op.want
    floor_bytes = (op.x.numel() + want.numel()) * op.x.element_size()
    plan = tb.Plan(problem, dev, tb.DEPTHWISE_CONFIGS[0] if not INTERP else None)
    bnd = tb.Bound(plan, S, D)
    x, y = bnd.x, bnd.y
    wl = prepared.layout(g, True, plan.operand_dtype(prepared))
    rows, gh, gw, he, we = plan.sizes
    res = {}
    for rnd in range(1 if INTERP or os.environ.get("PROBE_FIRST") else 2):
        if not INTERP:
            for cfg in [cf for cf in tb.configs(problem) if cf.bk][:3]:
                b = tb.Bound(tb.Plan(problem, dev, cfg), S, D)
                t = bench(lambda: tb.run(b, prepared))
                res.setdefault("lib " + str(cfg), []).append((t * 1e3, 0.0))
        for (bh, gg, pw, bc, roll, nw) in VARIANTS:
            bands, colsn, chans = -(-gh // bh), -(-gw // (gg * pw)), -(-k // bc)
            grid = (n * bands * colsn * chans,)
            args = (x, wl, prepared.bias, prepared.bias, y, gh, gw, he, we, k, bands, colsn, chans, *x.stride(), *y.stride(),
                    *problem.out_size, problem.tap0[0], problem.tap0[1], *plan.scalars[8:])
            def go():
                dw_reg[grid](*args, KH=r, KW=s, CLAMP=False, NEURON=1, HAS_BIAS=True, BH=bh, G=gg, PW=pw, BC=bc, ROLL=roll,
                             WIDE=False, num_warps=nw)
            label = f"reg h{bh} g{gg} pw{pw} c{bc} r{roll} w{nw}"
            try:
                D[..., k:].zero_(); go()
                err = ((D[..., k:].float() - want).norm() / want.norm()).item()
                t = 0.0 if INTERP else bench(go)
            except Exception as e:
                print("FAIL", label, repr(e)[:400], flush=True); continue
            res.setdefault(label, []).append((t * 1e3, err))
    for cf, v in sorted(res.items(), key=lambda kv: min(x[0] for x in kv[1])):
        t = min(x[0] for x in v)
        print(f"  {name} {dname} {cf:28s} {t:7.2f} us  err {v[0][1]:.1e} {floor_bytes / 4.3e12 * 1e6 / max(t, 1e-9) * 100:5.1f}% floor", flush=True)
