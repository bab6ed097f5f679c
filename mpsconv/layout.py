"""Porting helpers (our addition): weights from PyTorch / Caffe / TensorFlow layouts into
MPS's ``[O][kH][kW][I/G]`` (OHWI), kernels from ``torch.nn`` layers and back.

MPS has no padding argument: a convolution's window is placed by ``offset`` (the centre tap of
destination pixel 0 reads source pixel ``offset``). PyTorch's ``padding=p`` puts the first tap of
output 0 at ``-p``; with ``Kd = (k - 1)·d + 1`` taps spanned, that is ``offset = (Kd >> 1) - p``
(``core.geometry.offset_for_padding`` and its inverse and transposed forms). The destination's size
is the caller's choice in MPS; :func:`torch_output_size` gives PyTorch's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .convolution import MPSCNNConvolution, MPSCNNFullyConnected
from .datasource import _ArrayDataSource, check_weight_shape
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNDepthWiseConvolutionDescriptor
from .errors import MPSTypeError, MPSValueError
from .core.geometry import (
    kernel_offset_for_padding, offset_for_padding, padding_for_kernel_offset, padding_for_offset,
    torch_output_size,  # noqa: F401  (public, re-exported by the package)
)
from .transpose import MPSCNNConvolutionTranspose
from .types import MPSDataType, MPSOffset


def weights_from_oihw(w) -> np.ndarray:
    """PyTorch / Caffe ``[O][I/G][kH][kW]`` -> MPS ``[O][kH][kW][I/G]``."""
    return np.ascontiguousarray(np.asarray(_rank(w, 4, "weights_from_oihw"), np.float32).transpose(0, 2, 3, 1))


def weights_to_oihw(w) -> np.ndarray:
    """MPS ``[O][kH][kW][I/G]`` -> PyTorch / Caffe ``[O][I/G][kH][kW]``."""
    return np.ascontiguousarray(np.asarray(_rank(w, 4, "weights_to_oihw"), np.float32).transpose(0, 3, 1, 2))


def weights_from_hwio(w) -> np.ndarray:
    """TensorFlow ``[kH][kW][I/G][O]`` -> MPS ``[O][kH][kW][I/G]``."""
    return np.ascontiguousarray(np.asarray(_rank(w, 4, "weights_from_hwio"), np.float32).transpose(3, 0, 1, 2))


def weights_to_hwio(w) -> np.ndarray:
    """MPS ``[O][kH][kW][I/G]`` -> TensorFlow ``[kH][kW][I/G][O]``."""
    return np.ascontiguousarray(np.asarray(_rank(w, 4, "weights_to_hwio"), np.float32).transpose(1, 2, 3, 0))


def _rank(w, rank: int, owner: str):
    shape = np.shape(w)
    if len(shape) != rank:
        raise MPSValueError(f"{owner}: the weights have shape {shape}; a rank-{rank} array is needed")
    return w


class MPSCNNConvolutionWeights(_ArrayDataSource):
    """A ready-made ``MPSCNNConvolutionDataSource`` over arrays (our addition).

    ``weights``: float32 ``[O][kH][kW][I/G]`` (any shape with that many elements); ``bias``: ``[O]`` or
    None. ``kernelWeightsDataType`` (float32 unless given) decides whether the kernel rounds to fp16.
    To change the weights, assign ``.weights_array`` / ``.bias_array`` and call the kernel's
    ``reloadWeightsAndBiasesFromDataSource()``; to train, subclass it with an ``update``
    (``encode_data_source_update``; ``mpsconv/demo.py`` has one).
    """

    def __init__(self, descriptor, weights, bias=None, *, kernelWeightsDataType=MPSDataType.float32, label=None):
        if not isinstance(descriptor, MPSCNNConvolutionDescriptor):
            raise MPSTypeError(f"MPSCNNConvolutionWeights: descriptor={descriptor!r} must be an "
                               "MPSCNNConvolutionDescriptor")
        d = descriptor
        ig = 1 if isinstance(d, MPSCNNDepthWiseConvolutionDescriptor) else d.inputFeatureChannels // d.groups
        count = d.outputFeatureChannels * d.kernelHeight * d.kernelWidth * ig
        check_weight_shape(weights, (d.outputFeatureChannels, d.kernelHeight, d.kernelWidth, ig), "MPSCNNConvolutionWeights",
                           "weights")
        w = np.asarray(weights, np.float32)
        if w.size != count:
            raise MPSValueError(f"MPSCNNConvolutionWeights: weights has {w.size} values; the descriptor needs "
                                f"{count} (O={d.outputFeatureChannels} x kH={d.kernelHeight} x kW={d.kernelWidth} "
                                f"x I/G={ig})")
        b = None if bias is None else np.asarray(bias, np.float32).reshape(-1)
        if b is not None and b.size != d.outputFeatureChannels:
            raise MPSValueError(f"MPSCNNConvolutionWeights: bias has {b.size} values; the descriptor needs "
                                f"{d.outputFeatureChannels} (outputFeatureChannels)")
        super().__init__(d, np.ascontiguousarray(w), b, kernelWeightsDataType, label)

    @property
    def weights_array(self) -> np.ndarray:
        """The float32 weights the kernel reads at its next load."""
        return self._weights

    @weights_array.setter
    def weights_array(self, value) -> None:
        value = np.asarray(value, np.float32)
        if value.size != self._weights.size:
            raise MPSValueError(f"MPSCNNConvolutionWeights.weights_array: {value.size} values; {self._weights.size} "
                                "are needed")
        self._weights = value

    @property
    def bias_array(self) -> np.ndarray | None:
        """The float32 bias the kernel reads at its next load (None: no bias)."""
        return self._bias

    @bias_array.setter
    def bias_array(self, value) -> None:
        n = self._descriptor.outputFeatureChannels
        value = None if value is None else np.asarray(value, np.float32).reshape(-1)
        if value is not None and value.size != n:
            raise MPSValueError(f"MPSCNNConvolutionWeights.bias_array: {value.size} values; {n} are needed "
                                "(outputFeatureChannels)")
        self._bias = value


def from_torch(module, device, *, neuron=None, input_shape=None):
    """An mpsconv kernel computing what ``module`` computes (our addition).

    ``torch.nn.Conv2d`` -> ``MPSCNNConvolution`` with ``offset`` set for its padding (zeros mode
    only); ``torch.nn.ConvTranspose2d`` -> ``MPSCNNConvolutionTranspose`` (weights rotated 180°,
    ``kernelOffset`` set); ``torch.nn.Linear`` -> ``MPSCNNFullyConnected`` over a 1x1 source, or
    over a ``(C, H, W)`` source given ``input_shape`` (the Linear that follows ``flatten`` of an NCHW
    tensor; its weights are reordered to MPS's HWC). ``neuron``: an ``MPSNNNeuronDescriptor`` to fuse.
    Size the destination with :func:`torch_output_size` to get PyTorch's output shape.
    """
    def weights_of(p):
        return None if p is None else p.detach().cpu().to(torch.float32).numpy()

    if not isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        raise MPSTypeError(f"from_torch: module={type(module).__name__}; Conv2d, ConvTranspose2d and Linear "
                           "are supported")
    w, b = weights_of(module.weight), weights_of(module.bias)
    if isinstance(module, nn.Linear):
        o, i = w.shape
        c, h, wd = (i, 1, 1) if input_shape is None else tuple(int(v) for v in input_shape)
        if c * h * wd != i:
            raise MPSValueError(f"from_torch: input_shape={input_shape} has {c * h * wd} values; "
                                f"the Linear takes in_features={i}")
        desc = MPSCNNConvolutionDescriptor(kernelWidth=wd, kernelHeight=h, inputFeatureChannels=c,
                                           outputFeatureChannels=o)
        ohwi = w.reshape(o, c, h, wd).transpose(0, 2, 3, 1)
        kernel_cls = MPSCNNFullyConnected
    else:
        transposed = isinstance(module, nn.ConvTranspose2d)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise MPSValueError(f"from_torch: {type(module).__name__} with padding={module.padding!r}, "
                                f"padding_mode={module.padding_mode!r}; give numeric padding and zeros mode "
                                "(set offset yourself for 'same')")
        (kh, kw), (sy, sx), (dy, dx) = module.kernel_size, module.stride, module.dilation
        groups = module.groups
        if transposed:
            cin, og = w.shape[:2]
            cout = og * groups
            ohwi = (w.reshape(groups, cin // groups, og, kh, kw).transpose(0, 2, 3, 4, 1)
                    .reshape(cout, kh, kw, cin // groups)[:, ::-1, ::-1, :])
        else:
            cout, cin = w.shape[0], w.shape[1] * groups
            ohwi = w.transpose(0, 2, 3, 1)
        # MPS spells one-channel groups as a depthwise descriptor (groups > 1 needs 4 channels a group)
        depthwise = not transposed and groups > 1 and groups == cin == cout
        desc = (MPSCNNDepthWiseConvolutionDescriptor if depthwise else MPSCNNConvolutionDescriptor)(
            kernelWidth=kw, kernelHeight=kh, inputFeatureChannels=cin, outputFeatureChannels=cout)
        desc.strideInPixelsX, desc.strideInPixelsY = sx, sy
        desc.dilationRateX, desc.dilationRateY = dx, dy
        desc.groups = 1 if depthwise else groups
        kernel_cls = MPSCNNConvolutionTranspose if transposed else MPSCNNConvolution
    if neuron is not None:
        desc.fusedNeuronDescriptor = neuron
    kernel = kernel_cls(device=device, weights=MPSCNNConvolutionWeights(
        desc, np.ascontiguousarray(ohwi), b, label=type(module).__name__))
    if kernel_cls is MPSCNNConvolution:
        py, px = module.padding
        kernel.offset = MPSOffset(x=offset_for_padding(kw, dx, px), y=offset_for_padding(kh, dy, py), z=0)
    elif kernel_cls is MPSCNNConvolutionTranspose:
        py, px = module.padding
        kernel.offset = MPSOffset(x=0, y=0, z=0)
        kernel.kernelOffsetX = kernel_offset_for_padding(kw, dx, px)
        kernel.kernelOffsetY = kernel_offset_for_padding(kh, dy, py)
    return kernel


def to_torch(kernel):
    """The ``torch.nn`` layer computing what ``kernel`` computes (our addition; the inverse of
    :func:`from_torch`). The fused neuron is not part of the layer: apply it after. Raises when the
    kernel's placement has no PyTorch padding (asymmetric or negative)."""
    loaded = kernel._loaded
    d = loaded.descriptor
    w, b = loaded.weights, loaded.bias
    o, kh, kw, ig = w.shape
    if isinstance(kernel, MPSCNNFullyConnected):
        layer = nn.Linear(kh * kw * ig, o)
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(w.transpose(0, 3, 1, 2).reshape(o, -1)))
    elif isinstance(kernel, (MPSCNNConvolution, MPSCNNConvolutionTranspose)):
        g, (sy, sx), (dy, dx) = d.groups, (d.strideInPixelsY, d.strideInPixelsX), (d.dilationRateY, d.dilationRateX)
        if isinstance(d, MPSCNNDepthWiseConvolutionDescriptor):
            g, w = o, w.reshape(o, kh, kw, 1)
        if isinstance(kernel, MPSCNNConvolutionTranspose):
            pad = (padding_for_kernel_offset(kh, dy, kernel.kernelOffsetY),
                   padding_for_kernel_offset(kw, dx, kernel.kernelOffsetX))
            layer = nn.ConvTranspose2d(ig * g, o, (kh, kw), (sy, sx), pad if min(pad) >= 0 else 0,
                                       groups=g, dilation=(dy, dx))
            tw = w[:, ::-1, ::-1, :].reshape(g, o // g, kh, kw, ig).transpose(0, 4, 1, 2, 3).reshape(g * ig, o // g, kh, kw)
        else:
            pad = (padding_for_offset(kh, dy, kernel.offset.y), padding_for_offset(kw, dx, kernel.offset.x))
            layer = nn.Conv2d(ig * g, o, (kh, kw), (sy, sx), pad if min(pad) >= 0 else 0, groups=g, dilation=(dy, dx))
            tw = w.transpose(0, 3, 1, 2)
        if min(pad) < 0:
            raise MPSValueError(f"to_torch: {type(kernel).__name__}'s placement needs padding {pad}; PyTorch "
                                "padding cannot be negative (crop the source instead)")
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(tw))
    else:
        raise MPSTypeError(f"to_torch: kernel={type(kernel).__name__}; MPSCNNConvolution, MPSCNNFullyConnected "
                           "and MPSCNNConvolutionTranspose are supported")
    layer.bias.data = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    return layer
