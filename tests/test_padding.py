"""kernel-image.md checklist: padding policies (39–64) and the worked examples WE-3…WE-12."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given, strategies as st

from helpers import QUEUE, blank, conv, image, run, values
from mpsconv import *
from mpsconv.core.geometry import dest_size, dest_size_reverse, padding_offset, tdiv
from tolerances import assert_close

M = MPSNNPaddingMethod


def test_ki_checklist_39_raw_values():
    expected = dict(alignCentered=0, alignTopLeft=1, alignBottomRight=2, align_reserved=3, addRemainderToTopLeft=0,
                    addRemainderToTopRight=4, addRemainderToBottomLeft=8, addRemainderToBottomRight=12,
                    sizeValidOnly=0, sizeSame=16, sizeFull=32, size_reserved=48, sizeMask=0x7F0,
                    customWhitelistForNodeFusion=0x2000, customAllowForNodeFusion=0x2000, custom=0x4000,
                    excludeEdges=0x8000)
    assert {name: int(getattr(M, name)) for name in expected} == expected


def test_ki_checklist_40_dest_size_same():
    assert (dest_size(224, 2, 3, 0), dest_size(5, 2, 3, 0), dest_size(7, 3, 3, 0)) == (112, 3, 3)


@given(n=st.integers(1, 200), s=st.integers(1, 8), kd=st.integers(1, 30))
def test_ki_checklist_41_42_dest_size_formulas(n, s, kd):
    if n >= kd:
        assert dest_size(n, s, kd, -1) == (n - kd) // s + 1
    assert dest_size(n, s, kd, 1) == -(-(n + kd - 1) // s)
    assert dest_size(n, s, kd, 0) == -(-n // s)


def test_ki_checklist_43_dest_size_reverse():
    assert [dest_size_reverse(4, 2, 3, style) for style in (-1, 0, 1)] == [5, 7, 9]


def allocate(kernel, width, height, method=None, channels=None):
    if method is not None:
        kernel.padding = MPSNNDefaultPadding(method)
    src = blank(width, height, channels or getattr(kernel, "inputFeatureChannels", 1))
    d = kernel.destinationImageDescriptor(sourceImages=[src])
    return (d.width, d.height), (kernel.offset.x, kernel.offset.y)


def test_ki_checklist_44_45_we3_we4():
    k = conv(strideInPixelsX=2, strideInPixelsY=2)
    cb = QUEUE.makeCommandBuffer()
    out = k.encode(commandBuffer=cb, sourceImage=blank(224, 224, 1))
    cb.commit()
    assert (out.width, out.height) == (112, 112) and k.offset == MPSOffset(0, 0, 0)
    k.padding = MPSNNDefaultPadding(0x1C)
    cb = QUEUE.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=blank(224, 224, 1))
    cb.commit()
    assert k.offset == MPSOffset(1, 1, 0)


def test_ki_checklist_46_we6():
    assert allocate(conv(dilationRateX=2, dilationRateY=2), 7, 7, 0x10) == ((7, 7), (0, 0))


def test_ki_checklist_47_we8():
    k = conv(strideInPixelsX=3, strideInPixelsY=3)
    assert allocate(k, 8, 8, 0x00) == ((2, 2), (1, 1))
    assert allocate(k, 8, 8, 0x0C) == ((2, 2), (2, 2))


def test_ki_checklist_48_we9():
    assert allocate(conv(), 5, 5, 0x20) == ((7, 7), (-1, -1))


def test_ki_checklist_49_we10():
    k = conv(3, 2, strideInPixelsX=2, strideInPixelsY=1)
    assert allocate(k, 6, 5, 0x10) == ((3, 5), (0, 0))
    assert allocate(k, 6, 5, 0x1C) == ((3, 5), (1, 1))


def test_ki_checklist_50_we12_truncating_division():
    k = conv(1, 1, strideInPixelsX=5)
    assert allocate(k, 13, 1, 0x10) == ((3, 1), (0, 0))
    assert allocate(k, 13, 1, 0x1C) == ((3, 1), (1, 0))
    assert tdiv(-1, 2) == 0 and tdiv(-3, 2) == -1 and tdiv(-2, 2) == -1


def test_ki_checklist_51_remainder_top_right():
    assert allocate(conv(2, 2), 4, 4, M.sizeSame | M.addRemainderToTopRight)[1] == (1, 0)


@given(n=st.integers(1, 40), s=st.integers(1, 4), kd=st.integers(1, 9))
def test_ki_checklist_52_align_top_left_and_bottom_right(n, s, kd):
    for style in (-1, 0, 1):
        if dest_size(n, s, kd, style) < 1:
            continue
        extra = (dest_size(n, s, kd, style) - 1) * s + kd - n
        assert padding_offset(n, s, kd, style, 2, 1) == kd >> 1
        assert padding_offset(n, s, kd, style, 1, 1) == (kd >> 1) - extra


@pytest.mark.parametrize("method", [M.align_reserved | M.sizeSame, M.size_reserved])
def test_ki_checklist_53_reserved_values_raise(method):
    k = conv()
    k.padding = MPSNNDefaultPadding(method)
    with pytest.raises(MPSValueError, match="reserved"):
        k.destinationImageDescriptor(sourceImages=[blank(5, 5, 1)])


def test_ki_checklist_54_55_destination_descriptor():
    k = conv(3, 3, 1, 6, strideInPixelsX=2)
    k.destinationFeatureChannelOffset = 8
    k.padding = MPSNNDefaultPadding(0x1C)
    src = blank(8, 7, 1, fmt=MPSImageFeatureChannelFormat.float16)
    first = k.destinationImageDescriptor(sourceImages=[src])
    offset = k.offset
    second = k.destinationImageDescriptor(sourceImages=[src])
    # x: D = 4, extra = 1 -> left 0 (remainder right) -> offset 1; y: D = 7, extra = 2 -> left 1 -> offset 0
    assert k.offset == offset == MPSOffset(1, 0, 0)
    assert (first.width, first.height, first.featureChannels, first.numberOfImages) == (4, 7, 14, 1)
    assert (second.width, second.height) == (first.width, first.height)
    assert first.channelFormat == MPSImageFeatureChannelFormat.float16
    cb = QUEUE.makeCommandBuffer()
    out = k.encode(commandBuffer=cb, sourceImage=src)
    cb.commit()
    assert (out.width, out.height, out.featureChannels) == (4, 7, 14)


def test_ki_checklist_56_manual_encode_ignores_padding():
    rng = np.random.default_rng(56)
    src = image(rng.uniform(-1, 1, (5, 5, 1)))
    k = conv(weights=rng.uniform(-1, 1, 9))
    first = values(run(k, src, blank(5, 5, 1)))
    k.padding = MPSNNDefaultPadding(M.sizeFull | M.alignTopLeft)
    np.testing.assert_array_equal(values(run(k, src, blank(5, 5, 1))), first)
    assert k.offset == MPSOffset(0, 0, 0)


class WidthFive(MPSNNPadding):
    def __init__(self):
        self.seen = None

    def paddingMethod(self):
        return M.custom | M.sizeSame

    def destinationImageDescriptor(self, sourceImages, sourceStates, kernel, suggestedDescriptor):
        self.seen = (suggestedDescriptor.width, kernel.offset)
        suggestedDescriptor.width = 5
        kernel.offset = MPSOffset(2, 0, 0)
        return suggestedDescriptor


def test_ki_checklist_57_custom_policy():
    k = conv()
    policy = WidthFive()
    k.padding = policy
    src = image(np.arange(8.0).reshape(1, 8, 1))
    out = run(k, src, None)
    assert policy.seen == (8, MPSOffset(0, 0, 0))
    assert out.width == 5 and k.offset == MPSOffset(2, 0, 0)


def test_ki_checklist_58_custom_bit_without_method():
    class Bare(MPSNNPadding):
        def paddingMethod(self):
            return M.custom | M.sizeSame

    for padding in (Bare(), MPSNNDefaultPadding(M.custom | M.sizeSame)):
        k = conv()
        k.padding = padding
        with pytest.raises(MPSValueError, match="custom"):
            k.destinationImageDescriptor(sourceImages=[blank(5, 5, 1)])


def test_ki_checklist_59_default_padding_objects():
    for align in (0, 1, 2):
        for rem in (0, 4, 8, 12):
            for size in (0, 16, 32):
                for flags in (0, 0x2000, 0x8000):
                    m = align | rem | size | flags
                    p = MPSNNDefaultPadding(m)
                    assert p.paddingMethod() == m and p.label()
    assert MPSNNDefaultPadding(0x1C).inverse().paddingMethod() == 0x1C
    assert MPSNNDefaultPadding(0x0C).inverse().paddingMethod() == 0x2C


def test_ki_checklist_60_tensorflow_average_pooling_policy():
    p = MPSNNDefaultPadding.paddingForTensorflowAveragePooling()
    assert p.paddingMethod() == 0x401C
    assert MPSNNDefaultPadding.paddingForTensorflowAveragePoolingValidOnly().paddingMethod() == 0x400C
    k = conv()
    k.padding = p
    k.destinationImageDescriptor(sourceImages=[blank(5, 5, 1)])
    assert k.edgeMode == MPSImageEdgeMode.clamp


def test_ki_checklist_61_exclude_edges_has_no_effect():
    rng = np.random.default_rng(61)
    src = image(rng.uniform(-1, 1, (6, 6, 1)))
    k = conv(weights=rng.uniform(-1, 1, 9))
    k.destinationImageAllocator = MPSImage.defaultAllocator()
    plain = values(run(k, src, None))
    k.padding = MPSNNDefaultPadding(0x10 | M.excludeEdges)
    np.testing.assert_array_equal(values(run(k, src, None)), plain)


def test_ki_checklist_62_allocating_needs_single_image():
    with pytest.raises(MPSValueError, match="numberOfImages == 1"):
        run(conv(), blank(5, 5, 1, images=2), None)


@st.composite
def framework_problems(draw):
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kd = (k - 1) * d + 1
    n = draw(st.integers(max(1, kd - 4), 14))
    return k, s, d, kd, n, draw(st.integers(0, 999))


def recipe(p, begin, size, backend, channels=3):
    """The manual-encode recipe ``offset = (Kd >> 1) - pad_begin``, against PyTorch on the same data.

    Returns ``(ours, x, w)``: our ``size x size`` result and the float64 input and weights as NCHW/OIHW
    tensors for the framework side.
    """
    k, s, d, kd, n, seed = p
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (2, k, k, channels)).astype(np.float16).astype(np.float32)
    x = rng.uniform(-1, 1, (n, n, channels))
    kernel = conv(k, k, channels, 2, weights=w, strideInPixelsX=s, strideInPixelsY=s, dilationRateX=d,
                  dilationRateY=d)
    kernel.offset = MPSOffset((kd >> 1) - begin, (kd >> 1) - begin, 0)
    ours = values(run(kernel, image(x), blank(size, size, 2), backend))[0]
    return ours, torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(w).double().permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@given(p=framework_problems(), pad=st.integers(0, 4))
def test_ki_checklist_63_pytorch_padding_recipe(backend, p, pad):
    k, s, d, kd, n, seed = p
    size = (n + 2 * pad - kd) // s + 1
    if size < 1:
        return
    ours, x, w = recipe(p, pad, size, backend)
    expected = Fn.conv2d(x, w, stride=s, padding=pad, dilation=d)[0].permute(1, 2, 0).numpy()
    assert_close(ours, expected, "float32", f"k={k} s={s} d={d} n={n} pad={pad}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@given(p=framework_problems())
def test_ki_checklist_64_tensorflow_same_recipe(backend, p):
    k, s, d, kd, n, seed = p
    size = -(-n // s)
    total = max((size - 1) * s + kd - n, 0)
    begin = total // 2
    ours, x, w = recipe(p, begin, size, backend, channels=1)
    expected = Fn.conv2d(Fn.pad(x, (begin, total - begin, begin, total - begin)), w, stride=s, dilation=d)
    assert_close(ours, expected[0].permute(1, 2, 0).numpy(), "float32", f"k={k} s={s} d={d} n={n}")
