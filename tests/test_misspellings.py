"""Misspelled properties are refused, as Swift refuses to compile them, with the nearest real name;
user subclasses keep Python's freedom."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, ArraySource, blank, conv, descriptor
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDataSource, MPSCNNConvolutionWeights, MPSCNNNeuronType, MPSImageDescriptor,
    MPSImageEdgeMode, MPSNNDefaultPadding, MPSNNNeuronDescriptor, MPSState, MTLCreateSystemDefaultDevice,
)

CASES = [  # (object, misspelled name, the suggestion)
    (lambda: descriptor(), "strideInPixelX", "strideInPixelsX"),
    (lambda: conv(), "edgemode", "edgeMode"),
    (lambda: conv(), "destinationFeatureChannelOfset", "destinationFeatureChannelOffset"),
    (lambda: blank(2, 2, 4), "featureChannel", "featureChannels"),
    (lambda: MPSImageDescriptor(), "featureChanels", "featureChannels"),
    (lambda: MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU), "alpha", None),
    (lambda: QUEUE.makeCommandBuffer(), "lable", "label"),
    (lambda: DEVICE, "lable", "label"),
    (lambda: MPSNNDefaultPadding(), "method", None),
    (lambda: MPSState(device=DEVICE, bufferSize=4), "Label", "label"),
    (lambda: MPSCNNConvolutionWeights(descriptor(), np.ones(9)), "weight_array", "weights_array"),
]


@pytest.mark.parametrize("make, name, suggestion", CASES, ids=[c[1] for c in CASES])
def test_a_misspelled_property_is_refused_with_the_nearest_name(make, name, suggestion):
    obj = make()
    before = dict(vars(obj))
    with pytest.raises(AttributeError, match=rf"{type(obj).__name__} has no attribute '{name}'") as info:
        setattr(obj, name, 2)
    if suggestion:
        assert f"did you mean '{suggestion}'" in str(info.value)
    assert vars(obj) == before


def test_real_properties_and_fields_still_set():
    d = descriptor()
    d.strideInPixelsX = 2
    k = conv()
    k.edgeMode, k.label = MPSImageEdgeMode.clamp, "layer"
    image_descriptor = MPSImageDescriptor()
    image_descriptor.width, image_descriptor.featureChannels = 5, 8
    n = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    n.a = 0.25
    device = MTLCreateSystemDefaultDevice()
    device.label = "gpu0"
    assert (d.strideInPixelsX, k.edgeMode, k.label, image_descriptor.width, n.a, device.label) == \
        (2, MPSImageEdgeMode.clamp, "layer", 5, 0.25, "gpu0")
    device.label = None


def test_user_subclasses_keep_pythons_freedom():
    class Source(MPSCNNConvolutionDataSource):
        def __init__(self):
            self.anything = 1

    class Trained(MPSCNNConvolutionWeights):
        pass

    class Layer(MPSCNNConvolution):
        pass

    Source().more = 2
    weights = Trained(descriptor(), np.ones(9))
    weights.learning_rate = 0.1
    layer = Layer(device=DEVICE, weights=ArraySource(descriptor(), np.ones(9)))
    layer.name = "mine"
    assert (weights.learning_rate, layer.name) == (0.1, "mine")
