"""The reference backend: NumPy, float64, written from docs/semantics.md to be obviously correct.

It gathers every window tap of the clip region through the edge mode (an index view of the
source) and contracts it with the weights in one ``einsum`` per problem. It is the oracle every
test compares the fast paths against, and it covers every feature.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..core.activations import NUMPY_OPS, apply_neuron, neuron_derivative
from ..core.formats import MPSImageFeatureChannelFormat as F, storage_to_values, values_to_storage
from ..core.geometry import ConvProblem, EdgeMode, identity_reads
from ..core.weights import BinaryParams


class Prepared:
    def __init__(self, weights, bias, prelu):
        self.binary = weights if isinstance(weights, BinaryParams) else None
        if self.binary is not None:
            weights = None
        self.weights = None if weights is None else np.asarray(weights.array(), np.float64)  # [O, kH, kW, Ig]
        self.bias = None if bias is None else np.asarray(bias, np.float64)
        self.prelu = None if prelu is None else np.asarray(prelu, np.float64)


def taps(first: int, count: int, stride: int, k: int, dilation: int, size: int, edge: EdgeMode):
    """Source coordinates ``[count, k]`` of each output's taps on one axis, and where they are inside."""
    coords = first + np.arange(count)[:, None] * stride + np.arange(k)[None, :] * dilation
    inside = (coords >= 0) & (coords < size)
    return np.clip(coords, 0, size - 1), inside if edge == EdgeMode.zero else np.ones_like(inside)


def expand(x: np.ndarray, problem: ConvProblem) -> np.ndarray:
    """Backwards kernels read the source with ``s - 1`` zeros inserted between pixels."""
    if problem.upsample == (1, 1):
        return x
    (uy, ux), (he, we) = problem.upsample, problem.expanded_size
    expanded = np.zeros((x.shape[0], he, we, x.shape[3]))
    expanded[:, ::uy, ::ux] = x
    return expanded


def gather_windows(x: np.ndarray, problem: ConvProblem) -> np.ndarray:
    """``[n, oh, ow, kH, kW, C]``: every tap of every output pixel, read through the edge mode."""
    (oh, ow), (kh, kw) = problem.grid, problem.kernel
    ys, y_in = taps(problem.tap0[0], oh, problem.stride[0], kh, problem.dilation[0], x.shape[1], problem.edge)
    xs, x_in = taps(problem.tap0[1], ow, problem.stride[1], kw, problem.dilation[1], x.shape[2], problem.edge)
    windows = x[:, ys[:, None, :, None], xs[None, :, None, :], :]  # [n, oh, ow, kh, kw, C]
    mask = y_in[:, None, :, None] & x_in[None, :, None, :]
    return np.where(mask[None, :, :, :, :, None], windows, 0.0)  # not windows·mask: inf·0 is NaN


