"""convolution.md checklist §15: binary convolution (105–113), and the popcount path of the torch
backend against the literal reference, bit for bit on integer outputs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import DEVICE, ArraySource, blank, descriptor, image, run, values
from mpsconv import *
from tolerances import assert_close

BACKENDS = ["reference", "torch"]
BT = MPSCNNBinaryConvolutionType


def pack(bits: np.ndarray) -> np.ndarray:
    """0/1 array [O][kH][kW][I] -> uint32 words [O][kH][kW][ceil(I/32)], channel c in bit c % 32."""
    o, kh, kw, i = bits.shape
    words = np.zeros((o, kh, kw, (i + 31) // 32), np.uint32)
    for c in range(i):
        words[..., c // 32] |= bits[..., c].astype(np.uint32) << np.uint32(c % 32)
    return words


def binary(bits, kind=BT.xnor, flags=MPSCNNBinaryConvolutionFlags.none, scale=None, cls=MPSCNNBinaryConvolution,
           bias=None, **terms):
    bits = np.asarray(bits)
    o, kh, kw, i = bits.shape
    ds = ArraySource(descriptor(kw, kh, i, o), pack(bits), bias, data_type=MPSDataType.uInt32)
    if scale is not None:
        return cls(device=DEVICE, convolutionData=ds, scaleValue=scale, type=kind, flags=flags)
    args = dict(outputBiasTerms=None, outputScaleTerms=None, inputBiasTerms=None, inputScaleTerms=None)
    args.update(terms)
    return cls(device=DEVICE, convolutionData=ds, type=kind, flags=flags, **args)


def one_pixel(kernel, values_, backend, channels_out=1):
    return values(run(kernel, image(np.asarray(values_, np.float64).reshape(1, 1, -1)), blank(1, 1, channels_out),
                      backend))[0, 0, 0]


def test_conv_checklist_105_bit_layout():
    bits = np.zeros((1, 1, 1, 40), np.uint8)
    bits[..., 33] = bits[..., 13] = 1
    words = pack(bits)
    assert words.shape[-1] == 2 and words[0, 0, 0, 1] == 1 << 1 and words[0, 0, 0, 0] == 1 << 13
    k = binary(bits)
    assert k._binary_params.bits.size == 2 * 1 * 1 * 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_106_binary_weights(backend):
    assert one_pixel(binary([[[[1, 0]]]], BT.binaryWeights), [0.5, -0.7], backend)[0] == pytest.approx(1.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_107_xnor(backend):
    k = binary([[[[1, 0]]]], BT.xnor)
    assert one_pixel(k, [0.5, 0.7], backend)[0] == 0 and one_pixel(k, [0.5, -0.7], backend)[0] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_108_and(backend):
    k = binary([[[[1, 0]]]], BT.AND)
    assert one_pixel(k, [0.5, -0.7], backend)[0] == 1 and one_pixel(k, [-0.5, 0.7], backend)[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_109_output_scale_and_bias(backend):
    k = binary([[[[1, 0]]]], BT.xnor, outputScaleTerms=[3.0], outputBiasTerms=[1.0])
    assert one_pixel(k, [0.5, -0.7], backend)[0] == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_110_input_terms(backend):
    k = binary([[[[1, 1]]]], BT.xnor, inputBiasTerms=[1.0, 1.0], inputScaleTerms=[2.0, 2.0])
    assert one_pixel(k, [-0.6, -2.0], backend)[0] == 0  # S' = (0.8, -2): +1 - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_111_beta_scaling(backend):
    k = binary([[[[1, 0]]]], BT.xnor, flags=MPSCNNBinaryConvolutionFlags.useBetaScaling)
    assert one_pixel(k, [0.5, -0.7], backend)[0] == pytest.approx(1.2)  # beta = (0.5 + 0.7) / 2 = 0.6, sum 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_112_scale_value(backend):
    k = binary([[[[1, 0]]]], BT.xnor, scale=0.5)
    assert one_pixel(k, [0.5, -0.7], backend)[0] == 1.0
    with_bias = binary([[[[1, 0]]]], BT.xnor, scale=0.5, bias=[0.25])  # OPEN §15.1: data-source bias
    assert one_pixel(with_bias, [0.5, -0.7], backend)[0] == 1.25


def test_conv_checklist_113_groups_and_fully_connected():
    ds = ArraySource(descriptor(1, 1, 8, 8, groups=2), pack(np.ones((8, 1, 1, 4), np.uint8)),
                     data_type=MPSDataType.uInt32)
    with pytest.raises(MPSValueError, match="groups=2; binary convolution has groups 1"):
        MPSCNNBinaryConvolution(device=DEVICE, convolutionData=ds, scaleValue=1.0, type=BT.xnor, flags=0)
    fc = binary(np.ones((2, 3, 3, 4), np.uint8), BT.xnor, cls=MPSCNNBinaryFullyConnected)
    fc.destinationImageAllocator = MPSImage.defaultAllocator()
    out = run(fc, image(np.ones((3, 3, 4))))
    assert (out.width, out.height, out.featureChannels) == (1, 1, 2)
    assert (values(out) == 36).all()
    assert binary([[[[1]]]]).padding.paddingMethod() == MPSNNPaddingMethod.sizeValidOnly  # OPEN §15.4


def test_unused_high_bits_are_ignored(binary_path):
    bits = np.random.default_rng(0).integers(0, 2, (2, 1, 1, 5)).astype(np.uint8)
    clean, dirty = pack(bits), pack(bits)
    dirty[..., 0] |= np.uint32(0xFFFFFFE0)  # garbage in bits 5..31
    x = image(np.random.default_rng(1).uniform(-1, 1, (3, 3, 5)))
    for kind in BT:
        outs = []
        for words in (clean, dirty):
            ds = ArraySource(descriptor(1, 1, 5, 2), words, data_type=MPSDataType.uInt32)
            k = MPSCNNBinaryConvolution(device=DEVICE, convolutionData=ds, scaleValue=1.0, type=kind, flags=0)
            outs.append(values(run(k, x, blank(3, 3, 2), "torch")))
        np.testing.assert_array_equal(outs[0], outs[1])


@st.composite
def binary_problems(draw):
    return dict(kind=draw(st.sampled_from(list(BT))), beta=draw(st.booleans()), cin=draw(st.integers(1, 70)),
                cout=draw(st.integers(1, 5)), k=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
                s=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), d=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                src=(draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))),
                dst=(draw(st.integers(1, 5)), draw(st.integers(1, 5))),
                offset=(draw(st.integers(-2, 3)), draw(st.integers(-2, 3))),
                edge=draw(st.sampled_from([MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp])),
                terms=draw(st.booleans()), seed=draw(st.integers(0, 999)))


@pytest.fixture(params=["float", "popcount"])
def binary_path(request, monkeypatch):
    """The torch backend's two XNOR/AND paths: exact float convolution (default) and popcounts."""
    from mpsconv.backends import torch as torch_backend

    if request.param == "popcount":
        monkeypatch.setattr(torch_backend, "POPCOUNT_MIN_TERMS", 0)
    return request.param


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=binary_problems())
def test_binary_matches_reference(binary_path, p):
    rng = np.random.default_rng(p["seed"])
    (kh, kw), (sy, sx), (dy, dx) = p["k"], p["s"], p["d"]
    bits = rng.integers(0, 2, (p["cout"], kh, kw, p["cin"])).astype(np.uint8)
    d = descriptor(kw, kh, p["cin"], p["cout"], strideInPixelsX=sx, strideInPixelsY=sy, dilationRateX=dx,
                   dilationRateY=dy)
    ds = ArraySource(d, pack(bits), data_type=MPSDataType.uInt32)
    terms = dict(outputBiasTerms=None, outputScaleTerms=None, inputBiasTerms=None, inputScaleTerms=None)
    if p["terms"]:
        terms = dict(outputBiasTerms=rng.uniform(-1, 1, p["cout"]), outputScaleTerms=rng.uniform(-2, 2, p["cout"]),
                     inputBiasTerms=rng.uniform(-0.5, 0.5, p["cin"]), inputScaleTerms=rng.uniform(-2, 2, p["cin"]))
    flags = MPSCNNBinaryConvolutionFlags.useBetaScaling if p["beta"] else MPSCNNBinaryConvolutionFlags.none
    k = MPSCNNBinaryConvolution(device=DEVICE, convolutionData=ds, type=p["kind"], flags=flags, **terms)
    k.offset, k.edgeMode = MPSOffset(*p["offset"], 0), p["edge"]
    n, hs, ws = p["src"]
    src = image(rng.uniform(-1, 1, (n, hs, ws, p["cin"])))
    results = [values(run(k, src, blank(p["dst"][1], p["dst"][0], p["cout"], images=n), b)) for b in BACKENDS]
    if p["kind"] != BT.binaryWeights and not p["terms"] and not p["beta"]:
        np.testing.assert_array_equal(results[1], results[0])  # integer outputs: bit for bit
    else:
        assert_close(results[1], results[0], "float32", str(p))


