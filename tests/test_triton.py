"""The triton backend's kernels against the float64 reference, on random geometry and data.

On a machine without a CUDA GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest.py before Triton is imported) on CPU tensors: slow, so the shapes are small and the
draws few, but every index computation of the kernels is the one the GPU runs. With a GPU the same
tests run the compiled kernels on CUDA images.
"""
from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import FMT, DEVICE, QUEUE, ArraySource, blank, descriptor, image, launched_kernels, run, values
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionTranspose, MPSCNNFullyConnected, MPSCNNNeuronType, MPSOffset, MPSRectNoClip,
)
from mpsconv.backends import torch as torch_backend, triton as triton_backend
from test_properties import build, check_against_reference, neuron_descriptor, problems, written_mask
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason="Triton is not installed")
#: A split-K configuration for the interpreter: partial sums in 3 parts.
INTERPRET_SPLIT = triton_backend.Config(16, 16, 16, 1, 1, 3)
T = MPSCNNNeuronType
FLOATS = [FMT.float32, FMT.float16, FMT.bfloat16]


triton_problems = functools.partial(problems, src_fmts=FLOATS, dst_fmts=FLOATS)
#: Run the torch backend's CUDA path (convolution in the source's type, then the Triton epilogue) on
#: CPU tensors.
cuda_path_on_cpu = functools.partial(mock.patch.object, torch_backend, "FUSED_ON_CPU", True)


@settings(max_examples=30)
@given(p=triton_problems())
def test_convolution_matches_reference(p):
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, "triton")


@pytest.mark.parametrize("kind", ["depthwise", "subpixel"])
@settings(max_examples=15)
@given(data=st.data())
def test_family_matches_reference(kind, data):
    p = data.draw(triton_problems(kind=kind))
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, "triton")


def rolling(drawn):
    """``drawn`` problems made to suit the rolling direct kernel: vertical stride and dilation 1, at
    most 3x3 taps."""
    return drawn.map(lambda p: dict(p, kernel=(min(p["kernel"][0], 3), min(p["kernel"][1], 3)),
                                    stride=(1, p["stride"][1]), dilation=(1, p["dilation"][1])))


def grouped_problems(rolling_: bool = False):
    """Grouped problems (2 or 3 groups of 4 or 8 input channels), which the direct kernels take by
    default; ``rolling_``: ones the rolling kernel takes."""
    drawn = triton_problems().filter(lambda p: p["g"] > 1)
    return rolling(drawn) if rolling_ else drawn


@settings(max_examples=10)
@given(p=st.one_of(triton_problems(kind="depthwise"), grouped_problems()))
def test_tiled_direct_matches_reference(p):
    """The tiled direct kernel, forced for every depthwise and grouped problem (by default it takes
    only those the rolling kernel cannot: vertical stride or dilation above 1, larger windows)."""
    with mock.patch.dict(triton_backend.INTERPRET_CONFIG, {True: triton_backend.INTERPRET_TILED}):
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "triton")


@pytest.mark.parametrize("band, roll, stages", [(4, 2, 1), (5, 3, 1), (3, 1, 3)])
@settings(max_examples=8)
@given(p=st.one_of(rolling(triton_problems(kind="depthwise")), grouped_problems(rolling_=True)))
def test_rolling_direct_matches_reference(band, roll, stages, p):
    """The rolling direct kernel with bands walking ``band`` source rows, ``roll`` a step: the
    steps inside the image (no per-row mask) and those at its edges and at the band's end (masked),
    whatever the offset, edge mode and image height put where; ``stages`` > 1 pipelines the row loop
    on a GPU (the interpreter runs it plainly). The kernel launched is checked in the interpreter,
    where the configuration is the one patched in."""
    cfg = triton_backend.Config(band, 32, roll, 1, stages, direct=True)
    with mock.patch.dict(triton_backend.INTERPRET_CONFIG, {True: cfg}), launched_kernels() as names:
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "triton")
    if triton_backend.interpreting() and written_mask(p, prior.shape).any():
        # (on a GPU the autotuner launches every candidate once to time it: the list names them all)
        assert names == ["direct_rolling_nhwc g1"], names


