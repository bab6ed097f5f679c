"""Triton kernels of the ``triton`` backend and of the torch backend's CUDA epilogue.

Every kernel reads and writes NHWC storage through explicit strides, starting at views that the
backend has already moved to the first source image / channel and to the destination's first image,
clip-region pixel and channel; so the index arithmetic here is that of ``ConvProblem``'s docstring,
nothing more. Accumulation is float32; the epilogue (bias, neuron, depth-to-space scatter, rounding
to the destination's type) is one jit function shared by every kernel.

Importing this module needs Triton; under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors,
which is how CI checks their index arithmetic.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Neuron codes are MPSCNNNeuronType raw values; _neuron mirrors neuron.FORMULAS (tests compare the two
# for every type).


@triton.jit
def _tanh(z):
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # saturates to +-1, never inf / inf


@triton.jit
def _index(i, WIDE: tl.constexpr):
    """Offsets in 64 bits only for storages of 2**31 elements or more: 32-bit address arithmetic is
    a good part of what the memory-bound kernels spend per element."""
    if WIDE:
        return i.to(tl.int64)
    return i


@triton.jit
def _neuron(x, a, b, c, p2, alpha, NEURON: tl.constexpr):
    """``FORMULAS[NEURON](x, a, b, c)``; ``alpha`` is the per-channel PReLU slope, ``p2`` a host-side
    constant (exponential: log2 of the base; logarithm: 1 / ln(base)). Clamps use ``where`` so that
    NaN propagates as in NumPy."""
    if NEURON == 1:  # reLU
        x = tl.where(x >= 0, x, a * x)
    elif NEURON == 2:  # linear
        x = a * x + b
    elif NEURON == 3:  # sigmoid
        x = 1.0 / (1.0 + tl.exp(-x))
    elif NEURON == 4:  # hardSigmoid
        x = a * x + b
        x = tl.where(x < 0.0, 0.0, x)
        x = tl.where(x > 1.0, 1.0, x)
    elif NEURON == 5:  # tanH
        x = a * _tanh(b * x)
    elif NEURON == 6:  # absolute
        x = tl.abs(x)
    elif NEURON == 7:  # softPlus: a * logaddexp(0, b x)
        z = b * x
        x = a * (tl.where(z > 0.0, z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))))
    elif NEURON == 8:  # softSign
        x = x / (1.0 + tl.abs(x))
    elif NEURON == 9:  # ELU
        x = tl.where(x >= 0, x, a * (tl.exp(x) - 1.0))
    elif NEURON == 10:  # pReLU
        x = tl.where(x >= 0, x, alpha * x)
    elif NEURON == 11:  # reLUN
        x = tl.where(x >= 0, x, a * x)
        x = tl.where(x > b, b, x)
    elif NEURON == 12:  # power: (a x + b) ** c, real results only
        y = a * x + b
        mag = tl.exp2(c * tl.log2(tl.abs(y)))
        integral = tl.floor(c) == c
        odd = integral & ((c - 2.0 * tl.floor(0.5 * c)) == 1.0)
        signed = tl.where(odd, -mag, mag)
        x = tl.where(y < 0.0, tl.where(integral, signed, tl.exp2(c * tl.log2(y))), mag)  # log2(y < 0): NaN
        x = tl.where(c == 0.0, 1.0, x)
    elif NEURON == 13:  # exponential: base ** (a x + b)
        x = tl.exp2((a * x + b) * p2)
    elif NEURON == 14:  # logarithm: log_base(a x + b)
        x = tl.log(a * x + b) * p2
    elif NEURON == 15:  # geLU
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _epilogue(acc, img, v, u, row_ok, oc, oc_ok, bias_ptr, prelu_ptr, y_ptr, syn, syh, syw, syc,
              OUT_H, OUT_W, OC_TOTAL, na, nb, nc, np2,
              NEURON: tl.constexpr, HAS_BIAS: tl.constexpr, SUBPIXEL: tl.constexpr, WIDE: tl.constexpr):
    """Bias, neuron and the store of a ``[rows, channels]`` float32 tile of convolution outputs at grid
    pixels ``(img, v, u)``, output channels ``oc``: straight into the destination's slice, or scattered
    depth-to-space (channel ``(OC/r²)·(r·dy + dx) + c`` to pixel ``(r·v + dy, r·u + dx)``)."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + oc, mask=oc_ok, other=0.0)[None, :]
    alpha = 0.0
    if NEURON == 10:
        alpha = tl.load(prelu_ptr + oc, mask=oc_ok, other=0.0)[None, :]
    acc = _neuron(acc, na, nb, nc, np2, alpha, NEURON)
    base = _index(img, WIDE) * syn
    if SUBPIXEL == 1:
        offs = (base + v * syh + u * syw)[:, None] + (oc * syc)[None, :]
        mask = row_ok[:, None] & oc_ok[None, :]
    else:
        per_block = OC_TOTAL // (SUBPIXEL * SUBPIXEL)
        block = oc // per_block
        py = v[:, None] * SUBPIXEL + (block // SUBPIXEL)[None, :]
        px = u[:, None] * SUBPIXEL + (block % SUBPIXEL)[None, :]
        offs = base[:, None] + py * syh + px * syw + ((oc - block * per_block) * syc)[None, :]
        mask = row_ok[:, None] & oc_ok[None, :] & (py < OUT_H) & (px < OUT_W)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel(rows, GH, GW):
    """Grid pixel ``(img, v, u)`` of flattened row index ``rows`` (images of ``GH x GW`` pixels)."""
    img = rows // (GH * GW)
    rem = rows - img * (GH * GW)
    v = rem // GW
    return img, v, rem - v * GW


@triton.jit
def _tap(iy, ix, row_ok, HE, WE, uy, ux, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr):
    """Source pixel ``(y, x)`` a tap at expanded coordinates ``(iy, ix)`` reads, and whether it reads
    one at all (zero edges read 0 outside; backwards kernels read 0 between source pixels)."""
    if CLAMP:
        iy = tl.minimum(tl.maximum(iy, 0), HE - 1)
        ix = tl.minimum(tl.maximum(ix, 0), WE - 1)
        ok = row_ok
    else:
        ok = row_ok & (iy >= 0) & (iy < HE) & (ix >= 0) & (ix < WE)
    if UPSAMPLE:
        ok = ok & (iy % uy == 0) & (ix % ux == 0)
        iy = iy // uy
        ix = ix // ux
    return iy, ix, ok


@triton.jit
def conv2d_nhwc(
    x_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
    M, GH, GW, HE, WE, CG, OG,
    sxn, sxh, sxw, sxc, syn, syh, syw, syc,
    OUT_H, OUT_W, OC_TOTAL,
    tap0y, tap0x, sy, sx, dy, dx, uy, ux,
    na, nb, nc, np2,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr,
    SUBPIXEL: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, WIDE: tl.constexpr,
):
    """Implicit-GEMM convolution: rows are output pixels ``(img, v, u)`` of the grid, columns the
    group's output channels, the reduction runs over taps x input channels of the group. Weights are
    ``[G][KH][KW][CG][OG]``. Grid: ``(cdiv(M, BM), cdiv(OG, BN), G·SPLIT)``.

    ``SPLIT > 1`` (split-K, for problems too small to fill the GPU): program ``(.., g·SPLIT + part)``
    reduces its part of the steps and stores the float32 partial sum at ``ws[part][row][channel]``
    (``y_ptr`` is then the workspace); ``epilogue_nhwc`` adds the parts and finishes."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2) // SPLIT
    part = tl.program_id(2) % SPLIT
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = rows < M
    col_ok = cols < OG
    img, v, u = _pixel(rows, GH, GW)
    iy0 = tap0y + v * sy
    ix0 = tap0x + u * sx
    x_img = _index(img, WIDE) * sxn
    w_group = w_ptr + g * (KH * KW * CG * OG)
    blocks = tl.cdiv(CG, BK)
    steps = KH * KW * blocks
    per_part = tl.cdiv(steps, SPLIT)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for step in range(part * per_part, tl.minimum(steps, (part + 1) * per_part)):
        t = step // blocks
        c = (step - t * blocks) * BK + ks
        r = t // KW
        s = t - r * KW
        iy, ix, ok = _tap(iy0 + r * dy, ix0 + s * dx, row_ok, HE, WE, uy, ux, CLAMP, UPSAMPLE)
        c_ok = c < CG
        a = tl.load(x_ptr + (x_img + iy * sxh + ix * sxw)[:, None] + ((g * CG + c) * sxc)[None, :],
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_group + (t * CG + c)[:, None] * OG + cols[None, :], mask=c_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if SPLIT == 1:
        _epilogue(acc, img, v, u, row_ok, g * OG + cols, col_ok, bias_ptr, prelu_ptr, y_ptr, syn, syh, syw, syc,
                  OUT_H, OUT_W, OC_TOTAL, na, nb, nc, np2, NEURON, HAS_BIAS, SUBPIXEL, WIDE)
    else:
        offs = _index(part * M + rows, WIDE)[:, None] * OC_TOTAL + (g * OG + cols)[None, :]
        tl.store(y_ptr + offs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _depthwise_tap(acc, t, x_ptr, w_ptr, x_img, x_chan, iy0, ix0, row_ok, oc, oc_ok, HE, WE, OC, sxh, sxw,
                   dy, dx, uy, ux, KW: tl.constexpr, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr):
    r = t // KW
    s = t - r * KW
    iy, ix, ok = _tap(iy0 + r * dy, ix0 + s * dx, row_ok, HE, WE, uy, ux, CLAMP, UPSAMPLE)
    xv = tl.load(x_ptr + (x_img + iy * sxh + ix * sxw)[:, None] + x_chan[None, :],
                 mask=ok[:, None] & oc_ok[None, :], other=0.0)
    wv = tl.load(w_ptr + t * OC + oc, mask=oc_ok, other=0.0)
    return acc + xv.to(tl.float32) * wv.to(tl.float32)[None, :]


@triton.jit
def depthwise_nhwc(
    x_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
    M, GH, GW, HE, WE, OC, MULT,
    sxn, sxh, sxw, sxc, syn, syh, syw, syc,
    OUT_H, OUT_W,
    tap0y, tap0x, sy, sx, dy, dx, uy, ux,
    na, nb, nc, np2,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr,
    SUBPIXEL: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    BP: tl.constexpr, BC: tl.constexpr, WIDE: tl.constexpr,
):
    """Depthwise convolution (one input channel per group, ``MULT`` outputs each): a direct float32
    multiply-add over the taps, channels innermost so that loads and stores are contiguous.
    Weights are ``[KH][KW][OC]``. Grid: ``(cdiv(OC, BC), cdiv(M, BP))``: the channel blocks of the
    same pixels run next to each other, so each pixel's channels leave DRAM together."""
    oc = tl.program_id(0) * BC + tl.arange(0, BC)
    rows = tl.program_id(1) * BP + tl.arange(0, BP)
    row_ok = rows < M
    oc_ok = oc < OC
    img, v, u = _pixel(rows, GH, GW)
    iy0 = tap0y + v * sy
    ix0 = tap0x + u * sx
    x_img = _index(img, WIDE) * sxn
    x_chan = (oc // MULT) * sxc
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    if KH * KW <= 49:  # unrolled: every tap's load can be in flight at once
        for t in tl.static_range(KH * KW):
            acc = _depthwise_tap(acc, t, x_ptr, w_ptr, x_img, x_chan, iy0, ix0, row_ok, oc, oc_ok, HE, WE, OC,
                                 sxh, sxw, dy, dx, uy, ux, KW, CLAMP, UPSAMPLE)
    else:
        for t in range(0, KH * KW):
            acc = _depthwise_tap(acc, t, x_ptr, w_ptr, x_img, x_chan, iy0, ix0, row_ok, oc, oc_ok, HE, WE, OC,
                                 sxh, sxw, dy, dx, uy, ux, KW, CLAMP, UPSAMPLE)
    _epilogue(acc, img, v, u, row_ok, oc, oc_ok, bias_ptr, prelu_ptr, y_ptr, syn, syh, syw, syc,
              OUT_H, OUT_W, OC, na, nb, nc, np2, NEURON, HAS_BIAS, SUBPIXEL, WIDE)


@triton.jit
def epilogue_nhwc(
    z_ptr, bias_ptr, prelu_ptr, y_ptr,
    M, GH, GW, OC,
    szn, szh, szw, szc, syn, syh, syw, syc,
    OUT_H, OUT_W,
    na, nb, nc, np2, szp,
    SUBPIXEL: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    BP: tl.constexpr, BC: tl.constexpr, PARTS: tl.constexpr, WIDE: tl.constexpr,
):
    """The epilogue alone, for a convolution computed elsewhere (cuDNN, or the parts of a split-K
    launch, ``PARTS`` of them ``szp`` elements apart): reads its ``[n, GH, GW, OC]`` output ``z`` once
    and writes the destination once. Grid: ``(cdiv(M, BP), cdiv(OC, BC))``."""
    rows = tl.program_id(0) * BP + tl.arange(0, BP)
    oc = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rows < M
    oc_ok = oc < OC
    img, v, u = _pixel(rows, GH, GW)
    offs = (_index(img, WIDE) * szn + v * szh + u * szw)[:, None] + (oc * szc)[None, :]
    mask = row_ok[:, None] & oc_ok[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for q in tl.static_range(1, PARTS):
        z += tl.load(z_ptr + q * szp + offs, mask=mask, other=0.0)
    _epilogue(z, img, v, u, row_ok, oc, oc_ok, bias_ptr, prelu_ptr, y_ptr, syn, syh, syw, syc,
              OUT_H, OUT_W, OC, na, nb, nc, np2, NEURON, HAS_BIAS, SUBPIXEL, WIDE)
