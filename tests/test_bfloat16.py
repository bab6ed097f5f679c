"""``MPSImageFeatureChannelFormat.bfloat16`` (our addition): storage, raw bytes, conversions, and the
kernels on every CPU backend (the triton backend's bf16 paths are in test_triton.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from helpers import FMT, DEVICE, ArraySource, blank, descriptor, image, run, values
from mpsconv import MPSCNNConvolution, MPSImage, MPSImageDescriptor, MPSValueError, MTLPixelFormat
from test_properties import build, check_against_reference, problems
from tolerances import assert_close


def test_bfloat16_images_store_bf16_and_read_back_as_float32():
    rng = np.random.default_rng(0)
    v = rng.uniform(-3, 3, (2, 3, 5, 6))
    img = image(v, FMT.bfloat16)
    assert img.featureChannelFormat == FMT.bfloat16 and img._ensure_storage().dtype == torch.bfloat16
    got = img.numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, torch.from_numpy(v).to(torch.bfloat16).float().numpy())
    assert img.pixelFormat == MTLPixelFormat.invalid  # Metal has no bf16 texture format
    assert img.torch().dtype == torch.bfloat16


def test_raw_bytes_are_bf16_bits():
    rng = np.random.default_rng(1)
    bits = torch.from_numpy(rng.uniform(-2, 2, (4, 3, 8)).astype(np.float32)).to(torch.bfloat16)
    raw = bits.view(torch.uint16).numpy()
    img = MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(channelFormat=FMT.bfloat16, width=3,
                                                                      height=4, featureChannels=8))
    img.writeBytes(raw, dataLayout=0, imageIndex=0)
    np.testing.assert_array_equal(img.numpy()[0], bits.float().numpy())
    out = np.zeros_like(raw)
    img.readBytes(out, dataLayout=0, imageIndex=0)
    np.testing.assert_array_equal(out, raw)


def test_unknown_formats_still_refused_with_bfloat16_listed():
    with pytest.raises(MPSValueError, match="bfloat16"):
        MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(channelFormat=5, width=2, height=2,
                                                                    featureChannels=4))


@settings(max_examples=40)
@given(p=problems(src_fmts=(FMT.bfloat16, FMT.float32), dst_fmts=(FMT.bfloat16, FMT.float16)))
def test_torch_backend_matches_reference_on_bfloat16_images(p):
    kernel, src, prior = build(p)
    check_against_reference(p, kernel, src, prior, "torch")


def test_bfloat16_sources_round_the_weights_to_bfloat16_on_every_backend():
    """§0.2's weight rule extended: a bf16 source multiplies bf16 weights, so the result is the same
    function of the data on every backend (here: exactly the float32 result of rounded weights)."""
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, (4, 1, 1, 4)).astype(np.float32)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 4, 4), w))
    x = rng.uniform(-1, 1, (3, 3, 4))
    src = image(x, FMT.bfloat16)
    xs = values(src)[0]
    wr = torch.from_numpy(w.astype(np.float16).astype(np.float32)).to(torch.bfloat16).double().numpy()
    want = xs @ wr[:, 0, 0, :].T
    for backend in ("reference", "torch"):
        assert_close(values(run(k, src, blank(3, 3, 4), backend))[0], want, "float32", backend)
