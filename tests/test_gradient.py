"""convolution.md checklist §11: MPSCNNConvolutionGradient (91–100): against the spec's 1-D example,
PyTorch autograd on random geometry, the reference on every path, and the transpose identity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given, strategies as st

from helpers import DEVICE, QUEUE, ArraySource, blank, descriptor, framework_transpose_geometry, image, quiet, values
from mpsconv import *
from tolerances import assert_close

BACKENDS = ["reference", "torch"]
OPT = MPSCNNConvolutionGradientOption


def pair(kw, kh, cin, cout, w, b=None, kernel_type=None, **props):
    d = descriptor(kw, kh, cin, cout, **props)
    ds = ArraySource(d, w, b, kernel_type=kernel_type)
    return MPSCNNConvolution(device=DEVICE, weights=ds), MPSCNNConvolutionGradient(device=DEVICE, weights=ds)


def forward_backward(fwd, grad, x, e, backend, offset=(0, 0), option=OPT.all, dst_hw=None, edge=MPSImageEdgeMode.zero,
                     sentinel=None):
    """Forward with a state, then the gradient; returns (dS, dW, dB) as float64 arrays."""
    fwd.offset, fwd.edgeMode = MPSOffset(*offset, 0), edge
    grad.gradientOption = option
    src = image(x)
    cin = fwd.inputFeatureChannels
    hd, wd = dst_hw or e.shape[-3:-1]
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        state = fwd.resultState(sourceImage=src)
        if sentinel is not None:
            for buffer in (state.gradientForWeights, state.gradientForBiases):
                buffer.contents()[:] = np.frombuffer(np.full(buffer.length // 4, sentinel, np.float32).tobytes(), np.uint8)
        fwd.encode(commandBuffer=cb, sourceImage=src, destinationState=state,
                   destinationImage=blank(wd, hd, fwd.outputFeatureChannels, images=src.numberOfImages))
        d_src = blank(src.width, src.height, cin, images=src.numberOfImages, fill=sentinel)
        e_img = image(e)
        grad.destinationImageDescriptor(sourceImages=[e_img, src], sourceStates=[state])  # sets the offsets
        grad.encode(commandBuffer=cb, sourceGradient=e_img, sourceImage=src, gradientState=state,
                    destinationGradient=d_src)
        cb.commit()
        cb.waitUntilCompleted()
    d_w = np.frombuffer(state.gradientForWeights.contents().tobytes(), np.float32).astype(np.float64)
    d_b = np.frombuffer(state.gradientForBiases.contents().tobytes(), np.float32).astype(np.float64)
    return values(d_src), d_w, d_b


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_91_one_dimensional_example(backend):
    w = np.array([2.0, 3.0, 5.0], np.float32)
    fwd, grad = pair(3, 1, 1, 1, w)
    d_s, d_w, d_b = forward_backward(fwd, grad, np.array([[[1.0], [2.0], [3.0]]]), np.array([[[1.0], [0.0], [0.0]]]),
                                     backend)
    assert d_w.tolist() == [0, 1, 2] and d_b.tolist() == [1]
    assert d_s[0, 0, :, 0].tolist() == [3, 5, 0]  # [w1, w2, 0]


@st.composite
def geometry(draw):
    g = draw(st.sampled_from([1, 1, 2]))
    cin, cout = (4 * g, 4 * g) if g > 1 else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(((kk - 1) * dd) // 2 for kk, dd in zip(k, d))
    hw = (draw(st.integers(max(k[0], 2), 8)), draw(st.integers(max(k[1], 2), 8)))
    return dict(g=g, cin=cin, cout=cout, k=k, s=s, d=d, pad=pad, hw=hw, n=draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 999)))


def torch_vjp(p, x, w, e):
    """PyTorch autograd of the same convolution (spec §1.8: offset = (Kd >> 1) - pad, zero edge)."""
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.from_numpy(w.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_(True)
    y = Fn.conv2d(xt, wt, stride=p["s"], padding=p["pad"], dilation=p["d"], groups=p["g"])
    y.backward(torch.from_numpy(e).permute(0, 3, 1, 2))
    return xt.grad.permute(0, 2, 3, 1).numpy(), wt.grad.permute(0, 2, 3, 1).numpy(), e.sum(axis=(0, 1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@given(p=geometry())
def test_conv_checklist_92_93_gradients_are_the_vjp(backend, p):
    rng = np.random.default_rng(p["seed"])
    (kh, kw), (sy, sx), (dy, dx) = p["k"], p["s"], p["d"]
    w = rng.uniform(-1, 1, (p["cout"], kh, kw, p["cin"] // p["g"])).astype(np.float16).astype(np.float32)
    x = rng.uniform(-1, 1, (p["n"], *p["hw"], p["cin"]))
    ho = (p["hw"][0] + 2 * p["pad"][0] - ((kh - 1) * dy + 1)) // sy + 1
    wo = (p["hw"][1] + 2 * p["pad"][1] - ((kw - 1) * dx + 1)) // sx + 1
    e = rng.uniform(-1, 1, (p["n"], ho, wo, p["cout"]))
    fwd, grad = pair(kw, kh, p["cin"], p["cout"], w, groups=p["g"], strideInPixelsX=sx, strideInPixelsY=sy,
                     dilationRateX=dx, dilationRateY=dy)
    offset = tuple((((kk - 1) * dd + 1) >> 1) - pp for kk, dd, pp in zip((kw, kh), (dx, dy), p["pad"][::-1]))
    d_s, d_w, d_b = forward_backward(fwd, grad, x, e, backend, offset=offset)
    want_s, want_w, want_b = torch_vjp(p, x, w, e)
    assert_close(d_s, want_s, "float32", f"dS {p}")
    assert_close(d_w.reshape(want_w.shape), want_w, "float32", f"dW {p}")
    assert_close(d_b, want_b, "float32", f"dB {p}")


@pytest.mark.parametrize("edge", [MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp])
@given(p=geometry(), ox=st.integers(-2, 3), oy=st.integers(-2, 3))
def test_torch_gradient_matches_reference(edge, p, ox, oy):
    rng = np.random.default_rng(p["seed"])
    (kh, kw), (sy, sx), (dy, dx) = p["k"], p["s"], p["d"]
    w = rng.uniform(-1, 1, (p["cout"], kh, kw, p["cin"] // p["g"]))
    x = rng.uniform(-1, 1, (p["n"], *p["hw"], p["cin"]))
    e = rng.uniform(-1, 1, (p["n"], 3, 4, p["cout"]))
    results = []
    for backend in BACKENDS:
        fwd, grad = pair(kw, kh, p["cin"], p["cout"], w, groups=p["g"], strideInPixelsX=sx, strideInPixelsY=sy,
                         dilationRateX=dx, dilationRateY=dy)
        results.append(forward_backward(fwd, grad, x, e, backend, offset=(ox, oy), edge=edge))
    for got, want, name in zip(results[1], results[0], ("dS", "dW", "dB")):
        assert_close(got, want, "float32", f"{name} {p} edge={edge.name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_94_batch_sums(backend):
    rng = np.random.default_rng(94)
    w = rng.uniform(-1, 1, 18)
    x, e = rng.uniform(-1, 1, (2, 5, 5, 2)), rng.uniform(-1, 1, (2, 5, 5, 1))
    fwd, grad = pair(3, 3, 2, 1, w)
    _, both_w, both_b = forward_backward(fwd, grad, x, e, backend)
    singles = [forward_backward(fwd, grad, x[i:i + 1], e[i:i + 1], backend) for i in range(2)]
    np.testing.assert_allclose(both_w, singles[0][1] + singles[1][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both_b, singles[0][2] + singles[1][2], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_95_gradient_option(backend):
    rng = np.random.default_rng(95)
    fwd, grad = pair(3, 3, 1, 1, rng.uniform(-1, 1, 9))
    x, e = rng.uniform(-1, 1, (4, 4, 1)), rng.uniform(-1, 1, (1, 4, 4, 1))
    d_s, d_w, d_b = forward_backward(fwd, grad, x, e, backend, option=OPT.gradientWithData, sentinel=7.0)
    assert (d_w == 7).all() and (d_b == 7).all() and not (d_s == 7).all()
    d_s, d_w, d_b = forward_backward(fwd, grad, x, e, backend, option=OPT.gradientWithWeightsAndBias, sentinel=7.0)
    assert (d_s == 7).all() and not (d_w == 7).all()


def test_conv_checklist_96_97_99_properties_and_restrictions():
    fwd, grad = pair(3, 3, 4, 8, np.ones(288))
    assert grad.gradientOption == OPT.all
    assert quiet(lambda: grad.serializeWeightsAndBiases) is False
    quiet(setattr, grad, "serializeWeightsAndBiases", True)
    assert (grad.sourceGradientFeatureChannels, grad.sourceImageFeatureChannels) == (8, 4)
    d = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=1,
                                            outputFeatureChannels=4)
    d.subPixelScaleFactor = 2
    with pytest.raises(MPSValueError, match="sub-pixel kernels"):
        MPSCNNConvolutionGradient(device=DEVICE, weights=ArraySource(d, np.ones(4)))
    with pytest.raises(MPSValueError, match="the forward clip region.s 5x5"):
        forward_backward(*pair(3, 3, 1, 1, np.ones(9)), np.ones((5, 5, 1)), np.ones((1, 4, 5, 1)), "torch",
                         dst_hw=(5, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@given(k=st.integers(1, 4), o=st.integers(-1, 2), s=st.integers(1, 2), seed=st.integers(0, 99))
def test_conv_checklist_100_data_gradient_is_the_transpose(backend, k, o, s, seed):
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (1, k, k, 1)).astype(np.float16).astype(np.float32)
    x = rng.uniform(-1, 1, (6, 6, 1))
    e = rng.uniform(-1, 1, (1, 3, 3, 1))
    fwd, grad = pair(k, k, 1, 1, w, strideInPixelsX=s, strideInPixelsY=s)
    d_s, _, _ = forward_backward(fwd, grad, x, e, backend, offset=(o, o))
    t = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(
        descriptor(k, k, 1, 1, strideInPixelsX=s, strideInPixelsY=s), w[:, ::-1, ::-1, :].copy()))
    t.kernelOffsetX = t.kernelOffsetY = -o + (1 if k % 2 == 0 else 0)
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        out = blank(6, 6, 1)
        t.encode(commandBuffer=cb, sourceImage=image(e), destinationImage=out)
        cb.commit()
        cb.waitUntilCompleted()
    assert_close(d_s, values(out), "float32", f"k={k} o={o} s={s}")


# -- §14: the transpose's gradient and state


@pytest.mark.parametrize("backend", BACKENDS)
@given(k=st.integers(1, 4), s=st.integers(1, 3), d=st.integers(1, 2), n=st.integers(1, 5), t=st.integers(-1, 3),
       seed=st.integers(0, 999))
def test_transpose_gradient_is_the_vjp(backend, k, s, d, n, t, seed):
    rng = np.random.default_rng(seed)
    geometry = framework_transpose_geometry(k, d, n, s, t)
    if geometry is None:
        return
    pad, size = geometry
    w_t = rng.uniform(-1, 1, (3, 2, k, k)).astype(np.float32)  # PyTorch [in][out][kh][kw]
    ours_w = np.ascontiguousarray(w_t[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))  # spec §10.3
    ours_w = ours_w.astype(np.float16).astype(np.float32)
    w_t = np.ascontiguousarray(ours_w.transpose(3, 0, 1, 2)[:, :, ::-1, ::-1])
    x, e = rng.uniform(-1, 1, (1, n, n, 3)), rng.uniform(-1, 1, (1, size, size, 2))
    ds = ArraySource(descriptor(k, k, 3, 2, strideInPixelsX=s, strideInPixelsY=s, dilationRateX=d, dilationRateY=d),
                     ours_w)
    tr, grad = MPSCNNConvolutionTranspose(device=DEVICE, weights=ds), MPSCNNConvolutionTransposeGradient(device=DEVICE,
                                                                                                          weights=ds)
    tr.kernelOffsetX = tr.kernelOffsetY = t
    src = image(x)
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        state = tr.resultState(sourceImage=src)
        tr.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(size, size, 2))
        d_src = blank(n, n, 3)
        e_img = image(e)
        grad.destinationImageDescriptor(sourceImages=[e_img, src], sourceStates=[state])  # sets the offsets
        grad.encode(commandBuffer=cb, sourceGradient=e_img, sourceImage=src, gradientState=state,
                    destinationGradient=d_src)
        cb.commit()
        cb.waitUntilCompleted()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.from_numpy(w_t.astype(np.float64)).requires_grad_(True)
    y = Fn.conv_transpose2d(xt, wt, stride=s, padding=pad, dilation=d)
    y.backward(torch.from_numpy(e).permute(0, 3, 1, 2))
    assert_close(values(d_src), xt.grad.permute(0, 2, 3, 1).numpy(), "float32", f"dS k={k} s={s} d={d} T={t}")
    want_w = wt.grad.numpy()[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)  # back to ours: [out][kh][kw][in]
    got_w = np.frombuffer(state.gradientForWeights.contents().tobytes(), np.float32).reshape(want_w.shape)
    assert_close(got_w, want_w, "float32", f"dW k={k} s={s} d={d} T={t}")
    assert isinstance(state, MPSCNNConvolutionTransposeGradientState) and state.convolutionTranspose is tr


def test_transpose_training_encode_records_both_kernels():
    fwd, _ = pair(3, 3, 1, 1, np.ones(9), strideInPixelsX=2, strideInPixelsY=2)
    src = image(np.ones((6, 6, 1)))
    cb = QUEUE.makeCommandBuffer()
    out, conv_state = fwd.encode(commandBuffer=cb, sourceImage=src, destinationStateIsTemporary=False)
    t = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(
        descriptor(3, 3, 1, 1, strideInPixelsX=2, strideInPixelsY=2), np.ones(9)))
    up, t_state = t.encode(commandBuffer=cb, sourceImage=out, convolutionGradientState=conv_state,
                           destinationStateIsTemporary=True)
    assert (up.width, up.height) == (6, 6) and t_state.isTemporary
    assert t_state.convolution is fwd and t_state.convolutionTranspose is t
    cb.commit()


@given(p=geometry(), ox=st.integers(-1, 2), oy=st.integers(-1, 2), clip_x=st.integers(0, 2), sfo=st.sampled_from([0, 4]))
def test_reference_gradients_match_central_differences(p, ox, oy, clip_x, sfo):
    """The float64 reference's gradients against central finite differences of its own forward pass,
    with a clip region and a source channel offset: L = <E, conv(S, W)>, dL/dS and dL/dW."""
    rng = np.random.default_rng(p["seed"])
    (kh, kw), (sy, sx), (dy, dx) = p["k"], p["s"], p["d"]
    cin, cout, g = p["cin"], p["cout"], p["g"]
    w = rng.uniform(-1, 1, (cout, kh, kw, cin // g)).astype(np.float16).astype(np.float32)
    x = rng.uniform(-1, 1, (1, *p["hw"], sfo + cin))
    fwd, grad = pair(kw, kh, cin, cout, w, groups=g, strideInPixelsX=sx, strideInPixelsY=sy, dilationRateX=dx,
                     dilationRateY=dy, kernel_type=MPSDataType.float32)
    fwd.sourceFeatureChannelOffset = sfo
    fwd.clipRect = MTLRegionMake2D(clip_x, 0, 3, 2)
    e = rng.uniform(-1, 1, (1, 2, 3, cout))

    def loss(xv, wv):
        k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(
            descriptor(kw, kh, cin, cout, groups=g, strideInPixelsX=sx, strideInPixelsY=sy, dilationRateX=dx,
                       dilationRateY=dy), wv, kernel_type=MPSDataType.float32))
        k.offset, k.sourceFeatureChannelOffset, k.clipRect = MPSOffset(ox, oy, 0), sfo, fwd.clipRect
        dst = blank(3 + clip_x, 2, cout)
        cb = QUEUE.makeCommandBuffer()
        with use_backend("reference"):
            k.encode(commandBuffer=cb, sourceImage=image(xv), destinationImage=dst)
            cb.commit()
            cb.waitUntilCompleted()
        return float((values(dst)[:, :, clip_x:] * e).sum())

    d_s, d_w, _ = forward_backward(fwd, grad, x, e, "reference", offset=(ox, oy), dst_hw=(2, 3 + clip_x))
    h = 1e-3
    for _ in range(3):  # a few random coordinates of each
        idx = tuple(int(rng.integers(0, dim)) for dim in x.shape[:3]) + (sfo + int(rng.integers(0, cin)),)
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        numeric = (loss(xp, w) - loss(xm, w)) / (2 * h)
        assert abs(d_s[idx[:3] + (idx[3] - sfo,)] - numeric) < 1e-3, (idx, numeric)
        widx = tuple(int(rng.integers(0, dim)) for dim in w.shape)
        wp, wm = w.copy(), w.copy()
        wp[widx] += h
        wm[widx] -= h
        numeric = (loss(x, wp) - loss(x, wm)) / (2 * h)
        assert abs(d_w.reshape(w.shape)[widx] - numeric) < 1e-3, (widx, numeric)


def test_conv_checklist_98_depthwise_gradient_buffer():
    d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=4,
                                             outputFeatureChannels=4)
    ds = ArraySource(d, np.random.default_rng(98).uniform(-1, 1, 36))
    fwd, grad = MPSCNNConvolution(device=DEVICE, weights=ds), MPSCNNConvolutionGradient(device=DEVICE, weights=ds)
    assert grad.channelMultiplier == 1
    x, e = np.random.default_rng(1).uniform(-1, 1, (5, 5, 4)), np.random.default_rng(2).uniform(-1, 1, (1, 5, 5, 4))
    results = [forward_backward(fwd, grad, x, e, b) for b in BACKENDS]
    assert results[0][1].size == 4 * 3 * 3  # [O][kH][kW]
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, "float32", "depthwise gradient")


@pytest.mark.parametrize("k, o, kernel_offset, secondary", [(3, 1, -1, 0), (4, 2, -1, 0), (3, 0, 0, -1)])
def test_gradient_reports_the_state_driven_offsets(k, o, kernel_offset, secondary):
    """spec §11.4/§11.5: kernelOffset = -o + (Kd even ? 1 : 0), primaryOffset 0, secondaryOffset o - (Kd >> 1)."""
    fwd, grad = pair(k, k, 1, 1, np.ones(k * k))
    forward_backward(fwd, grad, np.ones((6, 6, 1)), np.ones((1, 6, 6, 1)), "reference", offset=(o, o))
    assert (grad.kernelOffsetX, grad.kernelOffsetY) == (kernel_offset, kernel_offset)
    assert grad.primaryOffset == MPSOffset(0, 0, 0) and grad.secondaryOffset == MPSOffset(secondary, secondary, 0)


def _gradients(fwd, grad, src, e, state, cb, dst=None):
    """The gradient encode (manual into ``dst``, else the returning form) then (dS, dW, dB)."""
    out = grad.encode(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=state,
                      **({} if dst is None else {"destinationGradient": dst}))
    cb.commit()
    cb.waitUntilCompleted()
    read = lambda b: np.frombuffer(b.contents().tobytes(), np.float32).astype(np.float64)  # noqa: E731
    return values(dst if dst is not None else out), read(state.gradientForWeights), read(state.gradientForBiases)


def _forward(fwd, src, offset, clip=None):
    fwd.offset = MPSOffset(*offset, 0)
    cb = QUEUE.makeCommandBuffer()
    state = fwd.resultState(sourceImage=src)
    fwd.encode(commandBuffer=cb, sourceImage=src, destinationState=state,
               destinationImage=blank(src.width, src.height, fwd.outputFeatureChannels))
    return cb, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k, offset", [(3, (1, 0)), (2, (0, 1)), (5, (2, 3))])
def test_offsets_set_as_apple_says_give_the_state_driven_gradient(backend, k, offset):
    """The manual encode with kernelOffset = -o + (Kd even), primaryOffset 0, secondaryOffset = o - (Kd >> 1),
    set by hand, equals the encode that returns the gradient (which sets them from the state)."""
    rng = np.random.default_rng(k)
    fwd, grad = pair(k, k, 3, 4, rng.uniform(-1, 1, (4, k, k, 3)), rng.uniform(-1, 1, 4))
    src, e = blank(7, 6, 3, rng=rng), blank(7, 6, 4, rng=rng)
    grad.destinationImageAllocator = MPSImage.defaultAllocator()
    with use_backend(backend):
        cb, state = _forward(fwd, src, offset)
        want = _gradients(fwd, grad, src, e, state, cb)
        configured = (grad.kernelOffsetX, grad.kernelOffsetY, grad.primaryOffset, grad.secondaryOffset)
        even = 1 if k % 2 == 0 else 0
        ox, oy = offset
        assert configured == (-ox + even, -oy + even, MPSOffset(0, 0, 0), MPSOffset(ox - k // 2, oy - k // 2, 0))
        fresh = MPSCNNConvolutionGradient(device=DEVICE, weights=fwd.dataSource)
        fresh.kernelOffsetX, fresh.kernelOffsetY = -ox + even, -oy + even
        fresh.secondaryOffset = MPSOffset(ox - k // 2, oy - k // 2, 0)
        cb, state = _forward(fwd, src, offset)
        got = _gradients(fwd, fresh, src, e, state, cb, blank(7, 6, 3, rng=rng))
    for g, w in zip(got, want):
        assert_close(g, w, "float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_manual_encode_uses_the_offsets_as_set(backend):
    """Offsets that differ from the state's move the windows: the data gradient is that of the forward
    placed at -kernelOffset + (Kd even), the weight gradient that of the forward at secondaryOffset + (Kd >> 1)
    (each taken from the state-driven gradient of a forward placed there)."""
    rng = np.random.default_rng(5)
    w = rng.uniform(-1, 1, (2, 3, 3, 3))
    fwd, grad = pair(3, 3, 3, 2, w, rng.uniform(-1, 1, 2))
    src, e = blank(6, 5, 3, rng=rng), blank(6, 5, 2, rng=rng)
    with use_backend(backend):
        grad.kernelOffsetX, grad.kernelOffsetY = -1, 1  # the data gradient of a forward at offset (1, -1)
        grad.secondaryOffset = MPSOffset(0, -2, 0)  # the weight gradient of a forward at offset (1, -1)
        assert (grad.kernelOffsetX, grad.kernelOffsetY, grad.secondaryOffset) == (-1, 1, MPSOffset(0, -2, 0))
        cb, state = _forward(fwd, src, (0, 0))
        got = _gradients(fwd, grad, src, e, state, cb, blank(6, 5, 3))
        other = MPSCNNConvolutionGradient(device=DEVICE, weights=fwd.dataSource)
        other.destinationImageAllocator = MPSImage.defaultAllocator()
        cb, state = _forward(fwd, src, (1, -1))
        want = _gradients(fwd, other, src, e, state, cb)
    assert (grad.kernelOffsetX, grad.kernelOffsetY) == (-1, 1)  # the manual encode leaves them as set
    for g, w_ in zip(got, want):
        assert_close(g, w_, "float32")
    assert not np.allclose(got[0], _forward_backward_at_state(fwd, src, e, backend))


def _forward_backward_at_state(fwd, src, e, backend):
    grad = MPSCNNConvolutionGradient(device=DEVICE, weights=fwd.dataSource)
    grad.destinationImageAllocator = MPSImage.defaultAllocator()
    with use_backend(backend):
        cb, state = _forward(fwd, src, (0, 0))
        return _gradients(fwd, grad, src, e, state, cb)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_primary_offset_reads_the_gradient_where_its_data_starts(backend):
    """A padded incoming gradient, zero outside its data, with primaryOffset at the data's start gives the
    data gradient of the unpadded one."""
    rng = np.random.default_rng(6)
    fwd, grad = pair(3, 3, 2, 3, rng.uniform(-1, 1, (3, 3, 3, 2)))
    src, e = blank(5, 4, 2, rng=rng), rng.uniform(-1, 1, (4, 5, 3))
    padded = np.zeros((7, 9, 3))
    padded[2:6, 1:6] = e
    grad.gradientOption = OPT.gradientWithData
    with use_backend(backend):
        cb, state = _forward(fwd, src, (0, 0))
        grad.destinationImageDescriptor(sourceImages=[image(e), src], sourceStates=[state])
        want = _gradients(fwd, grad, src, image(e), state, cb, blank(5, 4, 2))[0]
        grad.primaryOffset = MPSOffset(1, 2, 0)
        cb, state = _forward(fwd, src, (0, 0))
        got = _gradients(fwd, grad, src, image(padded), state, cb, blank(5, 4, 2))[0]
        with pytest.raises(MPSValueError, match="at least the forward clip region's 5x4"):
            cb, state = _forward(fwd, src, (0, 0))
            grad.encode(commandBuffer=cb, sourceGradient=blank(4, 4, 3), sourceImage=src, gradientState=state,
                        destinationGradient=blank(5, 4, 2))
    assert_close(got, want, "float32")


def test_gradient_offsets_refuse_what_is_not_an_integer_and_the_transpose_refuses_other_placements():
    fwd, grad = pair(3, 3, 1, 1, np.ones(9))
    for prop, bad in (("kernelOffsetX", 1.5), ("kernelOffsetY", "1"), ("primaryOffset", (1, 2)),
                      ("secondaryOffset", 3)):
        with pytest.raises(MPSTypeError, match=f"{prop}|offset="):
            setattr(grad, prop, bad)
    assert (grad.kernelOffsetX, grad.primaryOffset, grad.secondaryOffset) == (0, MPSOffset(0, 0, 0), MPSOffset(0, 0, 0))
    assert (grad.primaryKernelWidth, grad.secondaryStrideInPixelsX, grad.primaryEdgeMode) == (3, 1, MPSImageEdgeMode.zero)
    d = descriptor(3, 3, 2, 2)
    ds = ArraySource(d, np.random.default_rng(0).uniform(-1, 1, 36))
    tr, tgrad = MPSCNNConvolutionTranspose(device=DEVICE, weights=ds), MPSCNNConvolutionTransposeGradient(
        device=DEVICE, weights=ds)
    src = blank(4, 4, 2, rng=np.random.default_rng(1))
    cb = QUEUE.makeCommandBuffer()
    state = tr.resultState(sourceImage=src)
    tr.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(4, 4, 2))
    tgrad.kernelOffsetX = 5
    dst = blank(4, 4, 2, fill=7.0)
    with pytest.raises(MPSValueError, match="computed at its state's placement only"):
        tgrad.encode(commandBuffer=cb, sourceGradient=blank(4, 4, 2), sourceImage=src, gradientState=state,
                     destinationGradient=dst)
    tgrad.destinationImageDescriptor(sourceImages=[dst, src], sourceStates=[state])
    tgrad.encode(commandBuffer=cb, sourceGradient=blank(4, 4, 2), sourceImage=src, gradientState=state,
                 destinationGradient=dst)
    cb.commit()
    cb.waitUntilCompleted()
    assert cb.error is None


def test_a_refused_gradient_encode_leaves_the_offsets_as_they_were():
    fwd, grad = pair(3, 3, 2, 2, np.random.default_rng(0).uniform(-1, 1, 36))
    src = blank(5, 5, 2, rng=np.random.default_rng(1))
    cb, state = _forward(fwd, src, (1, 1))
    grad.kernelOffsetX, grad.secondaryOffset = 7, MPSOffset(3, 2, 0)
    with pytest.raises(MPSValueError, match="forward clip region"):
        grad.encode(commandBuffer=cb, sourceGradient=blank(4, 5, 2), sourceImage=src, gradientState=state)
    assert (grad.kernelOffsetX, grad.kernelOffsetY, grad.secondaryOffset) == (7, 0, MPSOffset(3, 2, 0))
