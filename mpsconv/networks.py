"""Whole networks for the benchmarks (our addition): the convolutions of MobileNetV2, of the ResNet-50
body and of an Inception-style block, as MPS encodes into one command buffer and as the same
network in PyTorch.

A network is a list of ``Layer``s, each reading one image and writing one image (or, for the
Inception block's branches, a channel slice of one: MPS's concatenation). Only the convolutions
are there, each with its bias and fused neuron (MobileNetV2's ReLU6, ResNet's ReLU); pooling and
the residual additions are not part of the MPS convolution family, so both sides leave them out.

``Ours`` builds the images and kernels and encodes the whole network into one command buffer;
``Eager`` runs the same network in PyTorch (channels-last ``conv2d`` with bias, the activation in
place, ``torch.cat`` for the concatenation) on the same data and weights. ``timing`` alternates
contenders in rounds and reports medians with their spread. ``benchmarks/networks.py`` adds the
other peers (``torch.compile``, ONNX Runtime, CUDA graphs) and the per-layer mode; ``mpsconv bench
--networks`` runs ours against eager.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .timing import busy, spread_warning  # noqa: F401  (re-exported for benchmarks/networks.py)
from .convolution import MPSCNNConvolution
from .core.activations import MPSCNNNeuronType
from .core.formats import MPSImageFeatureChannelFormat
from .core.geometry import offset_for_padding, torch_output_size
from .datasource import _ArrayDataSource
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNDepthWiseConvolutionDescriptor
from .image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from .layout import weights_from_oihw
from .neuron import MPSNNNeuronDescriptor
from .types import MPSDataType, MPSOffset


class Layer(NamedTuple):
    """One convolution: ``src`` image -> channels ``[offset, offset + cout)`` of image ``dst``; a
    ``k`` x ``k`` window at ``stride``, padded ``k // 2`` as PyTorch would; ``neuron`` is ``relu6``,
    ``relu`` or None."""

    name: str
    src: str
    dst: str
    cin: int
    cout: int
    k: int = 1
    stride: int = 1
    groups: int = 1
    neuron: str | None = None
    offset: int = 0


class Network(NamedTuple):
    name: str
    input: str
    size: tuple[int, int, int]  # the input's (height, width, channels)
    layers: list[Layer]
    output: str


def mobilenet_v2(size: int = 224) -> Network:
    """MobileNetV2's 52 convolutions: the 3x3/2 stem, 17 inverted residual blocks (1x1 expansion and
    3x3 depthwise with ReLU6, linear 1x1 projection), the final 1x1 to 1280 channels."""
    layers = [Layer("stem", "input", "x0", 3, 32, 3, 2, neuron="relu6")]
    blocks = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1)]  # expansion t, channels c, repeats n, first stride s
    cin, i = 32, 0
    for t, c, n, s in blocks:
        for j in range(n):
            stride, hidden, src = (s if j == 0 else 1), cin * t, f"x{i}"
            if t != 1:
                layers.append(Layer(f"b{i}_expand", src, f"x{i}e", cin, hidden, neuron="relu6"))
                src = f"x{i}e"
            layers.append(Layer(f"b{i}_dw", src, f"x{i}d", hidden, hidden, 3, stride, hidden, "relu6"))
            layers.append(Layer(f"b{i}_project", f"x{i}d", f"x{i + 1}", hidden, c))
            cin, i = c, i + 1
    layers.append(Layer("head", f"x{i}", "output", cin, 1280, neuron="relu6"))
    return Network(f"mobilenetv2_{size}", "input", (size, size, 3), layers, "output")


def resnet50_body(size: int = 56) -> Network:
    """The ResNet-50 body's 48 convolutions from its 56x56x64 stem output: 16 bottlenecks of 1x1
    reduction, 3x3 (stride 2 first in stages 2-4), 1x1 expansion, each with ReLU."""
    layers, cin, i = [], 64, 0
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for j in range(blocks):
            src = "input" if i == 0 else f"x{i}"
            layers += [Layer(f"b{i}_reduce", src, f"x{i}r", cin, width, neuron="relu"),
                       Layer(f"b{i}_3x3", f"x{i}r", f"x{i}m", width, width, 3, stride if j == 0 else 1, neuron="relu"),
                       Layer(f"b{i}_expand", f"x{i}m", f"x{i + 1}", width, 4 * width, neuron="relu")]
            cin, i = 4 * width, i + 1
    layers[-1] = layers[-1]._replace(dst="output")
    return Network(f"resnet50_body_{size}", "input", (size, size, 64), layers, "output")


def inception(size: int = 28) -> Network:
    """An Inception (v1 3a) block on 28x28x192: four branches (1x1; 1x1 then 3x3; 1x1 then 5x5; a 1x1
    projection) writing channel slices of one 256-channel image."""
    relu = "relu"
    layers = [Layer("1x1", "input", "output", 192, 64, neuron=relu, offset=0),
              Layer("3x3_reduce", "input", "r3", 192, 96, neuron=relu),
              Layer("3x3", "r3", "output", 96, 128, 3, neuron=relu, offset=64),
              Layer("5x5_reduce", "input", "r5", 192, 16, neuron=relu),
              Layer("5x5", "r5", "output", 16, 32, 5, neuron=relu, offset=192),
              Layer("pool_proj", "input", "output", 192, 32, neuron=relu, offset=224)]
    return Network(f"inception_{size}", "input", (size, size, 192), layers, "output")


NETWORKS = {"mobilenetv2": mobilenet_v2, "resnet50": resnet50_body, "inception": inception}


def shapes(net: Network) -> dict[str, tuple[int, int, int]]:
    """Every image's (height, width, channels): a layer's output size as PyTorch computes it; an image
    written by several layers takes the channels they write together."""
    out = {net.input: net.size}
    for layer in net.layers:
        h, w, _ = out[layer.src]
        oh, ow = (torch_output_size(n, layer.k, layer.stride, layer.k // 2) for n in (h, w))
        _, _, c = out.get(layer.dst, (oh, ow, 0))
        out[layer.dst] = (oh, ow, max(c, layer.offset + layer.cout))
    return out


def random_weights(net: Network, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, float32 OIHW weights scaled to keep activations of order one, and a bias."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in net.layers:
        fan_in = layer.k * layer.k * layer.cin // layer.groups
        w = rng.standard_normal((layer.cout, layer.cin // layer.groups, layer.k, layer.k)) * math.sqrt(2.0 / fan_in)
        out[layer.name] = (w.astype(np.float32), (0.1 * rng.standard_normal(layer.cout)).astype(np.float32))
    return out


_NEURONS = {"relu6": (MPSCNNNeuronType.reLUN, 0.0, 6.0), "relu": (MPSCNNNeuronType.reLU, 0.0, 0.0)}
FORMATS = {torch.float32: MPSImageFeatureChannelFormat.float32, torch.float16: MPSImageFeatureChannelFormat.float16,
           torch.bfloat16: MPSImageFeatureChannelFormat.bfloat16}


class LayerWeights(_ArrayDataSource):
    """One layer's parameters as MPS code supplies them: the ``[O][kH][kW][I/G]`` weights made from the
    caller's OIHW array in ``load()`` and dropped in ``purge()`` (Apple's samples read them from a
    file there), so that the kernel holds the only copy of its own."""

    def __init__(self, descriptor, oihw: np.ndarray, bias: np.ndarray, kernel_type: MPSDataType, label: str):
        super().__init__(descriptor, None, bias, kernel_type, label)
        self._oihw = oihw

    def load(self):
        self._weights = weights_from_oihw(self._oihw)
        return True

    def purge(self):
        self._weights = None


def kernel_for(layer: Layer, weights, bias, device, kernel_type=MPSDataType.float32) -> MPSCNNConvolution:
    """The MPS kernel of one layer: its descriptor (depthwise where each channel is a group), fused
    neuron, float32 weights kept at ``kernel_type`` (``kernelWeightsDataType``), PyTorch's padding as
    an offset, and the channel offset it writes at."""
    depthwise = layer.groups > 1 and layer.groups == layer.cin == layer.cout
    cls = MPSCNNDepthWiseConvolutionDescriptor if depthwise else MPSCNNConvolutionDescriptor
    d = cls(kernelWidth=layer.k, kernelHeight=layer.k, inputFeatureChannels=layer.cin, outputFeatureChannels=layer.cout)
    d.strideInPixelsX = d.strideInPixelsY = layer.stride
    if not depthwise:
        d.groups = layer.groups
    if layer.neuron is not None:
        kind, a, b = _NEURONS[layer.neuron]
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(kind, a=a, b=b)
    kernel = MPSCNNConvolution(device=device, weights=LayerWeights(d, weights, bias, kernel_type, layer.name))
    o = offset_for_padding(layer.k, 1, layer.k // 2)
    kernel.offset = MPSOffset(o, o, 0)
    kernel.destinationFeatureChannelOffset = layer.offset
    return kernel


class Ours:
    """A network as MPS encodes: one image per tensor (whole images; the Inception block's branches
    write slices of one), one kernel per layer, all encoded into one command buffer. With
    ``temporary``, the images between the input and the output are ``MPSTemporaryImage``s, made for
    each command buffer and read as many times as layers read them (what MPS code does for speed)."""

    def __init__(self, net: Network, weights: dict, batch: int, device, dtype=torch.float32,
                 temporary: bool = False):
        self.net, self.device, self.temporary = net, device, temporary
        fmt = FORMATS[dtype]
        self.descriptors = {name: MPSImageDescriptor(channelFormat=fmt, width=w, height=h, featureChannels=c,
                                                     numberOfImages=batch) for name, (h, w, c) in shapes(net).items()}
        kept = {net.input, net.output} if temporary else set(self.descriptors)
        self.images = {name: MPSImage(device=device, imageDescriptor=self.descriptors[name]) for name in kept}
        # float16 networks keep MPS's default float16 kernel weights, as ported MPS code has them (and
        # eager's float16 copy holds the same values); float32 ones keep PyTorch's float32 weights, and
        # bfloat16 kernels round those to bfloat16 as eager's cast does
        kernel_type = MPSDataType.float16 if dtype == torch.float16 else MPSDataType.float32
        self.kernels = [(kernel_for(layer, *weights[layer.name], device, kernel_type), layer.src, layer.dst)
                        for layer in net.layers]
        self.reads = {}
        for layer in net.layers:
            self.reads[layer.src] = self.reads.get(layer.src, 0) + 1
        self.queue = device.makeCommandQueue()
        self._replayable = None

    def load(self, x: torch.Tensor) -> None:
        """The input's values (NHWC)."""
        image = self.images[self.net.input]
        image.torch().copy_(x.to(image.torch().device))

    def encode(self, cb) -> None:
        images = dict(self.images)
        for name, descriptor in self.descriptors.items():
            if name not in images:
                images[name] = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=descriptor)
                images[name].readCount = self.reads.get(name, 0)
        for kernel, src, dst in self.kernels:
            kernel.encode(commandBuffer=cb, sourceImage=images[src], destinationImage=images[dst])

    def __call__(self) -> None:
        """Encode the whole network into one command buffer, commit, wait."""
        cb = self.queue.makeCommandBuffer()
        self.encode(cb)
        cb.commit()
        cb.waitUntilCompleted()

    def replay(self) -> None:
        """The same command buffer replayed (``make_replayable``): recorded once, then run again."""
        if self._replayable is None:
            cb = self.queue.makeCommandBuffer()
            self.encode(cb)
            cb.make_replayable()
            cb.commit()
            cb.waitUntilCompleted()
            self._replayable = cb
        self._replayable.replay().waitUntilCompleted()

    def layer(self, index: int):
        """One layer alone: encode it into a command buffer of its own, commit, wait (whole images)."""
        kernel, src, dst = self.kernels[index]
        src, dst = (self.images.get(name) or MPSImage(device=self.device, imageDescriptor=self.descriptors[name])
                    for name in (src, dst))

        def run():
            cb = self.queue.makeCommandBuffer()
            kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
            cb.commit()
            cb.waitUntilCompleted()
        return run

    def output(self) -> torch.Tensor:
        return self.images[self.net.output].torch()