@pytest.mark.parametrize("config, kernel_height, band", [("d32x512x8w4s1", 3, 30), ("d16x256x8w2s1", 3, 14),
                                                         ("d16x256x8w2s1", 5, 12), ("d16x256x8w2s1", 1, 16),
                                                         ("d2x32x2w1s1", 3, 1), ("d4x32x2w1s1", 3, 2)])
def test_a_rolling_band_walks_the_configured_source_rows(config, kernel_height, band):
    """A rolling configuration's rows are the source rows its band walks, so that whole steps of
    them leave no masked rows to compute: a 3x3 layer's band of 32 source rows makes 30 output rows,
    and a band never makes fewer than one."""
    assert triton_backend.rolling_band(triton_backend.Config.parse(config), kernel_height) == band


@settings(max_examples=12)
@given(p=st.one_of(grouped_problems(rolling_=True), grouped_problems()))
def test_grouped_direct_and_gemm_match_reference(p):
    """Narrow groups through the direct kernels (the default), through the implicit GEMM group by group,
    and through the implicit GEMM with every group merged into one (block-diagonal weights): the
    autotuner times all three."""
    merged = triton_backend.Config(16, 16, 16, 1, 1, merge=p["g"])
    for max_ig, merge, want in ((triton_backend.DIRECT_MAX_IG, None, "direct"), (0, None, "conv2d_nhwc g1"),
                                (0, lambda _: merged, f"conv2d_nhwc g{p['g']}")):
        with mock.patch.object(triton_backend, "DIRECT_MAX_IG", max_ig), \
                mock.patch.object(triton_backend, "INTERPRET_CHOICE", merge), launched_kernels() as names:
            kernel, src, prior = build(p)
            check_against_reference(p, kernel, src, prior, "triton")
        # the interpreter runs the configuration patched in; a GPU's autotuner times every candidate
        if triton_backend.interpreting() and written_mask(p, prior.shape).any():  # (an empty clip: no launch)
            assert names and all(name.startswith(want) for name in names), names


@settings(max_examples=10)
@given(p=triton_problems(fully_connected=True))
def test_fully_connected_matches_reference(p):
    kernel, src, prior = build(p, MPSCNNFullyConnected)
    check_against_reference(p, kernel, src, prior, "triton")


@pytest.mark.parametrize("neuron_type", [t for t in list(T)[:-1]])
def test_every_neuron_matches_reference(neuron_type):
    """The kernels' ``_neuron`` against ``core.activations.FORMULAS`` for every type, PReLU per channel too."""
    rng = np.random.default_rng(100 + int(neuron_type))
    d = descriptor(3, 3, 5, 6)
    d.fusedNeuronDescriptor = neuron_descriptor(neuron_type, 6, rng)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, (6, 3, 3, 5)),
                                                                  rng.uniform(-1, 1, 6)))
    src = image(rng.uniform(-1, 1, (2, 7, 6, 5)))
    got = {b: values(run(kernel, src, blank(6, 7, 6, 2), b)) for b in ("reference", "triton")}
    assert_close(got["triton"], got["reference"], "float32", neuron_type.name)


@pytest.mark.parametrize("c", [2.0, 3.0, -1.0, 0.5, 0.0])
def test_power_neuron_signs(c):
    """``(a x + b) ** c`` on negative bases: real for integral ``c`` (odd keeps the sign), NaN else."""
    from mpsconv import MPSNNNeuronDescriptor

    rng = np.random.default_rng(5)
    d = descriptor(1, 1, 4, 4)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.power, a=1.0, b=0.0, c=c)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.eye(4, dtype=np.float32)))
    src = image(rng.uniform(-2, 2, (3, 3, 4)))
    got = {b: values(run(kernel, src, blank(3, 3, 4), b)) for b in ("reference", "triton")}
    assert_close(got["triton"], got["reference"], "float32", f"c={c}")


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_transpose_matches_reference(stride):
    """Backwards kernels: zeros inserted between source pixels, read through the same kernel."""
    rng = np.random.default_rng(stride)
    d = descriptor(3, 3, 4, 5, strideInPixelsX=stride, strideInPixelsY=stride)
    kernel = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, (5, 3, 3, 4)),
                                                                           rng.uniform(-1, 1, 5)))
    src = image(rng.uniform(-1, 1, (2, 4, 5, 4)))
    got = {}
    for backend in ("reference", "triton"):
        dst = image(np.full((2, 4 * stride + 1, 5 * stride, 8), 0.5), FMT.float16)
        run(kernel, src, dst, backend)
        got[backend] = values(dst)
    assert_close(got["triton"], got["reference"], "float16", f"stride {stride}")


