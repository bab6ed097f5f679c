"""States: kernel-image.md 101–103, 105, 108; convolution.md 79, 88, 98 (the parts that are not the
gradient kernels, which are issue 4)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, blank, conv, image, run, values
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


def test_neurons_make_no_state_yet():
    n = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.none))
    with pytest.raises(NotImplementedError, match="not in any issue"):
        n.encode(commandBuffer=QUEUE.makeCommandBuffer(), sourceImage=blank(3, 3, 1), destinationStateIsTemporary=True)
