"""kernel-image.md checklist: kernel objects (1–20) and geometry (21–38), mostly through neurons."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, blank, conv, image, run, values
from mpsconv import *

BACKENDS = ["reference", "torch"]


def identity():
    return MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.none))


@pytest.fixture(params=["neuron", "convolution"])
def kernel(request):
    return identity() if request.param == "neuron" else conv()


def test_ki_checklist_01_to_04_defaults(kernel):
    assert kernel.offset == MPSOffset(0, 0, 0)
    assert kernel.clipRect == MPSRectNoClip
    assert MPSRectNoClip.origin == (0, 0, 0) and set(MPSRectNoClip.size) == {2**64 - 1}
    assert (kernel.destinationFeatureChannelOffset, kernel.sourceFeatureChannelOffset) == (0, 0)
    assert kernel.sourceFeatureChannelMaxCount == 2**64 - 1
    assert kernel.edgeMode == MPSImageEdgeMode.zero == 0 and kernel.options == MPSKernelOptions.none == 0
    assert kernel.label is None


def test_ki_checklist_05_default_padding(kernel):
    assert kernel.padding.paddingMethod() == 0x10


def test_ki_checklist_06_default_allocator_makes_temporary_images(kernel):
    cb = QUEUE.makeCommandBuffer()
    out = kernel.encode(commandBuffer=cb, sourceImage=blank(3, 3, 1))
    assert isinstance(out, MPSTemporaryImage) and out.readCount == 1
    cb.commit()


def test_ki_checklist_07_neuron_window():
    n = identity()
    assert (n.kernelWidth, n.kernelHeight, n.strideInPixelsX, n.strideInPixelsY, n.dilationRateX,
            n.dilationRateY) == (1, 1, 1, 1, 1, 1)
    assert n.isBackwards is False and n.isStateModified is False


def test_ki_checklist_08_batch_state_reuse(kernel):
    """kernel-image.md #8 says False for convolutions too; Apple's MPSCNNKernel documentation says a
    kernel whose resultStateBatch holds one object for the whole batch returns YES, and
    convolution.md §8.4 (one state per batch) makes the convolution such a kernel: we follow Apple."""
    assert kernel.appendBatchBarrier() is False
    if isinstance(kernel, MPSCNNConvolution):
        assert kernel.isResultStateReusedAcrossBatch() is True
        states = kernel.resultStateBatch(sourceImage=[blank(3, 3, 1)] * 3)
        assert len(states) == 3 and states[0] is states[1] is states[2]
    else:
        assert kernel.isResultStateReusedAcrossBatch() is False


def test_ki_checklist_09_destination_channel_offset():
    n = identity()
    n.destinationFeatureChannelOffset = 6
    with pytest.raises(MPSValueError, match="destinationFeatureChannelOffset=6 must be a multiple of 4"):
        run(n, blank(2, 2, 4), blank(2, 2, 16))
    n.destinationFeatureChannelOffset = 8
    run(n, blank(2, 2, 4), blank(2, 2, 16))


def test_ki_checklist_10_source_channel_offset():
    n = identity()
    n.sourceFeatureChannelOffset = 2
    with pytest.raises(MPSValueError, match="sourceFeatureChannelOffset=2 must be a multiple of 4"):
        run(n, blank(2, 2, 8), blank(2, 2, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_11_max_count_is_capped(backend):
    n = identity()
    n.sourceFeatureChannelOffset, n.sourceFeatureChannelMaxCount = 8, 100
    src = np.broadcast_to(np.arange(24.0), (2, 2, 24))
    out = values(run(n, image(src), blank(2, 2, 20, fill=-1), backend))
    assert (out[..., :16] == np.arange(8, 24)).all() and (out[..., 16:] == -1).all()


def test_ki_checklist_12_13_raw_values():
    assert [int(MPSKernelOptions[n]) for n in ("none", "skipAPIValidation", "allowReducedPrecision",
                                               "disableInternalTiling", "insertDebugGroups", "verbose")] == \
        [0, 1, 2, 4, 8, 16]
    assert [int(m) for m in MPSImageEdgeMode] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("mode", [MPSImageEdgeMode.mirror, MPSImageEdgeMode.mirrorWithEdge, MPSImageEdgeMode.constant])
def test_ki_checklist_14_edge_modes_raise(kernel, mode):
    kernel.edgeMode = mode
    dst = blank(3, 3, 1, fill=5)
    with pytest.raises(MPSValueError, match="is not defined for this kernel"):
        run(kernel, blank(3, 3, 1), dst)
    assert (values(dst) == 5).all()


def test_ki_checklist_15_17_copy(kernel):
    kernel.offset, kernel.clipRect = MPSOffset(1, 2, 0), MTLRegionMake2D(1, 1, 2, 2)
    kernel.edgeMode, kernel.options = MPSImageEdgeMode.clamp, MPSKernelOptions.allowReducedPrecision
    kernel.destinationFeatureChannelOffset, kernel.sourceFeatureChannelOffset = 4, 8
    other = kernel.copy()
    assert other is not kernel and other.device is kernel.device
    for name in ("offset", "clipRect", "edgeMode", "options", "destinationFeatureChannelOffset",
                 "sourceFeatureChannelOffset", "label", "padding", "destinationImageAllocator"):
        assert getattr(other, name) == getattr(kernel, name), name
    other.offset = MPSOffset(9, 9, 0)
    assert kernel.offset == MPSOffset(1, 2, 0)


def test_ki_checklist_16_copy_to_device(kernel):
    other = MTLCopyAllDevices()[-1]
    assert kernel.copy(None, device=other).device is other


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_18_archive_round_trip(backend):
    n = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        MPSCNNNeuronType.softPlus, a=2.0, b=0.5))
    n.offset, n.edgeMode, n.label = MPSOffset(1, 0, 0), MPSImageEdgeMode.clamp, "act"
    archiver = NSKeyedArchiver(requiringSecureCoding=True)
    n.encode(archiver)
    back = MPSCNNNeuron(coder=NSKeyedUnarchiver(forReadingFrom=archiver.encodedData), device=DEVICE)
    for name in ("offset", "edgeMode", "label", "neuronType", "a", "b", "c", "clipRect", "padding"):
        assert getattr(back, name) == getattr(n, name), name
    src = image(np.random.default_rng(18).uniform(-2, 2, (4, 4, 3)))
    np.testing.assert_array_equal(values(run(back, src, blank(4, 4, 3), backend)),
                                  values(run(n, src, blank(4, 4, 3), backend)))


def test_ki_checklist_19_decoding_device():
    data = NSKeyedArchiver.archivedData(withRootObject=identity())
    cpu = MTLCopyAllDevices()[-1]
    assert MPSCNNNeuron(coder=NSKeyedUnarchiver(forReadingFrom=data, device=cpu)).device is cpu
    assert MPSCNNNeuron(coder=NSKeyedUnarchiver(forReadingFrom=data)).device is MTLCreateSystemDefaultDevice()


def test_ki_checklist_20_device_none_raises():
    with pytest.raises(TypeError, match="device=None must be an MTLDevice"):
        MPSCNNNeuron(device=None, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.none))


# -- geometry (21–38)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_21_22_box_sum(backend):
    out = values(run(conv(), image(np.ones((5, 5, 1))), blank(5, 5, 1), backend))[0, :, :, 0]
    assert out[0, 0] == 4 and out[0, 2] == 6 and out[2, 2] == 9
    k = conv()
    k.offset = MPSOffset(1, 1, 0)
    assert (values(run(k, image(np.ones((5, 5, 1))), blank(3, 3, 1), backend)) == 9).all()


def shifted(offset, edge, backend):
    src = np.add.outer(10.0 * np.arange(4), np.arange(5))[..., None]  # 5 wide, 4 tall
    n = identity()
    n.offset, n.edgeMode = offset, edge
    return src[..., 0], values(run(n, image(src), blank(5, 4, 1), backend))[0, :, :, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_23_shifted_copy(backend):
    src, out = shifted(MPSOffset(1, 2, 0), MPSImageEdgeMode.zero, backend)
    np.testing.assert_array_equal(out[:2, :4], src[2:, 1:])
    assert (out[2:] == 0).all() and (out[:, 4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_24_shifted_copy_clamps(backend):
    src, out = shifted(MPSOffset(1, 2, 0), MPSImageEdgeMode.clamp, backend)
    np.testing.assert_array_equal(out[:, 4], src[np.minimum(np.arange(4) + 2, 3), 4])
    np.testing.assert_array_equal(out[3], src[3, np.minimum(np.arange(5) + 1, 4)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_25_negative_offset(backend):
    src, out = shifted(MPSOffset(-1, 0, 0), MPSImageEdgeMode.zero, backend)
    assert (out[:, 0] == 0).all()
    np.testing.assert_array_equal(out[:, 1:], src[:, :-1])


def taps(kw, dilation, backend):
    """Source columns read by destination column 0 with its window centred at 4."""
    k = conv(kw, 1, dilationRateX=dilation)
    k.offset = MPSOffset(4, 0, 0)
    read = []
    for x in range(9):
        src = np.zeros((1, 9, 1))
        src[0, x] = 1
        if values(run(k, image(src), blank(1, 1, 1), backend))[0, 0, 0, 0]:
            read.append(x - 4)
    return read


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_26_to_28_window_taps(backend):
    assert taps(2, 1, backend) == [-1, 0]
    assert taps(3, 2, backend) == [-2, 0, 2]
    assert taps(2, 3, backend) == [-2, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_29_stride_centres(backend):
    k = conv(1, 1, strideInPixelsX=2)
    src = np.arange(9.0).reshape(1, 9, 1)
    assert values(run(k, image(src), blank(5, 1, 1), backend))[0, 0, :, 0].tolist() == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_30_31_clip_rect_we11(backend):
    rng = np.random.default_rng(30)
    src = rng.uniform(-1, 1, (8, 8, 1))
    w = rng.uniform(-1, 1, 9)
    k = conv(weights=w)
    k.clipRect = MTLRegion(MTLOrigin(4, 0, 0), MTLSize(4, 8, 1))
    k.offset = MPSOffset(4, 0, 0)
    out = values(run(k, image(src), blank(8, 8, 1, fill=7), backend))[0, :, :, 0]
    assert (out[:, :4] == 7).all()
    full = values(run(conv(weights=w), image(src), blank(8, 8, 1), backend))[0, :, :, 0]
    np.testing.assert_allclose(out[:, 4:], full[:, 4:], rtol=1e-6)


def test_ki_checklist_32_clip_outside_writes_nothing():
    k = conv()
    k.clipRect = MTLRegionMake2D(10, 10, 3, 3)
    out = values(run(k, image(np.ones((5, 5, 1))), blank(5, 5, 1, fill=7)))
    assert (out == 7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_33_image_mapping_we13(backend):
    rng = np.random.default_rng(33)
    src = rng.uniform(-1, 1, (5, 3, 3, 8))
    k = conv(1, 1, 8, 16, weights=rng.uniform(-1, 1, 128))
    k.offset = MPSOffset(0, 0, 2)
    k.clipRect = MTLRegion(MTLOrigin(0, 0, 1), MTLSize(2**64 - 1, 2**64 - 1, 2))
    out = values(run(k, image(src), blank(3, 3, 16, images=4, fill=-5), backend))
    assert (out[0] == -5).all() and (out[3] == -5).all()
    single = conv(1, 1, 8, 16, weights=k._loaded.weights)
    for d, s in ((1, 2), (2, 3)):
        np.testing.assert_allclose(out[d], values(run(single, image(src[s]), blank(3, 3, 16), backend))[0], rtol=1e-6)


def test_ki_checklist_34_image_range_errors():
    k = conv(1, 1, 8, 16)
    k.offset = MPSOffset(0, 0, 4)
    k.clipRect = MTLRegion(MTLOrigin(0, 0, 1), MTLSize(2**64 - 1, 2**64 - 1, 2))
    with pytest.raises(MPSValueError, match=r"offset.z=4 \+ 2 images to process exceeds the source's numberOfImages=5"):
        run(k, blank(3, 3, 8, images=5), blank(3, 3, 16, images=4))
    k.offset = MPSOffset(0, 0, -1)
    with pytest.raises(MPSValueError, match="offset.z=-1 must be >= 0"):
        run(k, blank(3, 3, 8, images=5), blank(3, 3, 16, images=4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ki_checklist_35_channel_slice_we14(backend):
    n = identity()
    n.sourceFeatureChannelOffset, n.sourceFeatureChannelMaxCount, n.destinationFeatureChannelOffset = 8, 8, 32
    src = np.broadcast_to(np.arange(24.0), (2, 2, 24))
    out = values(run(n, image(src), blank(2, 2, 64, fill=-1), backend))
    assert (out[..., 32:40] == np.arange(8, 16)).all()
    assert (out[..., :32] == -1).all() and (out[..., 40:] == -1).all()
    for dfo in (30, 60):
        n.destinationFeatureChannelOffset = dfo
        with pytest.raises(MPSValueError):
            run(n, image(src), blank(2, 2, 64))


def test_ki_checklist_36_destination_too_few_channels():
    with pytest.raises(MPSValueError, match="destinationImage has 3 feature channels"):
        run(conv(1, 1, 1, 4), blank(2, 2, 1), blank(2, 2, 3))


def test_ki_checklist_37_aliasing():
    src = blank(2, 2, 8)
    with pytest.raises(MPSValueError, match="shares storage"):
        run(identity(), src, src)
    with pytest.raises(MPSValueError, match="shares storage"):
        run(identity(), src, src.subImage(featureChannelRange=range(4, 8)))


def test_ki_checklist_38_batch_destination_aliases_any_source():
    a, b = blank(2, 2, 4), blank(2, 2, 4)
    cb = QUEUE.makeCommandBuffer()
    with pytest.raises(MPSValueError, match=r"destinationImage\[1\] shares storage with a source image of the batch"):
        identity().encodeBatch(commandBuffer=cb, sourceImages=[a, b], destinationImages=[blank(2, 2, 4), a])
    assert cb._work == []


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["neuron", "convolution"])
def test_a_kernel_copied_by_python_runs_like_the_original(kind, how):
    """``copy.deepcopy`` and pickle (a model's layers copied whole, or sent to a worker) keep the one
    device object, so the copy's encodes are accepted and compute what the original's do, also
    after the original has run: a convolution of 36,864 weights then keeps them only in oneDNN's
    reordered copy on the CPU, and the copy gets the values, not the backend's objects."""
    import copy
    import pickle

    rng = np.random.default_rng(15)
    channels = 1 if kind == "neuron" else 64
    kernel = identity() if kind == "neuron" else conv(3, 3, channels, channels, rng.uniform(-1, 1, 9 * channels ** 2),
                                                      bias=rng.uniform(-1, 1, channels))
    src = image(rng.uniform(-2, 2, (5, 5, channels)))
    expected = values(run(kernel, src, blank(5, 5, channels)))
    other = copy.deepcopy(kernel) if how == "deepcopy" else pickle.loads(pickle.dumps(kernel))
    assert other is not kernel and other.device is kernel.device is DEVICE
    np.testing.assert_array_equal(values(run(other, src, blank(5, 5, channels))), expected)
    np.testing.assert_array_equal(values(run(kernel, src, blank(5, 5, channels))), expected)