def test_weights_that_float16_would_round_multiply_in_float32():
    """float32 kernel weights with a float16 source: the products keep the weights' precision."""
    from mpsconv import MPSDataType

    rng = np.random.default_rng(11)
    w = (rng.uniform(-1, 1, (4, 3, 3, 4)) + 1e-4).astype(np.float32)  # not float16-exact
    d = descriptor(3, 3, 4, 4)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, kernel_type=MPSDataType.float32))
    src = image(rng.uniform(-1, 1, (6, 6, 4)), FMT.float16)
    got = {b: values(run(kernel, src, blank(6, 6, 4), b)) for b in ("reference", "triton")}
    assert_close(got["triton"], got["reference"], "float32", "fp32 weights, fp16 source")


@settings(max_examples=20)
@given(p=triton_problems())
def test_split_k_matches_reference(p):
    """Split-K launches (partial sums in a workspace, then the epilogue kernel adds them and finishes)."""
    with mock.patch.object(triton_backend, "INTERPRET_CHOICE", lambda p: INTERPRET_SPLIT):
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "triton")


@settings(max_examples=15)
@given(p=triton_problems())
def test_flat_reduction_matches_reference(p):
    """Implicit-GEMM steps over the flattened (tap, channel) reduction, with split-K too."""
    flat = triton_backend.Config(16, 16, 16, 1, 1, split=p["seed"] % 2 + 1, flat=True)
    with mock.patch.object(triton_backend, "INTERPRET_CHOICE", lambda p: None if triton_backend.direct(p) else flat):
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "triton")


def packable(drawn):
    """``drawn`` problems of one group read without dilation, which the packed implicit GEMM takes."""
    return drawn.filter(lambda p: p["g"] == 1).map(lambda p: dict(p, dilation=(1, 1)))


@settings(max_examples=15)
@given(p=st.one_of(packable(triton_problems()), packable(triton_problems(kind="subpixel"))))
def test_packed_implicit_gemm_matches_reference(p):
    """Space-to-depth into a packed image (strides, window offsets, zero and clamp edges applied
    there), then the implicit GEMM over its contiguous tap rows, a step shorter than a row's run or
    longer (masked), with every epilogue."""
    cfg = triton_backend.Config(16, 16, (8, 16, 32)[p["seed"] % 3], 1, 1, pack=True)
    with mock.patch.object(triton_backend, "INTERPRET_CHOICE", lambda _: cfg), launched_kernels() as names:
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "triton")
    assert names in ([], ["pack_nhwc g1", "packed_conv_nhwc g1"]), names


