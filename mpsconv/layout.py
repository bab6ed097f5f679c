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
from .core.activations import MPSCNNNeuronType
from .datasource import _ArrayDataSource, check_weight_shape
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNDepthWiseConvolutionDescriptor
from .errors import MPSTypeError, MPSValueError
from .image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from .kernel import MPSCNNKernel, MPSImageEdgeMode
from .neuron import MPSCNNNeuron, MPSNNNeuronDescriptor
from .core.geometry import (
    dilated_extent, kernel_offset_for_padding, offset_for_padding, padding_for_kernel_offset, padding_for_offset,
    torch_output_size,  # noqa: F401  (public, re-exported by the package)
)
from .transpose import MPSCNNConvolutionTranspose
from .types import MPSDataType, MPSOffset, as_list


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
        w = _float32(weights, "MPSCNNConvolutionWeights", "weights")
        if w.size != count:
            raise MPSValueError(f"MPSCNNConvolutionWeights: weights has {w.size} values; the descriptor needs "
                                f"{count} (O={d.outputFeatureChannels} x kH={d.kernelHeight} x kW={d.kernelWidth} "
                                f"x I/G={ig})")
        b = None if bias is None else _float32(bias, "MPSCNNConvolutionWeights", "bias").reshape(-1)
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
        value = _float32(value, "MPSCNNConvolutionWeights", "weights_array")
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
        value = None if value is None else _float32(value, "MPSCNNConvolutionWeights", "bias_array").reshape(-1)
        if value is not None and value.size != n:
            raise MPSValueError(f"MPSCNNConvolutionWeights.bias_array: {value.size} values; {n} are needed "
                                "(outputFeatureChannels)")
        self._bias = value


