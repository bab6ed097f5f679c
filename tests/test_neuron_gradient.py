"""MPSCNNNeuronGradient: every neuron type's gradient against torch.autograd of hand-written PyTorch
activations, the sides taken at kinks, the window geometry against the reference on every backend,
the training encode forms, refusals, and the Triton pass against the one derivative table."""
from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from helpers import DEVICE, FMT, QUEUE, ArraySource, blank, descriptor, image, values
from mpsconv import (
    NSKeyedArchiver, NSKeyedUnarchiver, MPSCNNConvolution, MPSCNNNeuron, MPSCNNNeuronGradient, MPSCNNNeuronType,
    MPSCommandBufferError, MPSImage, MPSImageEdgeMode, MPSNNGradientState, MPSNNNeuronDescriptor, MPSOffset,
    MPSTemporaryImage, MPSTypeError, MPSValueError, MTLRegionMake2D, use_backend,
)
from mpsconv.backends import triton as triton_backend
from test_properties import neuron_descriptor
from tolerances import assert_close

T = MPSCNNNeuronType
TYPES = [t for t in T if t != T.count]
BACKENDS = ["reference", "torch"] + (["triton"] if triton_backend.available() else [])


def autograd_activation(neuron_type, x, a, b, c):
    """The activation written with PyTorch's own functions (not the formula table), for autograd."""
    return {
        T.none: lambda: x,
        T.reLU: lambda: Fn.leaky_relu(x, a),
        T.linear: lambda: a * x + b,
        T.sigmoid: lambda: torch.sigmoid(x),
        T.hardSigmoid: lambda: torch.clamp(a * x + b, 0.0, 1.0),
        T.tanH: lambda: a * torch.tanh(b * x),
        T.absolute: lambda: torch.abs(x),
        T.softPlus: lambda: a * Fn.softplus(b * x),
        T.softSign: lambda: Fn.softsign(x),
        T.ELU: lambda: Fn.elu(x, alpha=a),
        T.pReLU: lambda: torch.where(x >= 0, x, a * x),
        T.reLUN: lambda: torch.clamp(Fn.leaky_relu(x, a), max=b),
        T.power: lambda: (a * x + b) ** c,
        T.exponential: lambda: torch.exp(a * x + b) if c == -1 else c ** (a * x + b),
        T.logarithm: lambda: torch.log(a * x + b) / (1.0 if c == -1 else math.log(c)),
        T.geLU: lambda: Fn.gelu(x),
    }[neuron_type]()


def pair(descriptor):
    return (MPSCNNNeuron(device=DEVICE, neuronDescriptor=descriptor),
            MPSCNNNeuronGradient(device=DEVICE, neuronDescriptor=descriptor))


def forward_backward(forward, gradient, src, e, backend, dst=None):
    """The forward encode filling a state, then the gradient on ``backend`` (into ``dst``, or
    allocating); dS values."""
    cb = QUEUE.makeCommandBuffer()
    state = forward.resultState(sourceImage=src)
    out = blank(src.width, src.height, forward_channels(forward, src), images=src.numberOfImages)
    forward.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=out)
    with use_backend(backend):
        kwargs = dict(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=state)
        if dst is None:
            gradient.destinationImageAllocator = MPSImage.defaultAllocator()
            dst = gradient.encode(**kwargs)
        else:
            assert gradient.encode(destinationGradient=dst, **kwargs) is None
        cb.commit()
        cb.waitUntilCompleted()
    return values(dst)


def forward_channels(forward, src):
    return forward.destinationFeatureChannelOffset + src.featureChannels - forward.sourceFeatureChannelOffset


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neuron_type", TYPES)
def test_every_neuron_gradient_is_the_vjp(backend, neuron_type):
    """dS = E·f'(S) for every type with non-default parameters (PReLU per channel), against
    torch.autograd of the activation written with PyTorch's functions, in float64."""
    rng = np.random.default_rng(int(neuron_type))
    descriptor = neuron_descriptor(neuron_type, 3, rng)
    forward, gradient = pair(descriptor)
    x = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
    e = rng.uniform(-1, 1, (2, 5, 6, 3))
    got = forward_backward(forward, gradient, image(x), image(e), backend)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    a, b, c = gradient.a, gradient.b, gradient.c  # the descriptor's, defaults filled in
    if neuron_type == T.pReLU:
        a = torch.tensor(np.frombuffer(bytes(gradient.data), np.float32), dtype=torch.float64)
    y = autograd_activation(neuron_type, xt, a, b, c)
    (want,) = torch.autograd.grad(y, xt, torch.tensor(e))
    assert_close(got, want.numpy(), "float32", f"{neuron_type.name} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kinks_take_the_slope_on_their_right(backend):
    """ReLU and ReLU6 at 0: 1; ReLU6 at 6: 0; |x| at 0: 1; hardSigmoid at its corners: the slope just
    right of them; ELU at 0: 1 (E is 2 everywhere, so dS is twice the slope)."""
    cases = [
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU, a=0.25), [0.0, -1.0, 1.0], [1.0, 0.25, 1.0]),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLUN, a=0.0, b=6.0), [0.0, 6.0, 5.5], [1.0, 0.0, 1.0]),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.absolute), [0.0, -0.5, 0.5], [1.0, -1.0, 1.0]),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.hardSigmoid, a=0.5, b=0.5), [-1.0, 1.0, 0.0], [0.5, 0.0, 0.5]),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.hardSigmoid, a=-0.5, b=0.5), [-1.0, 1.0, 0.0], [-0.5, 0.0, -0.5]),
        (MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.ELU, a=0.5), [0.0, -1.0, 2.0], [1.0, 0.5 * math.exp(-1.0), 1.0]),
    ]
    for descriptor, xs, slopes in cases:
        forward, gradient = pair(descriptor)
        got = forward_backward(forward, gradient, image([[xs]]), image(np.full((1, 1, 3), 2.0)), backend)
        assert_close(got[0, 0, 0], 2.0 * np.array(slopes), "float32", repr(descriptor))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("seed", range(6))
