"""Memory limits and tiles (issue 7, item 4; docs/reliability.md "Memory").

An encode whose image storage plus scratch would not fit raises ``MPSMemoryError`` before it
records or allocates anything; one whose scratch alone is too large runs as row bands (then image
groups) and gives the results of the whole problem.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import DEVICE, FMT, QUEUE, ArraySource, blank, conv, descriptor, image, run, values
from mpsconv import (
    MPSCNNBinaryConvolution, MPSCNNBinaryConvolutionType, MPSCNNConvolution, MPSCNNConvolutionTranspose,
    MPSCNNDepthWiseConvolutionDescriptor, MPSCNNNeuron, MPSCNNNeuronType, MPSCNNSubPixelConvolutionDescriptor,
    MPSImage, MPSImageDescriptor, MPSImageEdgeMode, MPSMemoryError, MPSNNNeuronDescriptor, MPSOffset, MTLOrigin,
    MTLRegion, MTLSize, MTLCommandBufferStatus, use_backend, use_memory_limit,
)
from mpsconv import memory
from mpsconv.backends import REGISTRY
from mpsconv.core.geometry import tiles
from tolerances import assert_close

RNG = np.random.default_rng(11)

# The limit and the tiles are the CPU's (a GPU encode is checked against the free GPU memory, and
# the GPU's backends need no tiles): test_cuda.py covers CUDA.
pytestmark = pytest.mark.skipif(DEVICE.is_cuda, reason="the CPU memory limit; test_cuda.py covers the GPU")


def _encode(kernel, src, dst, backend):
    """Encode into a fresh command buffer; returns it uncommitted."""
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    return cb


def _cases():
    """(name, kernel, source, destination size (w, h, c, n)) over the window geometries."""
    w = lambda *shape: RNG.uniform(-1, 1, int(np.prod(shape))).astype(np.float32)  # noqa: E731
    plain = conv(3, 3, 8, 8, weights=w(8, 3, 3, 8), bias=w(8), strideInPixelsY=2, dilationRateX=2)
    plain.offset = MPSOffset(1, 2, 0)
    plain.clipRect = MTLRegion(MTLOrigin(1, 3, 0), MTLSize(13, 14, 1))
    clamp = conv(5, 3, 4, 4, weights=w(4, 3, 5, 4))
    clamp.edgeMode = MPSImageEdgeMode.clamp
    sub = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=4,
                                              outputFeatureChannels=16)
    sub.subPixelScaleFactor = 2
    dw = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=8,
                                              outputFeatureChannels=8)
    dw.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.sigmoid)
    transpose = conv(3, 3, 4, 4, weights=w(4, 3, 3, 4), cls=MPSCNNConvolutionTranspose, strideInPixelsX=2,
                     strideInPixelsY=2)
    binary = MPSCNNBinaryConvolution(
        device=DEVICE, convolutionData=ArraySource(descriptor(3, 3, 4, 4), RNG.integers(0, 2**32, 36, dtype=np.uint32)),
        scaleValue=0.5, type=MPSCNNBinaryConvolutionType.xnor, flags=0)
    neuron = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        MPSCNNNeuronType.tanH, a=1.0, b=1.0))
    src = lambda h, w_, c, n=1: image(RNG.uniform(-1, 1, (n, h, w_, c)))  # noqa: E731
    return [
        ("offset, clip, stride, dilation", plain, src(37, 19, 8), (20, 20, 8, 1)),
        ("clamp edges, 3 images", clamp, src(23, 9, 4, 3), (9, 23, 4, 3)),
        ("sub-pixel, odd clip", MPSCNNConvolution(device=DEVICE, weights=ArraySource(sub, w(16, 3, 3, 4))),
         src(11, 7, 4), (14, 21, 4, 1)),
        ("depthwise + sigmoid", MPSCNNConvolution(device=DEVICE, weights=ArraySource(dw, w(8, 3, 3))),
         src(30, 12, 8), (12, 30, 8, 1)),
        ("transpose", transpose, src(13, 6, 4), (12, 26, 4, 1)),
        ("binary", binary, src(25, 10, 4), (10, 25, 4, 1)),
        ("neuron", neuron, src(33, 5, 4, 2), (5, 33, 4, 2)),
    ]


CASES = _cases()


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_problems_over_the_tile_budget_run_as_tiles_with_the_same_results(case, backend):
    name, kernel, src, (w, h, c, n) = case
    before = RNG.uniform(-1, 1, (n, h, w, c))  # the clip region leaves some of it
    expected = image(before)
    whole = _encode(kernel, src, expected, "reference")
    whole.commit()
    whole.waitUntilCompleted()
    problem = kernel._problem(src, expected, "test")
    scratch = REGISTRY[backend].scratch_bytes(problem)
    dst = image(before)
    with use_memory_limit(4 * max(1, scratch // 5)):  # the tile budget is a quarter of the limit
        cb = _encode(kernel, src, dst, backend)
    assert len(cb._work) >= 3, f"{len(cb._work)} tiles"
    cb.commit()
    cb.waitUntilCompleted()
    assert_close(values(dst), values(expected), "float32", name)


def test_the_triton_backend_needs_no_tiles():
    """Its implicit GEMM reads the images in place: no scratch grows with them (split-K's workspace
    is only offered to problems too small to fill the GPU)."""
    kernel = conv(3, 3, 64, 64, weights=RNG.uniform(-1, 1, 64 * 64 * 9))
    problem = kernel._problem(blank(512, 512, 64), blank(512, 512, 64), "test")
    assert REGISTRY["triton"].scratch_bytes(problem) == 0 < REGISTRY["torch"].scratch_bytes(problem)


def test_tiles_cover_the_clip_region_once():
    sub = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=4,
                                              outputFeatureChannels=36)
    sub.subPixelScaleFactor = 3
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(sub, np.ones(36 * 36, np.float32)))
    problem = kernel._problem(blank(7, 9, 4, images=5), blank(20, 25, 4, images=5), "test")
    assert problem.subpixel == 3 and problem.out_size == (25, 20)
    for rows, images in [(1, 1), (2, 2), (4, 5), (100, 100)]:
        covered = np.zeros((5, 25, 20), int)
        for piece in tiles(problem, rows, images):
            (y, x), (h, w) = piece.out_origin, piece.out_size
            covered[piece.dst_image0:piece.dst_image0 + piece.n_images, y:y + h, x:x + w] += 1
            assert piece.tap0[0] == problem.tap0[0] + (y - problem.out_origin[0]) // 3 * problem.stride[0]
        assert (covered == 1).all(), (rows, images)


def test_an_encode_over_the_limit_raises_before_touching_anything():
    kernel = conv(3, 3, 8, 8, weights=RNG.uniform(-1, 1, 576))
    src = blank(64, 64, 8, rng=RNG)
    dst = blank(64, 64, 8, rng=RNG)
    before = dst._storage.clone()
    fresh = MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=64, height=64, featureChannels=8, numberOfImages=1))
    cb = QUEUE.makeCommandBuffer()
    with use_memory_limit(100_000):  # the fresh destination's storage alone is 131 KB
        with pytest.raises(MPSMemoryError, match=r"MPSCNNConvolution.encode: the encode needs .* \(128.0 KiB for "
                                                 r"image storage it allocates"):
            kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=fresh)
        with pytest.raises(MPSMemoryError, match="is available"):
            kernel.encode(commandBuffer=cb, sourceImage=src)  # allocating: the same storage
        assert fresh._storage is None and cb._work == []
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)  # fits: tiles
    assert torch.equal(dst._storage, before)  # nothing ran yet
    cb.commit()
    cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.completed
    assert_close(values(dst), values(run(kernel, src, blank(64, 64, 8), "reference")), "float32")


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MPSCONV_MEMORY_LIMIT", "64K")
    kernel = conv(1, 1, 4, 4, weights=np.eye(4, dtype=np.float32).reshape(-1))
    with pytest.raises(MPSMemoryError, match="64.0 KiB is available"):
        run(kernel, blank(100, 100, 4, rng=RNG))
    monkeypatch.setenv("MPSCONV_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="MPSCONV_MEMORY_LIMIT='lots' is not a byte count"):
        run(kernel, blank(100, 100, 4, rng=RNG))


def test_an_image_the_allocator_cannot_hold_raises_our_error():
    huge = MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=1 << 20, height=1 << 20, featureChannels=4, numberOfImages=1))
    with pytest.raises(MPSMemoryError, match=r"MPSImage \(1048576x1048576, 4 channels, 1 images\): allocating "
                                             r"16384.0 GiB failed"):
        huge.numpy()


def test_a_window_spanning_a_billion_rows_is_refused_not_allocated():
    """Found by the surface fuzzer: a clamp edge with dilation 2**30 makes the torch backend gather a
    read window of 2**30 + 1 rows (a 1x1 source!). Its scratch is counted, so the encode is refused;
    before, the CPU allocator was asked for 17 GB and the process was killed."""
    kernel = conv(1, 2, 1, 1, weights=[0.5, -0.25], dilationRateY=2**30)
    kernel.edgeMode = MPSImageEdgeMode.clamp
    dst = blank(1, 1, 1, rng=RNG)
    before = dst._storage.clone()
    cb = QUEUE.makeCommandBuffer()
    with use_memory_limit(1 << 30), use_backend("torch"):
        with pytest.raises(MPSMemoryError, match=r"GiB of scratch\); 1.0 GiB is available"):
            kernel.encode(commandBuffer=cb, sourceImage=blank(1, 1, 1, rng=RNG), destinationImage=dst)
    assert torch.equal(dst._storage, before) and cb._work == []


def test_packed_pieces_in_use_together_never_overlap():
    # random lifetimes and sizes: every two pieces in use at a same step lie apart, the total is at
    # least the bytes in use at once and at most all of them; a chain of layers (each image in use
    # while the next is made) packs into exactly the bytes in use at once
    rng = np.random.default_rng(5)
    for _ in range(200):
        count = int(rng.integers(1, 12))
        pieces = []
        for _ in range(count):
            first = int(rng.integers(0, 20))
            pieces.append((512 * int(rng.integers(1, 9)), first, first + int(rng.integers(0, 6))))
        offsets, total = memory.packed(pieces)
        for i, (size, first, last) in enumerate(pieces):
            assert 0 <= offsets[i] and offsets[i] + size <= total
            for j, (size2, first2, last2) in enumerate(pieces[:i]):
                if first <= last2 and first2 <= last:
                    assert offsets[i] + size <= offsets[j] or offsets[j] + size2 <= offsets[i]
        at_once = max(sum(s for s, a, b in pieces if a <= step <= b) for step in range(26))
        assert at_once <= total <= sum(s for s, _, _ in pieces)
    assert memory.packed([]) == ([], 0)
    sizes = [1, 2, 3, 1, 6, 6, 1, 4]
    chain = [(512 * s, i, i + 1) for i, s in enumerate(sizes)]
    assert memory.packed(chain)[1] == 512 * max(a + b for a, b in zip(sizes, sizes[1:]))
