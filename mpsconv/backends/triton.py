"""The triton backend: fused NHWC convolution kernels for CUDA GPUs (``_triton_kernels``).

One launch computes a whole MPS operation: the implicit-GEMM convolution (any window, stride,
dilation, groups, offset, edge mode; zeros inserted for backwards kernels), bias, the neuron, and
the store into the destination's channel slice and clip region (depth-to-space for sub-pixel
kernels). Depthwise problems (one input channel per group) run a direct kernel with the same
epilogue: tiles of whole NHWC rows, and for vertical stride and dilation 1 a kernel that rolls
down the rows, loading each source row once per tap column. Groups too narrow for tensor cores
(under 16 input channels) are offered both: the direct kernels (up to 8 channels a group), and the
implicit GEMM over several groups merged into one with block-diagonal weights; layers of under 16
input channels a group also an implicit GEMM that steps over the flattened (tap, channel)
reduction, and (one group, no dilation) a packed one: a space-to-depth launch copies the source into
a scratch image where each packed tap row is one contiguous run, then a stride-1 implicit GEMM
reads those runs (an RGB first layer: 7x7 at stride 2 becomes 4x4 taps of 16 channels). 1x1
layers whose windows are whole strided matrices (pixels by channels) are offered a persistent GEMM
that loads and stores through TMA descriptors (Hopper).
Products are taken in the source's storage type (float16 / bfloat16) when the weights are exact in
it, else in float32 (TF32 only when the kernel's ``options`` allow reduced precision); the
accumulator is float32 throughout.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors too (slowly), which is how CI checks
them; elsewhere the backend supports CUDA devices only. Loading Triton, the launcher and the
epilogue kernel are shared with the torch backend (``launch``).
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.activations import neuron_args, neuron_supported
from ..core.formats import STORAGE_DTYPE, MPSImageFeatureChannelFormat as F
from ..core.geometry import ConvProblem, EdgeMode
from .launch import (
    EPILOGUE_TILE, Launcher, available, epilogue_args, epilogue_launcher, interpreting, kernels, needs_wide_index,
    tl_dtype,
)

_FORMATS = (F.float16, F.float32, F.bfloat16)


@dataclass(frozen=True)
class Config:
    """A launch configuration: tile sizes, warps and pipeline stages (``num_stages``)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1  # split-K parts (> 1: partial sums in a workspace, then the epilogue kernel)
    # a direct kernel's tiles, named "d...": (output rows, or for the rolling kernel the source rows a
    # band walks (``rolling_band``); positions; source rows loaded together)
    direct: bool = False
    merge: int = 1  # groups computed as one, with block-diagonal weights (narrow groups on tensor cores)
    flat: bool = False  # steps over the flattened (tap, channel) reduction (a few input channels), "...f"
    tma: int = 0  # > 0: the persistent TMA GEMM of 1x1 layers, this many programs an SM, "...t<n>"
    pack: bool = False  # space-to-depth first, then an implicit GEMM over the packed image, "...p"

    def __str__(self) -> str:
        text = f"{'d' if self.direct else ''}{self.bm}x{self.bn}x{self.bk}w{self.warps}s{self.stages}"
        return (text + (f"k{self.split}" if self.split > 1 else "") + (f"g{self.merge}" if self.merge > 1 else "")
                + ("f" if self.flat else "") + ("p" if self.pack else "") + (f"t{self.tma}" if self.tma else ""))

    @classmethod
    def parse(cls, text: str) -> "Config":
        m = re.fullmatch(r"(d?)(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(?:k(\d+))?(?:g(\d+))?(f?)(p?)(?:t(\d+))?", text)
        if m is None:
            raise ValueError(f"Config.parse: {text!r} is not a launch configuration")
        direct, *fields, split, merge, flat, pack, tma = m.groups()
        return cls(*map(int, fields), split=int(split or 1), direct=bool(direct), merge=int(merge or 1),
                   flat=bool(flat), tma=int(tma or 0), pack=bool(pack))


def _direct(*fields) -> Config:
    return Config(*fields, direct=True)


#: Candidates the autotuner times for implicit-GEMM problems (bm, bn, bk, warps, stages).
GEMM_CONFIGS = [Config(128, 64, 32, 4, 3), Config(128, 128, 32, 8, 3), Config(64, 64, 32, 4, 4),
                Config(128, 128, 64, 8, 3), Config(64, 128, 64, 4, 3), Config(256, 128, 64, 8, 3),
                Config(128, 256, 64, 8, 3), Config(64, 32, 32, 4, 3), Config(64, 64, 64, 4, 4),
                Config(128, 128, 64, 4, 4), Config(128, 64, 64, 4, 3)]
