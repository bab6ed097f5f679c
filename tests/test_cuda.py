"""CUDA: devices, streams, completion, autotuned dispatch and graph replay on a real GPU.

Skipped where no CUDA GPU is usable (CI); the device tool runs them on an H100. What needs no GPU
(the autotune cache file, replay semantics) is tested in test_dispatch.py on the CPU.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import ArraySource, descriptor, launched_kernels
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionTranspose, MPSCNNDepthWiseConvolutionDescriptor, MPSDeviceError, MPSImage,
    MPSImageFeatureChannelFormat as FMT, MPSKernelOptions, MPSNNNeuronDescriptor,
    MPSCNNNeuronType, MTLCommandBufferStatus, MTLCopyAllDevices, MTLCreateSystemDefaultDevice, use_backend,
)
from mpsconv.backends import triton as triton_backend
from mpsconv.metal import device_from_name
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MPSCONV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gpu():
    return device_from_name("cuda")


def img(device, values, fmt):
    return MPSImage.from_numpy(np.asarray(values, np.float64), featureChannelFormat=fmt, device=device)


def run(kernel, src, dst, backend=None):
    queue = kernel.device.makeCommandQueue()
    cb = queue.makeCommandBuffer()
    if backend:
        with use_backend(backend):
            kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    else:
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    return dst.numpy().astype(np.float64)


def test_default_device_is_the_first_gpu_and_all_devices_are_listed():
    device = MTLCreateSystemDefaultDevice()
    assert device.is_cuda and device.torch_device == torch.device("cuda", 0)
    devices = MTLCopyAllDevices()
    assert sum(d.is_cuda for d in devices) == torch.cuda.device_count() and not devices[-1].is_cuda


def test_kernel_refuses_images_of_another_device():
    rng = np.random.default_rng(0)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(descriptor(3, 3, 4, 4), rng.uniform(-1, 1, 144)))
    cpu = device_from_name("cpu")
    src = img(cpu, rng.uniform(-1, 1, (5, 5, 4)), FMT.float32)
    dst = img(gpu(), np.zeros((5, 5, 4)), FMT.float32)
    with pytest.raises(MPSDeviceError, match="sourceImage is on cpu"):
        k.encode(commandBuffer=gpu().makeCommandQueue().makeCommandBuffer(), sourceImage=src, destinationImage=dst)


CASES = {
    "plain": dict(kw=3, kh=3, cin=16, cout=24),
    "strided-dilated": dict(kw=3, kh=5, cin=8, cout=16, strideInPixelsX=2, dilationRateY=2),
    "grouped": dict(kw=3, kh=3, cin=16, cout=32, groups=4),
    "1x1": dict(kw=1, kh=1, cin=32, cout=64),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", [FMT.float16, FMT.bfloat16, FMT.float32])
@pytest.mark.parametrize("backend", [None, "triton", "torch"])
def test_gpu_paths_match_reference(case, fmt, backend):
    rng = np.random.default_rng(hash((case, int(fmt))) % 2**32)
    props = dict(CASES[case])
    d = descriptor(props.pop("kw"), props.pop("kh"), props.pop("cin"), props.pop("cout"), **props)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.1)
    groups = d.groups
    w = rng.uniform(-1, 1, (d.outputFeatureChannels, d.kernelHeight, d.kernelWidth, d.inputFeatureChannels // groups))
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, w, rng.uniform(-1, 1, d.outputFeatureChannels)))
    k.destinationFeatureChannelOffset = 8
    k.offset = (1, 0, 0)
    src = img(gpu(), rng.uniform(-1, 1, (2, 13, 11, d.inputFeatureChannels)), fmt)
    prior = rng.uniform(-1, 1, (2, 13, 11, 8 + d.outputFeatureChannels + 4))
    got = run(k, src, img(gpu(), prior, fmt), backend)
    want = run(k, src, img(gpu(), prior, fmt), "reference")
    assert_close(got, want, fmt.name, f"{case} {fmt.name} {backend}")


@pytest.mark.parametrize("fmt", [FMT.float16, FMT.float32])
def test_depthwise_subpixel_transpose_on_gpu(fmt):
    rng = np.random.default_rng(3)
    dw = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=64,
                                              outputFeatureChannels=64)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(dw, rng.uniform(-1, 1, (64, 3, 3, 1)),
                                                            rng.uniform(-1, 1, 64)))
    t = MPSCNNConvolutionTranspose(device=gpu(), weights=ArraySource(
        descriptor(3, 3, 8, 8, strideInPixelsX=2, strideInPixelsY=2), rng.uniform(-1, 1, (8, 3, 3, 8))))
    for kernel, cin, shape in ((k, 64, (2, 9, 10, 64)), (t, 8, (1, 17, 19, 8))):
        src = img(gpu(), rng.uniform(-1, 1, (shape[0], 9, 10, cin)), fmt)
        for backend in (None, "triton"):
            got = run(kernel, src, img(gpu(), np.zeros(shape), fmt), backend)
            want = run(kernel, src, img(gpu(), np.zeros(shape), fmt), "reference")
            assert_close(got, want, fmt.name, f"{type(kernel).__name__} {backend}")


@pytest.mark.parametrize("config", [str(c) for c in triton_backend.GROUPED_CONFIGS + triton_backend.MERGED_TILES])
def test_every_grouped_configuration_on_gpu(config, monkeypatch):
    """Each narrow-group candidate compiled, direct or merged implicit GEMM: groups of 4 and of 8
    channels, zero and clamp edges, a window offset and channel slices, stride 2
    (except for the rolling kernel)."""
    from mpsconv import MPSImageEdgeMode

    cfg = triton_backend.Config.parse(config)
    for name in ("GROUPED_CONFIGS", "MERGED_TILES", "GEMM_CONFIGS", "SPLIT_CONFIGS"):
        monkeypatch.setattr(triton_backend, name, [])
    monkeypatch.setattr(triton_backend, "GROUPED_CONFIGS" if cfg.direct else "MERGED_TILES", [cfg])
    rng = np.random.default_rng(8)
    cases = [((64, 64, 16), 1, MPSImageEdgeMode.zero), ((64, 64, 8), 1, MPSImageEdgeMode.clamp),
             ((64, 64, 16), 2, MPSImageEdgeMode.clamp)]
    for (cin, cout, groups), stride, edge in cases[:2] if cfg.direct and cfg.bk else cases:  # rolling: stride 1
        d = descriptor(3, 3, cin, cout, groups=groups, strideInPixelsX=stride, strideInPixelsY=stride)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.1)
        k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (cout, 3, 3, cin // groups)),
                                                                rng.uniform(-1, 1, cout)))
        k.edgeMode, k.offset, k.destinationFeatureChannelOffset = edge, (0, 1, 0), 4
        src = img(gpu(), rng.uniform(-1, 1, (3, 37, 29, cin)), FMT.bfloat16)
        prior = rng.uniform(-1, 1, (3, 37 // stride, 29 // stride, cout + 8))
        got = run(k, src, img(gpu(), prior, FMT.bfloat16), "triton")
        want = run(k, src, img(gpu(), prior, FMT.bfloat16), "reference")
        assert_close(got, want, "bfloat16", f"{config} {cin}/{groups} stride {stride} {edge.name}")


@pytest.mark.parametrize("config", [str(c) for c in triton_backend.GEMM_CONFIGS + triton_backend.SPLIT_CONFIGS])
def test_every_gemm_configuration_on_gpu(config, monkeypatch):
    """Each implicit-GEMM candidate compiled, split-K ones too: 3x3 layers with partial tiles of pixels,
    channels and reduction steps (200 input channels: 36 steps of 64, enough for 8 parts), a window
    offset and a channel slice; zero edges at stride 1 in float16, clamp edges at stride 2 in bfloat16."""
    from mpsconv import MPSImageEdgeMode

    cfg = triton_backend.Config.parse(config)
    monkeypatch.setattr(triton_backend, "GEMM_CONFIGS", [] if cfg.split > 1 else [cfg])
    monkeypatch.setattr(triton_backend, "SPLIT_CONFIGS", [cfg] if cfg.split > 1 else [])
    monkeypatch.setattr(triton_backend, "SPLIT_BELOW_TILES", 10 ** 9)  # offer split-K whatever the tile count
    rng = np.random.default_rng(10)
    for fmt, stride, edge in ((FMT.float16, 1, MPSImageEdgeMode.zero), (FMT.bfloat16, 2, MPSImageEdgeMode.clamp)):
        d = descriptor(3, 3, 200, 136, strideInPixelsX=stride, strideInPixelsY=stride)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.1)
        k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (136, 3, 3, 200)) / 9,
                                                                rng.uniform(-1, 1, 136)))
        k.edgeMode, k.offset, k.destinationFeatureChannelOffset = edge, (1, 0, 0), 8
        src = img(gpu(), rng.uniform(-1, 1, (2, 17, 13, 200)), fmt)
        prior = rng.uniform(-1, 1, (2, 17 // stride, 13 // stride, 152))
        with launched_kernels() as names:
            got = run(k, src, img(gpu(), prior, fmt), "triton")
        assert names[0] == "conv2d_nhwc g1", names
        want = run(k, src, img(gpu(), prior, fmt), "reference")
        assert_close(got, want, fmt.name, f"{config} stride {stride}")


@pytest.mark.parametrize("config", [str(c) for c in triton_backend.FLAT_TILES])
def test_every_flat_configuration_on_gpu(config, monkeypatch):
    """Each flattened-reduction candidate compiled: an RGB first layer (7x7, stride 2) and 5 channels
    (3x3, dilation 2, clamp edges), with a window offset and a channel slice."""
    from mpsconv import MPSImageEdgeMode

    monkeypatch.setattr(triton_backend, "FLAT_TILES", [triton_backend.Config.parse(config)])
    monkeypatch.setattr(triton_backend, "GEMM_CONFIGS", [])
    monkeypatch.setattr(triton_backend, "SPLIT_CONFIGS", [])
    rng = np.random.default_rng(9)
    for cin, kw, props, edge in [(3, 7, dict(strideInPixelsX=2, strideInPixelsY=2), MPSImageEdgeMode.zero),
                                 (5, 3, dict(dilationRateX=2, dilationRateY=2), MPSImageEdgeMode.clamp)]:
        d = descriptor(kw, kw, cin, 48, **props)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
        k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (48, kw, kw, cin)),
                                                                rng.uniform(-1, 1, 48)))
        k.edgeMode, k.offset, k.destinationFeatureChannelOffset = edge, (1, 0, 0), 8
        src = img(gpu(), rng.uniform(-1, 1, (2, 41, 45, cin)), FMT.float16)
        prior = rng.uniform(-1, 1, (2, 20, 22, 56))
        got = run(k, src, img(gpu(), prior, FMT.float16), "triton")
        want = run(k, src, img(gpu(), prior, FMT.float16), "reference")
        assert_close(got, want, "float16", f"{config} {cin} channels")


@pytest.mark.parametrize("config", [str(c) for c in triton_backend.PACKED_TILES])
def test_every_packed_configuration_on_gpu(config, monkeypatch):
    """Each packed implicit-GEMM candidate compiled, after the space-to-depth launch: an RGB first
    layer (7x7, stride 2, zero edges) in 16-bit, 5 channels (5x5, stride 1, clamp edges: tap rows of 40
    elements, not a multiple of the step) in bfloat16 and float32 with TF32 allowed, with a window
    offset and a channel slice, 96 output channels (so that the 128-wide tile is offered too); and a
    graph replay on new contents."""
    from mpsconv import MPSImageEdgeMode

    cfg = triton_backend.Config.parse(config)
    for name in ("FLAT_TILES", "GEMM_CONFIGS", "SPLIT_CONFIGS"):
        monkeypatch.setattr(triton_backend, name, [])
    monkeypatch.setattr(triton_backend, "PACKED_TILES", [cfg])
    rng = np.random.default_rng(12)
    for cin, kw, stride, edge, fmt in [(3, 7, 2, MPSImageEdgeMode.zero, FMT.float16),
                                       (5, 5, 1, MPSImageEdgeMode.clamp, FMT.bfloat16),
                                       (5, 5, 1, MPSImageEdgeMode.clamp, FMT.float32)]:
        d = descriptor(kw, kw, cin, 96, strideInPixelsX=stride, strideInPixelsY=stride)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
        k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (96, kw, kw, cin)),
                                                                rng.uniform(-1, 1, 96)))
        k.edgeMode, k.offset, k.destinationFeatureChannelOffset = edge, (1, 0, 0), 8
        k.options = MPSKernelOptions.allowReducedPrecision if fmt == FMT.float32 else 0
        size = 4 if fmt == FMT.float32 else 2
        if not triton_backend._fits(cfg, size, size, size):  # not offered: its pipeline would not fit
            continue
        src = img(gpu(), rng.uniform(-1, 1, (2, 41, 45, cin)), fmt)
        prior = rng.uniform(-1, 1, (2, 41 // stride, 45 // stride, 104))
        with launched_kernels() as names:
            got = run(k, src, img(gpu(), prior, fmt), "triton")
        assert names == ["pack_nhwc g1", "packed_conv_nhwc g1"], names
        want = run(k, src, img(gpu(), prior, fmt), "reference")
        close(got, want, fmt, f"{config} {cin} channels")
    # a replayed graph packs the new contents into the same scratch image
    check_replay(k, src, prior, fmt, rng, f"{config} replayed")


@pytest.mark.parametrize("config", [str(c) for c in triton_backend.TMA_CONFIGS])
def test_every_tma_configuration_on_gpu(config, monkeypatch):
    """Each persistent TMA GEMM candidate compiled, in 16- and 32-bit (TF32 allowed) where offered, into a channel
    slice, with output channels not a multiple of the tile; the same kernel on a source window that is
    not one matrix (narrower than the source) runs the implicit GEMM; a command buffer holding the
    TMA launch replays as a graph on new contents."""
    cfg = triton_backend.Config.parse(config)
    for name in ("GEMM_CONFIGS", "SPLIT_CONFIGS"):
        monkeypatch.setattr(triton_backend, name, [])
    monkeypatch.setattr(triton_backend, "TMA_CONFIGS", [cfg])
    rng = np.random.default_rng(10)
    prior = rng.uniform(-1, 1, (2, 23, 29, 224))
    cases = ((FMT.float16, 0), (FMT.bfloat16, 0), (FMT.float32, MPSKernelOptions.allowReducedPrecision))
    for fmt, options in cases:
        size = 4 if fmt == FMT.float32 else 2
        if not triton_backend._fits(cfg, size, size, size):  # not offered: its pipeline would not fit
            continue
        d = descriptor(1, 1, 96, 200)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.1)
        k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (200, 1, 1, 96)),
                                                                rng.uniform(-1, 1, 200)))
        k.options, k.sourceFeatureChannelOffset, k.destinationFeatureChannelOffset = options, 8, 16
        for width, offset, kernel_name in ((29, (0, 0, 0), "gemm_tma_nhwc g1"), (31, (1, 0, 0), "conv2d_nhwc g1")):
            src = img(gpu(), rng.uniform(-1, 1, (2, 23, width, 112)), fmt)
            k.offset = offset
            with launched_kernels() as names:
                got = run(k, src, img(gpu(), prior, fmt), "triton")
            want = run(k, src, img(gpu(), prior, fmt), "reference")
            close(got, want, fmt, f"{config} {fmt.name} source width {width}")
            assert names == [kernel_name], names
    k.offset = (0, 0, 0)
    check_replay(k, img(gpu(), rng.uniform(-1, 1, (2, 23, 29, 112)), fmt), prior, fmt, rng, f"{config} replayed")


@pytest.mark.parametrize("config", [str(triton_backend.SPLIT_CONFIGS[1]), str(triton_backend.PACKED_TILES[0])])
def test_scratch_is_drawn_for_each_run_and_given_back(config, monkeypatch):
    """Split-K partial sums and packed images come from the caching allocator for each run, not kept
    per bound encode: a repeated encode (the direct launch path, scratch addresses filled in per run)
    stays right when its scratch lands elsewhere, and leaves no memory behind after a run."""
    cfg = triton_backend.Config.parse(config)
    for name in ("FLAT_TILES", "GEMM_CONFIGS", "SPLIT_CONFIGS", "PACKED_TILES"):
        monkeypatch.setattr(triton_backend, name, [])
    monkeypatch.setattr(triton_backend, "SPLIT_CONFIGS" if cfg.split > 1 else "PACKED_TILES", [cfg])
    monkeypatch.setattr(triton_backend, "SPLIT_BELOW_TILES", 10 ** 9)
    rng = np.random.default_rng(16)
    cin, kw = (200, 3) if cfg.split > 1 else (3, 7)
    d = descriptor(kw, kw, cin, 96)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (96, kw, kw, cin)) / kw,
                                                            rng.uniform(-1, 1, 96)))
    src, dst = img(gpu(), np.zeros((2, 29, 31, cin)), FMT.float16), img(gpu(), np.zeros((2, 29, 31, 96)), FMT.float16)
    with use_backend("triton"):
        scratch = triton_backend.BACKEND.scratch_bytes(k._encoder.plan(k, src, dst, "test").problem)
    assert scratch > 0
    for i in range(4):
        values = rng.uniform(-1, 1, (2, 29, 31, cin))
        src.torch().copy_(torch.from_numpy(values).cuda().half())
        blocker = torch.empty(scratch, dtype=torch.int8, device="cuda") if i % 2 else None  # memory taken meanwhile
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with launched_kernels() as names:
            got = run(k, src, dst, "triton")
        torch.cuda.synchronize()
        if i:  # the first run also prepares the weights, which stay
            assert names == [] and torch.cuda.memory_allocated() == held, i  # the direct launch path, nothing kept
            assert torch.cuda.max_memory_allocated() >= held + scratch, i  # it was drawn for the run
        del blocker
        want = run(k, img(gpu(), values, FMT.float16), img(gpu(), np.zeros((2, 29, 31, 96)), FMT.float16), "reference")
        assert_close(got, want, "float16", f"{config} run {i}")


def check_replay(k, src, prior, fmt, rng, context):
    """``k`` encoded from ``src`` into a destination holding ``prior``, captured as a CUDA graph, then
    replayed after ``src``'s contents change: the destination holds the result for the new contents."""
    dst = img(gpu(), prior, fmt)
    cb = gpu().makeCommandQueue().makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    new = rng.uniform(-1, 1, tuple(src.torch().shape))
    src.torch().copy_(torch.from_numpy(new).cuda())
    cb.replay().waitUntilCompleted()
    want = run(k, img(gpu(), new, fmt), img(gpu(), prior, fmt), "reference")
    close(dst.numpy().astype(np.float64), want, fmt, context)


