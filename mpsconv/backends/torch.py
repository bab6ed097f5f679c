"""The torch backend: oneDNN on the CPU, cuDNN on CUDA, through ``torch.nn.functional.conv2d``.

Images are NHWC, so ``permute(0, 3, 1, 2)`` of a channel slice is a channels-last NCHW view that
the convolution reads without a copy. Metal's ``offset`` can place the window anywhere: the read
window becomes a crop plus zero pads (symmetric pads go to the convolution itself), and the clamp
edge mode an index gather. Bias is fused into the convolution; the neuron and the format
conversion write straight into the destination's channel slice and clip region, in one pass for
ReLU. Everything that depends only on the problem is worked out once, in ``Plan``.

On the CPU, when PyTorch's oneDNN operators are there, weights are reordered once into oneDNN's
blocked layout per geometry (``mkldnn._reorder_convolution_weight``) and the convolution runs through
``mkldnn._convolution_pointwise``: the same oneDNN kernels as
``conv2d``, bit for bit, without reordering the weights on every call (what inductor does for
frozen CPU models). The kernel then keeps that copy of its weights alone (``Prepared.packed``).
Elsewhere ``torch.nn.functional.conv2d`` runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading

import numpy as np
import torch
import torch.nn.functional as Fn

from ..core.activations import (
    TORCH_OPS, MPSCNNNeuronType, apply_neuron, neuron_args, neuron_derivative, neuron_supported,
)
from ..core.formats import FLOAT_FORMATS as _FLOAT_FORMATS, STORAGE_DTYPE, MPSImageFeatureChannelFormat as F, \
    storage_to_values, values_to_storage
from ..core.geometry import ConvProblem, framework_window, identity_reads, torch_output_size, transposed_window
from ..core.weights import BinaryParams
from . import launch  # the CUDA epilogue (Triton itself loads on first use)

_COPY, _RELU, _GENERAL = 0, 1, 2
_ONEDNN: bool | None = None  # whether the prepacked oneDNN path works in this PyTorch build
#: Tests set this (with Triton's interpreter) to run the CUDA path, convolution in the source's type
#: plus the Triton epilogue, on CPU tensors.
FUSED_ON_CPU = False
#: CUDA runs whose convolution output takes at most this many bytes are replayed as a CUDA graph
#: from their second run on (``_captured``): on such layers the host's cuDNN call and epilogue launch
#: (30-50 µs) take longer than the GPU's work. Each graph keeps its own output and cuDNN workspace
#: for as long as the encode stays cached.
GRAPH_MAX_BYTES = 16 << 20
#: Weights smaller than this (elements) go through conv2d: reordering them per call is cheaper than
#: the private operator's own overhead. Tests lower it to exercise the oneDNN path on small shapes.
ONEDNN_MIN_WEIGHTS = 16384
#: CPU layers whose output takes at least this many bytes are written by oneDNN straight into the
#: destination (zeroed, then the convolution added to it in place), not into a new tensor copied
#: there afterwards: a fresh output and its copy cost more memory traffic than the convolution on
#: large layers (MobileNetV2's 112x112 depthwise layer at batch 8: 1.08 ms -> 0.62 ms, eager 0.67 ms;
#: 2 cores). Below it the extra zeroing pass costs more than it saves. Tests lower it.
IN_PLACE_MIN_BYTES = 4 << 20


def onednn_usable() -> bool:
    """Probe once: PyTorch's private oneDNN operators may be absent or change between versions."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            x = torch.ones(1, 4, 2, 2).to(memory_format=torch.channels_last)
            w = _reorder(torch.ones(4, 4, 1, 1), (0, 0), (1, 1), (1, 1), 1, (1, 4, 2, 2))
            y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
            _ONEDNN = bool(torch.backends.mkldnn.is_available()) and bool((y == 4).all())
        except Exception:
            _ONEDNN = False
    return _ONEDNN


def _reorder(weights, padding, stride, dilation, groups, input_shape):
    # from the dense (channels-last) weights directly: ``to_mkldnn`` first would hold two more copies
    # of the layer's weights at once
    return torch.ops.mkldnn._reorder_convolution_weight(weights, list(padding), list(stride), list(dilation), groups,
                                                        list(input_shape))


