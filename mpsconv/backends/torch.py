"""The torch backend: oneDNN on the CPU, cuDNN on CUDA, through ``torch.nn.functional.conv2d``.

Images are NHWC, so ``permute(0, 3, 1, 2)`` of a channel slice is a channels-last NCHW view that
the convolution reads without a copy. Metal's ``offset`` can place the window anywhere: the read
window becomes a crop plus zero pads (symmetric pads go to the convolution itself), and the clamp
edge mode an index gather. Bias is fused into the convolution; the neuron and the format
conversion write straight into the destination's channel slice and clip region, in one pass for
ReLU. Everything that depends only on the problem is worked out once, in ``Plan``.

On the CPU, when PyTorch's oneDNN operators are there, weights are reordered once into oneDNN's
blocked layout per geometry (``mkldnn_reorder_conv2d_weight``) and the convolution runs through
``mkldnn._convolution_pointwise`` with ReLU as a fused post-op: the same oneDNN kernels as
``conv2d``, bit for bit, without reordering the weights on every call (what inductor does for
frozen CPU models). Elsewhere ``torch.nn.functional.conv2d`` runs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fn

from ..geometry import ConvProblem, EdgeMode
from ..image import MPSImageFeatureChannelFormat as F, storage_to_values, values_to_storage
from ..neuron import MPSCNNNeuronType, TORCH_OPS, apply_neuron

_FLOAT_FORMATS = (F.float16, F.float32)
_COPY, _RELU, _GENERAL = 0, 1, 2
_ONEDNN: bool | None = None  # whether the prepacked oneDNN path works in this PyTorch build
#: Weights smaller than this (elements) go through conv2d: reordering them per call is cheaper than
#: the private operator's own overhead. Tests lower it to exercise the oneDNN path on small shapes.
ONEDNN_MIN_WEIGHTS = 16384


def onednn_usable() -> bool:
    """Probe once: PyTorch's private oneDNN operators may be absent or change between versions."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            x = torch.ones(1, 4, 2, 2).to(memory_format=torch.channels_last)
            w = _reorder(torch.ones(4, 4, 1, 1), (0, 0), (1, 1), (1, 1), 1, (1, 4, 2, 2))
            y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
            _ONEDNN = bool(torch.backends.mkldnn.is_available()) and bool((y == 4).all())
        except Exception:
            _ONEDNN = False
    return _ONEDNN


def _reorder(weights, padding, stride, dilation, groups, input_shape):
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weights.contiguous().to_mkldnn(), list(padding), list(stride),
                                                      list(dilation), groups, list(input_shape))


class Prepared:
    """A kernel's effective parameters in this backend's layout, on the kernel's device."""

    def __init__(self, weights, bias, prelu, device):
        from ..binary import BinaryParams

        dev = device.torch_device
        self.binary = None
        if isinstance(weights, BinaryParams):
            self.binary = _BinaryTensors(weights, dev)
            weights = None
        self.weights = None
        if weights is not None:  # OHWI -> OIHW view, channels-last (OHWI is its memory order)
            w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(dev).permute(0, 3, 1, 2)
            if w.shape[1] == 1 or w.shape[2] * w.shape[3] == 1:
                # Such strides read as both layouts, and PyTorch 2.13's CPU conv2d then gives wrong
                # results for batches of 2 or more: use the canonical contiguous layout instead.
                w = w.clone(memory_format=torch.contiguous_format)
            self.weights = w
        self.bias = None if bias is None or not np.any(bias) else torch.from_numpy(
            np.asarray(bias, np.float32)).to(dev)
        self.prelu = None if prelu is None else torch.from_numpy(np.asarray(prelu, np.float32)).to(dev).view(-1, 1, 1)
        self._packed: dict = {}

    def packed(self, plan: "Plan"):
        """The weights in oneDNN's layout for ``plan``'s geometry, reordered once."""
        weights = self._packed.get(plan.pack_key)
        if weights is None:
            if len(self._packed) >= 16:
                self._packed.clear()
            weights = self._packed[plan.pack_key] = _reorder(self.weights, *plan.pack_key)
        return weights