def close(got, want, fmt, context):
    """Within the format's tolerance; float32 kernels here allow TF32, which the table has no row for: a
    relative error. TF32 keeps 10 mantissa bits of each operand, truncated on tensor cores (up to 2^-10
    each, always toward zero), so a product can be 2^-9 small and the errors of a sum add up more than
    they cancel: 3e-4 to 2e-3 on these layers; 2^-8 still fails any wrong index or tap."""
    if fmt == FMT.float32:
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2.0 ** -8, context
    else:
        assert_close(got, want, fmt.name, context)


@pytest.mark.parametrize("config", [str(c) for c in triton_backend.DEPTHWISE_CONFIGS]
                         + ["d32x512x1w4s3", "d16x256x2w2s4"])
def test_every_depthwise_configuration_on_gpu(config, monkeypatch):
    """Each depthwise candidate compiled (the interpreter runs only the small ones), and two rolling ones
    with pipelined row loops (rows staged through shared memory, which the interpreter does not do): 40
    channels (not a multiple of the tiles), zero and clamp edges, a window offset, stride 2 for the
    tiled kernel."""
    from mpsconv import MPSImageEdgeMode

    cfg = triton_backend.Config.parse(config)
    monkeypatch.setattr(triton_backend, "DEPTHWISE_CONFIGS", [cfg])
    rng = np.random.default_rng(7)
    for stride in (1, 2) if cfg.bk == 0 else (1,):
        for edge in (MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp):
            d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=40,
                                                     outputFeatureChannels=40)
            d.strideInPixelsX = d.strideInPixelsY = stride
            d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.1)
            k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (40, 3, 3, 1)),
                                                                    rng.uniform(-1, 1, 40)))
            k.edgeMode, k.offset, k.destinationFeatureChannelOffset = edge, (0, 1, 0), 4
            src = img(gpu(), rng.uniform(-1, 1, (3, 37, 29, 40)), FMT.float16)
            prior = rng.uniform(-1, 1, (3, 37 // stride, 29 // stride, 48))
            got = run(k, src, img(gpu(), prior, FMT.float16), "triton")
            want = run(k, src, img(gpu(), prior, FMT.float16), "reference")
            assert_close(got, want, "float16", f"{config} stride {stride} {edge.name}")


def test_reduced_precision_allows_tf32_and_stays_close():
    rng = np.random.default_rng(4)
    d = descriptor(3, 3, 64, 64)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (64, 3, 3, 64))))
    k.options = MPSKernelOptions.allowReducedPrecision
    src = img(gpu(), rng.uniform(-1, 1, (1, 12, 12, 64)), FMT.float32)
    for backend in ("triton", "torch"):
        got = run(k, src, img(gpu(), np.zeros((1, 12, 12, 64)), FMT.float32), backend)
        want = run(k, src, img(gpu(), np.zeros((1, 12, 12, 64)), FMT.float32), "reference")
        close(got, want, FMT.float32, backend)  # TF32: ~3e-4 expected