def _float32(values, owner: str, what: str) -> np.ndarray:
    """Real numbers as float32 (a tensor, an array, a list); complex numbers, strings and objects are
    refused, as the data-source path refuses them."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype.kind not in "fiub":
        kind = type(values).__name__ if array is None else str(array.dtype)
        raise MPSTypeError(f"{owner}: {what} must be real numbers (an array, a tensor or a list), not {kind}")
    return array.astype(np.float32)


def from_torch(module, device, *, neuron=None, input_shape=None):
    """An mpsconv kernel computing what ``module`` computes (our addition).

    ``torch.nn.Conv2d`` -> ``MPSCNNConvolution`` with ``offset`` set for its padding: numeric,
    ``'valid'`` or ``'same'`` (an odd total padding puts the extra row and column at the bottom and
    right, as PyTorch does); ``padding_mode='zeros'`` is the zero edge, ``'replicate'`` the clamp
    edge (``'reflect'`` and ``'circular'`` have no MPS edge mode and are refused).
    ``torch.nn.ConvTranspose2d`` -> ``MPSCNNConvolutionTranspose`` (weights rotated 180°,
    ``kernelOffset`` set); ``torch.nn.Linear`` -> ``MPSCNNFullyConnected`` over a 1x1 source, or
    over a ``(C, H, W)`` source given ``input_shape`` (the Linear that follows ``flatten`` of an NCHW
    tensor; its weights are reordered to MPS's HWC). ``neuron``: an ``MPSNNNeuronDescriptor`` to fuse.
    Size the destination with :func:`torch_output_size` to get PyTorch's output shape.

    ``torch.nn.Sequential`` -> :class:`TorchLayers`, the list of its kernels: each convolution with
    the ``BatchNorm2d`` after it folded in (``setBatchNormalizationParametersForInference…``, from
    the running statistics) and the activation after that fused (ReLU, ReLU6, LeakyReLU, PReLU,
    Sigmoid, Tanh, Hardsigmoid, ELU, Softplus, Softsign, GELU); an activation with nothing to fuse
    into is an ``MPSCNNNeuron`` of its own. ``Dropout`` and ``Identity`` are skipped; ``Flatten``
    may come before a ``Linear`` when ``input_shape`` gives the network input's ``(C, H, W)``.
    Anything else is refused, naming it: run it in PyTorch between encodes.
    """
    if isinstance(module, nn.Sequential):
        if neuron is not None:
            raise MPSTypeError("from_torch: neuron= is for one layer; a Sequential's activations are its own modules")
        return _sequential(module, device, input_shape)
    return _port(module, device, neuron, input_shape)[0]


def _port(module, device, neuron=None, input_shape=None, batch_norm=None):
    """``(kernel, size)`` for one layer: ``size(h, w)`` is PyTorch's output height and width."""
    def weights_of(p):
        return None if p is None else p.detach().cpu().to(torch.float32).numpy()

    if not isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        raise MPSTypeError(f"from_torch: module={type(module).__name__}; Conv2d, ConvTranspose2d, Linear and "
                           "Sequential are supported")
    w, b = weights_of(module.weight), weights_of(module.bias)
    edge = MPSImageEdgeMode.zero
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
        name = type(module).__name__
        if module.padding_mode == "replicate" and not transposed:
            edge = MPSImageEdgeMode.clamp  # the edge pixel, however far outside: what replicate padding reads
        elif module.padding_mode != "zeros":
            raise MPSValueError(f"from_torch: {name} with padding_mode={module.padding_mode!r}: MPS reads outside "
                                "the source as zero (padding_mode='zeros') or as the nearest edge pixel "
                                "('replicate'); 'reflect' and 'circular' have no MPS edge mode")
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
    if batch_norm is not None:
        _fold(desc, batch_norm)
    if neuron is not None:
        desc.fusedNeuronDescriptor = neuron
    kernel = kernel_cls(device=device, weights=MPSCNNConvolutionWeights(
        desc, np.ascontiguousarray(ohwi), b, label=type(module).__name__))
    if kernel_cls is MPSCNNFullyConnected:
        return kernel, lambda h, w: (1, 1)
    (ky, kx), (sy, sx), (dy, dx) = module.kernel_size, module.stride, module.dilation
    if kernel_cls is MPSCNNConvolutionTranspose:
        (py, px), (qy, qx) = module.padding, module.output_padding
        kernel.offset = MPSOffset(x=0, y=0, z=0)
        kernel.kernelOffsetX = kernel_offset_for_padding(kx, dx, px)
        kernel.kernelOffsetY = kernel_offset_for_padding(ky, dy, py)
        return kernel, lambda h, w: (torch_output_size(h, ky, sy, py, dy, transposed=True, output_padding=qy),
                                     torch_output_size(w, kx, sx, px, dx, transposed=True, output_padding=qx))
    (top, bottom), (left, right) = _conv_padding(module)
    kernel.offset = MPSOffset(x=offset_for_padding(kx, dx, left), y=offset_for_padding(ky, dy, top), z=0)
    kernel.edgeMode = edge
    return kernel, lambda h, w: ((h + top + bottom - dilated_extent(ky, dy)) // sy + 1,
                                 (w + left + right - dilated_extent(kx, dx)) // sx + 1)


def _fold(desc, bn) -> None:
    """A ``BatchNorm2d``'s running statistics as the descriptor's inference batch norm."""
    if bn.running_mean is None or bn.running_var is None:
        raise MPSValueError("from_torch: a BatchNorm2d without running statistics (track_running_stats=False) "
                            "normalizes by each batch's own; it has no inference form to fold")
    if bn.num_features != desc.outputFeatureChannels:
        raise MPSValueError(f"from_torch: BatchNorm2d({bn.num_features}) after a layer of "
                            f"{desc.outputFeatureChannels} output channels")
    values = lambda t: t.detach().cpu().to(torch.float32).numpy()  # noqa: E731
    ones = np.ones(bn.num_features, np.float32)
    desc.setBatchNormalizationParametersForInferenceWithMean(
        values(bn.running_mean), variance=values(bn.running_var),
        gamma=values(bn.weight) if bn.affine else ones, beta=values(bn.bias) if bn.affine else 0 * ones,
        epsilon=float(bn.eps))


def _neuron_of(module, channels: int | None):
    """The ``MPSNNNeuronDescriptor`` of an activation module, None for a module that is not one.
    Activations with no ``MPSCNNNeuronType`` are refused, naming it."""
    T, make = MPSCNNNeuronType, MPSNNNeuronDescriptor.cnnNeuronDescriptor
    if isinstance(module, nn.ReLU6):  # (a Hardtanh: before it)
        return make(T.reLUN, a=0.0, b=6.0)
    if isinstance(module, nn.ReLU):
        return make(T.reLU, a=0.0)
    if isinstance(module, nn.LeakyReLU):
        return make(T.reLU, a=float(module.negative_slope))
    if isinstance(module, nn.PReLU):
        a = module.weight.detach().cpu().to(torch.float32).numpy().reshape(-1)
        if a.size == 1 and channels is not None:
            a = np.repeat(a, channels)  # one slope for every channel
        return MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(a)
    if isinstance(module, nn.Sigmoid):
        return make(T.sigmoid)
    if isinstance(module, nn.Tanh):
        return make(T.tanH, a=1.0, b=1.0)
    if isinstance(module, nn.Hardsigmoid):  # relu6(x + 3) / 6
        return make(T.hardSigmoid, a=1.0 / 6.0, b=0.5)
    if isinstance(module, nn.ELU):
        return make(T.ELU, a=float(module.alpha))
    if isinstance(module, nn.Softplus):  # log(1 + exp(βx)) / β; PyTorch's linear tail above its threshold
        return make(T.softPlus, a=1.0 / module.beta, b=float(module.beta))  # agrees to float32 rounding
    if isinstance(module, nn.Softsign):
        return make(T.softSign)
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return make(T.geLU)
    if isinstance(module, (nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Hardtanh, nn.CELU, nn.SELU, nn.GLU,
                           nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Threshold, nn.RReLU, nn.Tanhshrink,
                           nn.Softshrink, nn.Hardshrink)):
        raise MPSValueError(f"from_torch: {module!r} has no MPSCNNNeuronType; run it in PyTorch between "
                            "encodes (image.torch() is a view of the image)")
    return None


def _sequential(seq, device, input_shape) -> "TorchLayers":
    """Group ``seq``'s modules into layers (a kernel, the BatchNorm2d folded into it, the activation
    fused into it) and port each."""
    modules = [(f"[{i}]", m) for i, m in enumerate(seq)]
    groups: list[list] = []  # [where, kernel module or None, batch norm, neuron, flatten before it]
    shape = None if input_shape is None else tuple(int(v) for v in input_shape)
    flatten = False
    for where, module in modules:
        last = groups[-1] if groups else None
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if flatten and not isinstance(module, nn.Linear):
                raise MPSValueError(f"from_torch: Sequential{where} is a {type(module).__name__} after Flatten")
            groups.append([where, module, None, None, flatten])
            flatten = False
        elif isinstance(module, nn.BatchNorm2d):
            if last is None or not isinstance(last[1], nn.Conv2d) or last[2] is not None or last[3] is not None:
                raise MPSValueError(f"from_torch: Sequential{where} is a BatchNorm2d that does not follow a Conv2d "
                                    "directly: MPS folds batch norm into the convolution before it")
            last[2] = module
        elif isinstance(module, nn.Flatten):
            flatten = True
        elif isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            continue  # inference: nothing to do
        else:
            channels = None
            if last is not None and last[1] is not None:
                channels = last[1].out_features if isinstance(last[1], nn.Linear) else last[1].out_channels
            neuron = _neuron_of(module, channels)
            if neuron is None:
                raise MPSTypeError(f"from_torch: Sequential{where} is {type(module).__name__}; mpsconv ports "
                                   "Conv2d, ConvTranspose2d, Linear, BatchNorm2d, Flatten before a Linear and the "
                                   "activations MPS fuses: run the rest in PyTorch between encodes")
            if last is not None and last[1] is not None and last[3] is None:
                last[3] = neuron
            else:  # nothing to fuse into: a neuron kernel of its own
                groups.append([where, None, None, neuron, False])
    if flatten:
        raise MPSValueError("from_torch: the Sequential ends with Flatten; an MPS image is already the flattened "
                            "values in HWC order")
    kernels, sizes = [], []
    for where, module, bn, neuron, flattened in groups:
        if module is None:
            kernels.append(MPSCNNNeuron(device=device, neuronDescriptor=neuron))
            sizes.append(lambda h, w: (h, w))
            continue
        if flattened and shape is None:
            raise MPSValueError(f"from_torch: Sequential{where} is a Linear after Flatten; pass input_shape=(C, H, W) "
                                "of the network's input so that its weights can be laid out for its source")
        kernel, size = _port(module, device, neuron, shape if flattened else None, bn)
        kernels.append(kernel)
        sizes.append(size)
        if shape is not None:
            c = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            shape = (c, *size(*shape[1:]))
    return TorchLayers(kernels, sizes)


class TorchLayers(list):
    """``from_torch`` of an ``nn.Sequential`` (our addition): its kernels, in order, and ``encode``,
    which runs them one after another into one command buffer."""

    def __init__(self, kernels, sizes):
        kernels, sizes = as_list(kernels, "TorchLayers", "kernels"), as_list(sizes, "TorchLayers", "sizes")
        if len(kernels) != len(sizes) or not all(isinstance(k, MPSCNNKernel) for k in kernels) \
                or not all(callable(size) for size in sizes):
            raise MPSTypeError("TorchLayers(kernels, sizes): a kernel and its output-size function (h, w) -> (h, w) "
                               "per layer; from_torch makes it")
        super().__init__(kernels)
        self._sizes = sizes

    def output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the last layer's output for a ``height x width`` input, as PyTorch gives it."""
        for size in self._sizes:
            height, width = size(height, width)
        last = self[-1]
        channels = last.outputFeatureChannels if hasattr(last, "outputFeatureChannels") else None
        return channels, height, width

    def encode(self, *, commandBuffer, sourceImage, destinationImage=None):
        """Encode every layer into ``commandBuffer``: the images between them are ``MPSTemporaryImage``s
        of it, sized as PyTorch sizes its tensors, in the source's format; the last writes
        ``destinationImage`` or a new ``MPSImage``, which it returns."""
        if not self:
            raise MPSValueError("TorchLayers.encode: there are no layers")
        if not isinstance(sourceImage, MPSImage):
            raise MPSTypeError(f"TorchLayers.encode: sourceImage={sourceImage!r} must be an MPSImage")
        image, h, w = sourceImage, sourceImage.height, sourceImage.width
        for i, (kernel, size) in enumerate(zip(self, self._sizes)):
            h, w = size(h, w)
            channels = getattr(kernel, "outputFeatureChannels", None) or image.featureChannels
            descriptor = MPSImageDescriptor(channelFormat=sourceImage.featureChannelFormat, width=w, height=h,
                                            featureChannels=channels, numberOfImages=sourceImage.numberOfImages)
            if i < len(self) - 1:
                out = MPSTemporaryImage(commandBuffer=commandBuffer, imageDescriptor=descriptor)
            else:
                out = destinationImage if destinationImage is not None else MPSImage(
                    device=commandBuffer.device, imageDescriptor=descriptor)
            kernel.encode(commandBuffer=commandBuffer, sourceImage=image, destinationImage=out)
            image = out
        return image


def _conv_padding(module) -> tuple[tuple[int, int], tuple[int, int]]:
    """A ``Conv2d``'s padding ``(before, after)`` on each axis ``(y, x)``: ``'same'`` pads
    ``d·(k - 1)`` in all, the odd one at the end, as PyTorch does."""
    if module.padding == "valid":
        return (0, 0), (0, 0)
    if module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in module.padding)


def to_torch(kernel):
    """The ``torch.nn`` layer computing what ``kernel`` computes (our addition; the inverse of
    :func:`from_torch`). The fused neuron is not part of the layer: apply it after. Raises when the
    kernel's placement has no PyTorch padding (asymmetric or negative)."""
    if not isinstance(kernel, (MPSCNNConvolution, MPSCNNConvolutionTranspose)):
        raise MPSTypeError(f"to_torch: kernel={kernel!r}; MPSCNNConvolution, MPSCNNFullyConnected and "
                           "MPSCNNConvolutionTranspose are supported")
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
