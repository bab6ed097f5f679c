"""Property tests: the torch backend against the float64 reference on random valid geometry.

Each draw builds one kernel and one source, pre-fills the destination with random values, runs
both backends on their own copy, and checks (1) every value agrees within the format's tolerance
and (2) everything outside the clip region, the written channel slice and the processed images
keeps its prior contents exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import FMT, DEVICE, ArraySource, blank, conv, descriptor, image, run, values
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDescriptor, MPSCNNDepthWiseConvolutionDescriptor, MPSCNNFullyConnected,
    MPSCNNNeuron, MPSCNNNeuronType, MPSCNNSubPixelConvolutionDescriptor, MPSImageEdgeMode, MPSNNNeuronDescriptor,
    MPSOffset, MPSRectNoClip, MTLOrigin, MTLRegion, MTLSize,
)
from tolerances import assert_close

T = MPSCNNNeuronType
#: parameters that keep every neuron finite-or-identically-special on both backends
NEURON_PARAMS = {
    T.none: (), T.reLU: (0.1,), T.linear: (2.0, -0.5), T.sigmoid: (), T.hardSigmoid: (0.2, 0.5),
    T.tanH: (1.5, 0.7), T.absolute: (), T.softPlus: (1.0, 2.0), T.softSign: (), T.ELU: (0.8,),
    T.reLUN: (0.1, 0.75), T.power: (0.5, 0.25, 2.0), T.exponential: (0.5, 0.1, -1.0),
    T.logarithm: (0.1, 3.0, 10.0), T.geLU: (),
}


def neuron_descriptor(neuron_type, channels, rng):
    if neuron_type == T.pReLU:
        return MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(rng.uniform(-1, 1, channels).astype(np.float32))
    return MPSNNNeuronDescriptor.cnnNeuronDescriptor(neuron_type, **dict(zip("abc", NEURON_PARAMS[neuron_type])))


@st.composite
def problems(draw, fully_connected=False, kind="plain", src_fmts=(FMT.float32, FMT.float16, FMT.unorm8),
             dst_fmts=(FMT.float32, FMT.float32, FMT.float16, FMT.unorm8)):
    """``kind``: ``plain``, ``depthwise`` (I = O, one filter per channel) or ``subpixel`` (r = 2 or 3);
    the source and destination formats are drawn from ``src_fmts`` and ``dst_fmts``."""
    g = 1 if fully_connected or kind != "plain" else draw(st.sampled_from([1, 1, 2, 3]))
    r = draw(st.sampled_from([2, 3])) if kind == "subpixel" else 1
    if g > 1:
        cin, cout = g * draw(st.sampled_from([4, 8])), g * draw(st.sampled_from([4, 8]))
    elif kind == "depthwise":
        cin = cout = draw(st.integers(1, 9))
    elif kind == "subpixel":
        cin, cout = draw(st.integers(1, 6)), r * r * draw(st.integers(1, 3))
    else:
        cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    if fully_connected:
        sy = sx = dy = dx = 1
        hs, ws = kh, kw
    else:
        sy, sx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        dy, dx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        hs, ws = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    hd, wd = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    if kind == "subpixel":
        hd, wd = draw(st.integers(1, 3 * r + 1)), draw(st.integers(1, 3 * r + 1))
    sfo, dfo = draw(st.sampled_from([0, 4])), draw(st.sampled_from([0, 4, 8]))
    cs = sfo + cin + draw(st.integers(0, 3))
    cd = dfo + cout // (r * r) + draw(st.integers(0, 2))
    ns, nd = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if draw(st.booleans()):
        clip = MPSRectNoClip
        if fully_connected:  # without a clip region the destination itself must be one pixel
            hd = wd = 1
    else:
        clip = MTLRegion(MTLOrigin(draw(st.integers(0, wd)), draw(st.integers(0, hd)), draw(st.integers(0, nd - 1))),
                         MTLSize(draw(st.integers(0, wd + 1)), draw(st.integers(0, hd + 1)), draw(st.integers(1, 3))))
        if fully_connected:
            clip = MTLRegion(clip.origin, MTLSize(1, 1, clip.size.depth))
    n_images = min(clip.size.depth, nd - clip.origin.z)
    oz = draw(st.integers(0, max(0, ns - n_images)))
    if n_images > ns:  # keep every draw valid: process no more images than the source has
        clip = MTLRegion(clip.origin, MTLSize(clip.size.width, clip.size.height, ns))
    return dict(
        kind=kind, r=r,
        g=g, cin=cin, cout=cout, kernel=(kh, kw), stride=(sy, sx), dilation=(dy, dx), src=(ns, hs, ws, cs),
        dst=(nd, hd, wd, cd), sfo=sfo, dfo=dfo, clip=clip,
        offset=MPSOffset(draw(st.integers(-4, ws + 3)), draw(st.integers(-4, hs + 3)), oz),
        edge=draw(st.sampled_from([MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp])),
        neuron=draw(st.sampled_from(list(T)[:-1])), bias=draw(st.booleans()),
        src_fmt=draw(st.sampled_from(src_fmts)),
        dst_fmt=draw(st.sampled_from(dst_fmts)),
        seed=draw(st.integers(0, 2**16)),
    )


DESCRIPTORS = {"plain": MPSCNNConvolutionDescriptor, "depthwise": MPSCNNDepthWiseConvolutionDescriptor,
               "subpixel": MPSCNNSubPixelConvolutionDescriptor}


def build(p, cls=MPSCNNConvolution):
    rng = np.random.default_rng(p["seed"])
    kh, kw = p["kernel"]
    kind = p.get("kind", "plain")
    d = DESCRIPTORS[kind](kernelWidth=kw, kernelHeight=kh, inputFeatureChannels=p["cin"],
                          outputFeatureChannels=p["cout"])
    d.groups, d.strideInPixelsY, d.strideInPixelsX = p["g"], p["stride"][0], p["stride"][1]
    d.dilationRateY, d.dilationRateX = p["dilation"]
    if kind == "subpixel":
        d.subPixelScaleFactor = p["r"]
    d.fusedNeuronDescriptor = neuron_descriptor(p["neuron"], p["cout"], rng)
    per_output = 1 if kind == "depthwise" else p["cin"] // p["g"]
    weights = rng.uniform(-1, 1, (p["cout"], kh, kw, per_output)).astype(np.float32)
    bias = rng.uniform(-1, 1, p["cout"]).astype(np.float32) if p["bias"] else None
    kernel = cls(device=DEVICE, weights=ArraySource(d, weights, bias))
    kernel.offset, kernel.clipRect, kernel.edgeMode = p["offset"], p["clip"], p["edge"]
    kernel.sourceFeatureChannelOffset, kernel.destinationFeatureChannelOffset = p["sfo"], p["dfo"]
    ns, hs, ws, cs = p["src"]
    src = image(rng.uniform(-1, 1, (ns, hs, ws, cs)) if p["src_fmt"] != FMT.unorm8 else rng.uniform(0, 1, (ns, hs, ws, cs)),
                p["src_fmt"])
    nd, hd, wd, cd = p["dst"]
    prior = values(image(rng.uniform(0, 1, (nd, hd, wd, cd)), p["dst_fmt"]))
    return kernel, src, prior


def written_mask(p, shape) -> np.ndarray:
    nd, hd, wd, cd = shape
    (x0, y0, z0), (w, h, d) = p["clip"]
    n = min(d, nd - z0)
    mask = np.zeros(shape, bool)
    written = p["cout"] // p.get("r", 1) ** 2
    mask[z0:z0 + max(n, 0), y0:min(y0 + h, hd), x0:min(x0 + w, wd), p["dfo"]:p["dfo"] + written] = True
    return mask


def check_against_reference(p, kernel, src, prior, fast_backend):
    results = {}
    for backend in ("reference", fast_backend):
        dst = image(prior, p["dst_fmt"])
        run(kernel, src, dst, backend=backend)
        results[backend] = values(dst)
    context = f"{type(kernel).__name__} {p}"
    outside = ~written_mask(p, prior.shape)
    for backend, got in results.items():
        np.testing.assert_array_equal(got[outside], prior[outside], err_msg=f"{backend} wrote outside [{context}]")
    assert_close(results[fast_backend], results["reference"], p["dst_fmt"].name, context)


@given(p=problems())
def test_convolution_matches_reference(p, fast_backend):
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, fast_backend)


@pytest.mark.parametrize("kind", ["depthwise", "subpixel"])
@given(data=st.data())
def test_family_matches_reference(kind, data, fast_backend):
    """Depthwise and sub-pixel kernels, torch backend against the reference, random geometry."""
    p = data.draw(problems(kind=kind))
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, fast_backend)


@given(p=problems(fully_connected=True))
def test_fully_connected_matches_reference(p, fast_backend):
    p["offset"] = MPSOffset(p["offset"].x + 11, p["offset"].y - 7, p["offset"].z)  # x/y are ignored
    kernel, src, prior = build(p, MPSCNNFullyConnected)
    check_against_reference(p, kernel, src, prior, fast_backend)


@st.composite
def neuron_problems(draw):
    p = draw(problems())
    p.update(kernel=(1, 1), stride=(1, 1), dilation=(1, 1), g=1)
    return p


@given(p=neuron_problems())
def test_neuron_kernel_matches_reference(p, fast_backend):
    rng = np.random.default_rng(p["seed"])
    ns, hs, ws, cs = p["src"]
    channels = cs - p["sfo"]
    nd, hd, wd, cd = p["dst"]
    p["cout"] = channels
    p["dst"] = (nd, hd, wd, max(cd, p["dfo"] + channels))
    kernel = MPSCNNNeuron(device=DEVICE, neuronDescriptor=neuron_descriptor(p["neuron"], channels + 2, rng))
    kernel.offset, kernel.clipRect, kernel.edgeMode = p["offset"], p["clip"], p["edge"]
    kernel.sourceFeatureChannelOffset, kernel.destinationFeatureChannelOffset = p["sfo"], p["dfo"]
    src = image(rng.uniform(-1, 1, p["src"]), p["src_fmt"] if p["src_fmt"] != FMT.unorm8 else FMT.float32)
    prior = values(image(rng.uniform(0, 1, p["dst"]), p["dst_fmt"]))
    check_against_reference(p, kernel, src, prior, fast_backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@given(g=st.integers(2, 3), cig=st.sampled_from([4, 8]), cog=st.sampled_from([4, 8]), seed=st.integers(0, 999))
def test_conv_checklist_36_groups_equal_independent_convolutions(backend, g, cig, cog, seed):
    """Property: ``groups = g`` equals ``g`` convolutions on channel slices (convolution.md #36)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (g * cog, 3, 3, cig)).astype(np.float16).astype(np.float32)
    src = image(rng.uniform(-1, 1, (5, 6, g * cig)))
    grouped = run(conv(3, 3, g * cig, g * cog, weights=w, groups=g), src, blank(6, 5, g * cog), backend)
    for k in range(g):
        part = conv(3, 3, cig, cog, weights=w[k * cog:(k + 1) * cog])
        part.sourceFeatureChannelOffset = k * cig
        got = run(part, src, blank(6, 5, cog), backend)
        assert_close(values(grouped)[..., k * cog:(k + 1) * cog], values(got), "float32", f"group {k}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@given(cin=st.integers(1, 9), cout=st.integers(1, 9), seed=st.integers(0, 999))
def test_conv_checklist_37_1x1_equals_matmul(backend, cin, cout, seed):
    """Property: a 1x1 convolution is ``D = W[:, 0, 0, :] @ S`` per pixel (convolution.md #37)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (cout, 1, 1, cin)).astype(np.float16).astype(np.float32)
    s = rng.uniform(-1, 1, (4, 3, cin))
    got = values(run(conv(1, 1, cin, cout, weights=w), image(s), blank(3, 4, cout), backend))[0]
    assert_close(got, s @ w[:, 0, 0, :].T.astype(np.float64), "float32", "1x1 vs matmul")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("neuron_type", [t for t in list(T)[:-1]])
def test_fused_neuron_equals_neuron_of_convolution(backend, neuron_type):
    """Property: conv with a fused neuron == the neuron kernel applied to the plain conv."""
    rng = np.random.default_rng(int(neuron_type))
    w = rng.uniform(-1, 1, (4, 3, 3, 2)).astype(np.float32)
    b = rng.uniform(-1, 1, 4).astype(np.float32)
    src = image(rng.uniform(-1, 1, (6, 5, 2)))
    neuron = neuron_descriptor(neuron_type, 4, rng)
    fused_desc = descriptor(3, 3, 2, 4)
    fused_desc.fusedNeuronDescriptor = neuron
    fused = MPSCNNConvolution(device=DEVICE, weights=ArraySource(fused_desc, w, b))
    plain = conv(3, 3, 2, 4, weights=w, bias=b)
    expected = run(MPSCNNNeuron(device=DEVICE, neuronDescriptor=neuron), run(plain, src, blank(5, 6, 4), backend),
                   blank(5, 6, 4), backend)
    assert_close(values(run(fused, src, blank(5, 6, 4), backend)), values(expected), "float32", neuron_type.name)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_onednn_path_matches_reference(onednn_everywhere, p):
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, "torch")


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_in_place_path_matches_reference(in_place_everywhere, p):
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, "torch")


@pytest.mark.parametrize("size", [8, 9])
def test_a_stride_2_same_layer_runs_in_place(in_place_everywhere, size):
    """A stride-2 3x3 layer with MPS's default padding reads one more row and column of zeros before
    the image than after it on an even size; the convolution's symmetric padding then makes no extra
    output, so nothing is cropped and the layer runs in place (MobileNetV2's stride-2 layers)."""
    rng = np.random.default_rng(size)
    d = descriptor(3, 3, 4, 8, strideInPixelsX=2, strideInPixelsY=2)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLUN, a=0.0, b=0.5)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 8 * 9 * 4),
                                                                  rng.uniform(-1, 1, 8)))
    src, out = image(rng.uniform(-1, 1, (2, size, size, 4))), (size + 1) // 2
    got = run(kernel, src, blank(out, out, 8, images=2), "torch")
    assert in_place_everywhere[0] == 1
    assert_close(values(got), values(run(kernel, src, blank(out, out, 8, images=2), "reference")), "float32")