class Plan:
    """Indexing, pads and epilogue of one ``ConvProblem``, resolved once."""

    def __init__(self, problem: ConvProblem, device):
        p = problem
        n, i0, c0 = p.n_images, p.src_image0, p.src_channel0
        self.problem = p
        self.src_index = (slice(i0, i0 + n), slice(None), slice(None), slice(c0, c0 + p.in_channels))
        self.src_format = F(p.src_format)
        crop, self.gathers, pads, self.zeros_shape = [slice(None)] * 4, [], [], None
        self.upsample = p.upsample if p.upsample != (1, 1) else None
        for axis, dim in ((0, 2), (1, 3)):
            first, last = p.read_range(axis)
            size = p.expanded_size[axis]
            if p.edge == EdgeMode.clamp:
                if first >= 0 and last < size:
                    crop[dim] = slice(first, last + 1)
                else:
                    index = torch.arange(first, last + 1).clamp_(0, size - 1).to(device.torch_device)
                    self.gathers.append((dim, index))
                pads.append((0, 0))
            else:
                lo, hi = max(first, 0), min(last, size - 1)
                if lo > hi:  # the window never touches the source: every tap reads 0
                    self.zeros_shape = (n, p.in_channels, *(r[1] - r[0] + 1 for r in map(p.read_range, (0, 1))))
                crop[dim] = slice(lo, hi + 1)
                pads.append((lo - first, last - hi))
        self.crop = tuple(crop) if any(c != slice(None) for c in crop) else None
        if self.zeros_shape is not None:
            pads = [(0, 0), (0, 0)]
        (top, bottom), (left, right) = pads
        (y0, x0), (oh, ow) = p.out_origin, p.out_size
        gh, gw = p.grid
        self.conv_padding, self.pad, self.out_crop = (0, 0), None, None
        symmetric = (max(top, bottom), max(left, right))
        shift = (symmetric[0] - top, symmetric[1] - left)
        # Convolution padding stays below the window (oneDNN crashes on far larger pads, which an
        # offset far outside the source produces); anything else is an explicit zero pad.
        in_range = symmetric[0] < p.extent(0) and symmetric[1] < p.extent(1)
        if not p.identity and in_range and shift[0] % p.stride[0] == 0 and shift[1] % p.stride[1] == 0:
            # Pad both sides by the larger pad and drop the outputs the extra rows/columns make:
            # output j of the padded convolution starts at j·s - P; ours at v·s - before, so
            # j = v + (P - before)/s, and the last one needed exists because after <= P.
            self.conv_padding = symmetric
            if shift != (0, 0) or (symmetric[0] > bottom or symmetric[1] > right):
                dy, dx = shift[0] // p.stride[0], shift[1] // p.stride[1]
                self.out_crop = (slice(None), slice(None), slice(dy, dy + gh), slice(dx, dx + gw))
        elif any((left, right, top, bottom)):
            self.pad = (left, right, top, bottom)
        d0, z0 = p.dst_channel0, p.dst_image0
        self.dst_index = (slice(z0, z0 + n), slice(y0, y0 + oh), slice(x0, x0 + ow), slice(d0, d0 + p.dst_channels))
        self.dst_format = F(p.dst_format)
        self.subpixel = p.subpixel
        self.conv2d = _conv2d_full_fp32 if device.is_cuda else Fn.conv2d
        shape = (n, p.in_channels, *(r[1] - r[0] + 1 for r in map(p.read_range, (0, 1))))
        if self.pad is None:  # the convolution's input is the crop, without the pads
            shape = (n, p.in_channels, shape[2] - top - bottom, shape[3] - left - right)
        weights = p.out_channels * p.kernel[0] * p.kernel[1] * (p.in_channels // p.groups)
        # _convolution_pointwise gives wrong results when channels-last strides are ambiguous (one
        # channel or one pixel, e.g. N=2, 1x1 output, 1 output channel in PyTorch 2.13): keep it to
        # layouts where they are not.
        unambiguous = min(p.out_channels, p.in_channels, shape[2] * shape[3], gh * gw) > 1
        self.onednn = (not device.is_cuda and not p.identity and unambiguous and weights >= ONEDNN_MIN_WEIGHTS
                       and onednn_usable())
        if self.onednn:
            self.pack_key = (self.conv_padding, p.stride, p.dilation, p.groups, shape)

        # Epilogue: what is left after the convolution (and its bias).
        neuron = p.neuron
        relu = neuron.type == MPSCNNNeuronType.reLU and neuron.a == 0.0
        self.post_op = "relu" if self.onednn and relu else "none"  # oneDNN applies it as a post-op
        self.apply_neuron = neuron.type != MPSCNNNeuronType.none and self.post_op == "none"
        if p.subpixel > 1 or self.dst_format not in _FLOAT_FORMATS:
            self.epilogue = _GENERAL  # neuron, depth-to-space, format conversion as needed
        elif not self.apply_neuron:
            self.epilogue = _COPY
        elif relu and self.dst_format == F.float32:  # clamp_min(out=) needs out's dtype to be y's
            self.epilogue = _RELU
        else:
            self.epilogue = _GENERAL


def _restrided(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as a view with the strides PyTorch itself would give it, or None where only a copy can:
    channels-last (oneDNN's fast layout, a no-op for NHWC slices) where that layout is
    unambiguous, else plain contiguous.

    PyTorch 2.13's CPU convolution miscomputes for inputs whose strides are legal only because of
    size-1 dimensions (one channel, or one pixel, sliced from a 4-lane image): never give it one.
    The stride of a size-1 dimension addresses nothing, so fixing only those is free.
    """
    n, c, h, w = x.shape
    if c > 1 and h * w > 1:
        return x if x.is_contiguous(memory_format=torch.channels_last) else None
    canonical = (c * h * w, h * w, w, 1)
    strides = x.stride()
    if strides == canonical:
        return x
    if all(size == 1 or a == b for size, a, b in zip(x.shape, strides, canonical)):
        return x.as_strided(x.shape, canonical, x.storage_offset())
    return None


def _canonical(x: torch.Tensor) -> torch.Tensor:
    view = _restrided(x)
    if view is not None:
        return view
    n, c, h, w = x.shape
    return x.contiguous(memory_format=torch.channels_last if c > 1 and h * w > 1 else torch.contiguous_format)


def _nchw_view(storage: torch.Tensor, images: slice, rows: slice, cols: slice, channels: slice) -> torch.Tensor:
    """``storage[images, rows, cols, channels].permute(0, 3, 1, 2)`` as one ``as_strided`` call
    (steps of 1 only): a view of an NHWC storage as channels-last NCHW."""
    sn, sh, sw, sc = storage.stride()
    n, h, w, c = storage.shape
    i0, i1, _ = images.indices(n)
    y0, y1, _ = rows.indices(h)
    x0, x1, _ = cols.indices(w)
    c0, c1, _ = channels.indices(c)
    offset = storage.storage_offset() + i0 * sn + y0 * sh + x0 * sw + c0 * sc
    return storage.as_strided((i1 - i0, c1 - c0, y1 - y0, x1 - x0), (sn, sc, sh, sw), offset)


class Bound:
    """A plan bound to one source and one destination storage: the views, made once per encode."""

    __slots__ = ("plan", "x", "ready", "out")

    def __init__(self, plan: Plan, src: torch.Tensor, dst: torch.Tensor):
        self.plan = plan
        if plan.zeros_shape is not None:  # the window misses the source: the input is zeros, always
            self.x, self.ready = _canonical(src.new_zeros(plan.zeros_shape, dtype=torch.float32)), True
        else:  # backwards kernels crop after expanding the source, at run time
            crop = plan.crop if plan.crop is not None and plan.upsample is None else (slice(None),) * 4
            images, _, _, channels = plan.src_index
            x = _nchw_view(src, images, crop[2], crop[3], channels)
            self.ready = False
            if plan.src_format == F.float32 and not plan.gathers and plan.pad is None and plan.upsample is None:
                view = _restrided(x)  # no work left on the input at run time, unless it needs a copy
                if view is not None:
                    x, self.ready = view, True
            self.x = x
        self.out = _nchw_view(dst, *plan.dst_index)


def run(bound: Bound, prepared: Prepared) -> None:
    plan = bound.plan
    p = plan.problem
    x = bound.x
    if not bound.ready:
        if plan.src_format != F.float32:  # dense first: converting a sparse view is several times slower
            x = storage_to_values(_canonical(x), plan.src_format, torch.float32)
        if plan.upsample is not None:
            x = _expand(x, plan.upsample)
            if plan.crop is not None:
                x = x[plan.crop]
        for dim, index in plan.gathers:
            x = x.index_select(dim, index)
        if plan.pad is not None:
            x = Fn.pad(x, plan.pad)
        x = _canonical(x)
    if p.identity:
        y = x[:, :, :: p.stride[0], :: p.stride[1]]
    elif plan.onednn:
        y = torch.ops.mkldnn._convolution_pointwise(x, prepared.packed(plan), prepared.bias, plan.conv_padding,
                                                    p.stride, p.dilation, p.groups, plan.post_op, [], "")
    else:
        y = plan.conv2d(x, prepared.weights, prepared.bias, p.stride, plan.conv_padding, p.dilation, p.groups)
    if plan.out_crop is not None:
        y = y[plan.out_crop]
    out = bound.out
    if plan.epilogue == _COPY:
        out.copy_(y)
    elif plan.epilogue == _RELU:
        torch.clamp_min(y, 0.0, out=out)  # ReLU and the write into the slice in one pass
    else:
        if plan.apply_neuron:
            y = _neuron(y, p, prepared)
        if plan.subpixel > 1:
            y = _depth_to_space(y, plan.subpixel)[:, :, : out.shape[2], : out.shape[3]]
        out.copy_(y if plan.dst_format in _FLOAT_FORMATS else values_to_storage(y, plan.dst_format))


def _neuron(y: torch.Tensor, p: ConvProblem, prepared: Prepared) -> torch.Tensor:
    neuron = p.neuron
    if neuron.type == MPSCNNNeuronType.reLU:
        # FORMULAS' where(x >= 0, x, a·x) as one pass instead of four: in place on the convolution's
        # own output, out of place for a neuron kernel, whose y is a view of the source image.
        if p.identity:
            return torch.clamp_min(y, 0.0) if neuron.a == 0.0 else Fn.leaky_relu(y, neuron.a)
        return y.clamp_min_(0.0) if neuron.a == 0.0 else Fn.leaky_relu_(y, neuron.a)
    prelu = None if prepared.prelu is None else prepared.prelu[: y.shape[1]]
    return apply_neuron(y, neuron, prelu, TORCH_OPS)


def _expand(x: torch.Tensor, upsample: tuple[int, int]) -> torch.Tensor:
    """The source with ``s - 1`` zeros between pixels (spec §10.3), NCHW, channels-last."""
    (uy, ux), (n, c, h, w) = upsample, x.shape
    out = x.new_zeros((n, c, (h - 1) * uy + 1, (w - 1) * ux + 1)).contiguous(memory_format=torch.channels_last)
    out[:, :, ::uy, ::ux] = x
    return out


def _depth_to_space(y: torch.Tensor, r: int) -> torch.Tensor:
    """NCHW view of NHWC depth-to-space (spec §5): channel ``(C/r²)·(r·dy + dx) + c`` of ``(Y, X)``
    becomes channel ``c`` of ``(r·Y + dy, r·X + dx)``."""
    n, c, h, w = y.shape
    blocks = y.reshape(n, r, r, c // (r * r), h, w)  # [n, dy, dx, c, Y, X]
    return blocks.permute(0, 3, 4, 1, 5, 2).reshape(n, c // (r * r), h * r, w * r)


def _conv2d_full_fp32(*args):
    # cuDNN would use TF32 for float32 by default; MPS numerics need full fp32 accumulation
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return Fn.conv2d(*args)


# --------------------------------------------------------------------------------------------
# Binary convolution (spec convolution.md §15): XNOR and AND as popcounts over packed words


class _BinaryTensors:
    def __init__(self, params, dev):
        o, kh, kw, words = params.bits.shape
        self.words = torch.from_numpy(params.bits.astype(np.int64)).to(dev)  # [O, kH, kW, W] in int64
        self.plus_minus = torch.from_numpy(2.0 * params.unpacked(words * 32).astype(np.float32) - 1).to(dev)
        self.in_bias = torch.from_numpy(params.in_bias).to(dev)
        self.in_scale = torch.from_numpy(params.in_scale).to(dev)
        self.out_bias = torch.from_numpy(params.out_bias).to(dev)
        self.out_scale = torch.from_numpy(params.out_scale).to(dev)


def _popcount(v: torch.Tensor) -> torch.Tensor:
    """Bits set in each 32-bit value held in an int64 (SWAR)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


class BinaryPlan:
    """Tap indices (through the edge mode) of a binary problem, and where it writes."""

    def __init__(self, problem: ConvProblem, device):
        from .reference import taps

        p = self.problem = problem
        dev = device.torch_device
        (kh, kw), (gh, gw) = p.kernel, p.grid
        ys, y_in = taps(p.tap0[0], gh, p.stride[0], kh, p.dilation[0], p.src_size[0], p.edge)
        xs, x_in = taps(p.tap0[1], gw, p.stride[1], kw, p.dilation[1], p.src_size[1], p.edge)
        self.index = (torch.from_numpy(ys[:, None, :, None]).to(dev), torch.from_numpy(xs[None, :, None, :]).to(dev))
        self.mask = torch.from_numpy((y_in[:, None, :, None] & x_in[None, :, None, :])[..., None]).to(dev)
        if p.beta:
            centre = [p.tap0[a] + (p.extent(a) >> 1) for a in (0, 1)]
            by, by_in = taps(centre[0] - (kh >> 1), gh, p.stride[0], kh, 1, p.src_size[0], p.edge)
            bx, bx_in = taps(centre[1] - (kw >> 1), gw, p.stride[1], kw, 1, p.src_size[1], p.edge)
            self.beta_index = (torch.from_numpy(by[:, None, :, None]).to(dev),
                               torch.from_numpy(bx[None, :, None, :]).to(dev))
            self.beta_mask = torch.from_numpy((by_in[:, None, :, None] & bx_in[None, :, None, :])[..., None]).to(dev)
        n, i0, c0 = p.n_images, p.src_image0, p.src_channel0
        self.src_index = (slice(i0, i0 + n), slice(None), slice(None), slice(c0, c0 + p.in_channels))
        (y0, x0), (oh, ow) = p.out_origin, p.out_size
        z0, d0 = p.dst_image0, p.dst_channel0
        self.dst_index = (slice(z0, z0 + n), slice(y0, y0 + oh), slice(x0, x0 + ow), slice(d0, d0 + p.out_channels))


class BinaryBound:
    __slots__ = ("plan", "src", "out")

    def __init__(self, plan: BinaryPlan, src: torch.Tensor, dst: torch.Tensor):
        self.plan, self.src, self.out = plan, src[plan.src_index], dst[plan.dst_index]


def _windows(x: torch.Tensor, index, mask) -> torch.Tensor:
    """``[n, gh, gw, kH, kW, C]``: every tap, read through the edge mode."""
    return x[:, index[0], index[1], :] * mask


def run_binary(bound: BinaryBound, prepared: Prepared) -> None:
    plan, b = bound.plan, prepared.binary
    p = plan.problem
    c, words = p.in_channels, b.words.shape[-1]
    x = storage_to_values(bound.src, F(p.src_format), torch.float32)  # [n, H, W, C]
    s_prime = (_windows(x, plan.index, plan.mask) + b.in_bias) * b.in_scale
    if p.binary == 0:  # binaryWeights: S'·(2·bit - 1), a float contraction
        acc = torch.einsum("nyxqpc,oqpc->nyxo", s_prime, b.plus_minus[..., :c])
    else:  # pack [S' >= 0] into 32-bit words, then XNOR / AND by popcount
        positive = Fn.pad((s_prime >= 0).to(torch.int64), (0, words * 32 - c))
        shifts = torch.arange(32, device=x.device, dtype=torch.int64)
        packed = (positive.reshape(*positive.shape[:-1], words, 32) << shifts).sum(-1)  # [n, gh, gw, kH, kW, W]
        taps = p.kernel[0] * p.kernel[1]
        rows = []
        for chunk in packed.split(max(1, (1 << 22) // max(1, packed[0, 0].numel() * b.words.shape[0])), dim=1):
            both = chunk[:, :, :, None] ^ b.words if p.binary == 1 else chunk[:, :, :, None] & b.words
            count = _popcount(both).sum(dim=(-3, -2, -1))  # [n, rows, gw, O]
            rows.append(taps * c - 2 * count if p.binary == 1 else count)  # bits past C are 0 on both sides
        acc = torch.cat(rows, dim=1).to(torch.float32)
    beta = 1.0
    if p.beta:
        around = (_windows(x, plan.beta_index, plan.beta_mask) + b.in_bias) * b.in_scale
        beta = around.abs().mean(dim=-1).mean(dim=(3, 4))[..., None]
    y = acc * b.out_scale * beta + b.out_bias  # [n, gh, gw, O]
    if p.neuron.type != MPSCNNNeuronType.none:
        prelu = None if prepared.prelu is None else prepared.prelu.view(-1)
        y = apply_neuron(y, p.neuron, prelu, TORCH_OPS)
    fmt = F(p.dst_format)
    bound.out.copy_(y if fmt in _FLOAT_FORMATS else values_to_storage(y, fmt))


def _plan(problem, device):
    return BinaryPlan(problem, device) if problem.binary >= 0 else Plan(problem, device)


def _bind(plan, src, dst):
    return BinaryBound(plan, src, dst) if isinstance(plan, BinaryPlan) else Bound(plan, src, dst)


def _run(bound, prepared) -> None:
    (run_binary if isinstance(bound, BinaryBound) else run)(bound, prepared)


class _Torch:
    name = "torch"

    @staticmethod
    def supports(problem, device) -> bool:
        return True

    @staticmethod
    def prepare(weights, bias, prelu, device) -> Prepared:
        return Prepared(weights, bias, prelu, device)

    plan = staticmethod(_plan)
    bind = staticmethod(_bind)
    run = staticmethod(_run)


BACKEND = _Torch()