def planned(rng, cin, **props):
    """The resolved problem of a 7x7 layer of ``cin`` input channels and 64 outputs (descriptor
    properties ``props``) from a 32x32 source into a 16x16 destination, random weights and pixels."""
    d = descriptor(7, 7, cin, 64, **props)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, (64, 7, 7, cin // d.groups))))
    return k._problem(image(rng.uniform(-1, 1, (1, 32, 32, cin))), blank(16, 16, 64), "t")


def test_packing_geometry_and_offer():
    """An RGB first layer (7x7, stride 2) packs into 4x4 taps of 12 channels (16 with padding), tap rows
    of 64 elements; layers with 16 input channels, groups or dilation are not offered the packing, and
    a plan refuses a packed configuration for them."""
    rng = np.random.default_rng(3)
    problem = functools.partial(planned, rng)
    rgb = problem(3, strideInPixelsX=2, strideInPixelsY=2)
    pk = triton_backend.packing(rgb)
    assert (pk.kh, pk.kw, pk.height, pk.width, pk.used, pk.channels, pk.run) == (4, 4, 19, 19, 12, 16, 64)
    assert any(c.pack for c in triton_backend.configs(rgb))
    assert triton_backend.BACKEND.scratch_bytes(rgb) == 19 * 19 * 16 * 4
    for other in (problem(16), problem(8, groups=2), problem(3, dilationRateX=2)):
        assert not any(c.pack for c in triton_backend.configs(other))
        with pytest.raises(ValueError, match="packed configuration"):
            triton_backend.Plan(other, DEVICE, triton_backend.Config(16, 16, 16, 1, 1, pack=True))


def test_a_plan_refuses_a_merge_that_does_not_divide_the_groups():
    p = planned(np.random.default_rng(5), 8, groups=2)
    triton_backend.Plan(p, DEVICE, triton_backend.Config(16, 16, 16, 1, 1, merge=2))
    with pytest.raises(ValueError, match="merges 4 groups, which do not divide this problem's 2"):
        triton_backend.Plan(p, DEVICE, triton_backend.Config(16, 16, 16, 1, 1, merge=4))


@st.composite
def matrix_problems(draw):
    """1x1 layers at stride 1 with the window inside the source (``triton.matrix``). With ``tma`` the
    windows are whole strided matrices with 16-byte rows (channels in eights, the clip region the
    whole destination, a vertical offset for one image only); without, a horizontal offset leaves the
    source window's rows unevenly spaced, and the implicit GEMM runs instead."""
    p = draw(triton_problems())
    tma, n = draw(st.booleans()), draw(st.integers(1, 2))
    hd, wd = draw(st.integers(1 if tma else 2, 6)), draw(st.integers(1 if tma else 2, 9))
    cin, cout = draw(st.sampled_from([8, 16, 24])), draw(st.sampled_from([8, 16, 24, 40]))
    sfo, dfo = draw(st.sampled_from([0, 8])), draw(st.sampled_from([0, 8]))
    oy = draw(st.integers(0, 2)) if n == 1 else 0
    ox = 0 if tma else draw(st.integers(1, 2))
    cs = sfo + cin + (8 * draw(st.integers(0, 1)) if tma else draw(st.integers(0, 3)))
    p.update(g=1, cin=cin, cout=cout, kernel=(1, 1), stride=(1, 1), dilation=(1, 1), sfo=sfo, dfo=dfo,
             src=(n, hd + oy, wd + ox, cs), dst=(n, hd, wd, dfo + cout + 8 * draw(st.integers(0, 1))),
             clip=MPSRectNoClip, offset=MPSOffset(ox, oy, 0), tma=tma)
    return p


@settings(max_examples=15)
@given(p=matrix_problems())
def test_tma_gemm_matches_reference(p):
    """The persistent TMA GEMM of 1x1 layers (several tiles a program, partial tiles at the matrices'
    ends, bias and every neuron in its epilogue), and its fallback to the implicit GEMM where the
    storages are not single matrices with 16-byte rows."""
    cfg = triton_backend.Config(16, 16, 16, 1, 1, tma=1)
    with mock.patch.object(triton_backend, "INTERPRET_CHOICE", lambda _: cfg), launched_kernels() as names:
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "triton")
    assert names == ["gemm_tma_nhwc g1" if p["tma"] else "conv2d_nhwc g1"], names