def test_in_place_path_runs_and_leaves_what_it_does_not_write(in_place_everywhere):
    """Into a channel slice of a destination holding other values: only the slice changes, to the
    reference's values."""
    rng = np.random.default_rng(11)
    d = descriptor(3, 3, 4, 8)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(T.reLUN, a=0.0, b=0.5)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 8 * 9 * 4), rng.uniform(
        -1, 1, 8)))
    kernel.destinationFeatureChannelOffset = 4
    src = image(rng.uniform(-1, 1, (2, 6, 7, 4)))
    prior = rng.uniform(-1, 1, (2, 6, 7, 16))
    got = run(kernel, src, image(prior), "torch")
    assert in_place_everywhere[0] == 1
    want = run(kernel, src, image(prior), "reference")
    assert_close(values(got), values(want), "float32", "channel slice")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems(fully_connected=True))
def test_onednn_path_fully_connected_matches_reference(onednn_everywhere, p):
    kernel, src, prior = build(p, MPSCNNFullyConnected)
    check_against_reference(p, kernel, src, prior, "torch")


@pytest.mark.parametrize("seed", range(6))
def test_view_images_match_reference(seed, fast_backend):
    """Sources and destinations that are views (sub-images, batch elements, texture-wrapped images)."""
    from mpsconv import MPSImage, MTLPixelFormat, MTLTextureDescriptor, MTLTextureType

    rng = np.random.default_rng(seed)
    parent = image(rng.uniform(-1, 1, (3, 6, 5, 12)))
    src = parent.batchRepresentation()[1].subImage(featureChannelRange=range(4, 12))  # 8 channels of image 1
    tex = DEVICE.makeTexture(MTLTextureDescriptor(textureType=MTLTextureType.type2DArray,
                                                  pixelFormat=MTLPixelFormat.rgba32Float, width=4, height=5,
                                                  arrayLength=6, usage=3))
    k = conv(3, 2, 8, 4, weights=rng.uniform(-1, 1, 4 * 2 * 3 * 8), strideInPixelsY=1, dilationRateX=2)
    k.offset = MPSOffset(int(rng.integers(-2, 4)), int(rng.integers(-2, 4)), 0)
    k.destinationFeatureChannelOffset = 4
    results = []
    prior = rng.uniform(-1, 1, (2, 5, 4, 12)).astype(np.float32)
    for backend in ("reference", fast_backend):
        wrapped = MPSImage(texture=tex, featureChannels=12)  # 2 images of 3 slices, a strided view
        wrapped.writeBytes(prior[1], dataLayout=0, imageIndex=1)
        wrapped.writeBytes(prior[0], dataLayout=0, imageIndex=0)
        dst = wrapped.batchRepresentation()[1]
        run(k, src, dst, backend)
        got = values(wrapped)
        np.testing.assert_array_equal(got[0], prior[0])  # the other image is untouched
        np.testing.assert_array_equal(got[1][..., :4], prior[1][..., :4])
        np.testing.assert_array_equal(got[1][..., 8:], prior[1][..., 8:])
        results.append(got)
    assert_close(results[1], results[0], "float32", f"views seed={seed}")