#: Split-K candidates, offered when the tiles alone would not fill the GPU.
SPLIT_CONFIGS = [Config(64, 64, 64, 4, 4, 2), Config(64, 64, 64, 4, 4, 4), Config(64, 128, 64, 4, 3, 2),
                 Config(64, 128, 64, 4, 3, 3), Config(64, 128, 64, 4, 3, 4),
                 Config(128, 64, 64, 4, 3, 4), Config(64, 64, 64, 4, 4, 8), Config(64, 128, 128, 8, 3, 4),
                 Config(32, 128, 64, 4, 4, 8)]
#: Tiles below which split-K candidates are timed too (about two waves of a 132-SM H100).
SPLIT_BELOW_TILES = 264
#: Depthwise candidates: (rows, row positions, source rows loaded together, warps, stages). ``bk`` 0 is
#: the tiled direct kernel (``direct_nhwc``), whose programs take ``bm`` output rows; ``bk`` > 0 the
#: rolling one (``direct_rolling_nhwc``), which needs vertical stride and dilation 1, and whose
#: programs walk ``bm`` source rows ``bk`` at a time: ``bm - KH + 1`` output rows (at least one). So a
#: band of whole steps has no masked rows to compute: 3x3 bands of 30 rows instead of 32 took the
#: H200's fp16 144-channel 56x56 layer from 30.3 to 27.4 us (benchmarks/history.md). Stages above 1
#: pipeline the rolling kernel's row loop (``cp.async`` staging through shared memory), 4x slower there.
DEPTHWISE_CONFIGS = [_direct(32, 256, 8, 2, 1), _direct(32, 512, 8, 4, 1), _direct(32, 128, 8, 1, 1),
                     _direct(16, 512, 8, 4, 1), _direct(16, 256, 8, 2, 1), _direct(16, 128, 8, 1, 1),
                     _direct(16, 256, 16, 2, 1), _direct(16, 128, 4, 1, 1), _direct(32, 512, 4, 4, 1),
                     _direct(2, 512, 0, 4, 1), _direct(4, 256, 0, 4, 1), _direct(8, 256, 0, 4, 1)]
#: Implicit-GEMM tiles for groups too narrow for tensor cores (under 16 input channels): ``merge``
#: groups computed as one (``bk`` / Ig of them, so that a step reads ``bk`` channels) with
#: block-diagonal weights; the zeros cost tensor-core time, which these layers have to spare.
MERGED_TILES = [Config(128, 32, 32, 4, 3), Config(128, 32, 32, 4, 4), Config(128, 64, 64, 4, 3),
                Config(64, 32, 32, 2, 4)]
#: Implicit-GEMM tiles stepping over the flattened (tap, channel) reduction, for layers of a few input
#: channels per group (an RGB first layer: 3 channels x 49 taps in 5 steps of 32 instead of 49 of 32).
FLAT_TILES = [Config(128, 64, 32, 4, 3, flat=True), Config(128, 64, 64, 4, 3, flat=True),
              Config(256, 64, 32, 8, 3, flat=True), Config(64, 64, 32, 4, 4, flat=True),
              Config(128, 64, 16, 4, 4, flat=True)]
#: Implicit-GEMM tiles over a space-to-depth packed image (``packing``), for layers of a few input
#: channels: ``bk`` elements of a packed tap row's contiguous run a step.
PACKED_TILES = [Config(128, 64, 64, 4, 3, pack=True), Config(128, 64, 32, 4, 3, pack=True),
                Config(128, 64, 64, 4, 4, pack=True), Config(256, 64, 64, 8, 3, pack=True),
                Config(64, 64, 64, 4, 4, pack=True), Config(128, 128, 64, 8, 3, pack=True)]
#: Packed pixels a program of the space-to-depth kernel (``pack_nhwc``) writes, and its warps.
PACK_TILE = (128, 4)
#: Persistent TMA GEMM tiles for 1x1 layers whose windows are strided matrices (``matrix``); ``tma``
#: programs an SM. Where a bound pair's windows are not single matrices TMA can address, the
#: implicit GEMM runs instead (``TMA_FALLBACK``). H200, fp16: ResNet-50's 56x56 64 -> 256 layer into a
#: channel slice 0.026 ms against 0.038 ms for the best implicit-GEMM tile (benchmarks/history.md).
TMA_CONFIGS = [Config(256, 128, 64, 8, 3, tma=1), Config(128, 256, 64, 8, 3, tma=1),
               Config(128, 128, 64, 4, 3, tma=1), Config(128, 64, 64, 4, 3, tma=2), Config(64, 64, 64, 4, 3, tma=2),
               Config(128, 64, 32, 4, 3, tma=2), Config(128, 128, 128, 8, 3, tma=1), Config(128, 128, 64, 4, 5, tma=1)]
