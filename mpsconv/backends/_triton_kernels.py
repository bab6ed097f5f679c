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

# Neuron codes are MPSCNNNeuronType raw values; _neuron mirrors core.activations.FORMULAS (tests compare the two
# for every type).


@triton.jit
def _follow(GDC: tl.constexpr):
    """Programmatic dependent launch (``launch.Launcher``, Hopper on): every kernel may be scheduled
    before the kernel ahead of it in the stream has finished, so each waits here, before it touches
    memory, until that one has finished and its writes are visible; then it lets the kernel behind it
    be scheduled in turn. What it can save is the gap between consecutive kernels."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


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
def _real_pow(y, c):
    """``y ** c`` where it is real: NaN for a negative ``y`` and a non-integral ``c``; ``y ** 0 = 1``."""
    mag = tl.exp2(c * tl.log2(tl.abs(y)))
    integral = tl.floor(c) == c
    odd = integral & ((c - 2.0 * tl.floor(0.5 * c)) == 1.0)
    signed = tl.where(odd, -mag, mag)
    x = tl.where(y < 0.0, tl.where(integral, signed, tl.exp2(c * tl.log2(y))), mag)  # log2(y < 0): NaN
    return tl.where(c == 0.0, 1.0, x)


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
        x = _real_pow(a * x + b, c)
    elif NEURON == 13:  # exponential: base ** (a x + b)
        x = tl.exp2((a * x + b) * p2)
    elif NEURON == 14:  # logarithm: log_base(a x + b)
        x = tl.log(a * x + b) * p2
    elif NEURON == 15:  # geLU
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _neuron_grad(x, a, b, c, p2, alpha, NEURON: tl.constexpr):
    """``DERIVATIVES[NEURON](x, a, b, c)``, from the right at kinks; ``p2`` as in ``_neuron``."""
    one = tl.full(x.shape, 1.0, tl.float32)
    if NEURON == 0:
        d = one
    elif NEURON == 1:  # reLU
        d = tl.where(x >= 0, one, a)
    elif NEURON == 2:  # linear
        d = one * a
    elif NEURON == 3:  # sigmoid
        s = 1.0 / (1.0 + tl.exp(-x))
        d = s * (1.0 - s)
    elif NEURON == 4:  # hardSigmoid
        y = a * x + b
        up = (y >= 0.0) & (y < 1.0)
        down = (y > 0.0) & (y <= 1.0)
        d = tl.where(a > 0, tl.where(up, a, 0.0), tl.where(a < 0, tl.where(down, a, 0.0), 0.0))
    elif NEURON == 5:  # tanH
        t = _tanh(b * x)
        d = a * b * (1.0 - t * t)
    elif NEURON == 6:  # absolute
        d = tl.where(x >= 0, one, -one)
    elif NEURON == 7:  # softPlus
        d = a * b / (1.0 + tl.exp(-b * x))
    elif NEURON == 8:  # softSign
        q = 1.0 + tl.abs(x)
        d = 1.0 / (q * q)
    elif NEURON == 9:  # ELU
        d = tl.where(x >= 0, one, a * tl.exp(x))
    elif NEURON == 10:  # pReLU
        d = tl.where(x >= 0, one, alpha)
    elif NEURON == 11:  # reLUN
        slope = tl.where(x >= 0, one, a)
        y = tl.where(x >= 0, x, a * x)
        capped = tl.where(slope > 0, y >= b, y > b)
        d = tl.where(capped, 0.0, slope)
    elif NEURON == 12:  # power
        d = tl.where(c == 0.0, 0.0, c * a * _real_pow(a * x + b, c - 1.0))
    elif NEURON == 13:  # exponential: a ln(base) base ** (a x + b)
        d = a * (p2 * 0.6931471805599453) * tl.exp2((a * x + b) * p2)
    elif NEURON == 14:  # logarithm
        d = a * p2 / (a * x + b)
    else:  # geLU
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    return d


@triton.jit
def neuron_gradient_nhwc(
    s_ptr, e_ptr, d_ptr, prelu_ptr,
    M, H, W, C,
    ssn, ssh, ssw, ssc, sen, seh, sew, sec, sdn, sdh, sdw, sdc,
    TY, TX, OUT_H, OUT_W,
    na, nb, nc, np2,
    NEURON: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """A neuron's gradient, one pass over the forward source's pixels: pixel ``(y, x)`` was read by the
    clip pixel ``(y - TY, x - TX)`` (a 1x1 window, stride 1, no pixel read twice); ``dS = E·f'(S)``
    there and 0 where no clip pixel read it. Grid: ``(cdiv(M, BP), cdiv(C, BC))``, ``M = n·H·W``."""
    _follow(GDC)
    rows = tl.program_id(0) * BP + tl.arange(0, BP)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rows < M
    ch_ok = ch < C
    img, y, x = _pixel(rows, H, W)
    v = y - TY
    u = x - TX
    read = row_ok & (v >= 0) & (v < OUT_H) & (u >= 0) & (u < OUT_W)
    mask = row_ok[:, None] & ch_ok[None, :]
    n = _index(img, WIDE)
    s = tl.load(s_ptr + (n * ssn + y * ssh + x * ssw)[:, None] + (ch * ssc)[None, :], mask=mask, other=0.0)
    e_mask = read[:, None] & ch_ok[None, :]
    e = tl.load(e_ptr + (n * sen + v * seh + u * sew)[:, None] + (ch * sec)[None, :], mask=e_mask, other=0.0)
    alpha = na
    if NEURON == 10:
        alpha = tl.load(prelu_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    d = e.to(tl.float32) * _neuron_grad(s.to(tl.float32), na, nb, nc, np2, alpha, NEURON)
    d = tl.where(e_mask, d, 0.0)
    tl.store(d_ptr + (n * sdn + y * sdh + x * sdw)[:, None] + (ch * sdc)[None, :],
             d.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activate(acc, oc, oc_ok, bias_ptr, prelu_ptr, na, nb, nc, np2, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Bias and neuron of a float32 tile whose output channels ``oc`` come as ``[1, columns]``."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + oc, mask=oc_ok, other=0.0)
    alpha = 0.0
    if NEURON == 10:
        alpha = tl.load(prelu_ptr + oc, mask=oc_ok, other=0.0)
    return _neuron(acc, na, nb, nc, np2, alpha, NEURON)


@triton.jit
def _epilogue(acc, img, v, u, row_ok, oc, oc_ok, bias_ptr, prelu_ptr, y_ptr, syn, syh, syw, syc,
              OUT_H, OUT_W, OC_TOTAL, na, nb, nc, np2,
              NEURON: tl.constexpr, HAS_BIAS: tl.constexpr, SUBPIXEL: tl.constexpr, WIDE: tl.constexpr):
    """Bias, neuron and the store of a ``[rows, columns]`` float32 tile of convolution outputs at grid
    pixels ``(img, v, u)``, output channels ``oc``: straight into the destination's slice, or scattered
    depth-to-space (channel ``(OC/r²)·(r·dy + dx) + c`` to pixel ``(r·v + dy, r·u + dx)``). Every
    index comes broadcastable to the tile: ``img`` and ``row_ok`` as ``[rows, 1]``, ``oc`` and ``oc_ok``
    as ``[1, columns]``, ``v`` and ``u`` as either, as each kernel lays pixels out."""
    acc = _activate(acc, oc, oc_ok, bias_ptr, prelu_ptr, na, nb, nc, np2, NEURON, HAS_BIAS)
    base = _index(img, WIDE) * syn
    mask = row_ok & oc_ok
    if SUBPIXEL == 1:
        offs = base + v * syh + u * syw + oc * syc
    else:
        per_block = OC_TOTAL // (SUBPIXEL * SUBPIXEL)
        block = oc // per_block
        py = v * SUBPIXEL + block // SUBPIXEL
        px = u * SUBPIXEL + block % SUBPIXEL
        offs = base + py * syh + px * syw + (oc - block * per_block) * syc
        mask = mask & (py < OUT_H) & (px < OUT_W)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel(rows, GH, GW):
    """Grid pixel ``(img, v, u)`` of flattened row index ``rows`` (images of ``GH x GW`` pixels)."""
    img = rows // (GH * GW)
    rem = rows - img * (GH * GW)
    v = rem // GW
    return img, v, rem - v * GW


@triton.jit
def _tap_axis(i, ok, E, up, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr):
    """One axis of ``_tap``: the source index a tap at expanded index ``i`` reads, and whether it reads."""
    if CLAMP:
        i = tl.minimum(tl.maximum(i, 0), E - 1)
    else:
        ok = ok & (i >= 0) & (i < E)
    if UPSAMPLE:
        ok = ok & (i % up == 0)
        i = i // up
    return i, ok


@triton.jit
def _tap(iy, ix, row_ok, HE, WE, uy, ux, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr):
    """Source pixel ``(y, x)`` a tap at expanded coordinates ``(iy, ix)`` reads, and whether it reads
    one at all (zero edges read 0 outside; backwards kernels read 0 between source pixels)."""
    iy, ok = _tap_axis(iy, row_ok, HE, uy, CLAMP, UPSAMPLE)
    ix, ok = _tap_axis(ix, ok, WE, ux, CLAMP, UPSAMPLE)
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
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, FLAT: tl.constexpr,
    WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """Implicit-GEMM convolution: rows are output pixels ``(img, v, u)`` of the grid, columns the
    group's output channels, the reduction runs over taps x input channels of the group. Weights are
    ``[G][KH][KW][CG][OG]``. Grid: ``(cdiv(M, BM), cdiv(OG, BN), G·SPLIT)``.

    A step takes ``BK`` channels of one tap, or with ``FLAT`` ``BK`` consecutive (tap, channel) pairs
    of the flattened reduction: for a few input channels (an RGB first layer), where a step per tap
    would be mostly padding, at the price of a gathered load.

    ``SPLIT > 1`` (split-K, for problems too small to fill the GPU): program ``(.., g·SPLIT + part)``
    reduces its part of the steps and stores the float32 partial sum at ``ws[part][row][channel]``
    (``y_ptr`` is then the workspace); ``epilogue_nhwc`` adds the parts and finishes."""
    _follow(GDC)
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
    steps = tl.cdiv(KH * KW * CG, BK) if FLAT else KH * KW * blocks
    per_part = tl.cdiv(steps, SPLIT)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for step in range(part * per_part, tl.minimum(steps, (part + 1) * per_part)):
        if FLAT:  # [BM, BK] taps: each column of the step has its own tap and channel
            k = step * BK + ks
            t = k // CG
            c = k - t * CG
            r = t // KW
            s = t - r * KW
            k_ok = k < KH * KW * CG
            iy, ok = _tap_axis(iy0[:, None] + (r * dy)[None, :], row_ok[:, None] & k_ok[None, :], HE, uy, CLAMP,
                               UPSAMPLE)
            ix, ok = _tap_axis(ix0[:, None] + (s * dx)[None, :], ok, WE, ux, CLAMP, UPSAMPLE)
            a = tl.load(x_ptr + x_img[:, None] + iy * sxh + ix * sxw + ((g * CG + c) * sxc)[None, :], mask=ok,
                        other=0.0)
            b = tl.load(w_group + k[:, None] * OG + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            t = step // blocks
            c = (step - t * blocks) * BK + ks
            r = t // KW
            s = t - r * KW
            iy, ix, ok = _tap(iy0 + r * dy, ix0 + s * dx, row_ok, HE, WE, uy, ux, CLAMP, UPSAMPLE)
            c_ok = c < CG
            a = tl.load(x_ptr + (x_img + iy * sxh + ix * sxw)[:, None] + ((g * CG + c) * sxc)[None, :],
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_group + (t * CG + c)[:, None] * OG + cols[None, :],
                        mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if SPLIT == 1:
        _epilogue(acc, img[:, None], v[:, None], u[:, None], row_ok[:, None], (g * OG + cols)[None, :],
                  col_ok[None, :], bias_ptr, prelu_ptr, y_ptr, syn, syh, syw, syc, OUT_H, OUT_W, OC_TOTAL, na, nb,
                  nc, np2, NEURON, HAS_BIAS, SUBPIXEL, WIDE)
    else:
        offs = _index(part * M + rows, WIDE)[:, None] * OC_TOTAL + (g * OG + cols)[None, :]
        tl.store(y_ptr + offs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def pack_nhwc(
    x_ptr, p_ptr,
    PIX, PH, PW, HE, WE,
    sxn, sxh, sxw, sxc,
    tap0y, tap0x,
    C: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, CP: tl.constexpr,
    CLAMP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """Space-to-depth for ``packed_conv_nhwc``: packed pixel ``(img, by, bx)``, channel ``(py·SX + px)·C
    + c`` is the source value a tap at ``(tap0y + by·SY + py, tap0x + bx·SX + px)`` reads, channel
    ``c`` (edges applied: zero or clamped); channels ``SY·SX·C`` to ``CP`` are zero. The packed image
    ``[n, PH, PW, CP]`` is dense. The channel split is constexpr: divisions by run-time values cost
    more than the copy. Grid: ``cdiv(PIX, BP)``, ``PIX = n·PH·PW``."""
    _follow(GDC)
    pix = tl.program_id(0) * BP + tl.arange(0, BP)[:, None]
    ch = tl.arange(0, BC)[None, :]
    pix_ok = pix < PIX
    img, by, bx = _pixel(pix, PH, PW)
    py = ch // (SX * C)
    px = (ch % (SX * C)) // C
    iy, ok = _tap_axis(tap0y + by * SY + py, pix_ok & (ch < SY * SX * C), HE, 1, CLAMP, False)
    ix, ok = _tap_axis(tap0x + bx * SX + px, ok, WE, 1, CLAMP, False)
    value = tl.load(x_ptr + _index(img, WIDE) * sxn + iy * sxh + ix * sxw + (ch % C) * sxc, mask=ok, other=0.0)
    tl.store(p_ptr + _index(pix, WIDE) * CP + ch, value, mask=pix_ok & (ch < CP))


@triton.jit
def packed_conv_nhwc(
    p_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
    M, GH, GW, OC, spn, sph, spw, syn, syh, syw, syc,
    OUT_H, OUT_W, na, nb, nc, np2,
    KH: tl.constexpr, RUN: tl.constexpr, SUBPIXEL: tl.constexpr, NEURON: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """Implicit GEMM over a packed image (``pack_nhwc``): a stride-1 convolution with no edges, whose
    ``KH`` tap rows each read one contiguous run of ``RUN`` = packed taps x packed channels elements
    from the packed pixel ``(v + r, u)`` on. So a step's loads are whole aligned runs, masked per row
    only, where the unpacked layer's (a few channels, a stride) would gather 2-byte values. Weights
    ``[KH][RUN][OC]``. Grid: ``(cdiv(M, BM), cdiv(OC, BN))``."""
    _follow(GDC)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = rows < M
    col_ok = cols < OC
    img, v, u = _pixel(rows, GH, GW)
    at = p_ptr + (_index(img, WIDE) * spn + v * sph + u * spw)[:, None] + ks[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(KH):
        for k0 in tl.static_range(0, RUN, BK):
            w_at = w_ptr + (r * RUN + k0 + ks)[:, None] * OC + cols[None, :]
            if RUN % BK == 0:  # masks constant along the run: vector loads
                a = tl.load(at + (r * sph + k0), mask=row_ok[:, None], other=0.0)
                b = tl.load(w_at, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < RUN
                a = tl.load(at + (r * sph + k0), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    _epilogue(acc, img[:, None], v[:, None], u[:, None], row_ok[:, None], cols[None, :], col_ok[None, :], bias_ptr,
              prelu_ptr, y_ptr, syn, syh, syw, syc, OUT_H, OUT_W, OC, na, nb, nc, np2, NEURON, HAS_BIAS, SUBPIXEL, WIDE)


@triton.jit
def gemm_tma_nhwc(
    x_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
    M, CG, OG, sx, sy, na, nb, nc, np2, PROGRAMS,
    NEURON: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GDC: tl.constexpr,
):
    """A 1x1 convolution whose source and destination windows are each one strided matrix (``M``
    pixels by channels, rows ``sx`` / ``sy`` elements apart): ``y = x @ w``, weights ``[CG][OG]``.

    Loads and stores go through tensor-memory-access descriptors (Hopper's TMA), which zero-fill
    reads past the matrix and clip writes to it, so neighbouring channels of the destination stay
    untouched. ``PROGRAMS`` programs walk the ``BM x BN`` tiles in turn, the tile loop flattened with
    the reduction so that one tile's loads are in flight while the previous tile is stored: these
    layers move far more bytes than they multiply."""
    _follow(GDC)
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, CG], strides=[sx, 1], block_shape=[BM, BK])
    wd = tl.make_tensor_descriptor(w_ptr, shape=[CG, OG], strides=[OG, 1], block_shape=[BK, BN])
    yd = tl.make_tensor_descriptor(y_ptr, shape=[M, OG], strides=[sy, 1], block_shape=[BM, BN])
    col_tiles = tl.cdiv(OG, BN)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * col_tiles, PROGRAMS, flatten=True):
        row0 = (tile // col_tiles) * BM
        col0 = (tile % col_tiles) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, CG, BK):
            a = xd.load([row0, k])
            b = wd.load([k, col0])
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        oc = col0 + tl.arange(0, BN)[None, :]
        acc = _activate(acc, oc, oc < OG, bias_ptr, prelu_ptr, na, nb, nc, np2, NEURON, HAS_BIAS)
        yd.store([row0, col0], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _row_run(GW, OC, OG, sxc, BF: tl.constexpr, IG: tl.constexpr):
    """The direct kernels' run of ``BF`` consecutive (column, channel) positions ``f = u·OC + oc`` of an
    output row, the fastest-varying part of the program id: ``(the id's rest, u, oc, whether f lies in
    the row, the offset of the first source channel of oc's group)``, the last four ``[1, BF]``, in the
    tile's own layout (groups of ``OG`` outputs read ``IG`` source channels each)."""
    chunks = tl.cdiv(GW * OC, BF)
    pid = tl.program_id(0)
    rest = pid // chunks
    f = (pid - rest * chunks) * BF + tl.arange(0, BF)[None, :]
    u = f // OC
    oc = f - u * OC
    return rest, u, oc, u < GW, (oc // OG) * (IG * sxc)


@triton.jit
def _direct_tap(acc, t, x_ptr, w_ptr, x_rows, iy0, rows_ok, x_chan, ix0, cols_ok, oc, HE, WE, OC, sxh, sxw, sxc,
                dy, dx, uy, ux, KW: tl.constexpr, IG: tl.constexpr, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr):
    r = t // KW
    s = t - r * KW
    iy, ok_y = _tap_axis(iy0 + r * dy, rows_ok, HE, uy, CLAMP, UPSAMPLE)  # [rows, 1]
    ix, ok_x = _tap_axis(ix0 + s * dx, cols_ok, WE, ux, CLAMP, UPSAMPLE)  # [1, columns]
    at = x_ptr + (x_rows + iy * sxh) + (ix * sxw + x_chan)
    for j in tl.static_range(IG):
        xv = tl.load(at + j * sxc, mask=ok_y & ok_x, other=0.0)
        wv = tl.load(w_ptr + (t * IG + j) * OC + oc, mask=cols_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)
    return acc


@triton.jit
def direct_nhwc(
    x_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
    ROWS, GH, GW, HE, WE, OC, OG,
    sxn, sxh, sxw, sxc, syn, syh, syw, syc,
    OUT_H, OUT_W,
    tap0y, tap0x, sy, sx, dy, dx, uy, ux,
    na, nb, nc, np2,
    KH: tl.constexpr, KW: tl.constexpr, IG: tl.constexpr, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr,
    SUBPIXEL: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    BH: tl.constexpr, BF: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """Depthwise and narrow grouped convolution (groups of ``IG`` input channels, ``OG`` outputs each;
    depthwise: ``IG = 1``): a direct float32 multiply-add over the taps and the group's input channels.
    A tile is ``BH`` output rows (of all images: row ``img·GH + v``) by ``BF`` consecutive (column,
    channel) positions of a row, ``f = u·OC + oc``: every channel of a pixel, pixels side by side,
    which is how NHWC lays a row out. So each tap's address and mask split into a per-row and a
    per-column part, worked out once per tile, and its loads are runs of whole rows. Weights are
    ``[KH][KW][IG][OC]`` (float32, or the source's type where exact). Grid: ``cdiv(GW·OC, BF) ·
    cdiv(ROWS, BH)``, the tiles of one row band next to each other (they share the band's source rows)."""
    _follow(GDC)
    band, u, oc, cols_ok, x_chan = _row_run(GW, OC, OG, sxc, BF, IG)
    rows = band * BH + tl.arange(0, BH)[:, None]  # [BH, 1]: per-row work stays in the tile's own layout
    rows_ok = rows < ROWS
    img = rows // GH
    v = rows - img * GH
    x_rows = _index(img, WIDE) * sxn
    iy0 = tap0y + v * sy
    ix0 = tap0x + u * sx
    acc = tl.zeros((BH, BF), dtype=tl.float32)
    if KH * KW * IG <= 49:  # unrolled: every tap's load can be in flight at once
        for t in tl.static_range(KH * KW):
            acc = _direct_tap(acc, t, x_ptr, w_ptr, x_rows, iy0, rows_ok, x_chan, ix0, cols_ok, oc, HE, WE, OC,
                              sxh, sxw, sxc, dy, dx, uy, ux, KW, IG, CLAMP, UPSAMPLE)
    else:
        for t in range(0, KH * KW):
            acc = _direct_tap(acc, t, x_ptr, w_ptr, x_rows, iy0, rows_ok, x_chan, ix0, cols_ok, oc, HE, WE, OC,
                              sxh, sxw, sxc, dy, dx, uy, ux, KW, IG, CLAMP, UPSAMPLE)
    _epilogue(acc, img, v, u, rows_ok, oc, cols_ok, bias_ptr, prelu_ptr, y_ptr, syn, syh, syw,
              syc, OUT_H, OUT_W, OC, na, nb, nc, np2, NEURON, HAS_BIAS, SUBPIXEL, WIDE)


@triton.jit
def direct_rolling_nhwc(
    x_ptr, w_ptr, bias_ptr, prelu_ptr, y_ptr,
    GH, GW, HE, WE, OC, OG, BANDS,
    sxn, sxh, sxw, sxc, syn, syh, syw, syc,
    OUT_H, OUT_W,
    tap0y, tap0x, sx, dx, uy, ux,
    na, nb, nc, np2,
    KH: tl.constexpr, KW: tl.constexpr, IG: tl.constexpr, CLAMP: tl.constexpr, UPSAMPLE: tl.constexpr,
    SUBPIXEL: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    BH: tl.constexpr, BF: tl.constexpr, ROLL: tl.constexpr, STAGES: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """``direct_nhwc`` for vertical stride and dilation 1, rolling down the rows: a program takes ``BF``
    consecutive (column, channel) positions ``f = u·OC + oc`` of ``BH`` output rows of one image, and
    walks the source rows once. Each source row is loaded as ``KW·IG`` shifted runs (one per tap column
    and input channel of the group) and converted once, then multiplied by every weight row: row
    ``r``'s products finish output row ``i - r``. ``KH - 1`` partial sums roll along. So a pixel costs
    ``KW·IG`` loads and conversions instead of ``KH·KW·IG``; column offsets, masks and the weights are
    worked out once per program. ``STAGES`` > 1 software-pipelines the row loop (Triton copies the
    next ``STAGES - 1`` steps' rows into shared memory while this one computes). Grid: ``cdiv(GW·OC,
    BF) · BANDS · images``, ``BANDS = cdiv(GH, BH)``."""
    _follow(GDC)
    rest, u, oc, cols_ok, x_chan = _row_run(GW, OC, OG, sxc, BF, IG)
    img = rest // BANDS
    v0 = (rest - img * BANDS) * BH
    x_img = x_ptr + _index(img, WIDE) * sxn
    cols = ()  # cols[s·IG + j]: tap column s, input channel j of the group
    col_oks = ()
    for s in tl.static_range(KW):
        ix, ok = _tap_axis(tap0x + u * sx + s * dx, cols_ok, WE, ux, CLAMP, UPSAMPLE)
        for j in tl.static_range(IG):
            cols = cols + (ix * sxw + x_chan + j * sxc,)
            col_oks = col_oks + (ok,)
    ws = ()  # ws[(r·KW + s)·IG + j]
    for t in tl.static_range(KH * KW * IG):
        ws = ws + (tl.load(w_ptr + t * OC + oc, mask=cols_ok, other=0.0).to(tl.float32),)
    pend = ()  # pend[j]: output row (i - KH + 1 + j)'s sum over the source rows so far
    for j in tl.static_range(KH - 1):
        pend = pend + (tl.zeros((1, BF), dtype=tl.float32),)
    last = tl.minimum(v0 + BH, GH)
    end = last + KH - 1
    for i0 in tl.range(v0, end, ROLL, num_stages=STAGES):  # output row i - r takes source row i + tap0y as tap row r
        rows = ()  # ROLL source rows' loads first, all in flight together
        for q in tl.static_range(ROLL):
            iy, row_ok = _tap_axis(i0 + q + tap0y, i0 + q < end, HE, uy, CLAMP, UPSAMPLE)
            x_row = x_img + iy * sxh
            xs = ()
            # where, not &: Triton's interpreter makes scalar & block int32. The source's lines are kept in
            # L2 over the others: a row's shifted runs and the next band's rows read them again (H200: 11%
            # off the 14x14 layer of benchmarks/history.md, level to 2% faster on the 56x56 one)
            for c in tl.static_range(KW * IG):
                xs = xs + (tl.load(x_row + cols[c], mask=tl.where(row_ok, col_oks[c], False), other=0.0,
                                   eviction_policy="evict_last"),)
            rows = rows + (xs,)
        for q in tl.static_range(ROLL):
            rolled = ()
            for r in tl.static_range(KH):
                # tap row r adds to output row i - r: a new sum for r = 0, else the one rolling along
                # (continuing it: one multiply-add per product, no separate product sum to add)
                if r == 0:
                    p = rows[q][0].to(tl.float32) * ws[0]
                else:
                    p = pend[KH - 1 - r] + rows[q][0].to(tl.float32) * ws[r * KW * IG]
                for c in tl.static_range(1, KW * IG):
                    p += rows[q][c].to(tl.float32) * ws[r * KW * IG + c]
                if r == KH - 1:
                    done = p
                else:
                    rolled = (p,) + rolled
            o = i0 + q - (KH - 1)
            _epilogue(done, img, o, u, tl.where((o >= v0) & (o < last), cols_ok, False), oc, cols_ok, bias_ptr,
                      prelu_ptr, y_ptr, syn, syh, syw, syc, OUT_H, OUT_W, OC, na, nb, nc, np2, NEURON, HAS_BIAS,
                      SUBPIXEL, WIDE)
            pend = rolled


@triton.jit
def epilogue_nhwc(
    z_ptr, bias_ptr, prelu_ptr, y_ptr,
    M, GH, GW, OC,
    szn, szh, szw, szc, syn, syh, syw, syc,
    OUT_H, OUT_W,
    na, nb, nc, np2, szp,
    SUBPIXEL: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    BP: tl.constexpr, BC: tl.constexpr, PARTS: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    """The epilogue alone, for a convolution computed elsewhere (cuDNN, or the parts of a split-K
    launch, ``PARTS`` of them ``szp`` elements apart): reads its ``[n, GH, GW, OC]`` output ``z`` once
    and writes the destination once. Grid: ``(cdiv(M, BP), cdiv(OC, BC))``."""
    _follow(GDC)
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
    _epilogue(z, img[:, None], v[:, None], u[:, None], row_ok[:, None], oc[None, :], oc_ok[None, :], bias_ptr,
              prelu_ptr, y_ptr, syn, syh, syw, syc, OUT_H, OUT_W, OC, na, nb, nc, np2, NEURON, HAS_BIAS, SUBPIXEL,
              WIDE)
