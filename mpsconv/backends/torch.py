"""The torch backend: oneDNN on the CPU, cuDNN on CUDA, through ``torch.nn.functional.conv2d``.

Images are NHWC, so ``permute(0, 3, 1, 2)`` of a channel slice is a channels-last NCHW view that
the convolution reads without a copy. Asymmetric or negative pads (Metal's ``offset`` can place
the window anywhere) become a crop plus a zero pad, the clamp edge mode an index gather; bias is
fused into the convolution, and the neuron and the format conversion are written straight into
the destination's channel slice and clip region (one pass, no intermediate copy for ReLU).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as Fn

from ..geometry import ConvProblem, EdgeMode
from ..image import MPSImageFeatureChannelFormat as F, storage_to_values, values_to_storage
from ..neuron import MPSCNNNeuronType, TORCH_OPS, apply_neuron

_FLOAT_FORMATS = (F.float16, F.float32)


class Prepared:
    def __init__(self, weights, bias, prelu, device):
        dev = device.torch_device
        self.weights = None
        if weights is not None:  # OHWI -> OIHW, kept channels-last (which is OHWI in memory)
            w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(dev)
            self.weights = w.permute(0, 3, 1, 2)
        self.bias = None if bias is None or not np.any(bias) else torch.from_numpy(
            np.asarray(bias, np.float32)).to(dev)
        self.prelu = None if prelu is None else torch.from_numpy(np.asarray(prelu, np.float32)).to(dev).view(-1, 1, 1)


def _axis_window(x: torch.Tensor, dim: int, first: int, last: int, size: int, edge: EdgeMode):
    """Source rows/columns ``first..last`` along ``dim`` (NCHW): a slice plus ``(before, after)`` zero
    pads, or for the clamp edge mode a gather with clamped indices."""
    if edge == EdgeMode.clamp:
        if first >= 0 and last < size:
            return x.narrow(dim, first, last - first + 1), (0, 0)
        index = torch.arange(first, last + 1, device=x.device).clamp_(0, size - 1)
        return x.index_select(dim, index), (0, 0)
    lo, hi = max(first, 0), min(last, size - 1)
    if lo > hi:  # the window never touches the source: all taps read 0
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_zeros(shape), (last - first + 1, 0)
    return x.narrow(dim, lo, hi - lo + 1), (lo - first, last - hi)


def _read_source(problem: ConvProblem, src: torch.Tensor):
    """The source slice as float NCHW, cropped to the read window, and the pads still to apply."""
    n, i0, c0 = problem.n_images, problem.src_image0, problem.src_channel0
    x = src[i0:i0 + n, :, :, c0:c0 + problem.in_channels].permute(0, 3, 1, 2)
    fmt = F(problem.src_format)
    if fmt != F.float32:
        x = storage_to_values(x, fmt, torch.float32)
    pads = []
    for axis, dim in ((0, 2), (1, 3)):
        first, last = problem.read_range(axis)
        x, pad = _axis_window(x, dim, first, last, problem.src_size[axis], problem.edge)
        pads.append(pad)
    return x, pads


def forward(problem: ConvProblem, src: torch.Tensor, dst: torch.Tensor, prepared: Prepared) -> None:
    if problem.empty:
        return
    x, ((top, bottom), (left, right)) = _read_source(problem, src)
    if top == bottom and left == right:
        conv_padding = (top, left)
    else:
        x = Fn.pad(x, (left, right, top, bottom))
        conv_padding = (0, 0)
    if problem.identity:
        if conv_padding != (0, 0):
            x = Fn.pad(x, (left, right, top, bottom))
        y = x[:, :, :: problem.stride[0], :: problem.stride[1]]
    else:
        with _precision(x.device):
            y = Fn.conv2d(x, prepared.weights, prepared.bias, problem.stride, conv_padding, problem.dilation,
                          problem.groups)
    (y0, x0), (oh, ow) = problem.out_origin, problem.out_size
    d0, n = problem.dst_channel0, problem.n_images
    out = dst[problem.dst_image0:problem.dst_image0 + n, y0:y0 + oh, x0:x0 + ow, d0:d0 + y.shape[1]]
    out = out.permute(0, 3, 1, 2)
    _epilogue(problem, y, out, prepared)


def _epilogue(problem: ConvProblem, y: torch.Tensor, out: torch.Tensor, prepared: Prepared) -> None:
    """``out = store(f(y))``: the neuron and the format conversion in as few passes as possible."""
    neuron = problem.neuron
    fmt = F(problem.dst_format)
    if fmt in _FLOAT_FORMATS:
        if neuron.type == MPSCNNNeuronType.none:
            out.copy_(y)
            return
        if neuron.type == MPSCNNNeuronType.reLU and neuron.a == 0.0:
            torch.clamp_min(y, 0.0, out=out)  # ReLU and the write into the slice in one pass
            return
    if neuron.type != MPSCNNNeuronType.none:
        prelu = None if prepared.prelu is None else prepared.prelu[: y.shape[1]]
        y = apply_neuron(y, neuron, prelu, TORCH_OPS)
    out.copy_(y if fmt in _FLOAT_FORMATS else values_to_storage(y, fmt))


def _precision(device: torch.device):
    if device.type == "cuda":  # cuDNN would use TF32 for float32 by default; MPS numerics need full fp32
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    return contextlib.nullcontext()


class _Torch:
    name = "torch"

    @staticmethod
    def supports(problem, device) -> bool:
        return True

    @staticmethod
    def prepare(weights, bias, prelu, device) -> Prepared:
        return Prepared(weights, bias, prelu, device)

    forward = staticmethod(forward)


BACKEND = _Torch()
