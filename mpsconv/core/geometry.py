"""Pure integer geometry: from a kernel's properties and its images to one frozen ``ConvProblem``.

Nothing here touches a tensor (no torch, no numpy). Public classes collect property values and
image shapes, call ``resolve_forward`` once per encode, and hand the resulting ``ConvProblem`` to a
backend; backends never re-derive sizes, pads or channel ranges.

Conventions (docs/semantics.md): internal tuples are ``(y, x)``; ``Kd`` is the
dilated window extent ``(k - 1)·d + 1``; arithmetic that can see a negative numerator uses
``tdiv`` (C division, truncating toward zero), never Python's ``//``.

Window placement. For destination pixel ``(X, Y)`` of the clip region, ``u = X - clip.x``,
``v = Y - clip.y``; its window centre in the source is ``offset + (u·sX, v·sY)`` and tap ``p``
reads column ``offset.x + u·sX - (KdX >> 1) + p·dX``. So every output pixel's first tap is the
clip region's first tap (``tap0``) plus ``u·sX``: the whole forward problem is a strided
cross-correlation of the source, read through the edge mode, starting at ``tap0``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from ..errors import MPSValueError
from ..types import as_int


def tdiv(a: int, b: int) -> int:
    """C integer division: truncates toward zero, where Python's ``//`` floors.

    >>> tdiv(-1, 2), tdiv(-3, 2), -1 // 2
    (0, -1, -1)
    """
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def dilated_extent(k: int, d: int) -> int:
    """``Kd = (k - 1)·d + 1``: the source pixels one window spans."""
    return (k - 1) * d + 1


class MPSNNPaddingMethod(enum.IntFlag):
    """``MPSNNPaddingMethod``: how the allocating encodes size the destination and place ``offset``.

    Three fields of bits (alignment, remainder, size) plus flags; raw values are Apple's. Value 0 in
    a field is a real choice (``alignCentered``, ``addRemainderToTopLeft``, ``sizeValidOnly``).
    """

    alignCentered = 0
    alignTopLeft = 1
    alignBottomRight = 2
    align_reserved = 3
    alignMask = 3
    addRemainderToTopLeft = 0
    addRemainderToTopRight = 4
    addRemainderToBottomLeft = 8
    addRemainderToBottomRight = 12
    addRemainderToMask = 12
    sizeValidOnly = 0
    sizeSame = 16
    sizeFull = 32
    size_reserved = 48
    sizeMask = 0x7F0
    customWhitelistForNodeFusion = 1 << 13
    customAllowForNodeFusion = 1 << 13
    custom = 1 << 14
    excludeEdges = 1 << 15

    # Swift spellings of the zero-valued members.
    centered = 0
    topLeft = 0
    validOnly = 0


#: size style per axis: -1 valid only, 0 same, +1 full
_STYLE = {0: -1, 16: 0, 32: 1}


def dest_size(n: int, s: int, k: int, style: int) -> int:
    """``DestSize`` for forward kernels: ``tdiv(n + style·(K - 1) + s - 1, s)``."""
    return tdiv(n + style * (k - 1) + s - 1, s)


def dest_size_reverse(n: int, s: int, k: int, style: int) -> int:
    """``DestSizeReverse`` for backwards kernels: ``(n - 1)·s + 1 + style·(K - 1)``."""
    return (n - 1) * s + 1 + style * (k - 1)


def _left(extra: int, alignment: int, rem_left: int) -> int:
    """Padding before the first pixel for ``extra`` missing (or, if negative, unused) pixels."""
    if alignment == MPSNNPaddingMethod.alignTopLeft:
        return extra
    if alignment == MPSNNPaddingMethod.alignBottomRight:
        return 0
    return tdiv(extra + rem_left, 2)


def padding_offset(n: int, s: int, k: int, style: int, alignment: int, rem_left: int) -> int:
    """The ``offset`` (window centre of destination pixel 0) the padding policy chooses on one axis."""
    d = dest_size(n, s, k, style)
    extra = (d - 1) * s + k - n  # pixels missing (> 0) or unused (< 0)
    return (k >> 1) - _left(extra, alignment, rem_left)


@dataclass(frozen=True)
class PaddingRule:
    """A decoded ``MPSNNPaddingMethod``."""

    alignment: int
    style: int  # -1 valid only, 0 same, +1 full
    rem_left_x: int
    rem_top_y: int
    custom: bool


def decode_padding_method(method: int, owner: str) -> PaddingRule:
    """Split the bit field; reserved alignment or size values are errors."""
    method = as_int(method, owner, "paddingMethod", 0)
    alignment = method & 3
    if alignment == 3:
        raise MPSValueError(
            f"{owner}: paddingMethod=0x{method:X} uses align_reserved (3); "
            "use alignCentered, alignTopLeft or alignBottomRight"
        )
    size_bits = method & 0x30
    if size_bits == 0x30:
        raise MPSValueError(
            f"{owner}: paddingMethod=0x{method:X} uses size_reserved (48); use sizeValidOnly, sizeSame or sizeFull"
        )
    remainder = method & 12
    return PaddingRule(
        alignment=alignment,
        style=_STYLE[size_bits],
        rem_left_x=0 if remainder & 4 else 1,
        rem_top_y=0 if remainder & 8 else 1,
        custom=bool(method & MPSNNPaddingMethod.custom),
    )


def allocate(
    src_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
    rule: PaddingRule, owner: str, backwards: bool = False,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Destination size ``(H, W)`` and window offset ``(y, x)`` a padding policy gives.

    Forward kernels: ``DestSize`` and ``offset``. Backwards kernels:
    ``DestSizeReverse``, and the forward rule applied to the expanded source
    at stride 1, i.e. ``kernelOffset = (Kd >> 1) - left`` with ``extra = (style + 1)·(Kd - 1)`` (the
    kernel's own ``offset`` becomes 0).
    """
    sizes, offsets = [], []
    for axis, rem in ((0, rule.rem_top_y), (1, rule.rem_left_x)):
        n, s = src_hw[axis], stride[axis]
        kd = dilated_extent(kernel[axis], dilation[axis])
        d = dest_size_reverse(n, s, kd, rule.style) if backwards else dest_size(n, s, kd, rule.style)
        if d < 1:
            name = "height" if axis == 0 else "width"
            raise MPSValueError(
                f"{owner}: the padding policy gives destination {name} {d} for source {name} {n}, "
                f"window {kd}, stride {s}; it must be >= 1 (use a larger source or sizeSame/sizeFull)"
            )
        sizes.append(d)
        if backwards:
            offsets.append((kd >> 1) - _left((rule.style + 1) * (kd - 1), rule.alignment, rem))
        else:
            offsets.append(padding_offset(n, s, kd, rule.style, rule.alignment, rem))
    return (sizes[0], sizes[1]), (offsets[0], offsets[1])


