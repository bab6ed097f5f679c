"""Error messages that used to stop a porter: each names what to do instead."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, ArraySource, conv, descriptor, image
from mpsconv import (
    MPSCNNConvolutionDescriptor, MPSCNNConvolutionWeights, MPSCNNNeuronReLU, MPSImage, MPSTemporaryImage,
    MPSValueError, weights_from_oihw,
)


def test_the_descriptor_initializer_with_a_neuron_filter_is_taken():
    """Swift's init(kernelWidth:kernelHeight:inputFeatureChannels:outputFeatureChannels:neuronFilter:)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relu = MPSCNNNeuronReLU(device=DEVICE, a=0.0)
        d = MPSCNNConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4,
                                        outputFeatureChannels=4, neuronFilter=relu)
    assert any("fusedNeuronDescriptor" in str(w.message) for w in caught)
    assert d.neuron is relu and d._active_neuron().neuronType.name == "reLU"


def test_reading_an_allocated_temporary_image_names_the_allocator():
    k = conv(3, 3, 1, 1)
    cb = QUEUE.makeCommandBuffer()
    dst = k.encode(commandBuffer=cb, sourceImage=image(np.ones((4, 4, 1))))
    cb.commit()
    cb.waitUntilCompleted()
    assert isinstance(dst, MPSTemporaryImage)
    with pytest.raises(MPSValueError, match=r"destinationImageAllocator = MPSImage\.defaultAllocator\(\)"):
        dst.numpy()
    k.destinationImageAllocator = MPSImage.defaultAllocator()
    cb = QUEUE.makeCommandBuffer()
    readable = k.encode(commandBuffer=cb, sourceImage=image(np.ones((4, 4, 1))))
    cb.commit()
    cb.waitUntilCompleted()
    assert readable.numpy().shape == (1, 4, 4, 1)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 224, 224), (2, 1, 28, 28)])
def test_an_nchw_array_is_refused_by_from_numpy(shape):
    with pytest.raises(MPSValueError, match=r"looks like NCHW .*transpose\(0, 2, 3, 1\)"):
        MPSImage.from_numpy(np.zeros(shape, np.float32), device=DEVICE)


def test_small_nhwc_images_with_few_rows_are_still_taken():
    assert MPSImage.from_numpy(np.ones((1, 2, 6, 6)), device=DEVICE).featureChannels == 6


@pytest.mark.parametrize("layout, convert", [("OIHW", "weights_from_oihw"), ("HWIO", "weights_from_hwio")])
def test_weights_in_another_layout_are_refused_naming_both(layout, convert):
    o, i, kh, kw = 8, 4, 3, 5
    shape = (o, i, kh, kw) if layout == "OIHW" else (kh, kw, i, o)
    d = descriptor(kw, kh, i, o)
    for make in (lambda w: MPSCNNConvolutionWeights(d, w),
                 lambda w: __import__("mpsconv").MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w))):
        with pytest.raises(MPSValueError, match=re.escape(f"shape {shape}; the descriptor needs OHWI (8, 3, 5, 4)")
                           + f".*{convert}"):
            make(np.ones(shape, np.float32))
    ohwi = weights_from_oihw(np.ones((o, i, kh, kw), np.float32))
    assert MPSCNNConvolutionWeights(d, ohwi).weights_array.shape == (8, 3, 5, 4)