def test_autotune_writes_its_cache_and_survives_a_corrupt_file(cache_dir):
    from mpsconv.backends import tuning

    rng = np.random.default_rng(5)
    src = img(gpu(), rng.uniform(-1, 1, (1, 16, 16, 32)), FMT.float16)

    def fresh_kernel():
        return MPSCNNConvolution(device=gpu(), weights=ArraySource(descriptor(3, 3, 32, 32),
                                                                   rng.uniform(-1, 1, (32, 3, 3, 32))))
    tuning._memory.clear()
    run(fresh_kernel(), src, img(gpu(), np.zeros((1, 16, 16, 32)), FMT.float16))
    path = cache_dir / tuning.FILE_NAME
    choices = tuning.load(path)
    assert len(choices) == 1 and next(iter(choices.values())).split(":")[0] in ("triton", "torch")
    path.write_text("{ not json")
    tuning._memory.clear()
    run(fresh_kernel(), src, img(gpu(), np.zeros((1, 16, 16, 32)), FMT.float16))
    rewritten = tuning.load(path)  # ignored, measured again, rewritten (the winner may differ: a new timing)
    assert rewritten.keys() == choices.keys()
    assert next(iter(rewritten.values())).split(":")[0] in ("triton", "torch")


def test_commit_runs_on_the_queue_stream_and_handlers_run_off_thread_in_order():
    rng = np.random.default_rng(6)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(descriptor(3, 3, 16, 16), rng.uniform(-1, 1, 2304)))
    src = img(gpu(), rng.uniform(-1, 1, (4, 64, 64, 16)), FMT.float16)
    queue = gpu().makeCommandQueue()
    seen, threads = [], set()
    buffers = []
    for i in range(5):
        cb = queue.makeCommandBuffer()
        k.encode(commandBuffer=cb, sourceImage=src,
                 destinationImage=img(gpu(), np.zeros((4, 64, 64, 16)), FMT.float16))
        cb.addCompletedHandler(lambda c, i=i: (seen.append((i, c.status)), threads.add(threading.get_ident())))
        cb.commit()
        buffers.append(cb)
    buffers[-1].waitUntilCompleted()
    for cb in buffers:
        cb.waitUntilCompleted()
    assert [i for i, _ in seen] == list(range(5))
    assert all(status == MTLCommandBufferStatus.completed for _, status in seen)
    assert threading.get_ident() not in threads
    assert queue.stream is not None and queue.stream != torch.cuda.current_stream()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the caller's stream, restored


