"""NaN, infinities, float16 overflow and unorm clamping (issue 7, item 5; docs/reliability.md
"Numerics"; spec kernel-image.md §4.1 and §5.1).

The rule: each neuron is its §5.1 formula evaluated in IEEE arithmetic, with min, max and clamp
propagating NaN (IEEE 754-2019 ``minimum``/``maximum``). So NaN in gives NaN out through every
neuron, and an infinity gives what the formula gives, 0·inf = NaN included (reLU with a = 0 maps
-inf to NaN, softSign maps ±inf to NaN). A convolution sums IEEE products: an infinity times a zero
weight is NaN. Every backend must agree with the reference on where NaN lands, and on every other
value within the format's tolerance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import ArraySource, DEVICE, FMT, blank, descriptor, image, run, values
from mpsconv import (
    MPSCNNConvolution, MPSCNNDepthWiseConvolutionDescriptor, MPSCNNNeuron, MPSCNNNeuronType as T, MPSImageEdgeMode,
    MPSNNNeuronDescriptor,
)
from mpsconv.core.activations import DEFAULT_PARAMETERS
from tolerances import assert_close

# Triton's interpreter computes with NumPy, which warns about the IEEE specials these tests feed it.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 2.0, -2.0, 7e4, -7e4, 1e-40, 65519.0, 65520.0])
FAST = ["torch", "triton"]
NEURONS = [t for t in T if t != T.count]


def _neuron(t):
    if t == T.pReLU:
        return MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(np.array([0.0, 0.5, 0.25, 1.0], np.float32))
    a, b, c = DEFAULT_PARAMETERS.get(t, (0.0, 0.0, 0.0))
    return MPSNNNeuronDescriptor.cnnNeuronDescriptor(t, a=a, b=b, c=2.0 if t == T.power else c)


def _special_image(fmt):
    """Each special value in every channel, the channels in different orders."""
    x = np.stack([np.roll(SPECIAL, 3 * c) for c in range(4)], axis=-1)[None, None]  # [1][1][W][4]
    return image(x, fmt), x


def _kernels(t):
    """The neuron three ways: a neuron kernel, fused into a 1x1 depthwise convolution of weight 1,
    fused into a convolution (whose sums mix the specials with the other channels)."""
    nd = _neuron(t)
    dw = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4,
                                              outputFeatureChannels=4)
    dw.fusedNeuronDescriptor = nd
    d = descriptor(3, 1, 4, 4)
    d.fusedNeuronDescriptor = nd
    rng = np.random.default_rng(int(t))
    weights = rng.uniform(-1, 1, 48).astype(np.float32)
    weights[::5] = 0.0  # zero weights meet the infinities: 0·inf = NaN
    return {"neuron": MPSCNNNeuron(device=DEVICE, neuronDescriptor=nd),
            "depthwise": MPSCNNConvolution(device=DEVICE, weights=ArraySource(dw, np.ones(4, np.float32))),
            "convolution": MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, weights, rng.uniform(-1, 1, 4)))}


@pytest.mark.parametrize("fmt", [FMT.float32, FMT.float16])
@pytest.mark.parametrize("t", NEURONS, ids=lambda t: t.name)
def test_special_values_through_every_neuron_on_every_backend(t, fmt):
    src, _ = _special_image(fmt)
    n = len(SPECIAL)
    for name, kernel in _kernels(t).items():
        expected = values(run(kernel, src, blank(n, 1, 4, fmt=fmt), "reference"))
        for backend in FAST:
            if backend == "triton" and name == "neuron":
                continue  # the triton backend runs convolutions; neuron kernels go to torch
            got = values(run(kernel, src, blank(n, 1, 4, fmt=fmt), backend))
            assert_close(got, expected, fmt.name, f"{t.name} {name} on {backend}")


@pytest.mark.parametrize("t", NEURONS, ids=lambda t: t.name)
def test_nan_in_gives_nan_out_through_every_neuron(t):
    src, x = _special_image(FMT.float32)
    kernel = _kernels(t)["depthwise"]
    for backend in ["reference"] + FAST:
        got = values(run(kernel, src, blank(len(SPECIAL), 1, 4), backend))
        assert np.isnan(got[np.isnan(x)]).all(), f"{t.name} on {backend}"


def test_pinned_infinities():
    """The consequences of the rule that a user might not expect, pinned on every backend."""
    cases = [  # (neuron, x, f(x))
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU, a=0.0), -math.inf, math.nan),  # 0·(-inf)
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU, a=0.1), -math.inf, -math.inf),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU, a=0.0), math.inf, math.inf),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.sigmoid), -math.inf, 0.0),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.sigmoid), math.inf, 1.0),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.softSign), math.inf, math.nan),  # inf / inf
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.ELU, a=1.0), -math.inf, -1.0),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLUN, a=0.0, b=6.0), math.inf, 6.0),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.hardSigmoid, a=0.2, b=0.5), -math.inf, 0.0),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.geLU), -math.inf, math.nan),  # -inf · 0
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.softPlus, a=1.0, b=1.0), -math.inf, 0.0),
    ]
    for nd, x, fx in cases:
        dw = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4,
                                                  outputFeatureChannels=4)
        dw.fusedNeuronDescriptor = nd
        kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(dw, np.ones(4, np.float32)))
        for backend in ["reference"] + FAST:
            got = values(run(kernel, image(np.full((1, 1, 4), x)), blank(1, 1, 4), backend))[0, 0, 0, 0]
            assert got == fx or (math.isnan(fx) and math.isnan(got)), (T(nd.neuronType).name, x, backend, got)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_float16_overflow_saturates_to_infinity(backend):
    """Writing to float16 rounds to nearest even and overflows to ±inf (§4.1), from finite sums too."""
    sums = np.array([65504.0, 65519.0, 65520.0, 7e4, 1e30, -65519.0, -65520.0, -7e4])
    expected = np.array([65504.0, 65504.0, np.inf, np.inf, np.inf, -65504.0, -np.inf, -np.inf])
    # a 1x1 convolution of weight 0.5 over float32 sources of twice the sums: the sums are finite
    d = descriptor(1, 1, 1, 1)
    from mpsconv import MPSDataType

    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.array([0.5], np.float32),
                                                                  kernel_type=MPSDataType.float32))
    src = image((2 * sums).reshape(1, -1, 1))
    got = values(run(kernel, src, blank(len(sums), 1, 1, fmt=FMT.float16), backend))[0, 0, :, 0]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", [FMT.unorm8, FMT.unorm16])
@pytest.mark.parametrize("backend", ["reference", "torch"])  # triton takes float formats only
def test_unorm_destinations_clamp_on_write(backend, fmt):
    """Writing to unorm clamps to [0, 1] (§4.1); NaN is stored as 0 (§4.1 OPEN)."""
    sums = np.array([-1.0, -1e-9, 0.25, 1.0, 1.5, np.inf, -np.inf, np.nan, 1e30])
    expected = np.array([0.0, 0.0, 0.25, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), np.array([1.0], np.float32)))
    src = image(sums.reshape(1, -1, 1))
    got = values(run(kernel, src, blank(len(sums), 1, 1, fmt=fmt), backend))[0, 0, :, 0]
    scale = 255.0 if fmt == FMT.unorm8 else 65535.0
    np.testing.assert_allclose(got, np.round(expected * scale) / scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("edge", [MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp])
def test_an_infinity_reaches_exactly_the_windows_that_read_it(edge):
    """A 3x3 convolution over one +inf pixel: the outputs whose window holds it with a positive
    weight are +inf, with a zero weight NaN, and the others finite, on every backend (the clamp edge
    repeats an edge pixel into the windows beside it)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (1, 6, 7, 4))
    x[0, 0, 3, 2] = np.inf  # on the top edge
    weights = rng.uniform(0.1, 1, (4, 3, 3, 4)).astype(np.float32)
    weights[1, 0, 1, 2] = 0.0  # output channel 1 meets the infinity through a zero weight in one tap
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 4, 4), weights.reshape(-1)))
    kernel.edgeMode = edge
    expected = values(run(kernel, image(x), blank(7, 6, 4), "reference"))
    assert np.isposinf(expected).any() and np.isnan(expected).any() and np.isfinite(expected).any()
    for backend in FAST:
        got = values(run(kernel, image(x), blank(7, 6, 4), backend))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=backend)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected), err_msg=backend)
        assert_close(got, expected, "float32", backend)