#: The implicit-GEMM tiles that run a TMA choice whose storages TMA cannot address, or whose pipeline
#: does not fit with the weights in float32 (not the TMA tiles themselves: some would not fit either).
TMA_FALLBACK = GEMM_CONFIGS[0]
#: Small tiles for the interpreter, which runs every program one after another on the CPU (keyed by
#: whether the problem takes the direct kernels).
INTERPRET_CONFIG = {False: Config(16, 16, 16, 1, 1), True: _direct(4, 32, 2, 1, 1)}
#: Tests set this to pick the interpreter's configuration per problem (a split-K, merged or flat one);
#: where it gives None, or is None, the configurations above apply.
INTERPRET_CHOICE: Callable[[ConvProblem], Config | None] | None = None
#: The interpreter's tiled depthwise configuration, for problems the rolling kernel cannot take.
INTERPRET_TILED = _direct(4, 32, 0, 1, 1)
#: Grouped convolutions of at most this many input channels per group also get the direct kernels
#: (``GROUPED_CONFIGS``): a GEMM tile would be mostly padding.
DIRECT_MAX_IG = 8
#: Direct candidates for narrow groups: one position per thread, as each holds ``IG`` times the
#: weights and loads of a depthwise one. On 16-bit layers the merged GEMM (``MERGED_TILES``) is faster
#: (H100: 47 µs against 78 µs on ResNeXt's 32 groups of 4 channels at 56x56); float32 products
#: without TF32 run on CUDA cores either way, where the direct kernel does no wasted work.
GROUPED_CONFIGS = [_direct(64, 128, 2, 4, 1), _direct(32, 128, 4, 4, 1), _direct(16, 128, 1, 4, 1),
                   _direct(1, 512, 0, 4, 1)]


def depthwise(p: ConvProblem) -> bool:
    return p.in_channels == p.groups


def group_inputs(p: ConvProblem) -> int:
    return p.in_channels // p.groups


def direct(p: ConvProblem) -> bool:
    """Whether the direct kernels (``direct_nhwc``, ``direct_rolling_nhwc``) serve ``p``: depthwise,
    or grouped with at most ``DIRECT_MAX_IG`` input channels per group."""
    return depthwise(p) or (p.groups > 1 and group_inputs(p) <= DIRECT_MAX_IG)


def rolls(p: ConvProblem) -> bool:
    """Whether the rolling direct kernel takes ``p``: each source row must serve consecutive output
    rows (vertical stride and dilation 1), and its weights, held in registers, at most 5x5 taps
    (depthwise) or 72 values (grouped)."""
    taps = p.kernel[0] * p.kernel[1]
    return p.stride[0] == 1 and p.dilation[0] == 1 and taps <= 25 and taps * group_inputs(p) <= 72


def rolling_band(cfg: Config, kernel_height: int) -> int:
    """Output rows of a rolling direct program (``BH``): its band walks ``cfg.bm`` source rows, of
    which the first ``kernel_height - 1`` only start sums; at least one."""
    return max(cfg.bm - (kernel_height - 1), 1)


def matrix(p: ConvProblem) -> bool:
    """Whether ``p`` is one GEMM over pixels: a dense 1x1 layer read at stride 1 from a window inside
    the source (so edges never matter). Whether its windows are also single strided matrices depends
    on the storages, which ``_matrices`` looks at."""
    inside = all(0 <= t and t + g <= s for t, g, s in zip(p.tap0, p.grid, p.src_size))
    return (p.kernel == (1, 1) and p.stride == (1, 1) and p.upsample == (1, 1) and p.subpixel == 1
            and p.groups == 1 and inside)


@dataclass(frozen=True)
class Packing:
    """Space-to-depth geometry of a ``packs`` problem (``pack_nhwc``, ``packed_conv_nhwc``).

    A tap ``(r, s)`` is ``(r'·sy + py, s'·sx + px)``: output pixel ``(v, u)`` reads it from packed
    pixel ``(v + r', u + s')``, channel ``(py·sx + px)·C + c``. So the layer becomes a stride-1
    convolution over ``kh x kw`` packed taps with no edges (the packing applied them), whose tap
    rows are contiguous runs of ``run`` elements; weights of taps past the window are zero."""

    stride: tuple[int, int]
    kh: int  # packed taps: ceil(KH / sy) x ceil(KW / sx)
    kw: int
    height: int  # packed pixels an image: grid + packed taps - 1
    width: int
    used: int  # packed channels holding values, sy·sx·C
    channels: int  # packed channels, ``used`` rounded up to 8 (16-byte pixels in 16-bit)

    @property
    def run(self) -> int:
        return self.kw * self.channels

    def shape(self, images: int) -> tuple[int, int, int, int]:
        """The packed image's shape (NHWC, dense) for ``images`` images."""
        return images, self.height, self.width, self.channels


#: Layers of fewer input channels than this (and one group) are offered the packed implicit GEMM.
PACK_BELOW_CHANNELS = 16