def depth_to_space(x: np.ndarray, r: int) -> np.ndarray:
    """NHWC depth-to-space: channel ``(C/r²)·(r·dy + dx) + c`` of pixel ``(Y, X)`` becomes
    channel ``c`` of pixel ``(r·Y + dy, r·X + dx)``."""
    n, h, w, c = x.shape
    blocks = x.reshape(n, h, w, r, r, c // (r * r))  # [.., dy, dx, c]
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, c // (r * r))


def binary_accumulate(x: np.ndarray, windows: np.ndarray, problem: ConvProblem, params) -> np.ndarray:
    """The binary formula, literally: ``acc · scale[o] · β + bias[o]`` from the windows of ``S̃``."""
    c = problem.in_channels
    s_prime = (windows + params.in_bias) * params.in_scale  # S' = (S̃ + inBias) · inScale
    bits = params.unpacked(c).astype(np.float64)
    if problem.binary == 0:  # binaryWeights: S'·(2·bit - 1)
        terms, weights = s_prime, 2 * bits - 1
    elif problem.binary == 1:  # xnor: sgn(S')·(2·bit - 1), sgn(v) = v < 0 ? -1 : +1
        terms, weights = np.where(s_prime < 0, -1.0, 1.0), 2 * bits - 1
    else:  # AND: [S' >= 0]·bit
        terms, weights = (s_prime >= 0).astype(np.float64), bits
    acc = np.einsum("nyxqpc,oqpc->nyxo", terms, weights, optimize=True)
    beta = 1.0
    if problem.beta:  # the mean of A = mean_c |S'| over a kW x kH window around the window centre
        (ty, tx), (sy, sx) = problem.tap0, problem.beta_shift()
        around = replace(problem, dilation=(1, 1), tap0=(ty + sy, tx + sx))
        a = np.abs((gather_windows(x, around) + params.in_bias) * params.in_scale).mean(axis=-1)
        beta = a.mean(axis=(3, 4))[..., None]
    return acc * params.out_scale * beta + params.out_bias


@np.errstate(all="ignore")  # IEEE special values are the semantics here, not accidents to warn about
def forward(problem: ConvProblem, src: torch.Tensor, dst: torch.Tensor, prepared: Prepared) -> None:
    if problem.empty:
        return
    n, i0, c0 = problem.n_images, problem.src_image0, problem.src_channel0
    raw = src[i0:i0 + n, :, :, c0:c0 + problem.in_channels].cpu()
    x = expand(storage_to_values(raw, F(problem.src_format), torch.float64).numpy(), problem)
    windows = gather_windows(x, problem)
    if problem.binary >= 0:
        out = binary_accumulate(x, windows, problem, prepared.binary)
    elif problem.identity:
        out = windows[:, :, :, 0, 0, :]
    else:
        g = problem.groups
        nb, oh, ow, kh, kw, _ = windows.shape
        grouped = windows.reshape(nb, oh, ow, kh, kw, g, -1)
        w = prepared.weights.reshape(g, problem.out_channels // g, kh, kw, -1)
        out = np.einsum("nyxqpgc,goqpc->nyxgo", grouped, w, optimize=True).reshape(nb, oh, ow, -1)
        if prepared.bias is not None:
            out = out + prepared.bias
    prelu = None if prepared.prelu is None else prepared.prelu[: out.shape[-1]]
    out = apply_neuron(out, problem.neuron, prelu, NUMPY_OPS)
    (y0, x0), (oh, ow), d0 = problem.out_origin, problem.out_size, problem.dst_channel0
    if problem.subpixel > 1:
        out = depth_to_space(out, problem.subpixel)[:, :oh, :ow]
    stored = values_to_storage(torch.from_numpy(np.ascontiguousarray(out)), F(problem.dst_format))
    dst[problem.dst_image0:problem.dst_image0 + n, y0:y0 + oh, x0:x0 + ow, d0:d0 + out.shape[-1]] = \
        stored.to(dst.device)


@np.errstate(all="ignore")
def gradient(problem: ConvProblem, src: torch.Tensor, e: torch.Tensor, weights: np.ndarray, device=None):
    """``(dS, dW, dB)`` for the incoming gradient ``e`` ``[n, He, We, O]``, literally (the plan of this
    backend is the problem itself).

    ``dS`` ``[n, Hs, Ws, I]`` scatters every tap's ``E·W`` back onto the pixel it read (clamped reads
    land on the edge pixel: the exact VJP); ``dW`` sums ``E`` times the windows over the batch;
    ``dB = ΣE``.
    """
    n, i0, c0 = problem.n_images, problem.src_image0, problem.src_channel0
    raw = src[i0:i0 + n, :, :, c0:c0 + problem.in_channels].cpu()
    x = expand(storage_to_values(raw, F(problem.src_format), torch.float64).numpy(), problem)
    windows = gather_windows(x, problem)  # [n, He, We, kH, kW, I]
    g = problem.groups
    nb, he, we, kh, kw, c = windows.shape
    og = problem.out_channels // g
    e = e.detach().cpu().numpy().astype(np.float64).reshape(nb, he, we, g, og)
    w = np.asarray(weights, np.float64).reshape(g, og, kh, kw, -1)
    d_w = np.einsum("nyxgo,nyxqpgc->goqpc", e, windows.reshape(nb, he, we, kh, kw, g, -1)).reshape(weights.shape)
    d_b = e.sum(axis=(0, 1, 2)).reshape(-1)
    # data gradient: each tap's contribution goes to the source pixel it read
    per_tap = np.einsum("nyxgo,goqpc->nyxqpgc", e, w).reshape(nb, he, we, kh, kw, c)
    ys, y_in = taps(problem.tap0[0], he, problem.stride[0], kh, problem.dilation[0], x.shape[1], problem.edge)
    xs, x_in = taps(problem.tap0[1], we, problem.stride[1], kw, problem.dilation[1], x.shape[2], problem.edge)
    mask = (y_in[:, None, :, None] & x_in[None, :, None, :])[None, ..., None]
    d_s = np.zeros_like(x)
    yy = np.broadcast_to(ys[:, None, :, None], (he, we, kh, kw))
    xx = np.broadcast_to(xs[None, :, None, :], (he, we, kh, kw))
    for b in range(nb):
        np.add.at(d_s[b], (yy, xx), per_tap[b] * mask[0])
    uy, ux = problem.upsample
    return d_s[:, ::uy, ::ux], d_w, d_b  # the VJP of zero insertion keeps the source pixels


@np.errstate(all="ignore")
def neuron_gradient(problem: ConvProblem, src: torch.Tensor, e: torch.Tensor, e_format: int, dst: torch.Tensor,
                    prelu) -> None:
    """A neuron's ``dS`` into ``dst`` (the destination's ``[n, Hs, Ws, C]`` storage view) for the
    incoming gradient ``e`` (``[n, He, We, C]`` storage of format ``e_format``): ``E·f'(S̃)`` on the
    pixel each clip pixel read (the edge pixel, with the clamp edge), summed, 0 where none read."""
    n, i0, c0, ch = problem.n_images, problem.src_image0, problem.src_channel0, problem.in_channels
    x = storage_to_values(src[i0:i0 + n, :, :, c0:c0 + ch].cpu(), F(problem.src_format), torch.float64).numpy()
    (ys, y_in), (xs, x_in) = (tuple(np.asarray(v) for v in axis) for axis in identity_reads(problem))
    read = x[:, ys[:, None], xs[None, :], :]
    a = None if prelu is None else np.asarray(prelu, np.float64)[:ch]
    g = storage_to_values(e.cpu(), F(e_format), torch.float64).numpy()
    g = g * neuron_derivative(read, problem.neuron, a, NUMPY_OPS)
    g = np.where((y_in[:, None] & x_in[None, :])[None, :, :, None], g, 0.0)  # not g·mask: inf·0 is NaN
    d_s = np.zeros_like(x)
    he, we = problem.out_size
    for b in range(n):
        np.add.at(d_s[b], (np.broadcast_to(ys[:, None], (he, we)), np.broadcast_to(xs[None, :], (he, we))), g[b])
    dst.copy_(values_to_storage(torch.from_numpy(d_s), F(problem.dst_format)).to(dst.device))


class _Reference:
    name = "reference"

    @staticmethod
    def supports(problem, device) -> bool:
        return True

    @staticmethod
    def prepare(weights, bias, prelu, device) -> Prepared:
        return Prepared(weights, bias, prelu)

    @staticmethod
    def scratch_bytes(problem: ConvProblem) -> int:
        """At most what ``forward`` allocates (float64): the whole source slice converted, every tap
        of every output (twice, gathered and masked), the sums and the neuron's copies."""
        p = problem
        (h, w), taps = p.expanded_size, p.kernel[0] * p.kernel[1]
        return 8 * (2 * p.n_images * h * w * p.in_channels + 2 * taps * p.out_elements() // p.out_channels
                    * p.in_channels + 4 * p.out_elements())

    @staticmethod
    def gradient_scratch_bytes(problem: ConvProblem) -> int:
        """At most what ``gradient`` allocates (float64): the source slice converted and its gradient,
        every tap of every output three times (gathered, masked, multiplied out), the incoming
        gradient and the weight gradient."""
        p = problem
        (h, w), taps = p.expanded_size, p.kernel[0] * p.kernel[1]
        windows = taps * p.out_elements() // p.out_channels * p.in_channels
        weights = p.out_channels * taps * (p.in_channels // p.groups)
        return 8 * (2 * p.n_images * h * w * p.in_channels + 3 * windows + p.out_elements() + weights)

    @staticmethod
    def plan(problem, device) -> ConvProblem:
        return problem

    @staticmethod
    def bind(plan, src, dst):
        return plan, src, dst

    @staticmethod
    def run(bound, prepared) -> None:
        forward(*bound, prepared)

    gradient = staticmethod(gradient)
    neuron_gradient = staticmethod(neuron_gradient)


BACKEND = _Reference()