def test_tma_scratch_allocator_leaves_a_callers_own_in_place():
    """The TMA GEMM's descriptors need Triton's allocator: we set ours only in a context that has none."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from mpsconv.backends import launch

    def theirs(size, alignment, stream):
        raise AssertionError("not called here")

    def run_in_fresh_context(before):
        if before is not None:
            triton.set_allocator(before)
        launch._ensure_allocator()
        return _allocation._allocator.get()

    fresh = contextvars.Context()  # a new thread's context: Triton's null allocator
    assert fresh.run(run_in_fresh_context, None) is launch._scratch
    assert contextvars.Context().run(run_in_fresh_context, theirs) is theirs
    assert launch._scratch(64, 16, None).numel() == 64


def test_repeated_launches_take_each_runs_scratch(monkeypatch):
    """The direct launch path (compiled kernels given addresses: CUDA only, so imitated here) of a
    split-K encode: from the second run on, every launch gets the new run's scratch address where the
    first run had a view of its scratch (the partial sums, then the epilogue reading them), and the
    first run's addresses everywhere else."""
    from mpsconv import use_backend
    from mpsconv.backends import launch as launch_module

    calls, drawn = [], []
    interpret = launch_module.Launcher.__call__

    def call(self, grid, args):
        if self.compiled is None:  # the interpreter runs it; later launches only record their arguments
            interpret(self, grid, args)
            self.compiled = True
        calls.append((self, tuple(args)))

    def new_scratch(bound, draw=triton_backend.Bound.new_scratch):
        drawn.append(draw(bound))
        return drawn[-1]

    monkeypatch.setattr(launch_module.Launcher, "__call__", call)
    monkeypatch.setattr(launch_module.Launcher, "addresses", lambda self, args: tuple(
        a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))
    monkeypatch.setattr(triton_backend.Bound, "new_scratch", new_scratch)
    monkeypatch.setattr(triton_backend, "INTERPRET_CHOICE", lambda p: INTERPRET_SPLIT)
    rng = np.random.default_rng(17)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 8, 12), rng.uniform(-1, 1, (12, 3, 3, 8)),
                                                             rng.uniform(-1, 1, 12)))
    src, dst = image(rng.uniform(-1, 1, (2, 7, 6, 8))), blank(6, 7, 12, 2)
    with use_backend("triton"):
        for _ in range(3):
            run(k, src, dst)  # ``drawn`` keeps each run's scratch, so the next one lands elsewhere
    first, *later = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert len(later) == 2 and len({t.data_ptr() for t in drawn}) == 3
    for scratch, launches in zip(drawn[1:], later):
        for (launcher, args), (same, before) in zip(launches, first):
            assert launcher is same
            holes = [i for i, a in enumerate(before)
                     if isinstance(a, torch.Tensor) and a.data_ptr() == drawn[0].data_ptr()]
            assert len(holes) == 1
            for i, a in enumerate(args):
                want = scratch.data_ptr() if i in holes else (
                    before[i].data_ptr() if isinstance(before[i], torch.Tensor) else before[i])
                assert a == want, i


def test_split_k_replays_on_new_contents():
    """A replay of a split-K launch (the same workspace, parts and epilogue) on new source contents."""
    from mpsconv import use_backend

    rng = np.random.default_rng(14)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 8, 12), rng.uniform(-1, 1, (12, 3, 3, 8)),
                                                             rng.uniform(-1, 1, 12)))
    src, dst = image(rng.uniform(-1, 1, (2, 7, 6, 8))), blank(6, 7, 12, 2)
    with mock.patch.object(triton_backend, "INTERPRET_CHOICE", lambda p: INTERPRET_SPLIT), use_backend("triton"):
        cb = QUEUE.makeCommandBuffer()
        k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.make_replayable()
        cb.commit()
        cb.waitUntilCompleted()
        new = rng.uniform(-1, 1, (2, 7, 6, 8)).astype(np.float32)
        for i in range(2):
            src.writeBytes(new[i], dataLayout=0, imageIndex=i)
        cb.replay().waitUntilCompleted()
    assert_close(values(dst), values(run(k, image(new), blank(6, 7, 12, 2), "reference")), "float32", "replay")


def test_dependent_launch_stays_off_where_the_device_has_none(monkeypatch):
    """``launch.DEPENDENT_LAUNCH`` on: the CPU (under the interpreter) launches every kernel as before,
    without the wait of ``_follow`` and without ``launch_pdl``, split-K parts and epilogue included."""
    from mpsconv import use_backend
    from mpsconv.backends import launch

    monkeypatch.setattr(launch, "DEPENDENT_LAUNCH", True)
    assert not launch.dependent_launch(torch.device("cpu"))
    rng = np.random.default_rng(15)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 8, 12), rng.uniform(-1, 1, (12, 3, 3, 8)),
                                                             rng.uniform(-1, 1, 12)))
    src = image(rng.uniform(-1, 1, (2, 7, 6, 8)))
    launchers = []
    with mock.patch.object(triton_backend, "INTERPRET_CHOICE", lambda p: INTERPRET_SPLIT), \
            launched_kernels(launchers):
        got = run(k, src, blank(6, 7, 12, 2), "triton")
    assert len(launchers) == 2
    assert all(launcher.kwargs["GDC"] is False and "launch_pdl" not in launcher.kwargs for launcher in launchers)
    assert_close(values(got), values(run(k, src, blank(6, 7, 12, 2), "reference")), "float32", "split-K")


