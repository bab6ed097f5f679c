"""convolution.md checklist §10: MPSCNNConvolutionTranspose (84–87, 89, 90), against the reference
on random geometry, and against PyTorch's conv_transpose2d."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given, strategies as st

from helpers import DEVICE, ArraySource, blank, conv, descriptor, framework_transpose_geometry, image, run, values
from mpsconv import *
from tolerances import assert_close

BACKENDS = ["reference", "torch"]


def transpose(kw=1, kh=1, cin=1, cout=1, weights=None, bias=None, **props):
    d = descriptor(kw, kh, cin, cout, **props)
    w = np.ones(cout * kh * kw * (cin // d.groups)) if weights is None else weights
    return MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(d, w, bias))


def row(values_):
    return np.asarray(values_, np.float64).reshape(1, -1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_84_zero_insertion(backend):
    k = transpose(strideInPixelsX=2)
    out = values(run(k, image(row([1, 2, 3, 4])), blank(7, 1, 1), backend))[0, 0, :, 0]
    assert out.tolist() == [1, 0, 2, 0, 3, 0, 4]
    assert k.isBackwards and conv().isBackwards is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_85_weights_not_rotated(backend):
    a, b, c = 2.0, 3.0, 5.0
    k = transpose(3, 1, weights=[a, b, c])
    k.kernelOffsetX = -1
    out = values(run(k, image(row([1])), blank(3, 1, 1), backend))[0, 0, :, 0]
    assert out.tolist() == [c, b, a]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_86_offset_in_source_pixels(backend):
    k = transpose(strideInPixelsX=2)
    k.offset = MPSOffset(2, 0, 0)
    out = values(run(k, image(row([1, 2, 3, 4])), blank(3, 1, 1), backend))[0, 0, :, 0]
    assert out.tolist() == [3, 0, 4]  # expanded index 4, 5, 6


@pytest.mark.parametrize("method, width", [(MPSNNPaddingMethod.sizeValidOnly, 5), (MPSNNPaddingMethod.sizeSame, 7),
                                           (MPSNNPaddingMethod.sizeFull, 9)])
def test_conv_checklist_87_allocating_sizes(method, width):
    k = transpose(3, 1, strideInPixelsX=2)
    k.padding = MPSNNDefaultPadding(method)
    d = k.destinationImageDescriptor(sourceImages=[blank(4, 1, 1)])
    assert d.width == width and k.offset == MPSOffset(0, 0, 0)


def test_allocating_sets_kernel_offset_that_undoes_the_forward_pairing():
    # forward valid-only (offset 1 for a 3-tap window) pairs with transpose full: kernelOffset = -1
    k = transpose(3, 3, strideInPixelsX=1)
    k.padding = MPSNNDefaultPadding(MPSNNPaddingMethod.sizeFull)
    k.destinationImageDescriptor(sourceImages=[blank(3, 3, 1)])
    assert (k.kernelOffsetX, k.kernelOffsetY) == (-1, -1)
    k.padding = MPSNNDefaultPadding(MPSNNPaddingMethod.sizeSame)
    k.destinationImageDescriptor(sourceImages=[blank(3, 3, 1)])
    assert (k.kernelOffsetX, k.kernelOffsetY) == (0, 0)


@st.composite
def adjoint_problems(draw):
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    return dict(k=k, s=s, d=d, n=draw(st.integers(k, 9)), o=draw(st.integers(-2, 3)), g=draw(st.sampled_from([1, 2])),
                seed=draw(st.integers(0, 999)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(p=adjoint_problems())
def test_conv_checklist_89_transpose_is_the_adjoint(backend, p):
    k, s, d, n, o, g = p["k"], p["s"], p["d"], p["n"], p["o"], p["g"]
    ci, co = 4 * g, 4 * g  # channels per group must be multiples of 4 with groups
    rng = np.random.default_rng(p["seed"])
    w = rng.uniform(-1, 1, (co, k, k, ci // g)).astype(np.float16).astype(np.float32)
    fwd = conv(k, k, ci, co, weights=w, strideInPixelsX=s, strideInPixelsY=s, dilationRateX=d, dilationRateY=d,
               groups=g)
    fwd.offset = MPSOffset(o, o, 0)
    kd = (k - 1) * d + 1
    size = -(-n // s)
    x, y = rng.uniform(-1, 1, (n, n, ci)), rng.uniform(-1, 1, (size, size, co))
    conv_x = values(run(fwd, image(x), blank(size, size, co), backend))[0]
    # W^T[grp·Ig + c][q][p][o_local] = W[grp·Og + o_local][kH-1-q][kW-1-p][c]
    og, ig = co // g, ci // g
    wt = np.zeros((ci, k, k, og), np.float32)
    for grp in range(g):
        block = w[grp * og:(grp + 1) * og, ::-1, ::-1, :]  # [o_local][q][p][c]
        wt[grp * ig:(grp + 1) * ig] = block.transpose(3, 1, 2, 0)
    t = transpose(k, k, co, ci, weights=wt, strideInPixelsX=s, strideInPixelsY=s, dilationRateX=d, dilationRateY=d,
                  groups=g)
    t.kernelOffsetX = t.kernelOffsetY = -o + (1 if kd % 2 == 0 else 0)
    t_y = values(run(t, image(y), blank(n, n, ci), backend))[0]
    lhs, rhs = float((conv_x * y).sum()), float((x * t_y).sum())
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs)), (lhs, rhs, p)


@pytest.mark.parametrize("backend", BACKENDS)
@given(k=st.integers(1, 5), s=st.integers(1, 3), d=st.integers(1, 2), n=st.integers(1, 6), t=st.integers(-1, 3),
       seed=st.integers(0, 999))
def test_conv_checklist_90_equals_framework_transposed_convolution(backend, k, s, d, n, t, seed):
    rng = np.random.default_rng(seed)
    geometry = framework_transpose_geometry(k, d, n, s, t)
    if geometry is None:
        return
    pad, size = geometry
    w_t = rng.uniform(-1, 1, (3, 2, k, k)).astype(np.float16).astype(np.float32)  # [ci][co][kh][kw]
    x = rng.uniform(-1, 1, (n, n, 3))
    expected = Fn.conv_transpose2d(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(w_t).double(),
                                   stride=s, padding=pad, dilation=d)[0].permute(1, 2, 0).numpy()
    ours_w = w_t[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)  # W[co][kh][kw][ci] = w_t[ci][co][kH-1-kh][kW-1-kw]
    kernel = transpose(k, k, 3, 2, weights=np.ascontiguousarray(ours_w), strideInPixelsX=s, strideInPixelsY=s,
                       dilationRateX=d, dilationRateY=d)
    kernel.kernelOffsetX = kernel.kernelOffsetY = t
    ours = values(run(kernel, image(x), blank(size, size, 2), backend))[0]
    assert_close(ours, expected, "float32", f"k={k} s={s} d={d} n={n} T={t}")


@st.composite
def transpose_problems(draw):
    g = draw(st.sampled_from([1, 1, 2]))
    cin, cout = (4 * g, 4 * g) if g > 1 else (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return dict(g=g, cin=cin, cout=cout, k=(draw(st.integers(1, 5)), draw(st.integers(1, 5))),
                s=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), d=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                src=(draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))),
                dst=(draw(st.integers(1, 9)), draw(st.integers(1, 9))),
                offset=(draw(st.integers(-2, 3)), draw(st.integers(-2, 3))),
                koff=(draw(st.integers(-3, 3)), draw(st.integers(-3, 3))), dfo=draw(st.sampled_from([0, 4])),
                neuron=draw(st.sampled_from([MPSCNNNeuronType.none, MPSCNNNeuronType.reLU, MPSCNNNeuronType.tanH])),
                fmt=draw(st.sampled_from([MPSImageFeatureChannelFormat.float32, MPSImageFeatureChannelFormat.float16])),
                seed=draw(st.integers(0, 999)))


@given(p=transpose_problems())
def test_transpose_matches_reference(p):
    rng = np.random.default_rng(p["seed"])
    (kh, kw), (sy, sx), (dy, dx) = p["k"], p["s"], p["d"]
    d = descriptor(kw, kh, p["cin"], p["cout"], groups=p["g"], strideInPixelsX=sx, strideInPixelsY=sy,
                   dilationRateX=dx, dilationRateY=dy)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(p["neuron"])
    w = rng.uniform(-1, 1, p["cout"] * kh * kw * p["cin"] // p["g"])
    k = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(d, w, rng.uniform(-1, 1, p["cout"])))
    k.offset = MPSOffset(*p["offset"], 0)
    k.kernelOffsetX, k.kernelOffsetY = p["koff"][1], p["koff"][0]
    k.destinationFeatureChannelOffset = p["dfo"]
    n, hs, ws = p["src"]
    src = image(rng.uniform(-1, 1, (n, hs, ws, p["cin"])), p["fmt"])
    prior = rng.uniform(-1, 1, (n, p["dst"][0], p["dst"][1], p["dfo"] + p["cout"]))
    results = [values(run(k, src, image(prior, p["fmt"]), b)) for b in ("reference", "torch")]
    assert_close(results[1], results[0], p["fmt"].name, str(p))


def test_transpose_round_trip_and_errors():
    rng = np.random.default_rng(4)
    k = transpose(3, 2, 2, 3, weights=rng.uniform(-1, 1, 36), strideInPixelsX=2)
    k.kernelOffsetX, k.kernelOffsetY = -1, 2
    back = NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolutionTranspose, NSKeyedArchiver.archivedData(withRootObject=k))
    assert type(back) is MPSCNNConvolutionTranspose and (back.kernelOffsetX, back.kernelOffsetY) == (-1, 2)
    src = image(rng.uniform(-1, 1, (3, 4, 2)))
    np.testing.assert_array_equal(values(run(back, src, blank(9, 6, 3))), values(run(k, src, blank(9, 6, 3))))
    with pytest.raises(MPSArchiveError, match="not a MPSCNNConvolution"):
        NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolution, NSKeyedArchiver.archivedData(withRootObject=k))
    assert not isinstance(k, MPSCNNConvolution)


@given(k=st.integers(1, 4), s=st.integers(1, 3), t=st.integers(-3, 3), w=st.integers(1, 8), n=st.integers(1, 6))
def test_source_region_is_what_the_encode_reads(k, s, t, w, n):
    """sourceRegion(destinationSize:) names exactly the source pixels that change the output."""
    kernel = transpose(k, 1, strideInPixelsX=s)
    kernel.kernelOffsetX = t
    region = kernel.sourceRegion(MTLSize(w, 1, 1))
    read = []
    for x in range(n):
        src = np.zeros((1, n, 1))
        src[0, x] = 1
        if values(run(kernel, image(src), blank(w, 1, 1), "reference")).any():
            read.append(x)
    inside = [x for x in range(region.origin.x, region.origin.x + region.size.width) if 0 <= x < n]
    assert read == inside, (region, read)