def test_an_error_during_the_work_lands_in_status_and_error(monkeypatch):
    from mpsconv.backends import triton as triton_backend

    rng = np.random.default_rng(7)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(descriptor(1, 1, 4, 4), rng.uniform(-1, 1, 16)))
    src = img(gpu(), rng.uniform(-1, 1, (3, 3, 4)), FMT.float16)
    cb = gpu().makeCommandQueue().makeCommandBuffer()

    def failing(bound, prepared):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(triton_backend.BACKEND, "run", failing)
    with use_backend("triton"):
        k.encode(commandBuffer=cb, sourceImage=src, destinationImage=img(gpu(), np.zeros((3, 3, 4)), FMT.float16))
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        cb.commit()
        assert torch.cuda.current_stream() == caller  # restored after the failed work too
    with pytest.raises(Exception, match="illegal memory access"):
        cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.error and "illegal memory access" in cb.error.localizedDescription


def test_replayed_graph_reads_the_images_current_contents():
    rng = np.random.default_rng(8)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(descriptor(3, 3, 16, 16), rng.uniform(-1, 1, 2304),
                                                            rng.uniform(-1, 1, 16)))
    a = img(gpu(), rng.uniform(-1, 1, (1, 20, 20, 16)), FMT.float16)
    b = img(gpu(), np.zeros((1, 20, 20, 16)), FMT.float16)
    c = img(gpu(), np.zeros((1, 20, 20, 16)), FMT.float16)
    queue = gpu().makeCommandQueue()
    cb = queue.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=a, destinationImage=b)
    k.encode(commandBuffer=cb, sourceImage=b, destinationImage=c)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    assert cb._graph is not None
    first = c.numpy().copy()
    new = rng.uniform(-1, 1, (1, 20, 20, 16)).astype(np.float16)
    a.torch().copy_(torch.from_numpy(new).cuda())
    cb.replay().waitUntilCompleted()
    expect_b = run(k, img(gpu(), new, FMT.float16), img(gpu(), np.zeros((1, 20, 20, 16)), FMT.float16), "reference")
    expect_c = run(k, img(gpu(), expect_b, FMT.float16), img(gpu(), np.zeros((1, 20, 20, 16)), FMT.float16),
                   "reference")
    got = c.numpy().astype(np.float64)  # two float16 layers: a one-ulp difference in b may carry into c
    assert np.linalg.norm(got - expect_c) / np.linalg.norm(expect_c) < 2e-3
    assert not np.allclose(first, c.numpy())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_repeated_encodes_take_the_direct_launch_path_and_stay_right(backend):
    """The second run of a bound encode skips Triton's dispatcher (triton.Launcher): same results."""
    rng = np.random.default_rng(9)
    d = descriptor(3, 3, 16, 32)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.sigmoid)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (32, 3, 3, 16)),
                                                            rng.uniform(-1, 1, 32)))
    k.destinationFeatureChannelOffset = 4
    dst = img(gpu(), np.zeros((2, 10, 12, 40)), FMT.float16)
    src = img(gpu(), np.zeros((2, 10, 12, 16)), FMT.float16)
    for i in range(3):
        values = rng.uniform(-1, 1, (2, 10, 12, 16))
        src.torch().copy_(torch.from_numpy(values).cuda().half())
        want = run(k, img(gpu(), values, FMT.float16), img(gpu(), np.zeros((2, 10, 12, 40)), FMT.float16),
                   "reference")
        assert_close(run(k, src, dst, backend), want, "float16", f"run {i}")


