"""``mpsconv demo``: a small CNN trained on scikit-learn's handwritten digits, built only from
mpsconv kernels (our addition).

    conv 3x3, 1 -> 16, ReLU                  8x8  -> 8x8   (MPSCNNConvolution, MPSCNNNeuron)
    conv 3x3 stride 2, 16 -> 32, ReLU        8x8  -> 4x4   (strided MPSCNNConvolution downsamples)
    fully connected 4x4x32 -> 10             4x4  -> 1x1   (MPSCNNFullyConnected)

Training: softmax cross-entropy (in PyTorch, on the images' memory); the gradient kernels
(MPSCNNNeuronGradient, MPSCNNConvolutionGradient, MPSCNNFullyConnectedGradient) give the source,
weight and bias gradients in one command buffer; momentum SGD runs in each data source's
``update(gradientState, sourceState)`` through ``encode_data_source_update`` when it completes.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from .coding import load, save
from .convolution import MPSCNNConvolution, MPSCNNFullyConnected
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNConvolutionGradientOption
from .gradient import (
    MPSCNNConvolutionGradient, MPSCNNFullyConnectedGradient, MPSCNNNeuronGradient, encode_data_source_update,
)
from .image import MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat
from .layout import MPSCNNConvolutionWeights
from .core.activations import MPSCNNNeuronType
from .neuron import MPSCNNNeuron, MPSNNNeuronDescriptor


class MomentumSGD(MPSCNNConvolutionWeights):
    """A data source that trains itself: the CPU form of ``update`` (``encode_data_source_update``)."""

    def __init__(self, descriptor, weights, bias, lr: float, momentum: float = 0.9, label=None):
        super().__init__(descriptor, weights, bias, label=label)
        self.lr, self.momentum = lr, momentum
        self._vw, self._vb = np.zeros_like(self.weights_array.reshape(-1)), np.zeros_like(self.bias_array)

    def update(self, gradientState, sourceState):
        gw = np.frombuffer(gradientState.gradientForWeights.contents().tobytes(), np.float32)
        gb = np.frombuffer(gradientState.gradientForBiases.contents().tobytes(), np.float32)
        self._vw = self.momentum * self._vw + gw
        self._vb = self.momentum * self._vb + gb
        self.weights_array = self.weights_array.reshape(-1) - self.lr * self._vw
        self.bias_array = self.bias_array - self.lr * self._vb
        return True


LAYERS = [  # name, kernel, cin, cout, stride, relu, fully connected
    ("conv1", 3, 1, 16, 1, True, False),
    ("conv2", 3, 16, 32, 2, True, False),
    ("fc", 4, 32, 10, 1, False, True),
]
SIZES = [(8, 8, 1), (8, 8, 16), (4, 4, 32), (1, 1, 10)]  # H, W, C of each layer's source, then the output


class Network:
    """The three weighted kernels, the ReLU neurons after the first two, their gradient kernels and
    the data sources, on one device."""

    def __init__(self, device, rng, lr: float):
        self.device = device
        self.queue = device.makeCommandQueue()
        self.forward, self.backward, self.relu = [], [], {}
        relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.0)
        for i, (name, k, cin, cout, stride, has_relu, fc) in enumerate(LAYERS):
            d = MPSCNNConvolutionDescriptor(kernelWidth=k, kernelHeight=k, inputFeatureChannels=cin,
                                            outputFeatureChannels=cout)
            d.strideInPixelsX = d.strideInPixelsY = stride
            if has_relu:  # a neuron kernel of its own, not fused: training needs its source, the conv's output
                self.relu[i] = (MPSCNNNeuron(device=device, neuronDescriptor=relu),
                                MPSCNNNeuronGradient(device=device, neuronDescriptor=relu))
            fan_in = k * k * cin
            ds = MomentumSGD(d, rng.standard_normal(cout * fan_in) * np.sqrt(2.0 / fan_in), np.zeros(cout), lr,
                             label=name)
            self.forward.append((MPSCNNFullyConnected if fc else MPSCNNConvolution)(device=device, weights=ds))
            grad = (MPSCNNFullyConnectedGradient if fc else MPSCNNConvolutionGradient)(device=device, weights=ds)
            grad.gradientOption = MPSCNNConvolutionGradientOption.all
            self.backward.append(grad)

    def image(self, values) -> MPSImage:
        return MPSImage.from_numpy(values, device=self.device)

    def blank(self, n: int, size) -> MPSImage:
        h, w, c = size
        return MPSImage(device=self.device, imageDescriptor=MPSImageDescriptor(
            channelFormat=MPSImageFeatureChannelFormat.float32, width=w, height=h, featureChannels=c,
            numberOfImages=n))

    def steps(self, kernels=None) -> list:
        """``(forward kernel, its gradient kernel, output size)`` in order: each weighted layer, then
        its ReLU where it has one."""
        steps = []
        for i, (kernel, size) in enumerate(zip(kernels or self.forward, SIZES[1:])):
            steps.append((kernel, self.backward[i], size))
            if i in self.relu:
                steps.append((*self.relu[i], size))
        return steps

    def logits(self, x: np.ndarray, kernels=None) -> np.ndarray:
        """Inference: one command buffer, five encodes."""
        cb = self.queue.makeCommandBuffer()
        img = self.image(x)
        for kernel, _, size in self.steps(kernels):
            out = self.blank(len(x), size)
            kernel.encode(commandBuffer=cb, sourceImage=img, destinationImage=out)
            img = out
        cb.commit()
        cb.waitUntilCompleted()
        return img.numpy()[:, 0, 0, :]

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> float:
        n = len(x)
        cb = self.queue.makeCommandBuffer()
        steps = self.steps()
        sources, states = [self.image(x)], []
        for kernel, _, size in steps:
            state = kernel.resultState(sourceImage=sources[-1])
            out = self.blank(n, size)
            kernel.encode(commandBuffer=cb, sourceImage=sources[-1], destinationState=state, destinationImage=out)
            sources.append(out)
            states.append(state)
        cb.commit()
        cb.waitUntilCompleted()
        # softmax and the loss are not MPS convolutions: PyTorch runs them on the image's own memory
        # (image.torch() is a view), and writes the loss gradient into an image the same way
        rows = torch.arange(n)
        p = torch.softmax(sources[-1].torch()[:, 0, 0, :].double(), dim=1)
        loss = float(-torch.log(p[rows, labels] + 1e-12).mean())
        p[rows, labels] -= 1.0
        error = self.blank(n, SIZES[-1])
        error.torch()[:, 0, 0, :] = p / n
        cb = self.queue.makeCommandBuffer()  # the whole backward pass
        for i in reversed(range(len(steps))):
            forward, gradient, _ = steps[i]
            source = sources[i]
            d_src = self.blank(n, (source.height, source.width, source.featureChannels))
            if not isinstance(gradient, MPSCNNNeuronGradient):
                # the state sets the kernel's offsets (kernelOffsetX/Y, secondaryOffset), as MPS asks
                gradient.destinationImageDescriptor(sourceImages=[error, source], sourceStates=[states[i]])
            gradient.encode(commandBuffer=cb, sourceGradient=error, sourceImage=source, gradientState=states[i],
                            destinationGradient=d_src)
            if not isinstance(gradient, MPSCNNNeuronGradient):
                # the CPU form of update runs when this command buffer completes, after every gradient
                encode_data_source_update(cb, states[i], forward, gradient)
            error = d_src
        cb.commit()
        cb.waitUntilCompleted()
        return loss


def digits(seed: int):
    """scikit-learn's 8x8 digits (shipped with it, no download), scaled to [0, 1], split 80 / 20."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], data.target[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def progress(epoch: int, epochs: int, step: int, steps: int, loss: float, stream) -> None:
    """A bar redrawn in place on a terminal; one line an epoch elsewhere (a log keeps no carriage returns)."""
    terminal = getattr(stream, "isatty", lambda: False)()
    if not terminal:
        if step == steps:
            stream.write(f"epoch {epoch}/{epochs}: loss {loss:.3f}\n")
            stream.flush()
        return
    width = 30
    done = int(width * step / steps)
    stream.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] {step}/{steps} loss {loss:.3f}")
    if step == steps:
        stream.write("\n")
    stream.flush()