def packs(p: ConvProblem) -> bool:
    """Whether ``p`` can run packed (``Packing``): one group of a few input channels, read without
    dilation or inserted zeros."""
    return (p.groups == 1 and p.in_channels < PACK_BELOW_CHANNELS and p.dilation == (1, 1)
            and p.upsample == (1, 1))


def packing(p: ConvProblem) -> Packing:
    """The packed geometry of a ``packs`` problem."""
    (sy, sx), (kh, kw), (gh, gw) = p.stride, p.kernel, p.grid
    kh, kw = -(-kh // sy), -(-kw // sx)
    used = sy * sx * p.in_channels
    return Packing((sy, sx), kh, kw, gh + kh - 1, gw + kw - 1, used, -(-used // 8) * 8)


def _default_config(p: ConvProblem) -> Config:
    if not interpreting():
        return configs(p)[0]
    chosen = INTERPRET_CHOICE and INTERPRET_CHOICE(p)
    if chosen:
        return chosen
    if not direct(p):
        return INTERPRET_CONFIG[False]
    return INTERPRET_CONFIG[True] if rolls(p) else INTERPRET_TILED


class Prepared:
    """Weights in the kernels' layouts and operand types, made on first use; bias and PReLU float32."""

    def __init__(self, weights, bias, prelu, device):
        dev = device.torch_device
        self.weights = np.ascontiguousarray(weights.array(), dtype=np.float32)  # [O, kH, kW, Ig]
        self.bias = None if bias is None else torch.from_numpy(np.asarray(bias, np.float32)).to(dev)
        self.prelu = None if prelu is None else torch.from_numpy(np.asarray(prelu, np.float32)).to(dev)
        self.device = dev
        self._layouts: dict = {}
        self._exact: dict = {}

    def exact_in(self, dtype: torch.dtype) -> bool:
        """Whether every weight is representable in ``dtype`` (then products in it lose nothing)."""
        if dtype not in self._exact:
            w = torch.from_numpy(self.weights)
            self._exact[dtype] = bool(torch.equal(w.to(dtype).to(torch.float32), w))
        return self._exact[dtype]

    def layout(self, groups: int, direct_: bool, dtype: torch.dtype, merge: int = 1,
               pack: Packing | None = None) -> torch.Tensor:
        key = (groups, direct_, dtype, merge, pack)
        if key not in self._layouts:
            w = torch.from_numpy(self.weights)  # [O, kH, kW, Ig]
            o, kh, kw, ig = w.shape
            if pack is not None:  # [kh'][kw'·CP][O], zero past the window and in the padding channels
                (sy, sx), ph, pw = pack.stride, pack.kh, pack.kw
                w = torch.nn.functional.pad(w, (0, 0, 0, pw * sx - kw, 0, ph * sy - kh))
                w = w.reshape(o, ph, sy, pw, sx, ig).permute(1, 3, 2, 4, 5, 0).reshape(ph, pw, pack.used, o)
                w = torch.nn.functional.pad(w, (0, 0, 0, pack.channels - pack.used)).reshape(ph, pack.run, o)
            elif direct_:  # [kH][kW][Ig][O]
                w = w.permute(1, 2, 3, 0)
            elif merge > 1:  # [G/m][kH][kW][m·Ig][m·O/G]: group a of each m reads and writes block (a, a)
                w = w.reshape(groups // merge, merge, o // groups, kh, kw, ig)
                w = torch.einsum("gaohwj,ab->ghwajbo", w, torch.eye(merge))
                w = w.reshape(groups // merge, kh, kw, merge * ig, merge * (o // groups))
            else:  # [G][kH][kW][Ig][O/G]
                w = w.reshape(groups, o // groups, kh, kw, ig).permute(0, 2, 3, 4, 1)
            self._layouts[key] = w.contiguous().to(device=self.device, dtype=dtype)
        return self._layouts[key]


class Plan:
    """The launch of one ``ConvProblem``: its scalars, constexprs and configuration, worked out once."""

    def __init__(self, problem: ConvProblem, device, config: Config | None = None):
        p = self.problem = problem
        gh, gw = p.grid
        self.rows = p.n_images * gh * gw
        he, we = p.expanded_size
        self.src_dtype = STORAGE_DTYPE[F(p.src_format)]
        self.config = config or _default_config(p)
        self.direct = self.config.direct
        code, a, b, c, p2 = self.neuron_args = neuron_args(p.neuron)
        self.neuron = code
        self.scalars = (p.tap0[0], p.tap0[1], p.stride[0], p.stride[1], p.dilation[0], p.dilation[1],
                        p.upsample[0], p.upsample[1], a, b, c, p2)
        self.sizes = (self.rows, gh, gw, he, we)
        self.constexprs = dict(KH=p.kernel[0], KW=p.kernel[1], CLAMP=p.edge == EdgeMode.clamp,
                               UPSAMPLE=p.upsample != (1, 1), SUBPIXEL=p.subpixel, NEURON=code)
        if self.config.pack and not packs(p):
            raise ValueError(f"triton.Plan: {self.config} is a packed configuration, which this problem cannot take")
        if p.groups % self.config.merge:
            raise ValueError(f"triton.Plan: {self.config} merges {self.config.merge} groups, which do not divide "
                             f"this problem's {p.groups}")
        self.packing = packing(p) if self.config.pack else None

    def operand_dtype(self, prepared: Prepared) -> torch.dtype:
        """The type the products are taken in: the source's 16-bit storage type when the weights are
        exact in it (float16 weights by MPS's rule, bfloat16 ones for bfloat16 sources), else float32."""
        if self.src_dtype != torch.float32 and prepared.exact_in(self.src_dtype):
            return self.src_dtype
        return torch.float32


class Bound:
    """A plan bound to one source and one destination storage. The launch (kernel, grid, arguments)
    is assembled on the first run and reused: Python work per launch is what small layers pay."""

    __slots__ = ("plan", "x", "y", "launch", "scratch")

    def __init__(self, plan: Plan, src: torch.Tensor, dst: torch.Tensor):
        p = plan.problem
        self.plan = plan
        self.x = src[p.src_image0:, :, :, p.src_channel0:]
        (y0, x0) = p.out_origin
        self.y = dst[p.dst_image0:, y0:, x0:, p.dst_channel0:]
        self.launch = None
        # ``(shape, dtype)`` of the run's scratch: the packed image, or split-K partial sums (packed
        # launches take no split, as in ``_launch``)
        self.scratch = None
        if plan.packing is not None:
            self.scratch = plan.packing.shape(p.n_images), src.dtype
        elif plan.config.split > 1:
            self.scratch = (plan.config.split, plan.rows, p.out_channels), torch.float32

    def new_scratch(self) -> torch.Tensor | None:
        """This run's scratch, from the caching allocator on the current stream. Drawn per run, not kept
        per bound: the layers of a command buffer then share the same memory, as eager's temporaries
        do (the allocator hands a block back to the same stream only after the work queued before),
        and a replay's capture takes it from the graph's pool."""
        if self.scratch is None:
            return None
        shape, dtype = self.scratch
        return torch.empty(shape, dtype=dtype, device=self.x.device)


def run(bound: Bound, prepared: Prepared) -> None:
    scratch = bound.new_scratch()
    launch = bound.launch
    if launch is not None and launch[0] is prepared:
        base = 0 if scratch is None else scratch.data_ptr()
        for launcher, grid, args, holes in launch[1]:
            if holes:  # this run's scratch in the places the first run's was
                args = list(args)
                for i, offset in holes:
                    args[i] = base + offset
            launcher(grid, args)
        return
    launches = _launch(bound, prepared, scratch)
    for launcher, grid, args in launches:  # the first run compiles and specialises
        launcher(grid, args)
    if scratch is None or all(launcher.compiled is not None for launcher, _, _ in launches):
        # later runs give the tensors' addresses: the bound and ``prepared`` keep the tensors alive,
        # and the scratch's (new each run) go in at the ``holes``
        bound.launch = (prepared, [(launcher, grid, launcher.addresses(args), _holes(args, scratch))
                                   for launcher, grid, args in launches])


def _holes(args: tuple, scratch: torch.Tensor | None) -> tuple:
    """``((index, byte offset), ...)``: where ``args`` hold views of ``scratch``."""
    if scratch is None:
        return ()
    storage, base = scratch.untyped_storage().data_ptr(), scratch.data_ptr()
    return tuple((i, a.data_ptr() - base) for i, a in enumerate(args)
                 if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage)


def _launch(bound: Bound, prepared: Prepared, scratch: torch.Tensor | None) -> list:
    """The launches of one run with its ``scratch`` (``Bound.new_scratch``): ``[(Launcher, grid, args)]``."""
    plan, x, y = bound.plan, bound.x, bound.y
    p, cfg, k = plan.problem, plan.config, kernels()
    rows, gh, gw, he, we = plan.sizes
    bias = prepared.bias if prepared.bias is not None else y  # never read when HAS_BIAS is False
    prelu = prepared.prelu if prepared.prelu is not None else y
    wide = needs_wide_index(x, y, scratch)
    kwargs = dict(plan.constexprs, HAS_BIAS=prepared.bias is not None, WIDE=wide, num_warps=cfg.warps)
    if plan.direct:
        # Products are float32 here. Weights exact in the source's 16-bit type are stored in it: half the
        # bytes, and loads of the same width as the source's, so both take one register layout.
        w = prepared.layout(p.groups, True, plan.operand_dtype(prepared))
        chunks = -(-(gw * p.out_channels) // cfg.bn)  # runs of BF (column, channel) positions per row
        head = (x, w, bias, prelu, y)
        sizes = (gh, gw, he, we, p.out_channels, p.out_channels // p.groups)
        strides = (*x.stride(), *y.stride(), *p.out_size)
        kwargs["IG"] = group_inputs(p)
        if cfg.bk and rolls(p):
            band = rolling_band(cfg, p.kernel[0])
            bands = -(-gh // band)
            (ty, tx, _, sx, _, dx, uy, ux, *neuron) = plan.scalars
            args = (*head, *sizes, bands, *strides, ty, tx, sx, dx, uy, ux, *neuron)
            kernel, tiles = k.direct_rolling_nhwc, dict(BH=band, BF=cfg.bn, ROLL=cfg.bk, STAGES=cfg.stages)
            grid = (chunks * bands * p.n_images,)
        else:
            lines = p.n_images * gh  # output rows of every image
            args = (*head, lines, *sizes, *strides, *plan.scalars)
            kernel, tiles = k.direct_nhwc, dict(BH=cfg.bm, BF=cfg.bn)
            grid = (chunks * -(-lines // cfg.bm),)
        return [(Launcher(kernel, dict(kwargs, **tiles)), grid, args)]
    operand = plan.operand_dtype(prepared)
    w = prepared.layout(p.groups, False, operand, cfg.merge, plan.packing)
    groups = p.groups // cfg.merge  # merged groups are one group of merge times the channels
    og, cg = p.out_channels // groups, p.in_channels // groups
    # The interpreter's bfloat16 dot is wrong (NumPy has no bfloat16): it multiplies float32 copies.
    dot = torch.float32 if interpreting() else operand
    precision = "tf32" if (p.reduced_precision and operand == torch.float32) else "ieee"
    if cfg.pack:
        kwargs.update(DOT_DTYPE=tl_dtype(dot), PRECISION=precision)
        return _packed_launches(bound, scratch, w, bias, prelu, kwargs)
    if cfg.tma:
        matrices = _matrices(p, x, y, w, wide)
        if matrices is not None and _fits(cfg, x.element_size(), w.element_size(), y.element_size()):
            a, c, b = matrices
            programs = min(-(-rows // cfg.bm) * -(-og // cfg.bn), cfg.tma * _processors(x.device))
            args = (a, b, bias, prelu, c, rows, cg, og, a.stride(0), c.stride(0), *plan.neuron_args[1:], programs)
            consts = dict(NEURON=plan.neuron, HAS_BIAS=prepared.bias is not None, DOT_DTYPE=tl_dtype(dot),
                          PRECISION=precision, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, num_warps=cfg.warps,
                          num_stages=cfg.stages)
            return [(Launcher(k.gemm_tma_nhwc, consts, scratch=True), (programs,), args)]
        # storages TMA cannot address: the implicit GEMM, with tiles that fit any operand type
        cfg = INTERPRET_CONFIG[False] if interpreting() else TMA_FALLBACK
        kwargs["num_warps"] = cfg.warps
    grid = (-(-rows // cfg.bm), -(-og // cfg.bn), groups * cfg.split)
    out = y if cfg.split == 1 else scratch
    args = (x, w, bias, prelu, out, rows, gh, gw, he, we, cg, og, *x.stride(), *y.stride(), *p.out_size,
            p.out_channels, *plan.scalars)
    conv = (Launcher(k.conv2d_nhwc, dict(kwargs, DOT_DTYPE=tl_dtype(dot), PRECISION=precision, BM=cfg.bm,
                                         BN=cfg.bn, BK=cfg.bk, SPLIT=cfg.split, FLAT=cfg.flat,
                                         num_stages=cfg.stages)), grid, args)
    if cfg.split == 1:
        return [conv]
    n = p.n_images
    z = scratch.view(cfg.split, n, gh, gw, p.out_channels)[0]  # part 0; the others szp further
    launcher, tile = epilogue_launcher(p, prepared.bias is not None, wide, cfg.split)
    return [conv, (launcher, *epilogue_args(tile, z, y, p, prepared.bias, prepared.prelu, plan.neuron_args,
                                             rows * p.out_channels))]


def _packed_launches(bound: Bound, packed: torch.Tensor, w: torch.Tensor, bias, prelu, kwargs: dict) -> list:
    """The space-to-depth launch into ``packed`` (the run's scratch), then the implicit GEMM over it (``Packing``) with
    the packed weights ``w``; ``kwargs`` are ``_launch``'s constexprs."""
    plan, x, y, k = bound.plan, bound.x, bound.y, kernels()
    p, cfg, pk = plan.problem, plan.config, plan.packing
    rows, gh, gw, he, we = plan.sizes
    (ty, tx, sy, sx, *_), neuron = plan.scalars, plan.neuron_args[1:]
    pixels = p.n_images * pk.height * pk.width
    bp, warps = (16, 1) if interpreting() else PACK_TILE
    pack = Launcher(k.pack_nhwc, dict(C=p.in_channels, SY=sy, SX=sx, CP=pk.channels, CLAMP=kwargs["CLAMP"], BP=bp,
                                      BC=_pow2(pk.channels, 1), WIDE=kwargs["WIDE"], num_warps=warps))
    pack_args = (x, packed, pixels, pk.height, pk.width, he, we, *x.stride(), ty, tx)
    conv = Launcher(k.packed_conv_nhwc, dict(
        KH=pk.kh, RUN=pk.run, SUBPIXEL=p.subpixel, NEURON=plan.neuron, HAS_BIAS=kwargs["HAS_BIAS"],
        DOT_DTYPE=kwargs["DOT_DTYPE"], PRECISION=kwargs["PRECISION"], BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        WIDE=kwargs["WIDE"], num_warps=cfg.warps, num_stages=cfg.stages))
    conv_args = (packed, w, bias, prelu, y, rows, gh, gw, p.out_channels, *packed.stride()[:3], *y.stride(),
                 *p.out_size, *neuron)
    return [(pack, (-(-pixels // bp),), pack_args), (conv, (-(-rows // cfg.bm), -(-p.out_channels // cfg.bn)),
                                                     conv_args)]


def _matrices(p: ConvProblem, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, wide: bool) -> tuple | None:
    """``(source, destination, weights)`` of a ``matrix`` problem as ``[pixels, channels]`` and
    ``[CG, OG]`` matrices that TMA descriptors can address (16-byte aligned starts and rows), or None
    where the windows are not single strided matrices (a clip region narrower than the image, say)."""
    (gh, gw), (ty, tx), n = p.grid, p.tap0, p.n_images
    if wide:
        return None
    try:
        a = x[:n, ty:ty + gh, tx:tx + gw, :p.in_channels].view(-1, p.in_channels)
        c = y[:n, :gh, :gw, :p.out_channels].view(-1, p.out_channels)
    except RuntimeError:  # the window's rows are not evenly spaced in the storage
        return None
    b = w.view(p.in_channels, p.out_channels)
    rows = n * gh * gw
    fits = all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == 1
               for t in (a, b, c))
    return (a, c, b) if fits and a.shape[0] == c.shape[0] == rows else None


#: Shared memory a block may use on Hopper (227 KiB).
SHARED_BYTES = 232448


def _fits(cfg: Config, src: int, weights: int, dst: int) -> bool:
    """Whether a pipelined GEMM tile (``stages`` source and weight tiles, and the output tile, which the
    TMA store and the epilogue's layout change stage there) fits in shared memory, given the bytes of a
    source, weight and destination element."""
    return cfg.stages * (cfg.bm * cfg.bk * src + cfg.bk * cfg.bn * weights) + cfg.bm * cfg.bn * dst <= SHARED_BYTES


def _has_tma() -> bool:
    """Whether the current GPU has tensor memory access (Hopper, compute capability 9, or later);
    the interpreter emulates it."""
    return interpreting() or _hopper()


@functools.cache
def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@functools.cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter: 2)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def configs(problem: ConvProblem) -> list[Config]:
    """The configurations worth timing for ``problem`` (tiles no wider than the channels need)."""
    if depthwise(problem):
        return [c for c in DEPTHWISE_CONFIGS if c.bk == 0 or rolls(problem)]
    direct_ = [c for c in GROUPED_CONFIGS if c.bk == 0 or rolls(problem)] if direct(problem) else []
    og = problem.out_channels // problem.groups
    cg = problem.in_channels // problem.groups
    fits = [c for c in GEMM_CONFIGS + SPLIT_CONFIGS if c.bn <= _pow2(og, 32) and c.bk <= _pow2(cg, 32)]
    rows = problem.n_images * problem.grid[0] * problem.grid[1]
    steps = problem.kernel[0] * problem.kernel[1] * -(-cg // 64)
    keep = [c for c in fits if c.split == 1 or (
        -(-rows // c.bm) * -(-og // c.bn) * problem.groups < SPLIT_BELOW_TILES and steps >= 4 * c.split)]
    merged = _merged(problem)  # where there are merged tiles, group-by-group ones waste 8x or more
    flat = [c for c in FLAT_TILES if c.bn <= _pow2(og, 32)] if cg < 16 else []
    sizes = (STORAGE_DTYPE[F(problem.src_format)].itemsize,) * 2 + (STORAGE_DTYPE[F(problem.dst_format)].itemsize,)
    run = packing(problem).run if packs(problem) else 0
    packed = [c for c in PACKED_TILES if c.bn <= _pow2(og, 32) and c.bk <= _pow2(run, 16) and _fits(c, *sizes)
              ] if run else []
    tma = [c for c in TMA_CONFIGS if c.bn <= _pow2(og, 64) and c.bk <= _pow2(cg, 32) and _fits(c, *sizes)
           ] if matrix(problem) and _has_tma() else []
    return direct_ + flat + packed + (merged or keep or GEMM_CONFIGS[:1]) + tma


def _merged(p: ConvProblem) -> list[Config]:
    """``MERGED_TILES`` for narrow groups, each merging ``bk`` / Ig groups (where that divides them)."""
    cg, og = group_inputs(p), p.out_channels // p.groups
    if p.groups == 1 or cg >= 16:
        return []
    out = []
    for tile in MERGED_TILES:
        m = tile.bk // cg
        if tile.bk % cg == 0 and m > 1 and p.groups % m == 0 and tile.bn <= _pow2(m * og, 16):
            out.append(replace(tile, merge=m))
    return out


def _pow2(n: int, least: int) -> int:
    """The power of two a tile needs to hold ``n`` channels, at least ``least``."""
    return max(least, 1 << (n - 1).bit_length())


def neuron_gradient_supported(problem: ConvProblem, e_format: int, device) -> bool:
    """Whether ``neuron_gradient`` takes this neuron's gradient in one pass: float storages, and no
    source pixel read twice (the zero edge, or clamped reads that all land inside)."""
    p = problem
    inside = all(0 <= t and t + o <= s for t, o, s in zip(p.tap0, p.out_size, p.src_size))
    return ((device.is_cuda or interpreting()) and available() and neuron_supported(p.neuron)
            and all(F(f) in _FORMATS for f in (p.src_format, e_format, p.dst_format))
            and (p.edge == EdgeMode.zero or inside))


def neuron_gradient(problem: ConvProblem, src: torch.Tensor, e: torch.Tensor, e_format: int, dst: torch.Tensor,
                    prelu) -> None:
    """The reference backend's ``neuron_gradient`` as one fused pass (``neuron_gradient_nhwc``): reads
    the source and the incoming gradient once, writes ``dS`` in the destination's type once."""
    p = problem
    n, i0, c0, ch = p.n_images, p.src_image0, p.src_channel0, p.in_channels
    s = src[i0:i0 + n, :, :, c0:c0 + ch]
    h, w = s.shape[1:3]
    bp, bc, warps = (16, 16, 1) if interpreting() else EPILOGUE_TILE
    kind, a, b, c, p2 = neuron_args(p.neuron)
    alpha = dst if prelu is None else torch.as_tensor(np.asarray(prelu, np.float32)[:ch], device=src.device)
    launch = Launcher(kernels().neuron_gradient_nhwc, dict(NEURON=kind, BP=bp, BC=bc,
                                                         WIDE=needs_wide_index(src, e, dst), num_warps=warps))
    rows = n * h * w
    launch((-(-rows // bp), -(-ch // bc)), (s, e, dst, alpha, rows, h, w, ch, *s.stride(), *e.stride(), *dst.stride(),
                                            *p.tap0, *p.out_size, a, b, c, p2))


class _Triton:
    name = "triton"

    @staticmethod
    def supports(problem: ConvProblem, device) -> bool:
        p = problem
        return ((device.is_cuda or interpreting()) and available() and not p.identity and p.binary < 0
                and F(p.src_format) in _FORMATS and F(p.dst_format) in _FORMATS and neuron_supported(p.neuron)
                and p.out_channels % p.groups == 0)

    @staticmethod
    def prepare(weights, bias, prelu, device) -> Prepared:
        return Prepared(weights, bias, prelu, device)

    @staticmethod
    def plan(problem, device, variant: str | None = None) -> Plan:
        return Plan(problem, device, Config.parse(variant) if variant else None)

    @staticmethod
    def variants(problem) -> list[str]:
        return [str(c) for c in configs(problem)]

    @staticmethod
    def scratch_bytes(problem: ConvProblem) -> int:
        """The most any candidate for ``problem`` allocates for a run: the split-K workspace of the
        widest split (float32), or the packed image (the source's type)."""
        offered = configs(problem)
        split = max(c.split for c in offered)
        most = 0 if split == 1 else 4 * split * problem.out_elements()
        if any(c.pack for c in offered):
            size = STORAGE_DTYPE[F(problem.src_format)].itemsize
            most = max(most, math.prod(packing(problem).shape(problem.n_images)) * size)
        return most

    bind = staticmethod(Bound)
    run = staticmethod(run)
    gradient = None  # gradients run through the torch backend (cuDNN)
    neuron_gradient = staticmethod(neuron_gradient)
    neuron_gradient_supported = staticmethod(neuron_gradient_supported)


BACKEND = _Triton()