def test_scratch_holes_are_the_views_of_the_runs_scratch():
    """A repeated launch fills in each run's scratch where the first run's views of it were: every view
    of the scratch (at its byte offset), nothing else, even a tensor of the same shape and type."""
    scratch, other = torch.empty(3, 4, 8), torch.empty(3, 4, 8)
    args = (other, scratch.view(3, 32)[1], 7, scratch, scratch[2, 1:], 2.5)
    assert triton_backend._holes(args, scratch) == ((1, 128), (3, 0), (4, 288))
    assert triton_backend._holes(args, None) == ()


def test_config_names_round_trip():
    for config in (triton_backend.GEMM_CONFIGS + triton_backend.SPLIT_CONFIGS + triton_backend.DEPTHWISE_CONFIGS
                   + triton_backend.MERGED_TILES + triton_backend.FLAT_TILES + triton_backend.TMA_CONFIGS):
        assert triton_backend.Config.parse(str(config)) == config


def test_depthwise_with_a_window_too_large_to_unroll():
    """Windows over 49 taps take the depthwise kernel's loop instead of its unrolled taps."""
    from mpsconv import MPSCNNDepthWiseConvolutionDescriptor

    rng = np.random.default_rng(12)
    d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=8, kernelHeight=7, inputFeatureChannels=8,
                                             outputFeatureChannels=8)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, (8, 7, 8, 1)),
                                                             rng.uniform(-1, 1, 8)))
    src = image(rng.uniform(-1, 1, (2, 9, 10, 8)), FMT.float16)
    got = {b: values(run(k, src, blank(10, 9, 8, 2, FMT.float16), b)) for b in ("reference", "triton")}
    assert_close(got["triton"], got["reference"], "float16", "8x7 depthwise")


@pytest.mark.parametrize("kind", ["plain", "depthwise"])
def test_64_bit_offsets_give_the_same_results(kind, monkeypatch):
    """Storages of 2**31 elements or more switch the kernels to 64-bit offsets (``WIDE``); too big to
    allocate here, so the switch is forced on a small problem and must not change a value."""
    from mpsconv import MPSCNNDepthWiseConvolutionDescriptor

    monkeypatch.setattr(triton_backend, "needs_wide_index", lambda *tensors: True)
    rng = np.random.default_rng(13)
    if kind == "plain":
        d, w = descriptor(3, 3, 8, 12), rng.uniform(-1, 1, (12, 3, 3, 8))
    else:
        d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=8,
                                                 outputFeatureChannels=8)
        w = rng.uniform(-1, 1, (8, 3, 3, 1))
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, rng.uniform(-1, 1, w.shape[0])))
    src = image(rng.uniform(-1, 1, (2, 7, 9, 8)), FMT.float16)
    got = {b: values(run(k, src, blank(9, 7, w.shape[0], 2, FMT.float16), b)) for b in ("reference", "triton")}
    assert_close(got["triton"], got["reference"], "float16", kind)


@settings(max_examples=30)
@given(p=triton_problems())
def test_torch_backend_cuda_path_matches_reference(p):
    """The torch backend's CUDA path run on CPU tensors, so that CI checks its window handling and the
    epilogue's indexing."""
    with cuda_path_on_cpu():
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "torch")


@pytest.mark.parametrize("kind", ["depthwise", "subpixel"])
@settings(max_examples=10)
@given(data=st.data())
def test_torch_backend_cuda_path_family(kind, data):
    p = data.draw(triton_problems(kind=kind))
    with cuda_path_on_cpu():
        kernel, src, prior = build(p)
        check_against_reference(p, kernel, src, prior, "torch")
