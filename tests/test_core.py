"""``mpsconv/core`` pinned from outside: every expectation here is written by hand (plain Python
arithmetic, literals, loops) or comes from PyTorch in float64, never from ``core``'s own formulas.

The reference and torch backends read the same formula table, geometry and rounding rules, so
comparing them with each other cannot see a mistake there; these tests can: a neuron's parameters
swapped or ignored, a clamp edge mirrored on one side, a bias with zero entries dropped, float16
rounding by truncation, a window placed wrongly on one axis."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, ArraySource, blank, descriptor, image, run, values
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionTranspose, MPSCNNNeuron, MPSCNNNeuronType, MPSDataType, MPSImageEdgeMode,
    MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MPSOffset,
)
from mpsconv.core.weights import round_for_source, round_weights
from mpsconv.tolerances import TOLERANCES
from tolerances import assert_close

T = MPSCNNNeuronType
BACKENDS = ["reference", "torch"]
FLOAT32 = MPSDataType.float32
X = [-3.0, -1.2, -0.3, 0.0, 0.45, 1.1, 2.4, 7.5]


def _relu(a):
    return lambda x: x if x >= 0 else a * x


#: (type, a, b, c, f(x)): parameters away from 1, 0 and the type's defaults, so that a swapped or
#: ignored parameter changes the values; f written out with the math module.
NEURONS = [
    (T.none, 0.0, 0.0, 0.0, lambda x: x),
    (T.reLU, 0.15, 0.0, 0.0, _relu(0.15)),
    (T.linear, 1.5, -0.25, 0.0, lambda x: 1.5 * x - 0.25),
    (T.sigmoid, 0.0, 0.0, 0.0, lambda x: 1 / (1 + math.exp(-x))),
    (T.hardSigmoid, 0.3, 0.4, 0.0, lambda x: min(max(0.3 * x + 0.4, 0.0), 1.0)),
    (T.tanH, 1.7, 0.6, 0.0, lambda x: 1.7 * math.tanh(0.6 * x)),
    (T.absolute, 0.0, 0.0, 0.0, abs),
    (T.softPlus, 1.3, 0.7, 0.0, lambda x: 1.3 * math.log(1 + math.exp(0.7 * x))),
    (T.softSign, 0.0, 0.0, 0.0, lambda x: x / (1 + abs(x))),
    (T.ELU, 0.8, 0.0, 0.0, lambda x: x if x >= 0 else 0.8 * (math.exp(x) - 1)),
    (T.reLUN, 0.2, 1.5, 0.0, lambda x: min(_relu(0.2)(x), 1.5)),
    (T.reLUN, 0.0, 6.0, 0.0, lambda x: min(max(x, 0.0), 6.0)),  # ReLU6, as MobileNet ports use it
    (T.power, 0.5, 2.0, 1.5, lambda x: (0.5 * x + 2.0) ** 1.5),
    (T.power, -0.25, 1.0, 3.0, lambda x: (-0.25 * x + 1.0) ** 3),
    (T.exponential, 0.7, -0.2, 3.0, lambda x: 3.0 ** (0.7 * x - 0.2)),
    (T.exponential, 0.4, 0.3, -1.0, lambda x: math.exp(0.4 * x + 0.3)),
    (T.logarithm, 0.5, 4.0, 10.0, lambda x: math.log10(0.5 * x + 4.0)),
    (T.logarithm, 0.3, 1.5, -1.0, lambda x: math.log(0.3 * x + 1.5)),
    (T.geLU, 0.0, 0.0, 0.0, lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))),
]
NEURON_IDS = [f"{t.name}({a},{b},{c})" for t, a, b, c, _ in NEURONS]


def _neuron_descriptor(t, a, b, c):
    return MPSNNNeuronDescriptor.cnnNeuronDescriptor(t, a=a, b=b, c=c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, a, b, c, f", NEURONS, ids=NEURON_IDS)
def test_every_neuron_type_as_a_kernel(backend, t, a, b, c, f):
    kernel = MPSCNNNeuron(device=DEVICE, neuronDescriptor=_neuron_descriptor(t, a, b, c))
    got = values(run(kernel, image(np.reshape(X, (1, 8, 1))), blank(8, 1, 1), backend))[0, 0, :, 0]
    assert_close(got, [f(x) for x in X], "float32", f"{t.name} neuron kernel on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, a, b, c, f", NEURONS, ids=NEURON_IDS)
def test_every_neuron_type_fused_into_a_convolution(backend, t, a, b, c, f):
    """A 1x1 convolution of weight 0.5 and bias 0.25 (both exact in float16): f(0.5·x + 0.25)."""
    d = descriptor(1, 1, 1, 1)
    d.fusedNeuronDescriptor = _neuron_descriptor(t, a, b, c)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [0.5], [0.25]))
    got = values(run(kernel, image(np.reshape(X, (1, 8, 1))), blank(8, 1, 1), backend))[0, 0, :, 0]
    assert_close(got, [f(0.5 * x + 0.25) for x in X], "float32", f"{t.name} fused on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prelu_takes_each_channel_its_own_slope(backend):
    slopes = [0.1, 0.25, 0.6]
    kernel = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(
        np.array(slopes, np.float32)))
    x = np.array([[[-2.0, -1.0, 3.0], [4.0, -0.5, -8.0]]])  # 1 x 2 x 3
    got = values(run(kernel, image(x), blank(2, 1, 3), backend))[0]
    want = [[[v if v >= 0 else slopes[ch] * v for ch, v in enumerate(pixel)] for pixel in row] for row in x]
    assert_close(got, want, "float32", f"pReLU on {backend}")


# -- window placement and the clamp edge, against a direct loop


def _direct(src, weights, bias, offset, out_hw, kernel, stride=(1, 1), dilation=(1, 1), clamp=False):
    """``dst[v, u, o] = bias[o] + Σ w[o, q, p, c]·S(y, x, c)`` with ``y = offset.y + v·sy - (KdY >> 1) +
    q·dy`` (and likewise x), reading through the clamp edge or zeros; one image, plain loops."""
    h, w, _ = src.shape
    (kh, kw), (sy, sx), (dy, dx) = kernel, stride, dilation
    half_y, half_x = ((kh - 1) * dy + 1) // 2, ((kw - 1) * dx + 1) // 2
    out = np.zeros((*out_hw, weights.shape[0]))
    for v in range(out_hw[0]):
        for u in range(out_hw[1]):
            for o in range(weights.shape[0]):
                total = bias[o]
                for q in range(kh):
                    for p in range(kw):
                        y, x = offset[1] + v * sy - half_y + q * dy, offset[0] + u * sx - half_x + p * dx
                        if clamp:
                            y, x = min(max(y, 0), h - 1), min(max(x, 0), w - 1)
                        elif not (0 <= y < h and 0 <= x < w):
                            continue
                        total += float(np.dot(weights[o, q, p], src[y, x]))
                out[v, u, o] = total
    return out


#: A 6x7 source, a 4x4 destination, a 3x3 window: an offset that sends the window off one side only,
#: then a destination larger than the source that leaves it on all four.
SIDES = {"top": ((2, 0), (4, 4)), "bottom": ((2, 2), (4, 4)), "left": ((0, 1), (4, 4)), "right": ((3, 1), (4, 4)),
         "all four": ((0, 0), (9, 8))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edge", ["clamp", "zero"])
@pytest.mark.parametrize("side", sorted(SIDES))
def test_the_edge_on_each_side(backend, edge, side):
    """Random data, so that reading a mirrored or shifted pixel instead of the edge pixel shows."""
    rng = np.random.default_rng(sorted(SIDES).index(side))
    (ox, oy), (w, h) = SIDES[side]
    src = rng.uniform(-1, 1, (6, 7, 2))
    weights, bias = rng.uniform(-1, 1, (3, 3, 3, 2)), np.array([0.5, 0.0, -0.75])
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 2, 3), weights, bias,
                                                                  kernel_type=FLOAT32))
    kernel.offset = MPSOffset(ox, oy, 0)
    kernel.edgeMode = MPSImageEdgeMode.clamp if edge == "clamp" else MPSImageEdgeMode.zero
    got = values(run(kernel, image(src), blank(w, h, 3), backend))[0]
    want = _direct(src, weights, bias, (ox, oy), (h, w), (3, 3), clamp=edge == "clamp")
    assert_close(got, want, "float32", f"{edge} edge, {side}, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [[0.0, 1.5, 0.0, -2.25], [0.0, 0.0, 0.0, 0.75], [0.0, 0.0, 0.0, 0.0]],
                         ids=["zeros between", "one non-zero", "all zero"])
def test_biases_with_zero_entries(backend, bias):
    rng = np.random.default_rng(5)
    src = rng.uniform(-1, 1, (3, 4, 2))
    weights = rng.uniform(-1, 1, (4, 1, 1, 2))
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 2, 4), weights,
                                                                  np.array(bias, np.float32), kernel_type=FLOAT32))
    got = values(run(kernel, image(src), blank(4, 3, 4), backend))[0]
    assert_close(got, _direct(src, weights, bias, (0, 0), (3, 4), (1, 1)), "float32", f"bias {bias} on {backend}")


# -- weight rounding

#: (value, float16 round-to-nearest-even, bfloat16 round-to-nearest-even): 0.3 and 0.6 round up where
#: truncation rounds down; 1 + 2**-11 is a tie that goes down to the even 1.0, 1 + 3·2**-11 one that
#: goes up to the even 1 + 2**-9 (truncation gives 1 + 2**-10).
ROUNDING = [(0.3, 0.300048828125, 0.30078125), (0.6, 0.60009765625, 0.6015625), (-0.3, -0.300048828125, -0.30078125),
            (1 + 2**-11, 1.0, 1.0), (1 + 3 * 2**-11, 1.001953125, 1.0), (2 / 3, 0.66650390625, 0.66796875)]


def test_round_weights_to_float16_is_round_to_nearest_even():
    given = np.array([r[0] for r in ROUNDING], np.float32)
    assert round_weights(given, MPSDataType.float16).tolist() == [r[1] for r in ROUNDING]
    assert round_weights(given, MPSDataType.float32).tolist() == given.tolist()


def test_bfloat16_sources_round_weights_to_nearest_even():
    given = np.array([r[0] for r in ROUNDING], np.float32)
    assert round_for_source(given, MPSImageFeatureChannelFormat.bfloat16).tolist() == [r[2] for r in ROUNDING]
    assert round_for_source(given, MPSImageFeatureChannelFormat.float16) is given


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_data_source_gets_float16_weights_unless_it_asks_for_float32(backend):
    """An impulse through a 1x1 convolution returns the effective weights (a data source without
    ``kernelWeightsDataType`` gets float16)."""
    given = np.array([r[0] for r in ROUNDING], np.float32)
    n = len(given)
    for kernel_type, want in ((None, [r[1] for r in ROUNDING]), (FLOAT32, given.tolist())):
        kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, n), given,
                                                                      kernel_type=kernel_type))
        got = values(run(kernel, image(np.ones((1, 1, 1))), blank(1, 1, n), backend))[0, 0, 0]
        np.testing.assert_array_equal(got, np.array(want, np.float32))


# -- PyTorch in float64: non-square windows and images, stride and dilation per axis

#: (name, source h x w, in / out channels, groups, kernel (kh, kw), stride (sy, sx), dilation (dy, dx),
#: PyTorch padding (py, px), the offset (x, y) that is: ((Kd >> 1) - p per axis, worked out by hand).
CROSS = [
    ("3x5 s2x1 d1x2", (13, 10), (3, 5), 1, (3, 5), (2, 1), (1, 2), (1, 2), (2, 0)),
    ("4x2 s1x3 d2x1", (9, 14), (2, 3), 1, (4, 2), (1, 3), (2, 1), (3, 0), (1, 0)),
    ("1x3 s2x2 groups", (7, 12), (8, 8), 2, (1, 3), (2, 2), (1, 1), (0, 1), (0, 0)),
    ("5x3 s3x2 d2x3", (17, 16), (4, 4), 1, (5, 3), (3, 2), (2, 3), (2, 1), (2, 2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, hw, channels, groups, kernel, stride, dilation, padding, offset", CROSS,
                         ids=[c[0] for c in CROSS])
def test_convolution_matches_pytorch_in_float64(backend, name, hw, channels, groups, kernel, stride, dilation,
                                                padding, offset):
    rng = np.random.default_rng(len(name))
    (cin, cout), (kh, kw) = channels, kernel
    x = rng.uniform(-1, 1, (2, *hw, cin))
    w = rng.uniform(-1, 1, (cout, kh, kw, cin // groups)).astype(np.float32)
    b = rng.uniform(-1, 1, cout).astype(np.float32)
    want = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).double().permute(0, 3, 1, 2),
                    torch.from_numpy(b).double(), stride, padding, dilation, groups).permute(0, 2, 3, 1).numpy()
    d = descriptor(kw, kh, cin, cout, strideInPixelsX=stride[1], strideInPixelsY=stride[0],
                   dilationRateX=dilation[1], dilationRateY=dilation[0], groups=groups)
    kernel_ = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, b, kernel_type=FLOAT32))
    kernel_.offset = MPSOffset(*offset, 0)
    got = values(run(kernel_, image(x), blank(want.shape[2], want.shape[1], cout, images=2), backend))
    assert_close(got, want, "float32", f"{name} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_convolution_matches_pytorch_in_float64(backend):
    """A 3x4 window, stride 2x3, PyTorch padding (1, 2): kernelOffset = p - (Kd - 1) + (Kd >> 1), i.e.
    y 1 - 2 + 1 = 0 and x 2 - 3 + 2 = 1; MPS's weights are PyTorch's rotated by 180° ([O][kH][kW][I])."""
    rng = np.random.default_rng(9)
    x = rng.uniform(-1, 1, (1, 5, 4, 3))
    w_torch = rng.uniform(-1, 1, (3, 2, 3, 4)).astype(np.float32)  # [in][out][kh][kw]
    b = rng.uniform(-1, 1, 2).astype(np.float32)
    want = F.conv_transpose2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w_torch).double(),
                              torch.from_numpy(b).double(), (2, 3), (1, 2)).permute(0, 2, 3, 1).numpy()
    w_mps = np.ascontiguousarray(w_torch[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))
    d = descriptor(4, 3, 3, 2, strideInPixelsX=3, strideInPixelsY=2)
    kernel = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(d, w_mps, b, kernel_type=FLOAT32))
    kernel.kernelOffsetY, kernel.kernelOffsetX = 0, 1
    got = values(run(kernel, image(x), blank(want.shape[2], want.shape[1], 2), backend))
    assert_close(got, want, "float32", f"transpose on {backend}")


def test_the_tolerance_table_is_pinned():
    """Loosening a tolerance must be a visible change here, with its reason."""
    assert TOLERANCES == {
        "float32": (1e-5, 1e-4),
        "float16": (2e-3, 2e-3),
        "bfloat16": (1.6e-2, 1.6e-2),
        "unorm8": (0.0, 1.0 / 255 + 1e-6),
        "unorm16": (0.0, 1.0 / 65535 + 1e-6),
    }