def test_small_torch_runs_replay_a_graph_that_follows_contents_and_weights():
    """The torch backend captures a small bound run as a CUDA graph on its second run and replays it
    after: new source contents and reloaded weights give the new results. Each stream (command
    queue) replays a graph of its own, whose memory it shares with its other graphs."""
    from mpsconv.backends import torch as torch_backend

    rng = np.random.default_rng(10)
    d = descriptor(3, 3, 16, 32)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    source = ArraySource(d, rng.uniform(-1, 1, (32, 3, 3, 16)), rng.uniform(-1, 1, 32))
    k = MPSCNNConvolution(device=gpu(), weights=source)
    k.destinationFeatureChannelOffset = 4
    dst = img(gpu(), np.zeros((2, 10, 12, 40)), FMT.float16)
    src = img(gpu(), np.zeros((2, 10, 12, 16)), FMT.float16)
    queues = [gpu().makeCommandQueue(), gpu().makeCommandQueue()]
    # runs 0-4 and 6 on one queue, 5 on another: its stream gets a graph (and a memory pool) of its own
    graphs = [0, 1, 1, 0, 1, 2, 2]
    for i, queue in enumerate([queues[0]] * 5 + [queues[1], queues[0]]):
        if i == 3:  # new weights drop the cached encodes: this run goes without a graph, the next captures
            source.w = rng.uniform(-1, 1, (32, 3, 3, 16))
            k.reloadWeightsAndBiasesFromDataSource()
        values = rng.uniform(-1, 1, (2, 10, 12, 16))
        src.torch().copy_(torch.from_numpy(values).cuda().half())
        want = run(k, img(gpu(), values, FMT.float16), img(gpu(), np.zeros((2, 10, 12, 40)), FMT.float16),
                   "reference")
        cb = queue.makeCommandBuffer()
        with use_backend("torch"):
            k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()
        assert_close(dst.numpy().astype(np.float64), want, "float16", f"run {i}")
        bound = next(b for _, b, *_ in k._encoder.bound.values()
                     if isinstance(b, torch_backend.Bound) and b.x.data_ptr() == src.torch().data_ptr())
        assert bound.plan.graphed and sum(map(bool, bound.graphs.values())) == graphs[i], i