def test_binary_archive_round_trip():
    rng = np.random.default_rng(9)
    k = binary(rng.integers(0, 2, (3, 3, 3, 40)).astype(np.uint8), BT.AND,
               flags=MPSCNNBinaryConvolutionFlags.useBetaScaling, outputScaleTerms=rng.uniform(0, 1, 3))
    k.offset = MPSOffset(1, 1, 0)
    back = NSKeyedUnarchiver.unarchivedObject(MPSCNNBinaryConvolution, NSKeyedArchiver.archivedData(withRootObject=k))
    assert (back.type, back.flags, back.offset) == (k.type, k.flags, k.offset)
    src = image(rng.uniform(-1, 1, (5, 5, 40)))
    np.testing.assert_array_equal(values(run(back, src, blank(3, 3, 3))), values(run(k, src, blank(3, 3, 3))))


def test_binary_fully_connected_round_trip():
    rng = np.random.default_rng(10)
    k = binary(rng.integers(0, 2, (4, 2, 3, 5)).astype(np.uint8), BT.binaryWeights, cls=MPSCNNBinaryFullyConnected,
               inputBiasTerms=rng.uniform(-1, 1, 5))
    back = NSKeyedUnarchiver.unarchivedObject(MPSCNNBinaryConvolution, NSKeyedArchiver.archivedData(withRootObject=k))
    assert type(back) is MPSCNNBinaryFullyConnected
    src = image(rng.uniform(-1, 1, (2, 3, 5)))
    np.testing.assert_array_equal(values(run(back, src, blank(1, 1, 4))), values(run(k, src, blank(1, 1, 4))))
