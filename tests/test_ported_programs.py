"""What ported MPS client programs need, each pinned on random data against the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import DEVICE, QUEUE, ArraySource, blank, descriptor, image, run, values
from mpsconv import (
    MPSCNNBinaryConvolution, MPSCNNBinaryConvolutionType, MPSCNNConvolutionGradient, MPSCNNConvolutionTranspose,
    MPSCNNNeuron, MPSCNNNeuronGradient, MPSCNNNeuronType, MPSNNNeuronDescriptor,
    MPSCNNConvolution, MPSCNNConvolutionDataSource, MPSCNNConvolutionGradientState, MPSCommandBuffer,
    MPSCommandBufferError, MPSDataType, MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSImageSizeEncodingState,
    MPSTemporaryImage, MPSTypeError, MPSValueError, MTLCommandBufferStatus,
)
from tolerances import assert_close


# -- weights through a pointer


class WeightFile(MPSCNNConvolutionDataSource):
    """A YOLO-style loader: one float32 file of every layer's biases and weights; each layer's data
    source hands out views into it at its offsets."""

    def __init__(self, blob, offset, d):
        self.blob, self.offset, self.d = blob, offset, d

    def dataType(self):
        return MPSDataType.float32

    def kernelWeightsDataType(self):
        return MPSDataType.float32

    def descriptor(self):
        return self.d

    def biasTerms(self):
        return self.blob[self.offset:]  # a view: the layer's biases, then everything after them

    def weights(self):
        return self.blob[self.offset + self.d.outputFeatureChannels:]

    def label(self):
        return "yolo"


def test_a_data_source_may_return_views_into_a_whole_weight_file():
    rng = np.random.default_rng(0)
    blob = rng.uniform(-1, 1, 1000).astype(np.float32)
    d = descriptor(3, 3, 4, 6)
    kernel = MPSCNNConvolution(device=DEVICE, weights=WeightFile(blob, 100, d))
    w = blob[106:106 + 6 * 9 * 4].reshape(6, 3, 3, 4)
    want = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, blob[100:106], kernel_type=MPSDataType.float32))
    src = image(rng.uniform(-1, 1, (5, 5, 4)))
    assert_close(values(run(kernel, src, blank(5, 5, 6), "reference")),
                 values(run(want, src, blank(5, 5, 6), "reference")), "float32")
    short = WeightFile(blob[:100 + 6 + 10], 100, d)
    with pytest.raises(MPSValueError, match=r"weights\(\) holds 10 elements; 216 are needed"):
        MPSCNNConvolution(device=DEVICE, weights=short)


def test_raw_bytes_longer_than_the_weights_give_their_first_values():
    w = np.arange(8, dtype=np.float32)
    d = descriptor(1, 1, 4, 2)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w.tobytes() + b"\xff" * 12))
    np.testing.assert_array_equal(k._loaded.weights.reshape(-1), w)


# -- MPSImageSizeEncodingState


def test_the_convolution_gradient_state_encodes_the_source_size():
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 1, 1, strideInPixelsX=2,
                                                                         strideInPixelsY=2), np.ones(9)))
    state = k.resultState(sourceImage=blank(7, 5, 1))
    assert isinstance(state, MPSImageSizeEncodingState) and issubclass(MPSCNNConvolutionGradientState,
                                                                       MPSImageSizeEncodingState)
    assert (state.sourceWidth, state.sourceHeight) == (7, 5)

    class Sized(MPSImageSizeEncodingState):
        sourceWidth, sourceHeight = 3, 4

    class DuckSized:
        sourceWidth = sourceHeight = 2

    assert isinstance(Sized(), MPSImageSizeEncodingState) and isinstance(DuckSized(), MPSImageSizeEncodingState)
    assert not isinstance(torch.zeros(1), MPSImageSizeEncodingState)


# -- MPSCommandBuffer


def _conv(rng, cin, cout):
    d = descriptor(3, 3, cin, cout)
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, (cout, 3, 3, cin)),
                                                                rng.uniform(-1, 1, cout)))


def test_temporary_images_live_across_commit_and_continue():
    rng = np.random.default_rng(1)
    first, second = _conv(rng, 3, 8), _conv(rng, 8, 4)
    src = image(rng.uniform(-1, 1, (9, 7, 3)))
    cb = MPSCommandBuffer(QUEUE)
    assert cb.rootCommandBuffer is cb.commandBuffer and cb.device is DEVICE
    done = []
    cb.addCompletedHandler(lambda buffer: done.append(buffer))
    tmp = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float16, width=7, height=9, featureChannels=8))
    first.encode(commandBuffer=cb, sourceImage=src, destinationImage=tmp)
    cb.commitAndContinue()
    root = cb.rootCommandBuffer
    root.waitUntilCompleted()  # (its handlers may run on the queue's thread)
    assert root.status == MTLCommandBufferStatus.completed and done == [root]
    assert cb.commandBuffer is not root and cb.status == MTLCommandBufferStatus.notEnqueued
    dst = blank(7, 9, 4)
    second.encode(commandBuffer=cb, sourceImage=tmp, destinationImage=dst)
    assert tmp.readCount == 0
    cb.commit()
    cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.completed and cb.error is None
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        second.encode(commandBuffer=cb, sourceImage=src)

    mid, want = blank(7, 9, 8, fmt=MPSImageFeatureChannelFormat.float16), blank(7, 9, 4)
    run(first, src, mid, "reference")
    run(second, mid, want, "reference")
    assert_close(values(dst), values(want), "float16")


def test_temporary_images_made_after_commit_and_continue_leave_the_earlier_ones_intact():
    # tmp is written by the first underlying buffer's work; a larger temporary made after the
    # commitAndContinue must not take (or move) tmp's bytes, which the second buffer still reads
    rng = np.random.default_rng(4)
    first, widen, second = _conv(rng, 3, 8), _conv(rng, 3, 32), _conv(rng, 8, 4)
    src = image(rng.uniform(-1, 1, (9, 7, 3)))
    cb = MPSCommandBuffer(QUEUE)
    tmp = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=7, height=9, featureChannels=8))
    first.encode(commandBuffer=cb, sourceImage=src, destinationImage=tmp)
    cb.commitAndContinue()
    cb.rootCommandBuffer.waitUntilCompleted()
    big = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=7, height=9, featureChannels=32))
    widen.encode(commandBuffer=cb, sourceImage=src, destinationImage=big)
    big.readCount = 0
    dst = blank(7, 9, 4)
    second.encode(commandBuffer=cb, sourceImage=tmp, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    mid, want = blank(7, 9, 8), blank(7, 9, 4)
    run(first, src, mid, "reference")
    run(second, mid, want, "reference")
    assert_close(values(dst), values(want), "float32")


def test_a_command_buffer_wrapping_an_existing_one():
    rng = np.random.default_rng(2)
    k = _conv(rng, 4, 4)
    src, dst = image(rng.uniform(-1, 1, (6, 6, 4))), blank(6, 6, 4)
    base = QUEUE.makeCommandBuffer()
    cb = MPSCommandBuffer.commandBufferWithCommandBuffer(base)
    assert cb.commandBuffer is base and cb.rootCommandBuffer is base
    cb.label = "wrapped"
    cb.predicate, cb.heapProvider = "p", "h"
    cb.prefetchHeap(forWorkloadSize=1 << 20)
    assert (base.label, cb.predicate, cb.heapProvider) == ("wrapped", "p", "h")
    k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.commit()
    base.waitUntilCompleted()
    want = blank(6, 6, 4)
    run(k, src, want, "reference")
    assert_close(values(dst), values(want), "float32")
    for bad in ({}, {"commandBuffer": cb}, {"commandBuffer": "queue"}):
        with pytest.raises(MPSTypeError, match="MPSCommandBuffer"):
            MPSCommandBuffer(**bad)
    with pytest.raises(MPSTypeError, match="not an MTLCommandQueue"):
        MPSCommandBuffer.commandBufferFromCommandQueue(base)


def test_every_kernel_family_encodes_into_an_mps_command_buffer():
    """Forward, transposed, binary and neuron kernels, and the convolution and neuron gradients, in
    one MPSCommandBuffer across a commitAndContinue; each result equals the plain command buffer's."""
    rng = np.random.default_rng(3)
    d = descriptor(3, 3, 4, 4)
    ds = ArraySource(d, rng.uniform(-1, 1, (4, 3, 3, 4)), rng.uniform(-1, 1, 4))
    relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.2)
    conv, grad = MPSCNNConvolution(device=DEVICE, weights=ds), MPSCNNConvolutionGradient(device=DEVICE, weights=ds)
    transpose = MPSCNNConvolutionTranspose(device=DEVICE, weights=ds)
    binary = MPSCNNBinaryConvolution(device=DEVICE, convolutionData=ArraySource(d, rng.uniform(-1, 1, 144)),
                                     scaleValue=0.5, type=MPSCNNBinaryConvolutionType.xnor, flags=0)
    neuron, neuron_grad = (MPSCNNNeuron(device=DEVICE, neuronDescriptor=relu),
                           MPSCNNNeuronGradient(device=DEVICE, neuronDescriptor=relu))
    src, e = image(rng.uniform(-1, 1, (5, 5, 4))), image(rng.uniform(-1, 1, (5, 5, 4)))

    def program(cb, split):
        outs = [blank(5, 5, 4) for _ in range(6)]
        state = conv.resultState(sourceImage=src)
        conv.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=outs[0])
        transpose.encode(commandBuffer=cb, sourceImage=src, destinationImage=outs[1])
        binary.encode(commandBuffer=cb, sourceImage=src, destinationImage=outs[2])
        split(cb)
        n_state = neuron.resultState(sourceImage=src)
        neuron.encode(commandBuffer=cb, sourceImage=src, destinationState=n_state, destinationImage=outs[3])
        neuron_grad.encode(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=n_state,
                           destinationGradient=outs[4])
        grad.destinationImageDescriptor(sourceImages=[e, src], sourceStates=[state])
        grad.encode(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=state,
                    destinationGradient=outs[5])
        cb.commit()
        cb.waitUntilCompleted()
        return [values(o) for o in outs] + [np.frombuffer(state.gradientForWeights.contents().tobytes(), np.float32)]

    want = program(QUEUE.makeCommandBuffer(), lambda cb: None)
    got = program(MPSCommandBuffer(QUEUE), lambda cb: cb.commitAndContinue())
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