EPILOGUES = {"none": (T.none, ()), "relu": (T.reLU, (0.0,)), "leaky": (T.reLU, (0.1,)), "sigmoid": (T.sigmoid, ())}


@pytest.mark.parametrize("path", ["conv2d", "onednn", "in_place"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("dst_fmt", [FMT.float32, FMT.float16, FMT.unorm8, FMT.unorm16])
def test_epilogue_paths_match_reference(path, epilogue, dst_fmt, monkeypatch):
    """Every destination format with every epilogue kind, through both CPU convolution paths."""
    from mpsconv.backends import torch as torch_backend

    if path == "onednn":
        if not torch_backend.onednn_usable():
            pytest.skip("no usable oneDNN pointwise convolution in this PyTorch build")
        monkeypatch.setattr(torch_backend, "ONEDNN_MIN_WEIGHTS", 0)
    if path == "in_place":
        if not torch_backend.onednn_usable():
            pytest.skip("no usable oneDNN pointwise convolution in this PyTorch build")
        monkeypatch.setattr(torch_backend, "IN_PLACE_MIN_BYTES", 0)
    neuron_type, params = EPILOGUES[epilogue]
    p = dict(g=1, cin=4, cout=8, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), src=(2, 6, 5, 4), dst=(2, 6, 5, 12),
             sfo=0, dfo=4, clip=MPSRectNoClip, offset=MPSOffset(0, 0, 0), edge=MPSImageEdgeMode.zero,
             neuron=neuron_type, bias=True, src_fmt=FMT.float16, dst_fmt=dst_fmt, seed=7)
    _, src, prior = build(p)  # its kernel's neuron comes from NEURON_PARAMS; this test needs its own
    d = descriptor(3, 3, 4, 8)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(neuron_type, **dict(zip("abc", params)))
    rng = np.random.default_rng(7)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 288), rng.uniform(-1, 1, 8)))
    kernel.destinationFeatureChannelOffset = 4
    check_against_reference(p, kernel, src, prior, "torch")