@pytest.mark.parametrize("follows", [True, False])
def test_chained_layers_wait_for_the_kernel_before_them(follows, monkeypatch):
    """With programmatic dependent launch (``launch.dependent_launch``) a kernel may be scheduled
    before the one ahead of it has finished: a chain in which each layer reads what the one before
    wrote and overwrites what it read (a -> b -> a -> b -> c, each layer split-K parts and their
    epilogue) gives the reference's values, plain and replayed with new source contents."""
    from mpsconv.backends import launch

    monkeypatch.setattr(launch, "DEPENDENT_LAUNCH", follows)
    assert launch.dependent_launch(torch.device("cuda")) == (follows and torch.cuda.get_device_capability()[0] >= 9)
    monkeypatch.setattr(triton_backend, "GEMM_CONFIGS", [])
    monkeypatch.setattr(triton_backend, "SPLIT_CONFIGS", [triton_backend.Config(64, 64, 64, 4, 4, 2)])
    monkeypatch.setattr(triton_backend, "SPLIT_BELOW_TILES", 10 ** 9)
    rng = np.random.default_rng(11)
    kernels = []
    for neuron in (MPSCNNNeuronType.reLU, MPSCNNNeuronType.tanH):
        d = descriptor(3, 3, 64, 64)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(neuron, a=0.1)
        kernels.append(MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (64, 3, 3, 64)) / 12,
                                                                           rng.uniform(-1, 1, 64))))
    shape = (2, 12, 12, 64)
    a, b, c = (img(gpu(), np.zeros(shape), FMT.float16) for _ in range(3))
    chain = [(0, a, b), (1, b, a), (0, a, b), (1, b, c)]
    queue = gpu().makeCommandQueue()
    cb = queue.makeCommandBuffer()
    values = rng.uniform(-1, 1, shape)
    a.torch().copy_(torch.from_numpy(values).cuda().half())
    with use_backend("triton"), launched_kernels() as names:
        for i, src, dst in chain:
            kernels[i].encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.make_replayable()
        cb.commit()
        cb.waitUntilCompleted()
    assert names == ["conv2d_nhwc g1"] * 4, names
    for replay in range(2):
        want = img(gpu(), values, FMT.float16)
        for i, _, _ in chain:
            want = img(gpu(), run(kernels[i], want, img(gpu(), np.zeros(shape), FMT.float16), "reference"), FMT.float16)
        expect = want.numpy().astype(np.float64)
        got = c.numpy().astype(np.float64)  # four float16 layers: one-ulp differences carry
        assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 3e-3, replay
        values = rng.uniform(-1, 1, shape)
        a.torch().copy_(torch.from_numpy(values).cuda().half())
        cb.replay().waitUntilCompleted()