def test_the_window_geometry_matches_the_reference(backend, seed):
    """Offsets, clip regions, both edge modes (clamped reads of one edge pixel add up), channel
    offsets on both sides and batches: the fast backends against the reference."""
    rng = np.random.default_rng(seed)
    neuron_type = TYPES[seed * 5 % len(TYPES)]
    descriptor = neuron_descriptor(neuron_type, 8, rng)
    forward, gradient = pair(descriptor)
    n, h, w = 1 + seed % 2, 4 + seed, 5 + seed % 3
    forward.offset = MPSOffset(int(rng.integers(-2, 3)), int(rng.integers(-2, 3)), 0)
    forward.edgeMode = MPSImageEdgeMode.clamp if seed % 2 else MPSImageEdgeMode.zero
    forward.clipRect = MTLRegionMake2D(1, 0, w - 1, h - 1)
    channels, d0 = 6, 4 * (seed // 3)
    forward.sourceFeatureChannelOffset = 4 * (seed % 2)
    gradient.sourceFeatureChannelOffset, gradient.destinationFeatureChannelOffset = 4, d0
    src = image(rng.uniform(-1, 1, (n, h, w, forward.sourceFeatureChannelOffset + channels)))
    e = image(rng.uniform(-1, 1, (n, h - 1, w - 1, 4 + channels)))
    prior = rng.uniform(-1, 1, (n, h, w, d0 + channels + 1))
    want = forward_backward(forward, gradient, src, e, "reference", image(prior))
    got = forward_backward(forward, gradient, src, e, backend, image(prior))
    assert_close(got, want, "float32", f"{neuron_type.name} on {backend}")
    np.testing.assert_array_equal(got[..., :d0], values(image(prior))[..., :d0])  # outside the slice: untouched
    assert not np.allclose(got[..., d0:d0 + channels], 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_images_and_a_temporary_state(backend):
    rng = np.random.default_rng(11)
    forward, gradient = pair(MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.tanH, a=1.5, b=0.5))
    src, e = image(rng.uniform(-2, 2, (1, 4, 4, 5)), FMT.float16), image(rng.uniform(-1, 1, (1, 4, 4, 5)), FMT.float16)
    cb = QUEUE.makeCommandBuffer()
    out, state = forward.encode(commandBuffer=cb, sourceImage=src, destinationStateIsTemporary=True)
    with use_backend(backend):
        assert isinstance(state, MPSNNGradientState) and state.isTemporary and isinstance(out, MPSTemporaryImage)
        out.readCount = 0
        dst = blank(4, 4, 5, fmt=FMT.float16)
        gradient.encode(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=state,
                        destinationGradient=dst)
        assert state.readCount == 0
        cb.commit()
        cb.waitUntilCompleted()
    x, g = values(src), values(e)
    want = g * 1.5 * 0.5 * (1 - np.tanh(0.5 * x) ** 2)
    assert_close(values(dst), values(image(want, FMT.float16)), "float16")


def test_batch_forms_and_the_descriptor():
    rng = np.random.default_rng(12)
    forward, gradient = pair(MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.sigmoid))
    srcs = [image(rng.uniform(-1, 1, (3, 4, 2))) for _ in range(2)]
    es = [image(rng.uniform(-1, 1, (3, 4, 2))) for _ in range(2)]
    cb = QUEUE.makeCommandBuffer()
    states = forward.resultStateBatch(sourceImage=srcs)
    assert states[0] is not states[1] and not forward.isResultStateReusedAcrossBatch()  # one per image
    forward.encodeBatch(commandBuffer=cb, sourceImages=srcs, destinationImages=[blank(4, 3, 2), blank(4, 3, 2)],
                        destinationStates=states)
    gradient.destinationImageAllocator = MPSImage.defaultAllocator()
    out = gradient.encodeBatch(commandBuffer=cb, sourceGradients=es, sourceImages=srcs, gradientStates=states)
    d = gradient.destinationImageDescriptor(sourceImages=[es[0], srcs[0]], sourceStates=[states[0]])
    assert (d.width, d.height, d.featureChannels) == (4, 3, 2)
    cb.commit()
    cb.waitUntilCompleted()
    for got, src, e in zip(out, srcs, es):
        s = 1 / (1 + np.exp(-values(src)))
        assert_close(values(got), values(e) * s * (1 - s), "float32")