def test_onednn_path_keeps_nan_through_relu(onednn_everywhere):
    """The oneDNN path applies ReLU itself, after the convolution: oneDNN's relu post-op maps NaN
    and -inf to 0."""
    d = descriptor(1, 1, 4, 4)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU, a=0.0)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.eye(4, dtype=np.float32).reshape(-1)))
    x = np.zeros((1, 4, 4))
    x[0, :, 0] = [-np.inf, np.nan, np.inf, -2.0]
    got = values(run(kernel, image(x), blank(4, 1, 4), "torch"))[0, 0, :, 0]
    np.testing.assert_array_equal(got, [np.nan, np.nan, np.inf, 0.0])


def test_in_place_path_keeps_nan_and_infinities_through_relun(in_place_everywhere):
    """Into the destination itself: the zeroed destination plus the convolution is the convolution,
    NaN and infinities included (0·inf = NaN reaches the other channels of a pixel), and the neuron
    after it keeps the formulas' NaN, as the reference has them."""
    d = descriptor(1, 1, 4, 4)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLUN, a=0.0, b=6.0)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.eye(4, dtype=np.float32).reshape(-1)))
    x = np.zeros((2, 4, 4))
    x[0, :, 0] = [-np.inf, np.nan, np.inf, -2.0]
    x[1] = np.random.default_rng(5).uniform(-8, 8, (4, 4))
    got = values(run(kernel, image(x), blank(4, 2, 4, fill=9.0), "torch"))
    assert in_place_everywhere[0] == 1
    np.testing.assert_array_equal(got[0, 0, :, 0], [np.nan, np.nan, 6.0, 0.0])
    want = values(run(kernel, image(x), blank(4, 2, 4, fill=9.0), "reference"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert_close(got, want, "float32", "in place")


def test_non_finite_weights_are_refused_when_the_kernel_is_made():
    """A NaN or infinite weight would meet the zero edge as inf·0 = NaN on backends that multiply the
    padding and not at all on those that skip it; so weights must be finite (docs/reliability.md)."""
    from mpsconv import MPSDataType, MPSValueError

    rng = np.random.default_rng(3)
    for bad, kernel_type, match in [(np.nan, MPSDataType.float32, r"\[o, kH, kW, i\] = \[0, 0, 1, 2\], is nan"),
                                    (-np.inf, MPSDataType.float32, "is -inf"),
                                    (1e5, MPSDataType.float16, "float16 kernel weights also beyond")]:
        weights = rng.uniform(-1, 1, 36).astype(np.float32)
        weights[6] = bad
        with pytest.raises(MPSValueError, match="MPSCNNConvolution: dataSource.weights\\(\\) holds 1 non-finite"):
            MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 4, 1), weights,
                                                                 kernel_type=kernel_type))
        with pytest.raises(MPSValueError, match=match):
            MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 4, 1), weights,
                                                                 kernel_type=kernel_type))
    d = descriptor(1, 1, 4, 2)
    d.setBatchNormalizationParametersForInferenceWithMean(np.zeros(2), variance=np.zeros(2), gamma=np.ones(2),
                                                          beta=np.zeros(2), epsilon=0.0)
    with pytest.raises(MPSValueError, match="8 non-finite values after folding in the batch-normalization"):
        MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(8, np.float32)))