@pytest.mark.parametrize("formats", [(FMT.float16, FMT.float32), (FMT.bfloat16, FMT.float16),
                                     (FMT.float32, FMT.bfloat16)])
@pytest.mark.parametrize("backend", [None, "triton", "torch"])
def test_mixed_source_and_destination_formats(formats, backend):
    """A destination wider than the source must not see the source type's rounding of the sum (the
    torch path then runs cuDNN in float32 before its epilogue)."""
    src_fmt, dst_fmt = formats
    rng = np.random.default_rng(10)
    d = descriptor(3, 3, 16, 16)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.sigmoid)
    k = MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (16, 3, 3, 16)),
                                                            rng.uniform(-1, 1, 16)))
    src = img(gpu(), rng.uniform(-2, 2, (2, 9, 8, 16)), src_fmt)
    got = run(k, src, img(gpu(), np.zeros((2, 9, 8, 16)), dst_fmt), backend)
    want = run(k, src, img(gpu(), np.zeros((2, 9, 8, 16)), dst_fmt), "reference")
    assert_close(got, want, dst_fmt.name, f"{src_fmt.name} -> {dst_fmt.name} {backend}")


# -- issue 7 on the GPU: memory and threads


def test_out_of_memory_while_running_fails_the_buffer_and_later_buffers_work(monkeypatch):
    """A CUDA allocator failure during the work: status error, code outOfMemory, an MPSMemoryError
    underneath, raised by waitUntilCompleted; the next command buffer runs normally."""
    from mpsconv import MPSCommandBufferError, MPSMemoryError
    from mpsconv.backends import torch as torch_backend
    from mpsconv.metal import MTLCommandBufferError

    device = gpu()
    rng = np.random.default_rng(7)
    k = MPSCNNConvolution(device=device, weights=ArraySource(descriptor(3, 3, 8, 8), rng.uniform(-1, 1, 576)))
    src = img(device, rng.uniform(-1, 1, (9, 9, 8)), FMT.float32)
    dst = img(device, np.zeros((9, 9, 8)), FMT.float32)
    real = torch_backend.run

    def starved(bound, prepared):  # what the allocator raises when a 40 GB scratch tensor does not fit
        torch.empty(1 << 45, dtype=torch.uint8, device=device.torch_device)
        real(bound, prepared)

    queue = device.makeCommandQueue()
    monkeypatch.setattr(torch_backend.BACKEND, "run", staticmethod(starved))
    with use_backend("torch"):
        cb = queue.makeCommandBuffer()
        k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.commit()
    with pytest.raises(MPSCommandBufferError, match="ran out of memory"):
        cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.error and cb.error.code == MTLCommandBufferError.outOfMemory
    assert isinstance(cb.error.underlyingError, MPSMemoryError)
    monkeypatch.setattr(torch_backend.BACKEND, "run", staticmethod(real))
    expected = run(k, src, img(device, np.zeros((9, 9, 8)), FMT.float32), "reference")
    with use_backend("torch"):
        later = queue.makeCommandBuffer()
        k.encode(commandBuffer=later, sourceImage=src, destinationImage=dst)
    later.commit()
    later.waitUntilCompleted()
    assert later.status == MTLCommandBufferStatus.completed
    assert_close(dst.numpy(), expected, "float32")