def figure(net: Network, x_test, y_test, pred, path: Path) -> None:
    """First-layer filters, some test digits with predictions, the confusion matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.5), dpi=100)
    grid = fig.add_gridspec(4, 12)
    w = net.forward[0]._loaded.weights[..., 0]  # [16][3][3]
    for i in range(16):
        ax = fig.add_subplot(grid[i // 4, i % 4])
        ax.imshow(w[i], cmap="RdBu", vmin=-abs(w).max(), vmax=abs(w).max())
        ax.axis("off")
    fig.text(0.17, 0.95, "conv1 filters", ha="center")
    for i in range(8):
        ax = fig.add_subplot(grid[(i // 4) * 2:(i // 4) * 2 + 2, 4 + i % 4])
        ax.imshow(x_test[i, ..., 0], cmap="gray_r")
        ok = pred[i] == y_test[i]
        ax.set_title(f"{pred[i]}" + ("" if ok else f" (is {y_test[i]})"), color="green" if ok else "red", fontsize=9)
        ax.axis("off")
    fig.text(0.5, 0.95, "test digits: prediction", ha="center")
    ax = fig.add_subplot(grid[:, 8:])
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (y_test, pred), 1)
    ax.imshow(confusion, cmap="Blues")
    for (r, c), v in np.ndenumerate(confusion):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white" if v > confusion.max() / 2 else "black")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.savefig(path)
    plt.close(fig)


def run(device, *, epochs: int = 8, out: Path = Path("mpsconv-demo"), seed: int = 0, batch: int = 32,
        lr: float = 0.05, stream=sys.stderr, echo=print) -> float:
    """Train, test, save, reload, draw; returns the held-out accuracy."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits(seed)
    rng = np.random.default_rng(seed)
    net = Network(device, rng, lr)
    echo(f"digits: {len(x_train)} training and {len(x_test)} held-out 8x8 images; device {device.name}")
    steps = (len(x_train) + batch - 1) // batch
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            losses.append(net.train_step(x_train[idx], y_train[idx]))
            progress(epoch, epochs, step + 1, steps, float(np.mean(losses[-10:])), stream)
    logits = net.logits(x_test)
    pred = logits.argmax(axis=1)
    accuracy = float((pred == y_test).mean())
    echo(f"held-out accuracy: {accuracy:.1%} ({int((pred == y_test).sum())}/{len(y_test)}) "
         f"after {epochs} epoch(s), {time.perf_counter() - start:.1f} s")
    paths = []
    for kernel, (name, *_rest) in zip(net.forward, LAYERS):
        paths.append(out / f"digits-{name}.mpsconv")
        save(kernel, paths[-1])
    reloaded = [load(p, device=device) for p in paths]
    same = np.array_equal(net.logits(x_test, reloaded), logits)
    echo(f"saved {', '.join(str(p) for p in paths)}; reloaded network predicts "
         + ("identically" if same else "DIFFERENTLY"))
    figure(net, x_test, y_test, pred, out / "digits.png")
    echo(f"wrote {out / 'digits.png'}")
    if not same:
        raise RuntimeError("the reloaded kernels do not reproduce the trained network's outputs")
    return accuracy
