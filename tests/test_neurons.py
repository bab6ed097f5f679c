"""kernel-image.md checklist: neurons (89–90, 93–100) and the worked values of §9."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, blank, image, quiet, run, values
from mpsconv import *

T = MPSCNNNeuronType
X = [-2.0, 0.0, 0.5, 3.0]
NAN, INF = float("nan"), float("inf")
#: spec §9: (type, parameters, values at x = -2, 0, 0.5, 3)
WORKED = [
    (T.reLU, (0.1,), [-0.2, 0, 0.5, 3]),
    (T.linear, (2, 1), [-3, 1, 2, 7]),
    (T.sigmoid, (), [0.119203, 0.5, 0.622459, 0.952574]),
    (T.hardSigmoid, (0.2, 0.5), [0.1, 0.5, 0.6, 1]),
    (T.tanH, (1, 1), [-0.964028, 0, 0.462117, 0.995055]),
    (T.softPlus, (1, 1), [0.126928, 0.693147, 0.974077, 3.04859]),
    (T.softSign, (), [-0.666667, 0, 0.333333, 0.75]),
    (T.ELU, (1,), [-0.864665, 0, 0.5, 3]),
    (T.reLUN, (0, 6), [0, 0, 0.5, 3]),
    (T.reLUN, (0, 2), [0, 0, 0.5, 2]),
    (T.power, (1, 0, 2), [4, 0, 0.25, 9]),
    (T.exponential, (1, 0, -1), [0.135335, 1, 1.64872, 20.0855]),
    (T.exponential, (1, 0, 2), [0.25, 1, 1.41421, 8]),
    (T.logarithm, (1, 0, 10), [NAN, -INF, -0.301030, 0.477121]),
    (T.geLU, (), [-0.0455003, 0, 0.345731, 2.99595]),
    (T.absolute, (), [2, 0, 0.5, 3]),
    (T.none, (), X),
]


def neuron(neuron_type, *params):
    return MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        neuron_type, **dict(zip("abc", params))))


def test_ki_checklist_89_raw_values():
    names = ["none", "reLU", "linear", "sigmoid", "hardSigmoid", "tanH", "absolute", "softPlus", "softSign", "ELU",
             "pReLU", "reLUN", "power", "exponential", "logarithm", "geLU", "count"]
    assert [int(T[n]) for n in names] == list(range(17))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("neuron_type, params, expected", WORKED, ids=[f"{w[0].name}{w[1]}" for w in WORKED])
def test_ki_checklist_90_worked_values(backend, neuron_type, params, expected):
    out = values(run(neuron(neuron_type, *params), image(np.reshape(X, (1, 4, 1))), blank(4, 1, 1), backend))[0, 0, :, 0]
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-6, equal_nan=True)


def test_ki_checklist_93_94_special_cases():
    src = image([[[-1.5, 0.0, 2.0]]])
    assert values(run(neuron(T.reLU, 0.0), src, blank(1, 1, 3))).ravel().tolist() == [0, 0, 2]
    np.testing.assert_allclose(values(run(neuron(T.exponential, 0.5, 1, -1), src, blank(1, 1, 3))).ravel(),
                               np.exp(0.5 * np.array([-1.5, 0, 2]) + 1), rtol=1e-6)
    np.testing.assert_allclose(values(run(neuron(T.logarithm, 2, 4, -1), src, blank(1, 1, 3))).ravel(),
                               np.log(2 * np.array([-1.5, 0, 2]) + 4), rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ki_checklist_95_96_prelu(backend):
    a = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    n = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(a.tobytes()))
    out = values(run(n, image(np.full((1, 1, 4), -1.0)), blank(1, 1, 4), backend)).ravel()
    np.testing.assert_allclose(out, -a, rtol=1e-7)
    n.sourceFeatureChannelOffset = 4
    out = values(run(n, image(np.full((1, 1, 8), -2.0)), blank(1, 1, 4), backend)).ravel()
    np.testing.assert_allclose(out, -2 * a, rtol=1e-7)
    three = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(a[:3]))
    with pytest.raises(MPSValueError, match="holds 3 floats.*needs at least"):
        run(three, image(np.ones((1, 1, 4))), blank(1, 1, 4))
    legacy = quiet(MPSCNNNeuronPReLU, device=DEVICE, a=a, count=4)
    assert legacy.neuronType == T.pReLU and np.frombuffer(legacy.data, np.float32).tolist() == pytest.approx(a)


def test_ki_checklist_97_descriptor_construction():
    with pytest.raises(TypeError, match="unavailable"):
        MPSNNNeuronDescriptor()
    d = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.linear, a=2, b=1, c=0)
    assert (d.neuronType, d.a, d.b, d.c) == (T.linear, 2.0, 1.0, 0.0)
    assert MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.hardSigmoid).a == 0.2  # documented defaults
    assert (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLUN).a, MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        T.reLUN).b) == (1.0, 6.0)
    with pytest.raises(MPSValueError, match="positive multiple of 4|at least one float|multiple of 4"):
        MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(b"\0\0\0")


def test_ki_checklist_98_kernel_snapshots_descriptor():
    d = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.linear, a=2, b=1)
    n = MPSCNNNeuron(device=DEVICE, neuronDescriptor=d)
    d.a = 10.0
    assert n.a == 2.0 and values(run(n, image([[[1.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 3.0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ki_checklist_99_float16_destination_rounds(backend):
    out = run(neuron(T.sigmoid), image([[[0.5]]]), blank(1, 1, 1, fmt=MPSImageFeatureChannelFormat.float16), backend)
    assert values(out)[0, 0, 0, 0] == 0.62255859375


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ki_checklist_100_unorm8_destination_clamps(backend):
    out = run(neuron(T.linear, 2, 1), image([[[3.0, -2.0]]]),
              blank(1, 1, 2, fmt=MPSImageFeatureChannelFormat.unorm8), backend)
    raw = np.zeros(2, np.uint8)
    out.readBytes(raw, dataLayout=0, imageIndex=0)
    assert raw.tolist() == [255, 0]


def test_legacy_subclasses_are_descriptor_carriers():
    cases = [(MPSCNNNeuronReLU, dict(a=0.5), T.reLU), (MPSCNNNeuronLinear, dict(a=2, b=3), T.linear),
             (MPSCNNNeuronSigmoid, {}, T.sigmoid), (MPSCNNNeuronHardSigmoid, dict(a=0.1, b=0.4), T.hardSigmoid),
             (MPSCNNNeuronTanH, dict(a=1, b=2), T.tanH), (MPSCNNNeuronAbsolute, {}, T.absolute),
             (MPSCNNNeuronSoftPlus, dict(a=1, b=2), T.softPlus), (MPSCNNNeuronSoftSign, {}, T.softSign),
             (MPSCNNNeuronELU, dict(a=0.7), T.ELU), (MPSCNNNeuronReLUN, dict(a=0.1, b=6), T.reLUN),
             (MPSCNNNeuronPower, dict(a=1, b=2, c=3), T.power),
             (MPSCNNNeuronExponential, dict(a=1, b=2, c=3), T.exponential),
             (MPSCNNNeuronLogarithm, dict(a=1, b=2, c=3), T.logarithm)]
    for cls, params, neuron_type in cases:
        with pytest.warns(DeprecationWarning):
            n = cls(device=DEVICE, **params)
        assert n.neuronType == neuron_type
        for name, value in params.items():
            assert getattr(n, name) == value
    with pytest.raises(TypeError, match=r"MPSCNNNeuronReLU\(device=, a=\)"):
        MPSCNNNeuronReLU(device=DEVICE)


def test_neuron_allocating_encode_keeps_size():
    n = neuron(T.absolute)
    for method in (0x00, 0x10, 0x20, 0x1C):
        n.padding = MPSNNDefaultPadding(method)
        d = n.destinationImageDescriptor(sourceImages=[blank(5, 4, 6)])
        assert (d.width, d.height, d.featureChannels, n.offset) == (5, 4, 6, MPSOffset(0, 0, 0))
    assert n.encodingStorageSize(sourceImage=blank(5, 4, 6)) == 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("neuron_type, params", [(t, p) for t, p, _ in WORKED] + [(T.reLU, (0.0,))],
                         ids=[f"{w[0].name}{w[1]}" for w in WORKED] + ["reLU(0.0,)"])
@pytest.mark.parametrize("fmt", [MPSImageFeatureChannelFormat.float32, MPSImageFeatureChannelFormat.float16])
@pytest.mark.parametrize("channels", [4, 5])  # 4 float32 channels are read in place, without a copy
def test_kernels_never_modify_their_source(backend, neuron_type, params, fmt, channels):
    data = np.random.default_rng(5).uniform(-2, 2, (2, 3, 4, channels))
    src = image(data, fmt)
    before = values(src)
    run(neuron(neuron_type, *params), src, blank(4, 3, channels, images=2, fmt=fmt), backend)
    np.testing.assert_array_equal(values(src), before)