class EdgeMode(enum.IntEnum):
    """The edge modes a convolution-family kernel can read through (``MPSImageEdgeMode``)."""

    zero = 0
    clamp = 1


@dataclass(frozen=True)
class NeuronSpec:
    """A resolved fused activation: type raw value and scalar parameters (PReLU data travels apart)."""

    type: int = 0
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0


@dataclass(frozen=True)
class ConvProblem:
    """One forward window operation, fully resolved to integers. Tuples are ``(y, x)``.

    For ``i < n_images``, ``v < out_size[0]``, ``u < out_size[1]``, ``o < out_channels``::

        dst[dst_image0 + i, out_origin + (v, u), dst_channel0 + o] = f(bias[o] +
            Σ_{q,p,c} W[o, q, p, c] · S̃[src_image0 + i, tap0 + (v, u)·stride + (q, p)·dilation,
                                           src_channel0 + grp(o)·Ig + c])

    where ``S̃`` reads through ``edge``; for backwards kernels (``upsample`` > 1) ``S̃`` is the source
    with ``upsample - 1`` zeros inserted between pixels, read at stride 1. ``identity`` kernels (neurons) have no weights: the one tap
    is copied channel for channel (``in_channels == out_channels``). Sub-pixel kernels (``subpixel =
    r > 1``) compute that on the ``grid`` (``ceil(out_size / r)``) and write destination pixel
    ``(v, u)`` of the clip region, channel ``c < out_channels / r²``, from grid pixel
    ``(v // r, u // r)``, channel ``(out_channels / r²)·(r·(v mod r) + (u mod r)) + c``.
    """

    n_images: int
    src_image0: int
    dst_image0: int
    src_size: tuple[int, int]
    out_origin: tuple[int, int]
    out_size: tuple[int, int]
    tap0: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    src_channel0: int
    in_channels: int
    dst_channel0: int
    out_channels: int
    groups: int
    edge: EdgeMode
    neuron: NeuronSpec
    identity: bool = False
    src_format: int = 4  # MPSImageFeatureChannelFormat raw values (float32)
    dst_format: int = 4
    subpixel: int = 1  # r: the convolution's output is rearranged depth-to-space into r x r blocks
    upsample: tuple[int, int] = (1, 1)  # backwards kernels: zeros inserted between source pixels first
    binary: int = -1  # MPSCNNBinaryConvolutionType raw value for binary kernels, else -1
    beta: bool = False  # binary kernels: MPSCNNBinaryConvolutionFlags.useBetaScaling
    reduced_precision: bool = False  # MPSKernelOptions.allowReducedPrecision: TF32 products allowed
    # kernelWeightsDataType float32: the weights are not rounded to float16, so a 16-bit source's
    # products may need float32 (another speed: the autotuner times such weights apart)
    float32_weights: bool = False

    @property
    def expanded_size(self) -> tuple[int, int]:
        """The source after zero insertion (``(n - 1)·s + 1``); the source itself for forward kernels."""
        (h, w), (uy, ux) = self.src_size, self.upsample
        return (h - 1) * uy + 1, (w - 1) * ux + 1

    @property
    def grid(self) -> tuple[int, int]:
        """The convolution's output size: the clip region, or ``ceil(clip / r)`` for sub-pixel kernels."""
        r = self.subpixel
        return -(-self.out_size[0] // r), -(-self.out_size[1] // r)

    @property
    def dst_channels(self) -> int:
        """Channels written to the destination: ``out_channels / r²``."""
        return self.out_channels // (self.subpixel * self.subpixel)

    @property
    def empty(self) -> bool:
        return self.n_images <= 0 or self.out_size[0] <= 0 or self.out_size[1] <= 0

    def extent(self, axis: int) -> int:
        return dilated_extent(self.kernel[axis], self.dilation[axis])

    def read_elements(self) -> int:
        """Source values the clip region's windows span (images x rows x columns x channels)."""
        (y0, y1), (x0, x1) = self.read_range(0), self.read_range(1)
        return self.n_images * (y1 - y0 + 1) * (x1 - x0 + 1) * self.in_channels

    def out_elements(self) -> int:
        """Values the convolution computes before any depth-to-space (images x grid x channels)."""
        return self.n_images * self.grid[0] * self.grid[1] * self.out_channels

    def beta_shift(self) -> tuple[int, int]:
        """Where a binary kernel's β window (``kernel`` undilated, centred on each window's centre)
        starts, relative to the window's first tap: ``(Kd >> 1) - (k >> 1)`` per axis."""
        return tuple((self.extent(axis) >> 1) - (self.kernel[axis] >> 1) for axis in (0, 1))

    def read_range(self, axis: int) -> tuple[int, int]:
        """First and last source coordinate the clip region reads on ``axis`` (may lie outside)."""
        first = self.tap0[axis]
        last = first + (self.grid[axis] - 1) * self.stride[axis] + self.extent(axis) - 1
        return first, last



def tiles(problem: ConvProblem, rows: int, images: int) -> list[ConvProblem]:
    """``problem`` cut into pieces of at most ``rows`` rows of its ``grid`` and ``images`` images,
    which together write exactly what it writes (each destination pixel depends only on its own
    window, so the pieces are independent). A sub-pixel piece covers ``r`` destination rows per grid
    row; the last one ends at the clip region's edge."""
    p, r = problem, problem.subpixel
    (gh, _), (oh, ow), (oy, ox) = p.grid, p.out_size, p.out_origin
    pieces = []
    for i0 in range(0, p.n_images, images):
        n = min(images, p.n_images - i0)
        for g0 in range(0, gh, rows):
            g1 = min(g0 + rows, gh)
            pieces.append(replace(p, n_images=n, src_image0=p.src_image0 + i0, dst_image0=p.dst_image0 + i0,
                                  out_origin=(oy + g0 * r, ox), out_size=(min(g1 * r, oh) - g0 * r, ow),
                                  tap0=(p.tap0[0] + g0 * p.stride[0], p.tap0[1])))
    return pieces


# --------------------------------------------------------------------------------------------
# The window as a framework convolution reads it (PyTorch's conv2d / conv_transpose2d)


@dataclass(frozen=True)
class FrameworkWindow:
    """How a framework convolution, whose padding is zeros and the same on both sides, computes a
    forward ``ConvProblem``. Pairs are ``(y, x)``; coordinates are of the (expanded) source.

    The read window (``read_range``) is cut from the source (``crop``, ``[start, stop)`` per axis),
    read through the clamp edge where it leaves the source (``gathers``: ``(axis, first, last, size)``,
    coordinates ``first..last`` clamped into ``0..size-1``), or is all zeros where it misses the
    source entirely (``zeros``). Zero edges outside the source become the convolution's own
    ``padding`` where that is exact (then ``out_crop`` is the first output of the padded convolution
    that is ours, when the larger pad of an axis made extra ones), else an explicit zero ``pad``
    ``(left, right, top, bottom)`` of the crop. ``input_size`` is what the convolution then reads.
    """

    crop: tuple[tuple[int, int], tuple[int, int]]
    gathers: tuple[tuple[int, int, int, int], ...]
    zeros: bool
    padding: tuple[int, int]
    out_crop: tuple[int, int] | None
    pad: tuple[int, int, int, int] | None
    input_size: tuple[int, int]


def framework_window(p: ConvProblem) -> FrameworkWindow:
    """The ``FrameworkWindow`` of a forward problem."""
    crop, gathers, pads, zeros = [], [], [], False
    for axis in (0, 1):
        first, last = p.read_range(axis)
        size = p.expanded_size[axis]
        if p.edge == EdgeMode.clamp:
            if first < 0 or last >= size:
                gathers.append((axis, first, last, size))
                crop.append((0, size))
            else:
                crop.append((first, last + 1))
            pads.append((0, 0))
            continue
        lo, hi = max(first, 0), min(last, size - 1)
        zeros = zeros or lo > hi  # the window never touches the source: every tap reads 0
        crop.append((lo, hi + 1))
        pads.append((lo - first, last - hi))
    read = tuple(last - first + 1 for first, last in map(p.read_range, (0, 1)))
    if zeros:
        pads = [(0, 0), (0, 0)]
    (top, bottom), (left, right) = pads
    symmetric = (max(top, bottom), max(left, right))
    shift = (symmetric[0] - top, symmetric[1] - left)
    # The convolution's own padding stays below the window (oneDNN crashes on far larger pads, which
    # an offset far outside the source produces); binary taps outside the source read inBias·inScale,
    # not 0, and an element-wise kernel has no convolution: those take an explicit pad.
    implicit = not p.identity and p.binary < 0 and symmetric[0] < p.extent(0) and symmetric[1] < p.extent(1)
    padding, out_crop, pad = (0, 0), None, None
    if implicit and shift[0] % p.stride[0] == 0 and shift[1] % p.stride[1] == 0:
        # Pad both sides by the larger pad and drop the outputs the extra rows/columns make: output j
        # of the padded convolution starts at j·s - P, ours at v·s - before, so j = v + (P - before)/s;
        # the last one needed exists because after <= P. The padded convolution has
        # grid + (P - before + P - after) // s outputs: a larger pad after the window than before makes
        # no extra output when it is less than a stride (a stride-2 "same" layer of an even size).
        padding = symmetric
        if shift != (0, 0) or symmetric[0] - bottom >= p.stride[0] or symmetric[1] - right >= p.stride[1]:
            out_crop = (shift[0] // p.stride[0], shift[1] // p.stride[1])
    elif any((left, right, top, bottom)):
        pad = (left, right, top, bottom)
    input_size = read if pad is not None else (read[0] - top - bottom, read[1] - left - right)
    return FrameworkWindow((crop[0], crop[1]), tuple(gathers), zeros, padding, out_crop, pad, input_size)


@dataclass(frozen=True)
class TransposedWindow:
    """How ``conv_transpose2d`` computes a backwards ``ConvProblem`` from the source itself (no zeros
    inserted): with framework padding 0, its output pixel ``j`` is local destination pixel ``u = j -
    start``, ``start = tap0 + Kd - 1``, and outputs beyond its extent ``(n - 1)·s + Kd`` read only
    inserted zeros. Where the framework's ``padding`` and ``output_padding`` give exactly the wanted
    outputs (``exact``), they are used; otherwise the full output is cropped (``crop``, ``[start,
    stop)`` per axis) and zero-padded (``pad``, ``(left, right, top, bottom)``) to the clip region."""

    exact: bool
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    crop: tuple[tuple[int, int], tuple[int, int]] | None
    pad: tuple[int, int, int, int] | None


def transposed_window(p: ConvProblem) -> TransposedWindow:
    """The ``TransposedWindow`` of a backwards problem (``upsample`` the forward stride)."""
    starts = [p.tap0[axis] + p.extent(axis) - 1 for axis in (0, 1)]
    natural = [(p.src_size[axis] - 1) * p.upsample[axis] - 2 * starts[axis] + p.extent(axis) for axis in (0, 1)]
    output_padding = [p.grid[axis] - natural[axis] for axis in (0, 1)]
    if all(start >= 0 and 0 <= extra < max(p.upsample[axis], p.dilation[axis])
           for axis, (start, extra) in enumerate(zip(starts, output_padding))):
        return TransposedWindow(True, (starts[0], starts[1]), (output_padding[0], output_padding[1]), None, None)
    crop, pads = [], []
    for axis in (0, 1):
        start, count = starts[axis], p.grid[axis]
        full = (p.src_size[axis] - 1) * p.upsample[axis] + p.extent(axis)
        lo, hi = max(start, 0), min(start + count, full)  # the wanted outputs it has
        if lo < hi:
            crop.append((lo, hi))
            pads.append((lo - start, start + count - hi))
        else:  # none: every wanted output reads only inserted zeros
            crop.append((0, 0))
            pads.append((count, 0))
    (top, bottom), (left, right) = pads
    pad = (left, right, top, bottom) if any((left, right, top, bottom)) else None
    return TransposedWindow(False, (0, 0), (0, 0), (crop[0], crop[1]), pad)


def source_region(
    offset_yx: tuple[int, int], size_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``sourceRegionForDestinationSize``: origin ``(y, x)`` and size ``(h, w)`` of the source read."""
    origin, size = [], []
    for axis in (0, 1):
        kd = dilated_extent(kernel[axis], dilation[axis])
        first = offset_yx[axis] - (kd >> 1)
        last = first + (size_hw[axis] - 1) * stride[axis] + kd - 1
        origin.append(first)
        size.append(last - first + 1)
    return (origin[0], origin[1]), (size[0], size[1])


def source_region_backwards(
    offset_yx: tuple[int, int], kernel_offset_yx: tuple[int, int], size_hw: tuple[int, int],
    kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``sourceRegionForDestinationSize`` of a backwards kernel: origin ``(y, x)`` and size ``(h, w)``
    of the source pixels read. The window of local pixel ``u`` spans expanded pixels
    ``T + u - (Kd >> 1)`` to ``+ Kd - 1``, ``T = offset·s + kernelOffset``; only every ``s``-th
    expanded pixel is a source pixel."""
    origin, size = [], []
    for axis in (0, 1):
        kd, s = dilated_extent(kernel[axis], dilation[axis]), stride[axis]
        t = offset_yx[axis] * s + kernel_offset_yx[axis]
        first = t - (kd >> 1)
        last = first + size_hw[axis] - 1 + kd - 1
        lo, hi = -((-first) // s), last // s  # the source pixels inside [first, last]
        origin.append(lo)
        size.append(max(0, hi - lo + 1))
    return (origin[0], origin[1]), (size[0], size[1])


def backwards_kernel_offset(forward_offset_yx: tuple[int, int], kernel: tuple[int, int],
                            dilation: tuple[int, int]) -> tuple[int, int]:
    """The ``kernelOffset`` a backwards kernel (a transpose, a gradient) takes from its forward
    convolution's gradient state: ``-offset + (1 if Kd is even else 0)`` per axis, with its own
    ``offset`` 0, so that its window over the zero-inserted source mirrors the forward window."""
    return tuple(-o + (1 if dilated_extent(k, d) % 2 == 0 else 0)
                 for o, k, d in zip(forward_offset_yx, kernel, dilation))


def gradient_secondary_offset(forward_offset_yx: tuple[int, int], kernel: tuple[int, int],
                              dilation: tuple[int, int]) -> tuple[int, int]:
    """A convolution gradient's ``secondaryOffset`` (its forward source's first read pixel):
    ``offset - (Kd >> 1)`` per axis."""
    return tuple(o - (dilated_extent(k, d) >> 1) for o, k, d in zip(forward_offset_yx, kernel, dilation))


def identity_reads(problem: ConvProblem) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """Where a neuron's clip pixels read its source, per axis ``(y, x)``: the source coordinate each
    clip row / column reads (clamped into the source) and whether that is a source pixel (with the
    clamp edge, always). What its gradient scatters ``E·f'`` back onto."""
    axes = []
    for first, count, size in zip(problem.tap0, problem.out_size, problem.src_size):
        coords = [first + i for i in range(count)]
        inside = [0 <= c < size or problem.edge == EdgeMode.clamp for c in coords]
        axes.append(([min(max(c, 0), size - 1) for c in coords], inside))
    return axes[0], axes[1]


def gradient_window_shifts(kernel_offset: tuple[int, int], primary: tuple[int, int], secondary: tuple[int, int],
                           configured: tuple[tuple[int, int], tuple[int, int]],
                           stride: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How far a convolution gradient's offsets, as its caller set them, move the forward window from
    where the gradient state placed it: ``(data, weights)``, each ``(y, x)``.

    ``configured`` is ``(kernelOffset, secondaryOffset)`` as the state sets them (``primaryOffset``
    0). The data gradient reads the zero-inserted incoming gradient from ``primaryOffset·stride +
    kernelOffset``, and ``kernelOffset = -offset + (1 if Kd is even else 0)``: its forward window
    starts ``-(kernelOffset - configured) - primaryOffset·stride`` further. The weight gradient's
    window starts at ``secondaryOffset = offset - (Kd >> 1)``: it moves by ``secondaryOffset -
    configured``."""
    (k_conf, q_conf) = configured
    data = tuple(-(k - kc) - p * s for k, kc, p, s in zip(kernel_offset, k_conf, primary, stride))
    weights = tuple(q - qc for q, qc in zip(secondary, q_conf))
    return data, weights


# --------------------------------------------------------------------------------------------
# PyTorch's padding and MPS's window placement, one axis at a time


def torch_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                      transposed: bool = False, output_padding: int = 0) -> int:
    """The output length PyTorch's ``Conv2d`` / ``ConvTranspose2d`` gives along one axis."""
    owner = "torch_output_size"
    size, padding, output_padding = (as_int(v, owner, name, 0) for v, name in (
        (size, "size"), (padding, "padding"), (output_padding, "output_padding")))
    kernel, stride, dilation = (as_int(v, owner, name, 1) for v, name in (
        (kernel, "kernel"), (stride, "stride"), (dilation, "dilation")))
    kd = dilated_extent(kernel, dilation)
    if transposed:
        return (size - 1) * stride - 2 * padding + kd + output_padding
    return (size + 2 * padding - kd) // stride + 1


def offset_for_padding(kernel: int, dilation: int, padding: int) -> int:
    """The ``offset`` of a convolution that PyTorch pads by ``padding``: PyTorch's first tap of output
    0 is at ``-padding``; MPS centres the window of destination pixel 0 on ``offset``, so
    ``offset = (Kd >> 1) - padding``."""
    return (dilated_extent(kernel, dilation) >> 1) - padding


def padding_for_offset(kernel: int, dilation: int, offset: int) -> int:
    """PyTorch's padding for a convolution's ``offset``: the inverse of ``offset_for_padding``."""
    return (dilated_extent(kernel, dilation) >> 1) - offset


def kernel_offset_for_padding(kernel: int, dilation: int, padding: int) -> int:
    """The ``kernelOffset`` (``offset`` 0) of a transposed convolution that PyTorch pads by
    ``padding``: MPS reads ``Z(T + u - (Kd >> 1) + p·d)`` with the weights as stored, PyTorch
    ``Z(u + padding - (Kd - 1) + k·d)`` with them rotated, so ``T = padding - (Kd - 1) + (Kd >> 1)``."""
    kd = dilated_extent(kernel, dilation)
    return padding - (kd - 1) + (kd >> 1)


def padding_for_kernel_offset(kernel: int, dilation: int, kernel_offset: int) -> int:
    """PyTorch's padding for a transposed convolution's ``kernelOffset``: the inverse of
    ``kernel_offset_for_padding``."""
    kd = dilated_extent(kernel, dilation)
    return kernel_offset + (kd - 1) - (kd >> 1)


def resolve_forward(
    *,
    owner: str,
    src_shape: tuple[int, int, int, int],
    dst_shape: tuple[int, int, int, int],
    offset: tuple[int, int, int],
    clip: tuple[tuple[int, int, int], tuple[int, int, int]],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    src_channel_offset: int,
    src_channel_max: int,
    dst_channel_offset: int,
    in_channels: int | None,
    out_channels: int | None,
    groups: int,
    edge: int,
    neuron: NeuronSpec,
    fully_connected: bool = False,
    formats: tuple[int, int] = (4, 4),
    subpixel: int = 1,
    kernel_offset: tuple[int, int] | None = None,
    binary: tuple[int, bool] = (-1, False),
    reduced_precision: bool = False,
    float32_weights: bool = False,
) -> ConvProblem:
    """Resolve a forward encode (docs/semantics.md, "Window placement") or raise naming
    what is wrong.

    ``src_shape``/``dst_shape`` are ``(N, H, W, C)`` with ``C`` the real feature channels.
    ``offset`` is ``(x, y, z)`` and ``clip`` ``((x, y, z), (w, h, d))`` as Metal spells them.
    ``in_channels=None`` means "follows the source" (element-wise kernels: ``Cin = Cout = Cin_avail``).
    ``kernel_offset`` ``(y, x)`` marks a backwards kernel: ``stride`` is then the
    upsampling factor, and the window of local destination pixel ``u`` is centred on expanded-source
    pixel ``offset·stride + kernelOffset + u``.
    """
    ns, hs, ws, cs = src_shape
    nd, hd, wd, cd = dst_shape
    (ox, oy, oz) = offset
    (cx, cy, cz), (cw, ch, cdepth) = clip

    sfo, dfo = src_channel_offset, dst_channel_offset
    if sfo % 4:
        raise MPSValueError(f"{owner}: sourceFeatureChannelOffset={sfo} must be a multiple of 4")
    if dfo % 4:
        raise MPSValueError(f"{owner}: destinationFeatureChannelOffset={dfo} must be a multiple of 4")
    if sfo > cs:
        raise MPSValueError(
            f"{owner}: sourceFeatureChannelOffset={sfo} is beyond the source's {cs} feature channels"
        )
    available = min(src_channel_max, cs - sfo)
    identity = in_channels is None
    if identity:
        in_channels = out_channels = available
        if available < 1:
            raise MPSValueError(f"{owner}: no source channels to read at sourceFeatureChannelOffset={sfo}")
    elif available < in_channels:
        raise MPSValueError(
            f"{owner}: sourceImage provides {available} feature channels from sourceFeatureChannelOffset={sfo} "
            f"(featureChannels={cs}, sourceFeatureChannelMaxCount={src_channel_max}); the kernel reads {in_channels}"
        )
    written = out_channels // (subpixel * subpixel)
    if cd < dfo + written:
        raise MPSValueError(
            f"{owner}: destinationImage has {cd} feature channels; destinationFeatureChannelOffset={dfo} + "
            f"{written} output channels needs {dfo + written}"
        )

    if oz < 0:
        raise MPSValueError(f"{owner}: offset.z={oz} must be >= 0")
    n_images = min(cdepth, nd - cz)
    if n_images > 0 and oz + n_images > ns:
        raise MPSValueError(
            f"{owner}: offset.z={oz} + {n_images} images to process exceeds the source's numberOfImages={ns}"
        )

    x1, y1 = min(cx + cw, wd), min(cy + ch, hd)
    out_w, out_h = max(0, x1 - cx), max(0, y1 - cy)

    kh, kw = kernel
    if fully_connected:
        if (kh, kw) != (hs, ws):
            raise MPSValueError(
                f"{owner}: the window {kw}x{kh} (kernelWidth x kernelHeight) must cover the whole source "
                f"{ws}x{hs}; fully connected kernels need kernelWidth == source width and kernelHeight == height"
            )
        if out_w > 1 or out_h > 1:
            raise MPSValueError(
                f"{owner}: the clip region is {out_w}x{out_h} pixels; a fully connected kernel writes one pixel "
                "(set clipRect to a 1x1 region or use a 1x1 destination)"
            )
        tap0 = (0, 0)  # offset x/y is ignored: the window is the whole source
    elif kernel_offset is not None:
        (sy, sx), (ky, kx) = stride, kernel_offset
        tap0 = (oy * sy + ky - (dilated_extent(kh, dilation[0]) >> 1),
                ox * sx + kx - (dilated_extent(kw, dilation[1]) >> 1))
    else:
        tap0 = (oy - (dilated_extent(kh, dilation[0]) >> 1), ox - (dilated_extent(kw, dilation[1]) >> 1))
    upsample = (1, 1)
    if kernel_offset is not None:
        upsample, stride = tuple(stride), (1, 1)

    return ConvProblem(
        n_images=max(0, n_images),
        src_image0=oz,
        dst_image0=cz,
        src_size=(hs, ws),
        out_origin=(cy, cx),
        out_size=(out_h, out_w),
        tap0=tap0,
        kernel=(kh, kw),
        stride=tuple(stride),
        dilation=tuple(dilation),
        src_channel0=sfo,
        in_channels=in_channels,
        dst_channel0=dfo,
        out_channels=out_channels,
        groups=groups,
        edge=EdgeMode(edge),
        neuron=neuron,
        identity=identity,
        src_format=formats[0],
        dst_format=formats[1],
        subpixel=subpixel,
        upsample=upsample,
        binary=binary[0],
        beta=binary[1],
        reduced_precision=reduced_precision,
        float32_weights=float32_weights,
    )
