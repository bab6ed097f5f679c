"""convolution.md checklist: depthwise (48–51) and sub-pixel (52–55) convolution, and their
definitions as properties: depthwise = a grouped convolution with groups = channels, sub-pixel =
a convolution followed by the spec's depth-to-space (written here literally, loop by loop)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given, strategies as st

from helpers import DEVICE, ArraySource, blank, image, run, values
from mpsconv import *
from tolerances import assert_close

BACKENDS = ["reference", "torch"]


def depthwise(channels, k=1, weights=None, **props):
    d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=k, kernelHeight=k, inputFeatureChannels=channels,
                                             outputFeatureChannels=channels)
    for name, value in props.items():
        setattr(d, name, value)
    w = np.ones(channels * k * k) if weights is None else weights
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w))


def subpixel(cin, n, r, k=1, weights=None, bias=None, **props):
    d = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=k, kernelHeight=k, inputFeatureChannels=cin,
                                            outputFeatureChannels=n)
    d.subPixelScaleFactor = r
    for name, value in props.items():
        setattr(d, name, value)
    w = np.ones(n * k * k * cin) if weights is None else weights
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_48_depthwise(backend):
    k = depthwise(4, weights=[1, 2, 3, 4])
    out = values(run(k, image(np.broadcast_to([10.0, 20, 30, 40], (2, 2, 4))), blank(2, 2, 4), backend))
    assert (out == [10, 40, 90, 160]).all()


def test_conv_checklist_49_depthwise_weight_count():
    """A 3x3, 4-channel depthwise kernel reads 36 weights: the first 36 of a longer buffer (MPS reads
    through a pointer), and a shorter one is refused."""
    k = depthwise(4, k=3, weights=np.arange(36))
    assert k._loaded.weights.size == 36
    longer = depthwise(4, k=3, weights=np.arange(144) * 0.5)
    np.testing.assert_array_equal(longer._loaded.weights.reshape(-1), np.arange(36) * 0.5)
    with pytest.raises(MPSValueError, match="holds 35 elements; 36 are needed"):
        depthwise(4, k=3, weights=np.arange(35))


@pytest.mark.parametrize("cout, props, match", [(8, {}, "channelMultiplier=2 is not supported"),
                                                (6, {}, "multiple of inputFeatureChannels=4"),
                                                (4, {"groups": 2}, "groups=2; a depthwise descriptor has groups 1")])
def test_conv_checklist_50_depthwise_errors(cout, props, match):
    d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4,
                                             outputFeatureChannels=cout)
    for name, value in props.items():
        setattr(d, name, value)
    with pytest.raises(MPSValueError, match=match):
        MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(cout)))


def test_conv_checklist_51_channel_multiplier():
    from helpers import conv

    assert depthwise(4).channelMultiplier == 1 and conv().channelMultiplier == 0
    d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=4,
                                             outputFeatureChannels=8)
    assert d.channelMultiplier == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_52_subpixel_mapping(backend):
    # 1x1 kernel, one input channel of value 1, weights v0..v7 = 0..7: Io(0, 0) = [0, 1, ..., 7]
    k = subpixel(1, 8, 2, weights=np.arange(8.0))
    out = values(run(k, image([[[1.0]]]), blank(2, 2, 2), backend))[0]
    # out[y, x]
    assert out[0, 0].tolist() == [0, 1] and out[0, 1].tolist() == [2, 3]
    assert out[1, 0].tolist() == [4, 5] and out[1, 1].tolist() == [6, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_53_subpixel_partial_blocks(backend):
    k = subpixel(1, 8, 2, weights=np.arange(8.0))
    k.clipRect = MTLRegionMake2D(0, 0, 5, 3)
    src = image(np.ones((2, 3, 1)))  # the intermediate is 3 x 2: source pixels (0..2, 0..1)
    out = values(run(k, src, blank(7, 5, 2, fill=-1), backend))[0]
    written = (out != -1).all(axis=-1)
    assert written.sum() == 15 and written[:3, :5].all()


def test_conv_checklist_54_subpixel_errors():
    with pytest.raises(MPSValueError, match="multiple of subPixelScaleFactor² = 4"):
        subpixel(1, 6, 2)
    with pytest.raises(MPSValueError, match="needs 6"):
        k = subpixel(1, 8, 2)
        k.destinationFeatureChannelOffset = 4
        run(k, image([[[1.0]]]), blank(2, 2, 5))
    with pytest.raises(MPSValueError, match="must be a multiple of 4"):
        subpixel(8, 8, 2, groups=2)


def test_conv_checklist_55_subpixel_default():
    d = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=1,
                                            outputFeatureChannels=1)
    assert d.subPixelScaleFactor == 1
    from helpers import conv

    assert conv().subPixelScaleFactor == 1 and subpixel(1, 8, 2).subPixelScaleFactor == 2
    assert subpixel(1, 8, 2).outputFeatureChannels == 8  # OPEN §5: N is reported


def test_subpixel_allocating_encode_scales_the_forward_size():
    k = subpixel(2, 12, 2, k=3, strideInPixelsX=2)
    d = k.destinationImageDescriptor(sourceImages=[blank(6, 5, 2)])
    assert (d.width, d.height, d.featureChannels) == (6, 10, 3) and k.offset == MPSOffset(0, 0, 0)


def test_subclass_descriptors_round_trip():
    for d in (MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=5, inputFeatureChannels=4,
                                                   outputFeatureChannels=4),
              MPSCNNSubPixelConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=2,
                                                  outputFeatureChannels=18)):
        if isinstance(d, MPSCNNSubPixelConvolutionDescriptor):
            d.subPixelScaleFactor = 3
        back = NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolutionDescriptor,
                                                  NSKeyedArchiver.archivedData(withRootObject=d))
        assert type(back) is type(d) and back == d


@pytest.mark.parametrize("backend", BACKENDS)
def test_family_kernels_round_trip(backend):
    rng = np.random.default_rng(3)
    for k in (depthwise(8, k=3, weights=rng.uniform(-1, 1, 72)), subpixel(3, 8, 2, k=3, weights=rng.uniform(-1, 1, 216))):
        back = NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolution, NSKeyedArchiver.archivedData(withRootObject=k))
        assert (back.channelMultiplier, back.subPixelScaleFactor) == (k.channelMultiplier, k.subPixelScaleFactor)
        src = image(rng.uniform(-1, 1, (5, 4, k.inputFeatureChannels)))
        out_channels = k.outputFeatureChannels // k.subPixelScaleFactor ** 2
        size = 4 * k.subPixelScaleFactor, 5 * k.subPixelScaleFactor
        np.testing.assert_array_equal(values(run(back, src, blank(*size, out_channels), backend)),
                                      values(run(k, src, blank(*size, out_channels), backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(c=st.integers(1, 9), k=st.integers(1, 5), s=st.integers(1, 2), d=st.integers(1, 2), seed=st.integers(0, 99))
def test_depthwise_is_grouped_convolution_with_groups_equal_channels(backend, c, k, s, d, seed):
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (c, k, k)).astype(np.float16).astype(np.float32)
    x = rng.uniform(-1, 1, (7, 6, c))
    kd, pad = (k - 1) * d + 1, ((k - 1) * d) // 2
    kernel = depthwise(c, k=k, weights=w, strideInPixelsX=s, strideInPixelsY=s, dilationRateX=d, dilationRateY=d)
    kernel.offset = MPSOffset((kd >> 1) - pad, (kd >> 1) - pad, 0)
    h, wd = (7 + 2 * pad - kd) // s + 1, (6 + 2 * pad - kd) // s + 1
    if h < 1 or wd < 1:
        return
    ours = values(run(kernel, image(x), blank(wd, h, c), backend))[0]
    expected = Fn.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(w).double()[:, None],
                         stride=s, padding=pad, dilation=d, groups=c)[0].permute(1, 2, 0).numpy()
    assert_close(ours, expected, "float32", f"c={c} k={k} s={s} d={d}")


def literal_depth_to_space(io: np.ndarray, r: int, cw: int, ch: int) -> np.ndarray:
    """Spec §5, loop by loop: D(x, y, c) = Io(x // r, y // r, (N/r²)·(r·(y mod r) + (x mod r)) + c)."""
    n = io.shape[-1]
    out = np.zeros((ch, cw, n // (r * r)))
    for y in range(ch):
        for x in range(cw):
            for c in range(n // (r * r)):
                out[y, x, c] = io[y // r, x // r, (n // (r * r)) * (r * (y % r) + (x % r)) + c]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@given(r=st.integers(2, 3), m=st.integers(1, 2), cin=st.integers(1, 3), cw=st.integers(1, 8), ch=st.integers(1, 8),
       seed=st.integers(0, 99))
def test_subpixel_is_convolution_then_depth_to_space(backend, r, m, cin, cw, ch, seed):
    rng = np.random.default_rng(seed)
    n = m * r * r
    w = rng.uniform(-1, 1, (n, 3, 3, cin)).astype(np.float16).astype(np.float32)
    b = rng.uniform(-1, 1, n).astype(np.float32)
    x = rng.uniform(-1, 1, (-(-ch // r), -(-cw // r), cin))
    from helpers import conv

    plain = conv(3, 3, cin, n, weights=w, bias=b)  # the intermediate Io, one pixel per block
    io = values(run(plain, image(x), blank(x.shape[1], x.shape[0], n), backend))[0]
    sub = subpixel(cin, n, r, k=3, weights=w, bias=b)
    sub.clipRect = MTLRegionMake2D(0, 0, cw, ch)
    ours = values(run(sub, image(x), blank(cw + 1, ch + 1, m), backend))[0, :ch, :cw]
    assert_close(ours, literal_depth_to_space(io, r, cw, ch), "float32", f"r={r} n={n} clip={cw}x{ch}")