def test_an_encode_larger_than_the_free_gpu_memory_is_refused_at_encode():
    from mpsconv import MPSImageDescriptor, MPSMemoryError

    device = gpu()
    free, _ = torch.cuda.mem_get_info()
    side = int((2 * free / 16) ** 0.5)  # a float32 destination of 4 channels, twice the free memory
    k = MPSCNNConvolution(device=device, weights=ArraySource(descriptor(1, 1, 4, 4), np.eye(4).reshape(-1)))
    src = img(device, np.ones((1, 1, 4)), FMT.float32)
    dst = MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=side, height=side, featureChannels=4, numberOfImages=1))
    cb = device.makeCommandQueue().makeCommandBuffer()
    with pytest.raises(MPSMemoryError, match="available on the GPU"):
        k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    assert dst._storage is None and cb._work == []


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_threads_with_their_own_queues_on_the_gpu(backend):
    """4 threads x 100 command buffers on a queue (stream) each, one shared kernel, with handlers:
    every result equals the single-thread one."""
    device = gpu()
    rng = np.random.default_rng(8)
    k = MPSCNNConvolution(device=device, weights=ArraySource(descriptor(3, 3, 16, 16), rng.uniform(-1, 1, 2304)))
    sources = [img(device, rng.uniform(-1, 1, (12, 12, 16)), FMT.float16) for _ in range(4)]
    expected = [run(k, s, img(device, np.zeros((12, 12, 16)), FMT.float16), backend) for s in sources]
    errors, handled = [], [0] * 4

    def worker(t):
        try:
            queue = device.makeCommandQueue()
            for i in range(100):
                dst = img(device, np.zeros((12, 12, 16)), FMT.float16)
                with use_backend(backend):
                    cb = queue.makeCommandBuffer()
                    k.encode(commandBuffer=cb, sourceImage=sources[(t + i) % 4], destinationImage=dst)
                cb.addCompletedHandler(lambda _, t=t: handled.__setitem__(t, handled[t] + 1))
                cb.commit()
                cb.waitUntilCompleted()
                assert_close(dst.numpy(), expected[(t + i) % 4], "float16", f"thread {t}, buffer {i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert handled == [100] * 4


def test_temporary_images_in_a_block_that_grows_and_in_a_packed_one():
    """MPSTemporaryImages between layers on the GPU: the first command buffer's block grows under the
    images (and the kernels bound to them) already encoded, the queue's next one places them as packed
    (``image.TemporaryHeap``), and a replay of that one reads new source contents; each gives the
    reference's values, layer by layer through MPSImages."""
    from mpsconv import MPSImageDescriptor, MPSTemporaryImage

    rng = np.random.default_rng(14)
    channels = [8, 16, 32, 24, 8, 4]
    kernels = []
    for a, b in zip(channels, channels[1:]):
        d = descriptor(3, 3, a, b)
        d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
        kernels.append(MPSCNNConvolution(device=gpu(), weights=ArraySource(d, rng.uniform(-1, 1, (b, 3, 3, a)) / 6,
                                                                           rng.uniform(-1, 1, b))))
    shape = (2, 10, 12)
    src = img(gpu(), rng.uniform(-1, 1, (*shape, channels[0])), FMT.float16)
    out = img(gpu(), np.zeros((*shape, channels[-1])), FMT.float16)
    queue = gpu().makeCommandQueue()

    def encode(replayable=False):
        cb, x, blocks = queue.makeCommandBuffer(), src, set()
        for kernel, c in zip(kernels[:-1], channels[1:-1]):
            y = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
                channelFormat=FMT.float16, width=shape[2], height=shape[1], featureChannels=c, numberOfImages=shape[0]))
            kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
            blocks.add(y._storage.untyped_storage().data_ptr())
            x = y
        kernels[-1].encode(commandBuffer=cb, sourceImage=x, destinationImage=out)
        if replayable:
            cb.make_replayable()
        cb.commit()
        cb.waitUntilCompleted()
        assert len(blocks) >= 1 and cb.status == MTLCommandBufferStatus.completed
        return cb

    def reference():
        x = src
        for kernel, c in zip(kernels, channels[1:]):
            x = img(gpu(), run(kernel, x, img(gpu(), np.zeros((*shape, c)), FMT.float16), "reference"), FMT.float16)
        return x.numpy().astype(np.float64)

    for replayable in (False, False, True):
        cb = encode(replayable)
        want = reference()
        got = out.numpy().astype(np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-3, replayable
    src.torch().copy_(torch.from_numpy(rng.uniform(-1, 1, (*shape, channels[0]))).cuda().half())
    cb.replay().waitUntilCompleted()
    want = reference()
    assert np.linalg.norm(out.numpy().astype(np.float64) - want) / np.linalg.norm(want) < 3e-3
