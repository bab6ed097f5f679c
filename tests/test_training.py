"""Training with mpsconv kernels the way MPS code does (issue 4): forward encodes that record
states, gradient kernels, plain SGD written in a data source, weights reloaded from it; and
archives carrying trained weights."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, ArraySource, blank, descriptor, image, values
from mpsconv import *


class SGDSource(ArraySource):
    """A data source whose weights a training loop updates (spec §12.3, CPU workflow)."""

    def step(self, state, lr):
        grad_w = np.frombuffer(state.gradientForWeights.contents().tobytes(), np.float32)
        grad_b = np.frombuffer(state.gradientForBiases.contents().tobytes(), np.float32)
        self.w = (self.w.reshape(-1) - lr * grad_w).astype(np.float32)
        self.b = (self.b - lr * grad_b).astype(np.float32)


def layer(kind, kw, kh, cin, cout, rng, **props):
    d = descriptor(kw, kh, cin, cout, **props)
    if kind == "conv":
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.none)
    ds = SGDSource(d, (rng.standard_normal(cout * kh * kw * cin) * 0.3).astype(np.float32), np.zeros(cout, np.float32),
                   kernel_type=MPSDataType.float32)
    fwd_cls, grad_cls = (MPSCNNConvolution, MPSCNNConvolutionGradient) if kind == "conv" else \
        (MPSCNNFullyConnected, MPSCNNFullyConnectedGradient)
    return ds, fwd_cls(device=DEVICE, weights=ds), grad_cls(device=DEVICE, weights=ds)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_two_layer_network_learns(backend):
    """conv 3x3 (stride 2, 1 -> 4 channels) -> ReLU (applied by hand on the CPU) -> fully connected
    (-> 2 classes), squared error on a fixed batch; SGD in the data sources; the loss halves."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 6, 1))
    labels = (x[:, :3].sum(axis=(1, 2, 3)) > x[:, 3:].sum(axis=(1, 2, 3))).astype(int)
    target = np.eye(2)[labels]
    ds1, conv1, grad1 = layer("conv", 3, 3, 1, 4, rng, strideInPixelsX=2, strideInPixelsY=2)
    ds2, fc, grad2 = layer("fc", 3, 3, 4, 2, rng)
    src = image(x)
    losses = []
    with use_backend(backend):
        for step in range(40):
            cb = QUEUE.makeCommandBuffer()
            h = blank(3, 3, 4, images=16)
            state1 = conv1.resultState(sourceImage=src)
            conv1.encode(commandBuffer=cb, sourceImage=src, destinationState=state1, destinationImage=h)
            cb.commit()
            cb.waitUntilCompleted()
            pre = values(h)
            hidden = image(np.maximum(pre, 0))  # ReLU on the CPU: its gradient is a mask
            cb = QUEUE.makeCommandBuffer()
            out = blank(1, 1, 2, images=16)
            state2 = fc.resultState(sourceImage=hidden)
            fc.encode(commandBuffer=cb, sourceImage=hidden, destinationState=state2, destinationImage=out)
            cb.commit()
            cb.waitUntilCompleted()
            y = values(out)[:, 0, 0]
            losses.append(float(((y - target) ** 2).mean()))
            e_out = image((2 * (y - target) / y.size)[:, None, None, :])
            cb = QUEUE.makeCommandBuffer()
            d_hidden = blank(3, 3, 4, images=16)
            grad2.destinationImageDescriptor(sourceImages=[e_out, hidden], sourceStates=[state2])  # sets the offsets
            grad2.encode(commandBuffer=cb, sourceGradient=e_out, sourceImage=hidden, gradientState=state2,
                         destinationGradient=d_hidden)
            cb.commit()
            cb.waitUntilCompleted()
            e_h = image(values(d_hidden) * (pre > 0))
            cb = QUEUE.makeCommandBuffer()
            grad1.gradientOption = MPSCNNConvolutionGradientOption.gradientWithWeightsAndBias
            grad1.destinationImageDescriptor(sourceImages=[e_h, src], sourceStates=[state1])
            grad1.encode(commandBuffer=cb, sourceGradient=e_h, sourceImage=src, gradientState=state1,
                         destinationGradient=blank(6, 6, 1, images=16))
            cb.commit()
            cb.waitUntilCompleted()
            for ds, state, kernels in ((ds1, state1, (conv1, grad1)), (ds2, state2, (fc, grad2))):
                ds.step(state, lr=0.5)
                for kernel in kernels:  # spec §11.7: reload both the forward and the gradient kernel
                    kernel.reloadWeightsAndBiasesFromDataSource()
    assert losses[-1] <= 0.5 * losses[0], losses