#: Dropping float32 weights of at least this size gives the freed pages back to the system at once.
TRIM_MIN_BYTES = 1 << 20


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError, TypeError):  # another C library, or no process handle (Windows)
        return None


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the system (glibc's ``malloc_trim``; nothing elsewhere). The weights
    a kernel drops once oneDNN holds its copy (``Prepared.packed``) are a large block in the middle of
    the heap, which ``free`` keeps resident: the process would keep two copies' worth of memory.
    About 0.1 ms a call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _oihw(ohwi: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[O][kH][kW][I]`` weights as the OIHW tensor ``conv2d`` takes, channels-last (OHWI is its
    memory order): on the CPU a view of ``ohwi``, without a copy."""
    t = torch.from_numpy(np.ascontiguousarray(ohwi, dtype=np.float32)).to(device)
    o, h, w, i = t.shape
    if i == 1 or h * w == 1:
        # The permuted view's strides would read as both layouts, and PyTorch 2.13's CPU conv2d then
        # gives wrong results for batches of 2 or more. Here OHWI's memory order is OIHW's, so the
        # canonical contiguous view holds the same bytes, without a copy.
        return t.view(o, i, h, w)
    return t.permute(0, 3, 1, 2)


def _ohwi_of_packed(packed: torch.Tensor) -> np.ndarray:
    """The float32 ``[O][kH][kW][I]`` weights back from oneDNN's reordered copy (exact: a reorder
    moves values)."""
    return packed.to_dense().permute(0, 2, 3, 1).contiguous().numpy()


class Prepared:
    """A kernel's effective parameters in this backend's layout, on the kernel's device."""

    def __init__(self, weights, bias, prelu, device):
        dev = device.torch_device
        self.binary = None
        if isinstance(weights, BinaryParams):
            self.binary = _BinaryTensors(weights, dev)
            weights = None
        self.device = dev
        self._kept = weights  # KeptWeights or None
        # On CUDA the device copy is made now; on the CPU the tensor views the kept array, made on
        # first use, and goes once oneDNN holds the weights (``packed``)
        self._weights = None if weights is None or dev.type != "cuda" else _oihw(weights.array(), dev)
        self.bias = None if bias is None or not np.any(bias) else torch.from_numpy(
            np.asarray(bias, np.float32)).to(dev)
        self.prelu = None if prelu is None else torch.from_numpy(np.asarray(prelu, np.float32)).to(dev).view(-1, 1, 1)
        self._packed: dict = {}
        self._operands: dict = {}

    @property
    def weights(self) -> torch.Tensor | None:
        """The weights ``[O][I/G][kH][kW]``, float32, as ``conv2d`` takes them (channels-last)."""
        weights = self._weights  # read once: ``packed`` on another queue's thread may drop it meanwhile
        if weights is None and self._kept is not None:
            weights = self._weights = _oihw(self._kept.array(), self.device)
        return weights

    def operand(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weights in a 16-bit ``dtype`` for cuDNN, or None where that type would round them."""
        if dtype not in self._operands:
            w = self.weights.to(dtype)
            exact = torch.equal(w.to(torch.float32), self.weights)
            self._operands[dtype] = w if exact else None
        return self._operands[dtype]

    def transposed(self, groups: int) -> torch.Tensor:
        """The weights as ``conv_transpose2d`` takes them: ``[I][O/G][kH][kW]``, rotated 180°."""
        if getattr(self, "_transposed", None) is None:
            o, ig, kh, kw = self.weights.shape
            w = self.weights.reshape(groups, o // groups, ig, kh, kw).transpose(1, 2)  # [G][Ig][Og][kH][kW]
            self._transposed = w.reshape(groups * ig, o // groups, kh, kw).flip(2, 3).contiguous()
        return self._transposed

    def packed(self, plan: "Plan"):
        """The weights in oneDNN's layout for ``plan``'s geometry, reordered once. Then the kernel keeps
        that copy alone (``KeptWeights.rely_on``): ``to_dense`` gives the float32 values back exactly,
        and a network's weights take the memory of one copy, not two."""
        weights = self._packed.get(plan.pack_key)
        if weights is None:
            if len(self._packed) >= 16:
                self._packed.clear()
            weights = self._packed[plan.pack_key] = _reorder(self.weights, *plan.pack_key)
            dropped = 4 * math.prod(self._kept.shape)
            self._kept.rely_on(functools.partial(_ohwi_of_packed, weights))
            self._weights = None
            if dropped >= TRIM_MIN_BYTES:
                _give_back_freed_memory()
        return weights


class Plan:
    """Indexing, pads and epilogue of one ``ConvProblem``, resolved once."""

    def __init__(self, problem: ConvProblem, device):
        p = problem
        n, i0, c0 = p.n_images, p.src_image0, p.src_channel0
        self.problem = p
        self.src_index = (slice(i0, i0 + n), slice(None), slice(None), slice(c0, c0 + p.in_channels))
        self.src_format = F(p.src_format)
        self.device, self._gather_indices = device.torch_device, None
        self.upsample = p.upsample if p.upsample != (1, 1) else None
        window = framework_window(p)
        everything = slice(None)
        self.crop = (everything, everything, slice(*window.crop[0]), slice(*window.crop[1]))
        self.gathers = [(axis + 2, first, last, size) for axis, first, last, size in window.gathers]
        self.zeros_shape = (n, p.in_channels, *window.input_size) if window.zeros else None
        self.conv_padding, self.pad = window.padding, window.pad
        self.out_crop = None if window.out_crop is None else (
            everything, everything, slice(window.out_crop[0], window.out_crop[0] + p.grid[0]),
            slice(window.out_crop[1], window.out_crop[1] + p.grid[1]))
        (y0, x0), (oh, ow) = p.out_origin, p.out_size
        gh, gw = p.grid
        d0, z0 = p.dst_channel0, p.dst_image0
        self.dst_index = (slice(z0, z0 + n), slice(y0, y0 + oh), slice(x0, x0 + ow), slice(d0, d0 + p.dst_channels))
        self.dst_format = F(p.dst_format)
        self.subpixel = p.subpixel
        self.conv2d = _full_fp32(Fn.conv2d) if device.is_cuda else Fn.conv2d
        self.conv_transpose2d = _full_fp32(Fn.conv_transpose2d) if device.is_cuda else Fn.conv_transpose2d
        # Backwards kernels: conv_transpose2d on the source itself (``core.geometry.transposed_window``)
        self.transposed = p.upsample != (1, 1) and not p.identity and p.binary < 0
        if self.transposed:
            backwards = transposed_window(p)
            self.t_padding = (backwards.padding, backwards.output_padding)
            self.t_crop = (everything,) * 4 if backwards.exact else \
                (everything, everything, slice(*backwards.crop[0]), slice(*backwards.crop[1]))
            self.t_pad = backwards.pad
            self.upsample, self.crop, self.pad, self.gathers, self.zeros_shape = None, None, None, [], None
            self.out_crop, self.conv_padding = None, (0, 0)
        shape = (n, p.in_channels, *window.input_size)
        weights = p.out_channels * p.kernel[0] * p.kernel[1] * (p.in_channels // p.groups)
        # _convolution_pointwise gives wrong results when channels-last strides are ambiguous (one
        # channel or one pixel, e.g. N=2, 1x1 output, 1 output channel in PyTorch 2.13): keep it to
        # layouts where they are not.
        unambiguous = min(p.out_channels, p.in_channels, shape[2] * shape[3], gh * gw) > 1
        mkldnn = (not device.is_cuda and not p.identity and p.binary < 0 and not self.transposed and unambiguous
                  and onednn_usable())
        self.onednn = mkldnn and weights >= ONEDNN_MIN_WEIGHTS
        self.pack_key = (self.conv_padding, p.stride, p.dilation, p.groups, shape)

        # On CUDA the epilogue after cuDNN is one Triton kernel: bias, neuron, store into the slice.
        self.fused = ((device.is_cuda or FUSED_ON_CPU) and not p.identity and p.binary < 0 and not self.transposed
                      and self.src_format in _FLOAT_FORMATS and self.dst_format in _FLOAT_FORMATS
                      and _triton_epilogue_usable(p))
        # cuDNN's output is rounded to its input type before our epilogue adds the bias. That costs
        # nothing visible only when the destination has that same 16-bit type and the neuron cannot
        # magnify half an ulp (none, ReLU with |a| <= 1); otherwise cuDNN runs in float32.
        self.compute_dtype = torch.float32
        if (self.fused and self.src_format != F.float32 and self.dst_format == self.src_format
                and (p.neuron.type == MPSCNNNeuronType.none
                     or (p.neuron.type == MPSCNNNeuronType.reLU and abs(p.neuron.a) <= 1.0))):
            self.compute_dtype = STORAGE_DTYPE[self.src_format]
        if device.is_cuda and p.reduced_precision:
            self.conv2d = _tf32(Fn.conv2d)
        if self.fused:
            self.epilogue_args = neuron_args(p.neuron)
        out_bytes = n * gh * gw * p.out_channels * self.compute_dtype.itemsize
        self.graphed = self.fused and device.is_cuda and out_bytes <= GRAPH_MAX_BYTES
        # Epilogue: what is left after the convolution (and its bias).
        # Not oneDNN's relu or clip post-ops: they map NaN and -inf to 0 (docs/reliability.md
        # "Numerics"); the output is copied into the destination anyway, and leaky_relu(out=) is that
        # copy (ReLU, and ReLUN's first part, whose ceiling is then one pass in place).
        self.apply_neuron = p.neuron.type != MPSCNNNeuronType.none
        self.ceiling = p.neuron.b if p.neuron.type == MPSCNNNeuronType.reLUN else None
        if p.subpixel > 1 or p.binary >= 0 or self.dst_format not in _FLOAT_FORMATS:
            self.epilogue = _GENERAL  # neuron, depth-to-space, format conversion as needed
        elif not self.apply_neuron:
            self.epilogue = _COPY
        elif _leaky(p.neuron) and self.dst_format == F.float32:  # leaky_relu(out=) needs out's dtype to be y's
            self.epilogue = _RELU
        else:
            self.epilogue = _GENERAL
        # into the destination itself (``_in_place``): float32, and no work between the convolution
        # and the store but the neuron
        self.in_place = (mkldnn and self.epilogue != _GENERAL and self.dst_format == F.float32
                         and self.out_crop is None and 4 * n * gh * gw * p.out_channels >= IN_PLACE_MIN_BYTES)


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

    __slots__ = ("plan", "x", "ready", "out", "epilogue", "ran", "graphs")

    def __init__(self, plan: Plan, src: torch.Tensor, dst: torch.Tensor):
        self.plan = plan
        self.epilogue = None  # CUDA: the Triton epilogue's launch (launch.Epilogue)
        self.ran = None  # the weights (Prepared) of the last run made without a graph
        # plan.graphed: raw stream -> (prepared, torch.cuda.CUDAGraph of a run), or False if capture failed
        self.graphs = {}
        if plan.zeros_shape is not None:  # the window misses the source: the input is zeros, always
            self.x, self.ready = _canonical(src.new_zeros(plan.zeros_shape, dtype=torch.float32)), True
        else:  # backwards kernels crop after expanding the source, at run time
            crop = plan.crop if plan.crop is not None and plan.upsample is None else (slice(None),) * 4
            images, _, _, channels = plan.src_index
            x = _nchw_view(src, images, crop[2], crop[3], channels)
            self.ready = False
            if (STORAGE_DTYPE[plan.src_format] == plan.compute_dtype and not plan.gathers and plan.pad is None
                    and plan.upsample is None):
                view = _restrided(x)  # no work left on the input at run time, unless it needs a copy
                if view is not None:
                    x, self.ready = view, True
            self.x = x
        self.out = _nchw_view(dst, *plan.dst_index)


def run(bound: Bound, prepared: Prepared) -> None:
    plan = bound.plan
    p = plan.problem
    x = bound.x
    if plan.fused:
        _run_fused(bound, prepared)
        return
    if not bound.ready:
        if plan.src_format != F.float32:  # dense first: converting a sparse view is several times slower
            x = storage_to_values(_canonical(x), plan.src_format, torch.float32)
        if plan.upsample is not None:
            x = _expand(x, plan.upsample)
            if plan.crop is not None:
                x = x[plan.crop]
        x = _canonical(_gather_and_pad(x, plan))
    if plan.in_place:  # (encode refuses a destination that shares storage with its source)
        _in_place(bound, prepared, x)
        return
    if p.identity:
        y = x[:, :, :: p.stride[0], :: p.stride[1]]
    elif p.binary >= 0:
        y = _binary_from_window(x, p, prepared.binary, plan.conv2d)
    elif plan.transposed:
        fused_bias = prepared.bias if plan.t_pad is None else None  # zero-filled outputs need the bias too
        padding, output_padding = plan.t_padding
        y = plan.conv_transpose2d(x, prepared.transposed(p.groups), fused_bias, p.upsample, padding,
                                  output_padding, p.groups, p.dilation)
        y = y[plan.t_crop]
        if plan.t_pad is not None:
            y = Fn.pad(y, plan.t_pad)
            if prepared.bias is not None:
                y = y + prepared.bias.view(1, -1, 1, 1)
    elif plan.onednn:
        y = torch.ops.mkldnn._convolution_pointwise(x, prepared.packed(plan), prepared.bias, plan.conv_padding,
                                                    p.stride, p.dilation, p.groups, "none", [], "")
    else:
        y = plan.conv2d(x, prepared.weights, prepared.bias, p.stride, plan.conv_padding, p.dilation, p.groups)
    if plan.out_crop is not None:
        y = y[plan.out_crop]
    out = bound.out
    if plan.epilogue == _COPY:
        out.copy_(y)
    elif plan.epilogue == _RELU:
        _relu_into(y, out, plan)
    else:
        if plan.apply_neuron:
            y = _neuron(y, p, prepared)
        if plan.subpixel > 1:
            y = _depth_to_space(y, plan.subpixel)[:, :, : out.shape[2], : out.shape[3]]
        out.copy_(y if plan.dst_format in _FLOAT_FORMATS else values_to_storage(y, plan.dst_format))


def _in_place(bound: Bound, prepared: Prepared, x: torch.Tensor) -> None:
    """oneDNN's convolution added to the zeroed destination (its binary-add post-op, in place), then
    the neuron in place: no output tensor of its own, no copy (``IN_PLACE_MIN_BYTES``). Adding to +0
    keeps every value but the sign of a zero sum."""
    plan, out = bound.plan, bound.out
    p = plan.problem
    out.zero_()
    torch.ops.mkldnn._convolution_pointwise_.binary(out, x, prepared.packed(plan), prepared.bias, plan.conv_padding,
                                                    p.stride, p.dilation, p.groups, "add", 1.0, None, [], None)
    if plan.epilogue == _RELU:
        _relu_into(out, out, plan)


def _relu_into(y: torch.Tensor, out: torch.Tensor, plan: Plan) -> None:
    """The ``_RELU`` epilogue: ReLU (and ReLUN's ceiling) of ``y`` written into ``out`` (``y`` itself
    in place), the write into the slice in the same pass. leaky_relu, not clamp_min, so that -inf
    gives the formula's a·(-inf) = NaN for a = 0 (docs/reliability.md "Numerics"); the ceiling after,
    in place (clamp keeps NaN)."""
    torch.ops.aten.leaky_relu.out(y, plan.problem.neuron.a, out=out)
    if plan.ceiling is not None:
        out.clamp_(max=plan.ceiling)


def _run_fused(bound: Bound, prepared: Prepared) -> None:
    """CUDA: cuDNN's convolution in the source's type (float32 accumulation), then one Triton pass
    for bias, neuron and the store into the destination's slice and clip region. Small layers
    (``plan.graphed``) run it as a CUDA graph from their second run with the same weights on: one
    launch instead of cuDNN's host work and the epilogue's. Inside someone else's capture
    (``make_replayable``, the autotuner) the kernels themselves run, to be captured there."""
    if bound.plan.graphed and not torch.cuda.is_current_stream_capturing():
        stream = torch._C._cuda_getCurrentRawStream(bound.out.device.index)
        graph = bound.graphs.get(stream)
        if graph is not False:
            if (graph is None or graph[0] is not prepared) and bound.ran is prepared:
                graph = bound.graphs[stream] = _captured(bound, prepared, stream)
            if graph and graph[0] is prepared:
                graph[1].replay()
                return
    _fused_once(bound, prepared)
    bound.ran = prepared


_CAPTURE = threading.local()  # .on while _captured records a run: cuDNN then takes its cached algorithm
_CAPTURE_LOCK = threading.Lock()
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
_POOLS: dict[tuple[int, int], tuple] = {}  # (device, stream replayed on) -> the graphs' shared memory pool


def _captured(bound: Bound, prepared: Prepared, stream: int):
    """``(prepared, graph)``: one run of ``bound`` captured as a CUDA graph on a side stream (captures
    record, they do not run), to be replayed on ``stream`` (a raw CUDA stream), or False where the
    run cannot be captured. The graphs replayed on one stream share one memory pool: each one's
    memory (cuDNN's output and workspace) is free again when its run ends, and runs on one stream
    never overlap, so a network's layers hold the memory of the largest, not of all. Runs on
    different streams can overlap, so each stream has its pool and its own graph of a bound."""
    device = bound.out.device
    with _CAPTURE_LOCK:  # one capture at a time on the side stream
        side = _CAPTURE_STREAMS.get(device.index)
        if side is None:
            side = _CAPTURE_STREAMS[device.index] = torch.cuda.Stream(device)
        pool = _POOLS.get((device.index, stream))
        if pool is None:
            pool = _POOLS[device.index, stream] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        _CAPTURE.on = True
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    _fused_once(bound, prepared)
                finally:
                    graph.capture_end()
        except Exception:  # e.g. a cuDNN path that synchronises: this bound runs without a graph
            return False
        finally:
            _CAPTURE.on = False
    return prepared, graph


def _fused_once(bound: Bound, prepared: Prepared) -> None:
    plan = bound.plan
    p = plan.problem
    weights, x = prepared.weights, bound.x
    if plan.compute_dtype != torch.float32:
        weights = prepared.operand(plan.compute_dtype)
    dtype = torch.float32 if weights is None else plan.compute_dtype
    if weights is None:
        weights = prepared.weights
    if not bound.ready or x.dtype != dtype:
        x = _canonical(_gather_and_pad(_canonical(x).to(dtype), plan))
    y = plan.conv2d(x, weights, None, p.stride, plan.conv_padding, p.dilation, p.groups)
    if plan.out_crop is not None:
        y = y[plan.out_crop]
    # One epilogue per bound encode and weights: a compiled kernel is specialised to its pointers'
    # alignment, and after the first run only the convolution's output (new each run) changes.
    if bound.epilogue is None or bound.epilogue.prepared is not prepared:
        bound.epilogue = launch.Epilogue(p, prepared.bias, None if prepared.prelu is None else
                                                 prepared.prelu.view(-1), bound.out.permute(0, 2, 3, 1),
                                                 plan.epilogue_args, prepared)
    bound.epilogue(y.permute(0, 2, 3, 1))


def _triton_epilogue_usable(p: ConvProblem) -> bool:
    return launch.available() and neuron_supported(p.neuron)


def _leaky(neuron) -> bool:
    """Whether ``neuron`` is ``leaky_relu`` (ReLU), or that and a ceiling (ReLUN), exactly: where(x >= 0,
    x, a·x) tests x >= 0, leaky_relu x > 0, the same wherever a·0 = 0, i.e. for a finite slope; the
    ceiling ``min(y, b)`` is ``clamp(max=b)`` for a finite ``b`` (both keep NaN)."""
    if neuron.type == MPSCNNNeuronType.reLU:
        return math.isfinite(neuron.a)
    return neuron.type == MPSCNNNeuronType.reLUN and math.isfinite(neuron.a) and math.isfinite(neuron.b)


def _neuron(y: torch.Tensor, p: ConvProblem, prepared: Prepared) -> torch.Tensor:
    neuron = p.neuron
    if _leaky(neuron):
        # FORMULAS' where(x >= 0, x, a·x) as one pass instead of four (with a = 0 too: -inf gives
        # 0·(-inf) = NaN, as the formula does): in place on the convolution's own output, out of
        # place for a neuron kernel, whose y is a view of the source image.
        y = Fn.leaky_relu(y, neuron.a) if p.identity else Fn.leaky_relu_(y, neuron.a)
        return y.clamp_(max=neuron.b) if neuron.type == MPSCNNNeuronType.reLUN else y
    prelu = None if prepared.prelu is None else prepared.prelu[: y.shape[1]]
    return apply_neuron(y, neuron, prelu, TORCH_OPS)


def _gather_and_pad(x: torch.Tensor, plan) -> torch.Tensor:
    """The window ops after the crop, shared by run and gradient: edge gathers, then zero padding."""
    if plan.gathers and plan._gather_indices is None:
        plan._gather_indices = [(dim, torch.arange(first, last + 1).clamp_(0, size - 1).to(plan.device))
                                for dim, first, last, size in plan.gathers]
    for dim, index in plan._gather_indices or ():
        x = x.index_select(dim, index)
    return x if plan.pad is None else Fn.pad(x, plan.pad)


def _expand(x: torch.Tensor, upsample: tuple[int, int]) -> torch.Tensor:
    """The source with ``s - 1`` zeros between pixels, NCHW, channels-last."""
    (uy, ux), (n, c, h, w) = upsample, x.shape
    out = x.new_zeros((n, c, (h - 1) * uy + 1, (w - 1) * ux + 1)).contiguous(memory_format=torch.channels_last)
    out[:, :, ::uy, ::ux] = x
    return out


def _depth_to_space(y: torch.Tensor, r: int) -> torch.Tensor:
    """NCHW view of NHWC depth-to-space: channel ``(C/r²)·(r·dy + dx) + c`` of ``(Y, X)``
    becomes channel ``c`` of ``(r·Y + dy, r·X + dx)``."""
    n, c, h, w = y.shape
    blocks = y.reshape(n, r, r, c // (r * r), h, w)  # [n, dy, dx, c, Y, X]
    return blocks.permute(0, 3, 4, 1, 5, 2).reshape(n, c // (r * r), h * r, w * r)


def _no_tf32(device):
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if device.is_cuda else contextlib.nullcontext()


def _cudnn(op, tf32: bool):
    """``op`` with cuDNN's algorithm search on (each shape is timed once, as our autotuner does) and
    TF32 as the kernel allows: off unless its options allow reduced precision (PyTorch's default is
    on, and MPS numerics need full float32). The caller's settings come back afterwards."""
    get_b, set_b = torch._C._get_cudnn_benchmark, torch._C._set_cudnn_benchmark
    get_t, set_t = torch._C._get_cudnn_allow_tf32, torch._C._set_cudnn_allow_tf32

    def call(*args):
        with _CUDNN_FLAGS:  # the flags are process-wide: queues on two threads must not interleave them
            benchmark, allow = get_b(), get_t()
            # a capture records and cannot time algorithms: it takes the one found by the first run
            set_b(not getattr(_CAPTURE, "on", False))
            set_t(tf32)
            try:
                return op(*args)
            finally:
                set_b(benchmark)
                set_t(allow)
    return call


_CUDNN_FLAGS = threading.RLock()


def _tf32(op):
    return _cudnn(op, True)


def _full_fp32(op):
    return _cudnn(op, False)


# --------------------------------------------------------------------------------------------
# Binary convolution
#
# XNOR and AND sums are integers: Σ sgn(S')·(2·bit - 1) and Σ [S' >= 0]·bit. As a convolution of ±1
# (or 0/1) values in float32 they are exact while |sum| < 2**24, i.e. bit for bit what popcounts over
# packed words give, and oneDNN runs them 20-50x faster on the CPU than popcounts built from torch
# operations (benchmarks/history.md). Layers with kH·kW·I >= 2**24 terms, where float32 could round,
# count bits instead: popcounts over 32-bit words.

#: Terms per output above which XNOR/AND sums are counted as popcounts (float32 is exact below 2**24).
POPCOUNT_MIN_TERMS = 1 << 24


class _BinaryTensors:
    def __init__(self, params, dev):
        o, kh, kw, words = params.bits.shape
        unpacked = params.unpacked(words * 32).astype(np.float32)  # [O, kH, kW, 32·W]
        self.words = torch.from_numpy(params.bits.astype(np.int64)).to(dev)  # [O, kH, kW, W]
        self.plus_minus = torch.from_numpy(2.0 * unpacked - 1).to(dev)  # (2·bit - 1), OHWI
        self.ones = torch.from_numpy(unpacked).to(dev)
        self.in_bias = torch.from_numpy(params.in_bias).to(dev)
        self.in_scale = torch.from_numpy(params.in_scale).to(dev)
        self.input_affine = bool(np.any(params.in_bias != 0) or np.any(params.in_scale != 1))
        self.unit_scale = bool(np.all(params.out_scale == 1))
        self.out_bias = torch.from_numpy(params.out_bias).to(dev)
        self.out_scale = torch.from_numpy(params.out_scale).to(dev)
        self._conv_weights: dict = {}

    def conv_weights(self, kind: int, channels: int) -> torch.Tensor:
        """OIHW float weights for the float path: ``2·bit - 1`` (binaryWeights, xnor) or ``bit`` (AND)."""
        key = (kind == 2, channels)
        if key not in self._conv_weights:
            source = self.ones if kind == 2 else self.plus_minus
            self._conv_weights[key] = source[..., :channels].permute(0, 3, 1, 2).contiguous()
        return self._conv_weights[key]


def _binary_from_window(x: torch.Tensor, p: ConvProblem, b: _BinaryTensors, conv2d) -> torch.Tensor:
    """``acc · scale · β + bias`` (NCHW) from the read window ``x`` of the source (pads included)."""
    c = p.in_channels
    channel = (1, -1, 1, 1)
    s_prime = (x + b.in_bias.view(channel)) * b.in_scale.view(channel) if b.input_affine else x
    if p.binary != 0 and p.kernel[0] * p.kernel[1] * c >= POPCOUNT_MIN_TERMS:
        acc = _popcount_accumulate(s_prime, p, b)
    else:
        if p.binary == 0:  # binaryWeights: S'·(2·bit - 1)
            terms = s_prime
        elif p.binary == 1:  # xnor: sgn(S')·(2·bit - 1), sgn(v) = v < 0 ? -1 : +1
            terms = torch.where(s_prime < 0, -1.0, 1.0)
        else:  # AND: [S' >= 0]·bit
            terms = (s_prime >= 0).to(torch.float32)
        weights = b.conv_weights(p.binary, c)
        if b.unit_scale and not p.beta:  # acc·1·1 + bias: the bias can ride in the convolution
            return conv2d(_canonical(terms), weights, b.out_bias, p.stride, (0, 0), p.dilation, 1)
        acc = conv2d(_canonical(terms), weights, None, p.stride, (0, 0), p.dilation, 1)
    beta = 1.0
    if p.beta:  # β: the mean of A = mean_c |S'| over a kW x kH window around each window centre
        (kh, kw), (gh, gw) = p.kernel, p.grid
        dy, dx = p.beta_shift()
        a = s_prime.abs().mean(dim=1, keepdim=True)[:, :, dy:, dx:]
        beta = Fn.avg_pool2d(a, (kh, kw), p.stride)[:, :, :gh, :gw]
    return acc * b.out_scale.view(channel) * beta + b.out_bias.view(channel)


def _popcount(v: torch.Tensor) -> torch.Tensor:
    """Bits set in each 32-bit value held in an int64 (SWAR)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def _popcount_accumulate(s_prime: torch.Tensor, p: ConvProblem, b: _BinaryTensors) -> torch.Tensor:
    """XNOR / AND sums as popcounts: pack ``[S' >= 0]`` per pixel into 32-bit words, then per tap
    ``32·W - 2·popcount(x ^ w)`` (xnor; bits past C are 0 on both sides) or ``popcount(x & w)`` (AND)."""
    c, words = p.in_channels, b.words.shape[-1]
    (kh, kw), (gh, gw), (sy, sx), (ddy, ddx) = p.kernel, p.grid, p.stride, p.dilation
    positive = Fn.pad((s_prime >= 0).to(torch.int64).permute(0, 2, 3, 1), (0, words * 32 - c))
    shifts = torch.arange(32, device=s_prime.device, dtype=torch.int64)
    packed = (positive.reshape(*positive.shape[:3], words, 32) << shifts).sum(-1)  # [n, H, W, words]
    acc = s_prime.new_zeros((s_prime.shape[0], gh, gw, b.words.shape[0]), dtype=torch.int64)
    for q in range(kh):
        for pp in range(kw):
            tap = packed[:, q * ddy: q * ddy + (gh - 1) * sy + 1: sy, pp * ddx: pp * ddx + (gw - 1) * sx + 1: sx]
            w = b.words[:, q, pp]  # [O, words]
            both = tap[:, :, :, None, :] ^ w if p.binary == 1 else tap[:, :, :, None, :] & w
            acc += _popcount(both).sum(-1)
    if p.binary == 1:
        acc = kh * kw * c - 2 * acc
    return acc.to(torch.float32).permute(0, 3, 1, 2)


def gradient(plan: Plan, src: torch.Tensor, e: torch.Tensor, weights: np.ndarray, device):
    """``(dS, dW, dB)`` as the vector-Jacobian product of this backend's own forward window operations
    (crop, zero pad or clamped gather, convolution) with the incoming gradient ``e`` ``[n, He, We, O]``:
    exact for every geometry the forward supports, clamped reads included."""
    problem = plan.problem
    n, i0, c0 = problem.n_images, problem.src_image0, problem.src_channel0
    x0 = storage_to_values(src[i0:i0 + n, :, :, c0:c0 + problem.in_channels], F(problem.src_format), torch.float32)
    x0 = _canonical(x0.permute(0, 3, 1, 2)).detach().requires_grad_(True)  # a leaf; no copy for NHWC slices
    w = torch.from_numpy(np.ascontiguousarray(weights, np.float32)).to(src.device).permute(0, 3, 1, 2)
    w = w.contiguous().requires_grad_(True)
    x = x0
    if plan.transposed:  # small and rare: autograd through conv_transpose2d itself
        with torch.enable_grad():
            o, ig, kh, kw = w.shape
            g = problem.groups
            wt = w.reshape(g, o // g, ig, kh, kw).transpose(1, 2).reshape(g * ig, o // g, kh, kw).flip(2, 3)
            padding, output_padding = plan.t_padding
            y = plan.conv_transpose2d(x0, wt, None, problem.upsample, padding, output_padding, g, problem.dilation)
            y = y[plan.t_crop]
            if plan.t_pad is not None:
                y = Fn.pad(y, plan.t_pad)
            d_x, d_w = torch.autograd.grad(y, (x0, w), e.permute(0, 3, 1, 2).to(y.dtype))
        return d_x.permute(0, 2, 3, 1), d_w.permute(0, 2, 3, 1), e.sum(dim=(0, 1, 2))
    with torch.enable_grad():  # recorded even when the caller runs under torch.no_grad()
        if plan.zeros_shape is not None:
            x = x0.new_zeros(plan.zeros_shape) + 0 * x0.sum()  # no tap reads the source
        else:
            x = _gather_and_pad(x if plan.crop is None else x[plan.crop], plan)
    # The convolution's own backward (no forward recomputed), then autograd through the window ops only.
    window = _canonical(x.detach())
    out_h, out_w = (torch_output_size(window.shape[2 + axis], problem.kernel[axis], problem.stride[axis],
                                      plan.conv_padding[axis], problem.dilation[axis]) for axis in (0, 1))
    grad_out = e.permute(0, 3, 1, 2).to(torch.float32)
    if plan.out_crop is not None:  # the wanted outputs are a crop of the padded convolution's
        full = grad_out.new_zeros((grad_out.shape[0], grad_out.shape[1], out_h, out_w))
        full[plan.out_crop] = grad_out
        grad_out = full
    with _no_tf32(device):
        d_window, d_w, _ = torch.ops.aten.convolution_backward(
            grad_out.contiguous(memory_format=torch.channels_last), window, w.detach(), None, list(problem.stride),
            list(plan.conv_padding), list(problem.dilation), False, [0, 0], problem.groups, [True, True, False])
    d_x = torch.autograd.grad(x, x0, d_window) if x.requires_grad else (torch.zeros_like(x0),)
    return d_x[0].permute(0, 2, 3, 1), d_w.permute(0, 2, 3, 1), e.sum(dim=(0, 1, 2))


def neuron_gradient(problem: ConvProblem, src: torch.Tensor, e: torch.Tensor, e_format: int, dst: torch.Tensor,
                    prelu) -> None:
    """The reference backend's ``neuron_gradient`` in float32 on the images' device: the derivative
    from the one formula table, the scatter an ``index_add_`` (reads of one edge pixel add up)."""
    n, i0, c0, ch = problem.n_images, problem.src_image0, problem.src_channel0, problem.in_channels
    x = storage_to_values(src[i0:i0 + n, :, :, c0:c0 + ch], F(problem.src_format), torch.float32)
    (ys, y_in), (xs, x_in) = identity_reads(problem)
    ys, xs = (torch.tensor(v, dtype=torch.int64, device=src.device) for v in (ys, xs))
    read = x[:, ys][:, :, xs]
    a = None if prelu is None else torch.as_tensor(np.asarray(prelu, np.float32)[:ch], device=src.device)
    g = storage_to_values(e, F(e_format), torch.float32) * neuron_derivative(read, problem.neuron, a, TORCH_OPS)
    mask = torch.tensor(y_in, device=src.device)[:, None] & torch.tensor(x_in, device=src.device)[None, :]
    g = torch.where(mask[None, :, :, None], g, 0.0)  # not g·mask: inf·0 is NaN
    h, w = x.shape[1:3]
    d_s = x.new_zeros((n, h * w, ch)).index_add_(1, (ys[:, None] * w + xs[None, :]).reshape(-1), g.reshape(n, -1, ch))
    dst.copy_(values_to_storage(d_s.reshape(n, h, w, ch), F(problem.dst_format)))


class _Torch:
    name = "torch"

    @staticmethod
    def supports(problem, device) -> bool:
        return True

    @staticmethod
    def prepare(weights, bias, prelu, device) -> Prepared:
        return Prepared(weights, bias, prelu, device)

    @staticmethod
    def scratch_bytes(problem: ConvProblem) -> int:
        """At most what ``run`` allocates besides the images: in float32 the read window three times
        (converted, gathered through the clamp edge, padded) and the whole expanded source of a
        backwards kernel, the convolution's output and the neuron's and the store's copies of it;
        the clamp edge's int64 row and column indices."""
        p = problem
        (y0, y1), (x0, x1) = p.read_range(0), p.read_range(1)
        expanded = p.n_images * p.expanded_size[0] * p.expanded_size[1] * p.in_channels if p.upsample != (1, 1) else 0
        return 4 * (3 * p.read_elements() + expanded + 3 * p.out_elements()) + 8 * (y1 - y0 + x1 - x0 + 2)

    @staticmethod
    def gradient_scratch_bytes(problem: ConvProblem) -> int:
        """At most what ``gradient`` allocates besides the images (float32): the source slice
        converted, the read window and its gradient three times (cropped, gathered or padded, and
        back), the incoming gradient twice (and the padded convolution's outputs around it), the
        expanded source and its gradient of a backwards kernel, and the weight gradient."""
        p = problem
        (y0, y1), (x0, x1) = p.read_range(0), p.read_range(1)
        expanded = p.n_images * p.expanded_size[0] * p.expanded_size[1] * p.in_channels if p.upsample != (1, 1) else 0
        weights = p.out_channels * p.kernel[0] * p.kernel[1] * (p.in_channels // p.groups)
        source = p.n_images * p.src_size[0] * p.src_size[1] * p.in_channels
        return 4 * (2 * source + 6 * p.read_elements() + 2 * expanded + 4 * p.out_elements() + weights) \
            + 8 * (y1 - y0 + x1 - x0 + 2)

    plan = staticmethod(Plan)
    bind = staticmethod(Bound)
    run = staticmethod(run)
    gradient = staticmethod(gradient)
    neuron_gradient = staticmethod(neuron_gradient)


BACKEND = _Torch()
