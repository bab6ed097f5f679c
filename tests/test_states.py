"""States: kernel-image.md 101–103, 105, 108; convolution.md 79, 88, 98 (the parts that are not the
gradient kernels, which are issue 4)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, ArraySource, blank, conv, descriptor, image, run, values
from mpsconv import *
from test_transpose import transpose


def test_ki_checklist_101_buffer_state():
    s = MPSState(device=DEVICE, bufferSize=64)
    assert (s.isTemporary, s.readCount, s.resourceCount, s.bufferSize(at=0)) == (False, 0, 1, 64)
    assert s.resourceType(at=0) == MPSStateResourceType.buffer == 1


def test_ki_checklist_102_temporary_state():
    cb = QUEUE.makeCommandBuffer()
    s = MPSState.temporaryState(commandBuffer=cb, bufferSize=16)
    assert s.isTemporary and s.readCount == 1
    cb.commit()
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        MPSState.temporaryState(commandBuffer=cb, bufferSize=16)


def test_ki_checklist_103_lazy_resource():
    s = MPSState(device=DEVICE, bufferSize=32)
    assert s.resource(at=0, allocateMemory=False) is None and s.resourceSize() == 32
    assert s.resource(at=0).length == 32 and s.resourceSize() == 32
    with pytest.raises(MPSValueError, match="index 1 is outside"):
        s.resource(at=1)


def test_ki_checklist_105_batch_increment():
    cb = QUEUE.makeCommandBuffer()
    s, t = MPSState.temporaryState(commandBuffer=cb), MPSState.temporaryState(commandBuffer=cb)
    assert MPSStateBatchIncrementReadCount([s, s, t], 1) == 2 and (s.readCount, t.readCount) == (2, 2)
    with pytest.raises(TypeError, match="unavailable"):
        MPSState()


def test_conv_checklist_79_and_98_gradient_state_members():
    k = conv(3, 3, 8, 16, groups=2)
    states = k.resultStateBatch(sourceImage=[blank(7, 5, 8)] * 3)
    assert len(states) == 3 and states[0] is states[1] is states[2]
    state = states[0]
    assert isinstance(state, MPSCNNConvolutionGradientState) and state.convolution is k
    assert state.gradientForWeights.length == 4 * 16 * 3 * 3 * 4 and state.gradientForBiases.length == 4 * 16
    assert state.gradientForWeightsLayout == MPSCNNConvolutionWeightsLayout.OHWI
    assert (state.sourceWidth, state.sourceHeight) == (7, 5)  # kernel-image #108


@pytest.mark.parametrize("temporary", [False, True])
def test_forward_encode_with_a_state(temporary):
    k = conv(3, 3, 1, 1)
    cb = QUEUE.makeCommandBuffer()
    src = image(np.ones((6, 5, 1)))
    out, state = k.encode(commandBuffer=cb, sourceImage=src, destinationStateIsTemporary=temporary)
    assert state.isTemporary is temporary and (state.sourceWidth, state.sourceHeight) == (5, 6)
    assert state.readCount == (1 if temporary else 0)  # filling a state does not read it
    dst = blank(5, 6, 1)
    manual = k.resultState(sourceImage=src)
    k.encode(commandBuffer=cb, sourceImage=src, destinationState=manual, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    assert values(dst)[0, 2, 2, 0] == 9


def forward_state(kw, src_hw, method=None, offset=None, stride=1):
    k = conv(kw, kw, 1, 1, strideInPixelsX=stride, strideInPixelsY=stride)
    cb = QUEUE.makeCommandBuffer()
    src = image(np.random.default_rng(0).uniform(-1, 1, (*src_hw, 1)))
    if method is not None:
        k.padding = MPSNNDefaultPadding(method)
        _, state = k.encode(commandBuffer=cb, sourceImage=src, destinationStateIsTemporary=False)
    else:
        k.offset = offset
        state = k.resultState(sourceImage=src)
        k.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(4, 4, 1))
    cb.commit()
    cb.waitUntilCompleted()
    return k, state


@pytest.mark.parametrize("kw, method, offset, expected", [
    (3, MPSNNPaddingMethod.sizeSame, None, (0, 0)),
    (3, MPSNNPaddingMethod.sizeValidOnly, None, (-1, -1)),
    (4, None, MPSOffset(2, 2, 0), (-1, -1)),
])
def test_conv_checklist_88_transpose_from_the_forward_state(kw, method, offset, expected):
    fwd, state = forward_state(kw, (6, 6), method, offset, stride=2 if method == MPSNNPaddingMethod.sizeSame else 1)
    t = transpose(kw, kw, 1, 1, strideInPixelsX=fwd.strideInPixelsX, strideInPixelsY=fwd.strideInPixelsY)
    t.destinationImageAllocator = MPSImage.defaultAllocator()
    cb = QUEUE.makeCommandBuffer()
    out = t.encode(commandBuffer=cb, sourceImage=blank(3, 3, 1), convolutionGradientState=state)
    cb.commit()
    assert (out.width, out.height) == (6, 6)
    assert (t.kernelOffsetX, t.kernelOffsetY) == expected and t.offset == MPSOffset(0, 0, 0)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_state_path_equals_the_manual_kernel_offset(backend):
    rng = np.random.default_rng(88)
    fwd, state = forward_state(4, (7, 7), offset=MPSOffset(1, 2, 0))
    w = rng.uniform(-1, 1, 16)
    y = image(rng.uniform(-1, 1, (4, 4, 1)))
    by_state = transpose(4, 4, weights=w)
    cb = QUEUE.makeCommandBuffer()
    dst_state = blank(7, 7, 1)
    with use_backend(backend):
        by_state.encode(commandBuffer=cb, sourceImage=y, convolutionGradientState=state, destinationImage=dst_state)
        cb.commit()
        cb.waitUntilCompleted()
    manual = transpose(4, 4, weights=w)
    manual.kernelOffsetX, manual.kernelOffsetY = -1 + 1, -2 + 1  # -o + 1 for an even window
    np.testing.assert_array_equal(values(dst_state), values(run(manual, y, blank(7, 7, 1), backend)))


def test_temporary_state_read_once_per_encode_call():
    cb = QUEUE.makeCommandBuffer()
    k = conv(3, 3, 1, 1)
    src = blank(6, 6, 1)
    state = k.temporaryResultState(commandBuffer=cb, sourceImage=src)
    k.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(6, 6, 1))
    state.readCount = 2
    t = transpose(3, 3)
    t.encodeBatch(commandBuffer=cb, sourceImages=[blank(6, 6, 1), blank(6, 6, 1)],
                  convolutionGradientStates=[state, state], destinationImages=[blank(6, 6, 1), blank(6, 6, 1)])
    assert state.readCount == 1  # one distinct state, one read
    cb.commit()


def test_batch_encodes_with_states():
    k = conv(3, 3, 1, 1)
    cb = QUEUE.makeCommandBuffer()
    sources = [image(np.ones((5, 5, 1))) for _ in range(3)]
    images, states = k.encodeBatch(commandBuffer=cb, sourceImages=sources, destinationStateIsTemporary=True)
    assert len(images) == len(states) == 3 and states[0] is states[2] and states[0].isTemporary
    manual = k.resultStateBatch(sourceImage=sources)
    destinations = [blank(5, 5, 1) for _ in sources]
    k.encodeBatch(commandBuffer=cb, sourceImages=sources, destinationStates=manual, destinationImages=destinations)
    cb.commit()
    cb.waitUntilCompleted()
    assert all(values(d)[0, 2, 2, 0] == 9 for d in destinations)
    assert (manual[0].sourceWidth, manual[0].sourceHeight) == (5, 5)


# -- weights and biases (convolution.md §8.5, §13)


def test_conv_checklist_74_export():
    d = descriptor(1, 1, 1, 2)
    d.setBatchNormalizationParametersForInferenceWithMean([1.0, 0.0], variance=[3.0, 1.0], gamma=[4.0, 1.0],
                                                          beta=[0.0, 0.5], epsilon=1.0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1.5, 1 / 3], [1.0, 2.0]))
    state = k.exportWeightsAndBiases(QUEUE.makeCommandBuffer(), resultStateCanBeTemporary=False)
    w = np.frombuffer(state.weights.contents().tobytes(), np.float32)
    b = np.frombuffer(state.biases.contents().tobytes(), np.float32)
    scale1 = np.float32(1 / np.sqrt(2.0))
    assert w[0] == 3.0 and w[1] == np.float32(np.float16(np.float32(1 / 3) * scale1))  # folded, then half
    assert b.size == 2 and b[0] == 0.0 and not state.isTemporary


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_conv_checklist_75_export_then_reload_changes_nothing(backend):
    rng = np.random.default_rng(75)
    k = conv(3, 3, 4, 8, weights=rng.uniform(-1, 1, 288), bias=rng.uniform(-1, 1, 8))
    src = image(rng.uniform(-1, 1, (5, 6, 4)))
    before = values(run(k, src, blank(6, 5, 8), backend))
    cb = QUEUE.makeCommandBuffer()
    state = k.exportWeightsAndBiases(cb, resultStateCanBeTemporary=True)
    k.reloadWeightsAndBiases(cb, state=state)
    cb.commit()
    np.testing.assert_array_equal(values(run(k, src, blank(6, 5, 8), backend)), before)


def test_conv_checklist_76_reload_from_a_state():
    k = conv(1, 1, 1, 1, weights=[1.0])
    cb = QUEUE.makeCommandBuffer()
    state = MPSCNNConvolutionWeightsAndBiasesState.temporaryCNNConvolutionWeightsAndBiasesState(
        commandBuffer=cb, cnnConvolutionDescriptor=descriptor(1, 1, 1, 1))
    state.weights.contents()[:] = np.frombuffer(np.float32(2.0).tobytes(), np.uint8)
    k.reloadWeightsAndBiasesWithCommandBuffer(cb, state)
    assert state.readCount == 0
    cb.commit()
    assert values(run(k, image([[[3.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 6.0


def test_conv_checklist_101_to_104_weights_state_buffers():
    d = descriptor(3, 3, 8, 16, groups=2)
    state = MPSCNNConvolutionWeightsAndBiasesState(device=DEVICE, cnnConvolutionDescriptor=d)
    assert (state.weights.length, state.biases.length) == (16 * 3 * 3 * 4 * 4, 64)
    assert (state.weightsOffset, state.biasesOffset) == (0, 0)
    buf = DEVICE.makeBuffer(length=2304 + 64)
    with pytest.raises(MPSValueError, match="weightsOffset=6 must be a non-negative multiple of 4"):
        MPSCNNConvolutionWeightsAndBiasesState(weights=buf, weightsOffset=6, biases=buf, biasesOffset=2304,
                                               cnnConvolutionDescriptor=d)
    with pytest.raises(MPSValueError, match="exceeds the 2368-byte buffer"):
        MPSCNNConvolutionWeightsAndBiasesState(weights=buf, weightsOffset=128, biases=buf, biasesOffset=2304,
                                               cnnConvolutionDescriptor=d)
    # #103: weights and biases sharing one buffer
    k = conv(1, 1, 1, 2, weights=[1.0, 1.0])
    shared = DEVICE.makeBuffer(length=16)
    shared.contents()[:] = np.frombuffer(np.array([2.0, 3.0, 0.5, -1.0], np.float32).tobytes(), np.uint8)
    one = MPSCNNConvolutionWeightsAndBiasesState(weights=shared, weightsOffset=0, biases=shared, biasesOffset=8,
                                                 cnnConvolutionDescriptor=descriptor(1, 1, 1, 2))
    k.reloadWeightsAndBiases(QUEUE.makeCommandBuffer(), state=one)
    assert values(run(k, image([[[2.0]]]), blank(1, 1, 2)))[0, 0, 0].tolist() == [4.5, 5.0]


def test_pointer_kernels_cannot_be_updated():
    from helpers import quiet

    k = quiet(MPSCNNConvolution, device=DEVICE, convolutionDescriptor=descriptor(1, 1, 1, 1), kernelWeights=[1.0],
              biasTerms=None, flags=MPSCNNConvolutionFlags.none)
    state = k.exportWeightsAndBiases(QUEUE.makeCommandBuffer())
    with pytest.raises(MPSValueError, match="cannot be trained"):
        k.reloadWeightsAndBiases(QUEUE.makeCommandBuffer(), state=state)