def test_trained_weights_survive_an_archive(tmp_path):
    rng = np.random.default_rng(1)
    ds, k, grad = layer("conv", 3, 3, 2, 3, rng)
    ds.w = (ds.w + 1.0).astype(np.float32)  # "trained"
    k.reloadWeightsAndBiasesFromDataSource()
    save(k, tmp_path / "trained.mpsconv")
    back = load(tmp_path / "trained.mpsconv", device=DEVICE)
    src = image(rng.uniform(-1, 1, (5, 5, 2)))
    outs = []
    for kernel in (k, back):
        cb = QUEUE.makeCommandBuffer()
        dst = blank(5, 5, 3)
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()
        outs.append(values(dst))
    np.testing.assert_array_equal(outs[0], outs[1])
    g_back = NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolutionGradient, NSKeyedArchiver.archivedData(withRootObject=grad))
    assert type(g_back) is MPSCNNConvolutionGradient and g_back.gradientOption == grad.gradientOption


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fully_connected_gradient_is_the_vjp(backend):
    rng = np.random.default_rng(2)
    ds, fc, grad = layer("fc", 2, 3, 3, 4, rng)
    x, e = rng.standard_normal((2, 3, 2, 3)), rng.standard_normal((2, 1, 1, 4))
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        src = image(x)
        state = fc.resultState(sourceImage=src)
        fc.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(1, 1, 4, images=2))
        d_src = blank(2, 3, 3, images=2)
        grad.destinationImageDescriptor(sourceImages=[d_src, src], sourceStates=[state])  # sets the offsets
        grad.encode(commandBuffer=cb, sourceGradient=image(e), sourceImage=src, gradientState=state,
                    destinationGradient=d_src)
        cb.commit()
        cb.waitUntilCompleted()
    w = ds.w.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(values(d_src).reshape(2, -1), e.reshape(2, 4) @ w, rtol=1e-5, atol=1e-6)
    d_w = np.frombuffer(state.gradientForWeights.contents().tobytes(), np.float32)
    np.testing.assert_allclose(d_w.reshape(4, -1), e.reshape(2, 4).T @ x.reshape(2, -1), rtol=1e-5, atol=1e-5)


class CPUUpdate(ArraySource):
    """The CPU form: update(gradientState, sourceState) -> bool, then the executor reloads."""

    def update(self, gradientState, sourceState):
        grad_w = np.frombuffer(gradientState.gradientForWeights.contents().tobytes(), np.float32)
        weights = np.frombuffer(sourceState.weights.contents().tobytes(), np.float32)
        self.w = (weights - 0.5 * grad_w).astype(np.float32)
        self.calls.append("update")
        return True


class GPUUpdate(ArraySource):
    """The GPU form: update(commandBuffer, gradientState, sourceState) -> a new weights state."""

    def update(self, commandBuffer, gradientState, sourceState):
        new = MPSCNNConvolutionWeightsAndBiasesState.temporaryCNNConvolutionWeightsAndBiasesState(
            commandBuffer=commandBuffer, cnnConvolutionDescriptor=self.desc)
        grad_w = np.frombuffer(gradientState.gradientForWeights.contents().tobytes(), np.float32)
        weights = np.frombuffer(sourceState.weights.contents().tobytes(), np.float32)
        new.weights.contents()[:] = np.frombuffer((weights - 0.5 * grad_w).astype(np.float32).tobytes(), np.uint8)
        sourceState.readCount = max(0, sourceState.readCount - 1)  # the callback owns both reads (spec §6.4)
        return new


@pytest.mark.parametrize("form", [CPUUpdate, GPUUpdate])
def test_data_source_update_callbacks(form):
    """One training step through the data source's update callback; both kernels see the new weights."""
    d = descriptor(1, 1, 1, 1)
    ds = form(d, np.array([1.0], np.float32), kernel_type=MPSDataType.float32)
    fwd, grad = MPSCNNConvolution(device=DEVICE, weights=ds), MPSCNNConvolutionGradient(device=DEVICE, weights=ds)
    src = image([[[2.0]]])
    cb = QUEUE.makeCommandBuffer()
    state = fwd.resultState(sourceImage=src)
    fwd.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(1, 1, 1))
    grad.encode(commandBuffer=cb, sourceGradient=image([[[1.0]]]), sourceImage=src, gradientState=state,
                destinationGradient=blank(1, 1, 1))
    if form is GPUUpdate:  # the GPU form reads the gradient now: it must exist now
        cb.commit()
        cb.waitUntilCompleted()
        cb = QUEUE.makeCommandBuffer()
    encode_data_source_update(cb, state, fwd, grad)
    cb.commit()
    cb.waitUntilCompleted()
    # dW = E·S = 2, so w = 1 - 0.5·2 = 0
    assert fwd._loaded.weights.reshape(-1).tolist() == [0.0] and grad._loaded.weights.reshape(-1).tolist() == [0.0]