class Eager:
    """The same network in PyTorch eager: NCHW channels-last tensors, ``conv2d`` with bias, the
    activation in place (``relu_``, ``hardtanh_(0, 6)``), ``torch.cat`` where layers write one image."""

    def __init__(self, net: Network, weights: dict, device: torch.device, dtype=torch.float32):
        self.net = net
        # its own copy of the weights, as ours has in its kernels (not views of the caller's arrays)
        self.params = {name: (torch.tensor(w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last),
                              torch.tensor(b, device=device, dtype=dtype)) for name, (w, b) in weights.items()}
        writers: dict[str, int] = {}
        self.last_read: dict[str, int] = {}  # a tensor is dropped after the last layer that reads it
        for i, layer in enumerate(net.layers):
            writers[layer.dst] = writers.get(layer.dst, 0) + 1
            self.last_read[layer.src] = i
        self.concatenated = {name for name, count in writers.items() if count > 1}

    def layer(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        w, b = self.params[layer.name]
        y = F.conv2d(x, w, b, layer.stride, layer.k // 2, 1, layer.groups)
        if layer.neuron == "relu6":
            y = F.hardtanh_(y, 0.0, 6.0)
        elif layer.neuron == "relu":
            y = y.relu_()
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the input, NCHW (channels-last); returns the output, NCHW."""
        tensors, parts = {self.net.input: x}, {}
        for i, layer in enumerate(self.net.layers):
            src = tensors.get(layer.src)
            if src is None:
                src = tensors[layer.src] = _concatenated(parts.pop(layer.src))
            if self.last_read[layer.src] == i:  # as a PyTorch user writes it, no tensor outlives its use
                del tensors[layer.src]
            y = self.layer(layer, src)
            del src
            if layer.dst in self.concatenated:
                parts.setdefault(layer.dst, []).append((layer.offset, y))
            else:
                tensors[layer.dst] = y
        out = self.net.output
        return tensors[out] if out in tensors else _concatenated(parts[out])

    def layer_alone(self, index: int, x: torch.Tensor):
        layer = self.net.layers[index]
        return lambda: self.layer(layer, x)


def _concatenated(parts: list) -> torch.Tensor:
    """``(channel offset, tensor)`` parts joined along the channels in offset order."""
    return torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])], 1)


# --------------------------------------------------------------------------------------------
# Timing


def synchronizer(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timing(contenders: dict, rounds: int = 5, budget_s: float = 1.0, sync=lambda: None,
           settle_s: float = 0.05) -> dict:
    """Seconds per call of each contender (a callable), timed in alternating rounds: per round, each
    runs untimed for ``settle_s``, then as many calls as fit in ``budget_s / rounds`` and its mean
    per call is one sample. Returns ``{name: (median, min, max)}`` over the rounds.

    The untimed calls let the thread pools of the contender before (OpenMP's, ONNX Runtime's) stop
    spinning on the cores this one needs, and this one's threads wake up: busy rather than asleep,
    since cores left idle for a while run the next calls up to twice as slowly, most of all those
    of a pool that parks its threads between calls (as our replay engine's session does)."""
    samples = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: compiles, plans, autotunes, first allocations
        fn()
        fn()
        sync()
    per_round = budget_s / rounds / max(1, len(contenders))
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync()
            start = time.perf_counter()
            while True:
                fn()
                sync()
                if time.perf_counter() - start >= settle_s:
                    break
            start, calls = time.perf_counter(), 0
            while True:
                fn()
                calls += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= per_round and calls >= 2:
                    break
            samples[name].append(elapsed / calls)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in samples.items()}


#: The largest ``max |ours - eager| / max |eager|`` that counts as the same network's output in
#: float32; in 16-bit types the floor under ``checked``'s comparison with the float32 network.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def checked(name: str, batch: int, net: Network, weights: dict, ours: torch.Tensor, eager: torch.Tensor,
            x: torch.Tensor) -> dict:
    """The errors of ``ours`` and ``eager`` (NCHW outputs of ``net`` on ``x``): ``rel_err`` between them,
    ``rel_err_ours_fp32`` and ``rel_err_eager_fp32`` against the float32 network (eager in float32),
    each ``max |a - b| / max |b|``. Raises ValueError where ours is not the same network's output: in
    float32 further than ``TOLERANCE`` from eager; in 16-bit types, where both round every layer's
    output (MobileNetV2's 52 layers in float16 at batch 32: about 5% from float32, both of them),
    further from the float32 network than ``TOLERANCE`` or 1.5x eager's own error, whichever is
    larger."""
    ours, eager = ours.float(), eager.float()
    exact = eager if x.dtype == torch.float32 else Eager(net, weights, x.device, torch.float32)(x.float())
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    errors = dict(rel_err=rel(ours, eager), rel_err_ours_fp32=rel(ours, exact), rel_err_eager_fp32=rel(eager, exact))
    if x.dtype == torch.float32:
        ok = errors["rel_err"] <= TOLERANCE[x.dtype]
    else:
        ok = errors["rel_err_ours_fp32"] <= max(TOLERANCE[x.dtype], 1.5 * errors["rel_err_eager_fp32"])
    if not ok:
        raise ValueError(f"{name} batch {batch}: ours and eager differ by {errors['rel_err']:.2e} (relative; from "
                         f"the float32 network: ours {errors['rel_err_ours_fp32']:.2e}, eager "
                         f"{errors['rel_err_eager_fp32']:.2e}); not timed")
    return errors


def compare(name: str, batch: int, device, budget_s: float = 2.0, rounds: int = 5, dtype=torch.float32) -> dict:
    """One network at one batch, ours against PyTorch eager on the same data and weights: the outputs
    checked against each other first, then ours (plain, replayed, and with temporary images between
    the layers, replayed) and eager timed in alternating rounds. ``{contender: (median, min, max)}``
    in seconds, and the relative difference of the outputs (``mpsconv bench --networks``)."""
    net = NETWORKS[name]()
    weights = random_weights(net)
    tdev = device.torch_device
    rng = np.random.default_rng(1)
    x_nhwc = torch.from_numpy(rng.standard_normal((batch, *net.size)).astype(np.float32)).to(tdev, dtype)
    x = x_nhwc.permute(0, 3, 1, 2)
    ours, temporary = Ours(net, weights, batch, device, dtype), Ours(net, weights, batch, device, dtype, True)
    eager = Eager(net, weights, tdev, dtype)
    ours.load(x_nhwc)
    temporary.load(x_nhwc)
    with torch.no_grad():
        ours()
        errors = checked(name, batch, net, weights, ours.output().permute(0, 3, 1, 2), eager(x), x)
        times = timing({"ours": ours, "ours_replay": ours.replay, "ours_temporary_replay": temporary.replay,
                        "eager": lambda: eager(x)}, rounds, budget_s, synchronizer(tdev))
    return dict(network=net.name, batch=batch, layers=len(net.layers), rel_err=errors["rel_err"], times=times)