def test_refusals_name_the_problem_and_write_nothing():
    rng = np.random.default_rng(13)
    forward, gradient = pair(MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU, a=0.1))
    src = image(rng.uniform(-1, 1, (4, 4, 2)))
    cb = QUEUE.makeCommandBuffer()
    state = forward.resultState(sourceImage=src)
    dst = image(np.full((4, 4, 2), 7.0))
    good = dict(commandBuffer=cb, sourceGradient=image(rng.uniform(-1, 1, (4, 4, 2))), sourceImage=src,
                gradientState=state, destinationGradient=dst)
    with pytest.raises(MPSValueError, match="not filled by a forward encode"):
        gradient.encode(**good)
    forward.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(4, 4, 2))
    other = MPSCNNNeuronGradient(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLU))
    conv = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 2, 2), np.eye(2)))
    bad = [
        (other, dict(good), MPSValueError, "make it from the forward neuron's descriptor"),
        (gradient, dict(good, gradientState=conv.resultState(sourceImage=src)), MPSTypeError, "MPSNNGradientState"),
        (gradient, dict(good, sourceGradient=blank(3, 4, 2)), MPSValueError, "forward clip region's 4x4"),
        (gradient, dict(good, destinationGradient=blank(4, 3, 2)), MPSValueError, "forward source's size"),
        (gradient, dict(good, destinationGradient=src), MPSValueError, "shares storage with sourceImage"),
        (gradient, dict(good, sourceImage=blank(5, 4, 2)), MPSValueError, "the forward source was 4x4"),
    ]
    for kernel, args, error, message in bad:
        with pytest.raises(error, match=message):
            kernel.encode(**args)
    gradient.encode(**good)
    cb.commit()
    cb.waitUntilCompleted()
    x = values(src)
    assert_close(values(dst), values(good["sourceGradient"]) * np.where(x >= 0, 1.0, 0.1), "float32")
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        gradient.encode(**good)


def test_the_gradient_archives_with_its_activation():
    descriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(np.array([0.5, -0.25], np.float32))
    gradient = MPSCNNNeuronGradient(device=DEVICE, neuronDescriptor=descriptor)
    gradient.destinationFeatureChannelOffset = 1
    back = NSKeyedUnarchiver.unarchivedObject(MPSCNNNeuronGradient, NSKeyedArchiver.archivedData(withRootObject=gradient))
    assert type(back) is MPSCNNNeuronGradient and back.neuronType == T.pReLU
    assert bytes(back.data) == bytes(gradient.data) and back.destinationFeatureChannelOffset == 1


@pytest.mark.skipif(not triton_backend.available(), reason="Triton is not installed")
def test_clamped_reads_of_one_pixel_leave_the_triton_pass_for_torch():
    """The fused pass writes each source pixel once; where the clamp edge reads one pixel twice
    the torch backend runs it (and the result still sums both reads)."""
    forward, gradient = pair(MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.linear, a=2.0))
    forward.offset, forward.edgeMode = MPSOffset(-1, 0, 0), MPSImageEdgeMode.clamp
    src, e = image([[[1.0], [2.0], [3.0]]]), image([[[1.0], [10.0], [100.0]]])
    calls = []
    real = triton_backend.neuron_gradient
    with mock.patch.object(triton_backend.BACKEND, "neuron_gradient",
                           staticmethod(lambda *a: (calls.append(1), real(*a)))):
        got = forward_backward(forward, gradient, src, e, "triton", blank(3, 1, 1))
        assert calls == [] and got[0, 0, :, 0].tolist() == [22.0, 200.0, 0.0]  # pixel 0 read by E[0] and E[1]
        forward.offset = MPSOffset(0, 0, 0)
        got = forward_backward(forward, gradient, src, e, "triton", blank(3, 1, 1))
        assert calls == [1] and got[0, 0, :, 0].tolist() == [2.0, 20.0, 200.0]


def test_the_allocating_batch_encode_makes_a_state_per_image():
    rng = np.random.default_rng(14)
    forward, gradient = pair(MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.softSign))
    srcs = [image(rng.uniform(-1, 1, (2, 3, 4))) for _ in range(3)]
    es = [image(rng.uniform(-1, 1, (2, 3, 4))) for _ in range(3)]
    cb = QUEUE.makeCommandBuffer()
    outs, states = forward.encodeBatch(commandBuffer=cb, sourceImages=srcs, destinationStateIsTemporary=False)
    assert len({id(s) for s in states}) == 3 and all(s._problem is not None for s in states)
    for out in outs:
        out.readCount = 0
    dsts = [blank(3, 2, 4) for _ in range(3)]
    gradient.encodeBatch(commandBuffer=cb, sourceGradients=es, sourceImages=srcs, gradientStates=states,
                         destinationGradients=dsts)
    cb.commit()
    cb.waitUntilCompleted()
    for dst, src, e in zip(dsts, srcs, es):
        assert_close(values(dst), values(e) / (1 + np.abs(values(src))) ** 2, "float32")
