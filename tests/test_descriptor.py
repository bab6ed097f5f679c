"""convolution.md §3 checklist (descriptor, items 1–17) and enumerations (114–115)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import ArraySource, DEVICE, blank, conv, descriptor, image, quiet, run, values
from mpsconv import *


def test_conv_checklist_01_factory_defaults():
    d = MPSCNNConvolutionDescriptor.cnnConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=8,
                                                              outputFeatureChannels=16)
    assert (d.strideInPixelsX, d.strideInPixelsY, d.groups, d.dilationRateX, d.dilationRateY) == (1, 1, 1, 1, 1)
    assert d.fusedNeuronDescriptor.neuronType == MPSCNNNeuronType.none
    assert quiet(lambda: d.neuron) is None


def test_conv_checklist_02_bare_descriptor():
    d = MPSCNNConvolutionDescriptor()
    assert (d.kernelWidth, d.kernelHeight) == (3, 3)
    assert (d.inputFeatureChannels, d.outputFeatureChannels) == (0, 0)  # OPEN §3.1: 0, kernels refuse it
    with pytest.raises(MPSValueError, match="inputFeatureChannels=0"):
        MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(0)))


@pytest.mark.parametrize("field", ["kernelWidth", "kernelHeight", "inputFeatureChannels", "outputFeatureChannels"])
def test_conv_checklist_03_factory_rejects_zero(field):
    args = dict(kernelWidth=3, kernelHeight=3, inputFeatureChannels=8, outputFeatureChannels=16)
    args[field] = 0
    with pytest.raises(MPSValueError, match=f"{field}=0 must be >= 1"):
        MPSCNNConvolutionDescriptor.cnnConvolutionDescriptor(**args)


def test_conv_checklist_04_even_kernel_accepted():
    d = descriptor(4, 4, 1, 1)
    assert MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(16))).kernelWidth == 4


@pytest.mark.parametrize("groups, cin, cout, ok", [
    (2, 8, 8, True), (2, 6, 8, False), (2, 8, 6, False), (3, 12, 12, True), (3, 8, 12, False)])
def test_conv_checklist_05_groups_rule(groups, cin, cout, ok):
    if ok:
        assert conv(3, 3, cin, cout, groups=groups).groups == groups
    else:
        with pytest.raises(MPSValueError, match="groups"):
            conv(3, 3, cin, cout, groups=groups)


def test_conv_checklist_06_no_multiple_of_4_without_groups():
    assert conv(3, 3, 3, 5).outputFeatureChannels == 5


def test_conv_checklist_07_batch_norm_folding():
    d = descriptor(1, 1, 1, 1)
    d.setBatchNormalizationParametersForInferenceWithMean([1.0], variance=[3.0], gamma=[4.0], beta=[0.0], epsilon=1.0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.5], [1.0]))
    assert k._loaded.weights.reshape(-1).tolist() == [3.0] and k._loaded.bias.tolist() == [0.0]
    assert values(run(k, image([[[2.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 6.0


def test_conv_checklist_08_batch_norm_without_bias_uses_J():
    d = descriptor(1, 1, 1, 1)
    d.setBatchNormalizationParametersForInferenceWithMean([1.0], variance=[3.0], gamma=[4.0], beta=[0.0], epsilon=1.0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.5], None))
    assert k._loaded.bias.tolist() == [-2.0]


def test_conv_checklist_09_batch_norm_arrays_copied():
    mean = np.array([1.0], np.float32)
    d = descriptor(1, 1, 1, 1)
    d.setBatchNormalizationParametersForInferenceWithMean(mean, variance=[3.0], gamma=[4.0], beta=[0.0], epsilon=1.0)
    mean[0] = 100.0
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.5], [1.0]))
    assert values(run(k, image([[[2.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 6.0


def test_conv_checklist_10_batch_norm_snapshot_at_kernel_build():
    d = descriptor(1, 1, 1, 1)
    d.setBatchNormalizationParametersForInferenceWithMean([1.0], variance=[3.0], gamma=[4.0], beta=[0.0], epsilon=1.0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.5], [1.0]))
    d.setBatchNormalizationParametersForInferenceWithMean([0.0], variance=[1.0], gamma=[1.0], beta=[0.0], epsilon=0.0)
    assert values(run(k, image([[[2.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 6.0


def test_conv_checklist_11_set_neuron_type():
    d = descriptor(1, 1, 1, 1)
    with pytest.raises(MPSValueError, match="pReLU"):
        quiet(d.setNeuronType, MPSCNNNeuronType.pReLU, parameterA=0.1, parameterB=0)
    quiet(d.setNeuronType, MPSCNNNeuronType.reLU, parameterA=0.1, parameterB=0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.0]))
    assert values(run(k, image([[[-2.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == pytest.approx(-0.2, rel=1e-6)


def test_conv_checklist_12_prelu_setter():
    d = descriptor(1, 1, 1, 2)
    quiet(d.setNeuronToPReLUWithParametersA, np.array([0.5, 0.25], np.float32).tobytes())
    assert quiet(d.neuronType) == MPSCNNNeuronType.pReLU and quiet(d.neuronParameterA) == 0.0
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.0, 1.0]))
    assert values(run(k, image([[[-4.0]]]), blank(1, 1, 2)))[0, 0, 0].tolist() == [-2.0, -1.0]


def test_conv_checklist_13_prelu_setter_wrong_length():
    d = descriptor(1, 1, 1, 2)
    with pytest.raises(MPSValueError, match="12 bytes; outputFeatureChannels=2 needs 8"):
        quiet(d.setNeuronToPReLUWithParametersA, bytes(12))


@pytest.mark.parametrize("shift, expected", [(-5.0, 0.0), (-3.0, 1.0)])
def test_conv_checklist_14_order_is_neuron_of_batch_norm_of_conv_plus_bias(shift, expected):
    # raw 1, bias 1, BN scale 2 and shift J: variance + eps = 1, gamma = 2, mean = 0, beta = J
    d = descriptor(1, 1, 1, 1)
    d.setBatchNormalizationParametersForInferenceWithMean([0.0], variance=[0.5], gamma=[2.0], beta=[shift],
                                                          epsilon=0.5)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.0], [1.0]))
    assert values(run(k, image([[[1.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == expected


def test_conv_checklist_15_descriptor_round_trip():
    d = descriptor(5, 3, 8, 12, strideInPixelsX=2, strideInPixelsY=3, groups=4, dilationRateX=2, dilationRateY=1)
    d.setBatchNormalizationParametersForInferenceWithMean(np.arange(12), variance=np.ones(12), gamma=np.full(12, 2),
                                                          beta=np.arange(12) / 3, epsilon=1e-3)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.power, a=2, b=0.5, c=3)
    data = NSKeyedArchiver.archivedData(withRootObject=d)
    back = NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolutionDescriptor, data)
    assert back == d and back is not d
    assert back.fusedNeuronDescriptor.c == 3.0 and back._batch_norm.epsilon == 1e-3
    prelu = descriptor(1, 1, 1, 3)
    prelu.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(np.array([1, 2, 3], np.float32))
    assert NSKeyedUnarchiver.unarchivedObject(
        MPSCNNConvolutionDescriptor, NSKeyedArchiver.archivedData(withRootObject=prelu)) == prelu
    via_init = MPSCNNConvolutionDescriptor(coder=NSKeyedUnarchiver(forReadingFrom=data))
    assert via_init == d


def test_conv_checklist_16_copy_is_independent():
    d = descriptor(3, 3, 1, 1)
    c = d.copy()
    c.kernelWidth = 5
    assert d.kernelWidth == 3 and c.kernelWidth == 5


def test_conv_checklist_17_supports_secure_coding():
    assert MPSCNNConvolutionDescriptor.supportsSecureCoding() is True
    assert MPSCNNConvolution.supportsSecureCoding() is True


def test_neuron_routes_last_one_set_wins():
    """OPEN §3.5: with a legacy neuron object and a fused descriptor, the last one set wins."""
    d = descriptor(1, 1, 1, 1)
    quiet(setattr, d, "neuron", quiet(MPSCNNNeuronReLU, device=DEVICE, a=0.5))
    assert quiet(d.neuronType) == MPSCNNNeuronType.reLU and quiet(d.neuronParameterA) == 0.5
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.absolute)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.0]))
    assert values(run(k, image([[[-3.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 3.0
    quiet(setattr, d, "neuron", quiet(MPSCNNNeuronLinear, device=DEVICE, a=2.0, b=1.0))
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.0]))
    assert values(run(k, image([[[-3.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == -5.0
    legacy = quiet(MPSCNNConvolutionDescriptor.cnnConvolutionDescriptor, kernelWidth=1, kernelHeight=1,
                   inputFeatureChannels=1, outputFeatureChannels=1,
                   neuronFilter=quiet(MPSCNNNeuronTanH, device=DEVICE, a=2.0, b=1.0))
    assert quiet(legacy.neuronType) == MPSCNNNeuronType.tanH


def test_fused_prelu_descriptor_needs_exactly_O_values():
    """OPEN §3.5: a fused pReLU descriptor is accepted with O floats and refused otherwise."""
    d = descriptor(1, 1, 1, 2)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(np.array([0.5], np.float32))
    with pytest.raises(MPSValueError, match="pReLU data holds 1 floats; outputFeatureChannels=2"):
        MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.0, 1.0]))


def test_conv_checklist_114_raw_values():
    assert MPSCNNConvolutionFlags.none == 0
    assert [int(v) for v in MPSCNNWeightsQuantizationType] == [0, 1, 2]
    assert (MPSNNConvolutionAccumulatorPrecisionOption.half, MPSNNConvolutionAccumulatorPrecisionOption.float) == (0, 1)
    assert (MPSCNNConvolutionGradientOption.gradientWithData, MPSCNNConvolutionGradientOption.gradientWithWeightsAndBias,
            MPSCNNConvolutionGradientOption.all) == (1, 2, 3)
    assert MPSCNNConvolutionWeightsLayout.OHWI == 0
    assert [int(v) for v in MPSCNNBinaryConvolutionType] == [0, 1, 2]
    assert [int(v) for v in MPSCNNBinaryConvolutionFlags] == [0, 1]


def test_conv_checklist_115_deprecated_members_warn():
    d = descriptor(1, 1, 1, 1)
    with pytest.warns(DeprecationWarning, match="setNeuronType is deprecated"):
        d.setNeuronType(MPSCNNNeuronType.linear, parameterA=2.0, parameterB=1.0)
    with pytest.warns(DeprecationWarning):
        assert d.neuronType() == MPSCNNNeuronType.linear
    with pytest.warns(DeprecationWarning):
        k = MPSCNNConvolution(device=DEVICE, convolutionDescriptor=d, kernelWeights=[1.0], biasTerms=None,
                              flags=MPSCNNConvolutionFlags.none)
    with pytest.warns(DeprecationWarning):
        assert k.neuronType == MPSCNNNeuronType.linear
    with pytest.warns(DeprecationWarning):
        assert (k.neuronParameterA, k.neuronParameterB) == (2.0, 1.0)
    with pytest.warns(DeprecationWarning):
        MPSCNNNeuronSigmoid(device=DEVICE)
    assert values(run(k, image([[[3.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 7.0
