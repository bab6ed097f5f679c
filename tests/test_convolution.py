"""convolution.md checklist: geometry (18–38), padding policy (39–47), data sources (56–68),
kernel properties and weights (69–73, 77–78), fully connected (80–83)."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from helpers import ArraySource, DEVICE, QUEUE, batch_norm_prelu_conv, blank, conv, descriptor, image, quiet, run, values
from mpsconv import *

BACKENDS = ["reference", "torch"]


def ramp(w=5, h=5):
    """``S(x, y) = x + 10y``."""
    return np.add.outer(10.0 * np.arange(h), np.arange(w))[..., None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_18_19_window_reads_zero_outside(backend):
    out = values(run(conv(), image(np.ones((5, 5, 1))), blank(5, 5, 1), backend))[0, :, :, 0]
    assert (out[0, 0], out[0, 1], out[2, 2], out[4, 4]) == (4, 6, 9, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_20_clamp_edge(backend):
    k = conv()
    k.edgeMode = MPSImageEdgeMode.clamp
    assert (values(run(k, image(np.ones((5, 5, 1))), blank(5, 5, 1), backend)) == 9).all()


@pytest.mark.parametrize("mode", [MPSImageEdgeMode.mirror, MPSImageEdgeMode.mirrorWithEdge, MPSImageEdgeMode.constant])
def test_conv_checklist_21_other_edge_modes_raise(mode):
    k = conv()
    k.edgeMode = mode
    with pytest.raises(MPSValueError, match=f"edgeMode={mode.name} is not defined"):
        run(k, image(np.ones((5, 5, 1))), blank(5, 5, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_22_cross_correlation(backend):
    src = np.zeros((5, 5, 1))
    src[2, 2] = 1
    w = np.array([[10 * q + p for p in range(3)] for q in range(3)], np.float32)
    out = values(run(conv(weights=w), image(src), blank(5, 5, 1), backend))[0, :, :, 0]
    # D(x, y) written out[y, x]
    assert (out[3, 3], out[1, 1], out[1, 2], out[2, 2]) == (0, 22, 21, 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_23_stride_offset(backend):
    k = conv(strideInPixelsX=2, strideInPixelsY=2)
    k.offset = MPSOffset(1, 1, 0)
    out = values(run(k, image(ramp()), blank(2, 2, 1), backend))[0, :, :, 0]
    assert out[0, 1] == 117  # D(1, 0): window x in [2, 4], y in [0, 2]


def impulse_response(kernel, width, backend, center):
    """Which source columns feed destination column 0: the output of a one-hot row per position."""
    hits = []
    for x in range(-4, width + 4):
        if 0 <= x < width:
            src = np.zeros((1, width, 1))
            src[0, x] = 1
            if values(run(kernel, image(src), blank(1, 1, 1), backend))[0, 0, 0, 0] != 0:
                hits.append(x - center)
    return hits


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_24_even_kernel_taps(backend):
    k = conv(4, 1)
    k.offset = MPSOffset(4, 0, 0)  # centre in the middle of a 9-wide row so no tap is cut
    assert impulse_response(k, 9, backend, 4) == [-2, -1, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_25_dilation(backend):
    w = np.zeros((3, 3), np.float32)
    w[1] = 1
    k = conv(weights=w, dilationRateX=2, dilationRateY=2)
    k.offset = MPSOffset(3, 3, 0)
    src = np.tile(np.arange(7.0), (7, 1))[..., None]
    assert values(run(k, image(src), blank(1, 1, 1), backend))[0, 0, 0, 0] == 1 + 3 + 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_26_even_dilated_kernel_taps(backend):
    k = conv(2, 1, dilationRateX=3)
    k.offset = MPSOffset(4, 0, 0)
    assert impulse_response(k, 9, backend, 4) == [-2, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_27_clip_region(backend):
    k = conv()
    k.clipRect = MTLRegionMake2D(2, 1, 1, 1)
    out = values(run(k, image(np.ones((5, 5, 1))), blank(5, 5, 1, fill=7), backend))[0, :, :, 0]
    assert out[1, 2] == 4
    out[1, 2] = 7
    assert (out == 7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_28_destination_channel_offset(backend):
    k = conv(1, 1, 1, 8, weights=np.arange(1, 9))
    k.destinationFeatureChannelOffset = 8
    out = values(run(k, image(np.ones((2, 2, 1))), blank(2, 2, 16, fill=-1), backend))
    assert (out[..., :8] == -1).all() and (out[..., 8:] == np.arange(1, 9)).all()


@pytest.mark.parametrize("offset, match", [(6, "multiple of 4"), (12, "needs 20")])
def test_conv_checklist_29_destination_channel_offset_errors(offset, match):
    k = conv(1, 1, 1, 8)
    k.destinationFeatureChannelOffset = offset
    with pytest.raises(MPSValueError, match=match):
        run(k, image(np.ones((2, 2, 1))), blank(2, 2, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_30_source_channel_offset(backend):
    k = conv(1, 1, 4, 1)
    k.sourceFeatureChannelOffset = 4
    src = np.broadcast_to(np.arange(8.0), (2, 2, 8))
    assert (values(run(k, image(src), blank(2, 2, 1), backend)) == 22).all()


def test_conv_checklist_31_max_count_below_input_channels():
    k = conv(1, 1, 4, 1)
    k.sourceFeatureChannelMaxCount = 2
    with pytest.raises(MPSValueError, match="provides 2 feature channels.*reads 4"):
        run(k, image(np.ones((2, 2, 8))), blank(2, 2, 1))


def test_conv_checklist_32_too_few_source_channels():
    with pytest.raises(MPSValueError, match="provides 3 feature channels"):
        run(conv(1, 1, 4, 1), image(np.ones((2, 2, 3))), blank(2, 2, 1))


def test_conv_checklist_33_destination_is_source():
    src = image(np.ones((3, 3, 1)))
    with pytest.raises(MPSValueError, match="shares storage with the source"):
        run(conv(), src, src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_34_multi_image_offset_z(backend):
    rng = np.random.default_rng(34)
    src_values = rng.uniform(-1, 1, (3, 4, 4, 1))
    k = conv(weights=rng.uniform(-1, 1, 9))
    k.offset = MPSOffset(0, 0, 1)
    k.clipRect = MTLRegion(MTLOrigin(0, 0, 0), MTLSize(4, 4, 2))
    got = values(run(k, image(src_values), blank(4, 4, 1, images=2), backend))
    single = MPSCNNConvolution.copy(k)
    single.offset, single.clipRect = MPSOffset(0, 0, 0), MPSRectNoClip
    for i in (0, 1):
        expected = values(run(single, image(src_values[i + 1]), blank(4, 4, 1), backend))
        np.testing.assert_allclose(got[i], expected[0], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_35_groups(backend):
    k = conv(1, 1, 8, 8, groups=2)
    out = values(run(k, image(np.broadcast_to(np.arange(8.0), (2, 2, 8))), blank(2, 2, 8), backend))
    assert (out[..., :4] == 6).all() and (out[..., 4:] == 22).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_38_bias_only(backend):
    k = conv(3, 3, 1, 2, weights=np.linspace(-1, 1, 18), bias=[1.0, -2.0])
    out = values(run(k, image(np.zeros((3, 3, 1))), blank(3, 3, 2), backend))
    assert (out[..., 0] == 1).all() and (out[..., 1] == -2).all()


# -- padding policy / allocating encode (39–47)


def allocate(kernel, width, height, method=None):
    if method is not None:
        kernel.padding = MPSNNDefaultPadding(method)
    cb = QUEUE.makeCommandBuffer()
    out = kernel.encode(commandBuffer=cb, sourceImage=blank(width, height, kernel.inputFeatureChannels))
    cb.commit()
    cb.waitUntilCompleted()
    return (out.width, out.height), (kernel.offset.x, kernel.offset.y)


M = MPSNNPaddingMethod


def test_conv_checklist_39_40_default_padding_same():
    assert allocate(conv(), 5, 5) == ((5, 5), (0, 0))
    assert conv().padding.paddingMethod() == 0x10
    assert allocate(conv(strideInPixelsX=2, strideInPixelsY=2), 5, 5) == ((3, 3), (0, 0))


def test_conv_checklist_41_remainder_side():
    assert allocate(conv(strideInPixelsX=2), 6, 1, M.sizeSame | M.addRemainderToTopLeft)[0][0] == 3
    assert allocate(conv(strideInPixelsX=2), 6, 1, M.sizeSame | M.addRemainderToTopLeft)[1][0] == 0
    assert allocate(conv(strideInPixelsX=2), 6, 1, M.sizeSame | M.addRemainderToBottomRight) == ((3, 1), (1, 0))


def test_conv_checklist_42_43_valid_and_full():
    assert allocate(conv(), 5, 5, M.sizeValidOnly) == ((3, 3), (1, 1))
    assert allocate(conv(), 5, 5, M.sizeFull) == ((7, 7), (-1, -1))


def test_conv_checklist_44_45_dilation_and_valid_stride():
    assert allocate(conv(dilationRateX=2, dilationRateY=2), 7, 7, M.sizeSame) == ((7, 7), (0, 0))
    assert allocate(conv(3, 1, strideInPixelsX=2), 6, 1, M.sizeValidOnly) == ((2, 1), (1, 0))


def test_conv_checklist_46_manual_encode_keeps_offset():
    k = conv()
    k.offset = MPSOffset(2, -1, 0)
    k.padding = MPSNNDefaultPadding(M.sizeFull)
    run(k, image(np.ones((5, 5, 1))), blank(5, 5, 1))
    assert k.offset == MPSOffset(2, -1, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_47_allocating_equals_manual_with_neuron(backend):
    rng = np.random.default_rng(47)
    d = descriptor(3, 3, 2, 3, strideInPixelsX=2, strideInPixelsY=2)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.tanH, a=1.0, b=0.5)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 54), rng.uniform(-1, 1, 3)))
    k.destinationImageAllocator = MPSImage.defaultAllocator()
    k.padding = MPSNNDefaultPadding(M.sizeSame | M.addRemainderToBottomRight)
    src = image(rng.uniform(-1, 1, (7, 6, 2)))
    allocated = run(k, src, None, backend)
    k2 = k.copy()
    k2.padding = MPSNNDefaultPadding(M.sizeFull)  # ignored by the manual encode
    out = run(k2, src, blank(allocated.width, allocated.height, 3), backend)
    assert k2.offset == k.offset == MPSOffset(1, 0, 0)  # x: extra 1 -> left 0; y: extra 2 -> left 1
    np.testing.assert_array_equal(values(out), values(allocated))


# -- data source (56–68)


def test_conv_checklist_56_load_first_purge_once():
    d = descriptor(1, 1, 1, 1)
    ds = ArraySource(d, [1.0])
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    assert ds.calls[0] == "load" and ds.calls[-1] == "purge"
    assert ds.calls.count("load") == ds.calls.count("purge") == 1
    k.reloadWeightsAndBiasesFromDataSource()
    assert ds.calls.count("load") == ds.calls.count("purge") == 2


def test_conv_checklist_57_load_false_fails():
    ds = ArraySource(descriptor(1, 1, 1, 1), [1.0])
    ds.load_result = False
    with pytest.raises(MPSValueError, match=r"load\(\) returned False"):
        MPSCNNConvolution(device=DEVICE, weights=ds)
    assert ds.calls == ["load"]  # OPEN §6.1: no purge after a failed load


def test_conv_checklist_58_none_bias_is_zero():
    k = conv(1, 1, 1, 1, weights=[2.0], bias=None)
    assert values(run(k, image([[[3.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 6.0


def test_conv_checklist_59_label_from_data_source():
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), [1.0], label="conv1"))
    assert k.label == "conv1"


@pytest.mark.parametrize("data_type", [MPSDataType.int8, MPSDataType.uInt32])
def test_conv_checklist_60_rejected_data_types(data_type):
    with pytest.raises(MPSValueError, match=f"dataType\\(\\)={data_type.name} is not accepted"):
        MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), [1], data_type=data_type))
    with pytest.raises(MPSValueError, match="dataType\\(\\)=float16 is not accepted"):
        MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), np.ones(1, np.float16),
                                                                      data_type=MPSDataType.float16))


def test_conv_checklist_61_linear_quantization():
    d = descriptor(1, 1, 1, 3)
    ds = ArraySource(d, np.array([0, 255, 51], np.uint8), data_type=MPSDataType.uInt8,
                     weightsQuantizationType=MPSCNNWeightsQuantizationType.linear,
                     rangesForUInt8Kernel=np.array([[-1, 1]] * 3, np.float32))
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    assert k._loaded.weights.reshape(-1).tolist() == pytest.approx([-1.0, 1.0, np.float16(-0.6)])


def test_conv_checklist_62_lookup_table_quantization():
    lut = np.linspace(-2, 2, 256).astype(np.float32)
    ds = ArraySource(descriptor(1, 1, 1, 1), np.array([7], np.uint8), data_type=MPSDataType.uInt8,
                     weightsQuantizationType=MPSCNNWeightsQuantizationType.lookupTable, lookupTableForUInt8Kernel=lut)
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    assert k._loaded.weights.reshape(-1)[0] == np.float32(np.float16(lut[7]))


@pytest.mark.parametrize("qtype, match", [(MPSCNNWeightsQuantizationType.linear, "rangesForUInt8Kernel"),
                                          (MPSCNNWeightsQuantizationType.lookupTable, "lookupTableForUInt8Kernel")])
def test_conv_checklist_63_quantization_needs_its_method(qtype, match):
    ds = ArraySource(descriptor(1, 1, 1, 1), np.array([7], np.uint8), data_type=MPSDataType.uInt8,
                     weightsQuantizationType=qtype)
    with pytest.raises(MPSValueError, match=match):
        MPSCNNConvolution(device=DEVICE, weights=ds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_64_weights_round_to_half(backend):
    k = conv(1, 1, 1, 1, weights=[1 / 3])
    assert values(run(k, image([[[3.0]]]), blank(1, 1, 1), backend))[0, 0, 0, 0] == 0.999755859375


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_65_float32_kernel_weights(backend):
    d = descriptor(1, 1, 1, 1)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, [1 / 3], kernel_type=MPSDataType.float32))
    assert values(run(k, image([[[3.0]]]), blank(1, 1, 1), backend))[0, 0, 0, 0] == np.float32(np.float32(1 / 3) * 3)
    with pytest.raises(MPSValueError, match=r"accumulatorPrecisionOption=.half is not allowed"):
        k.accumulatorPrecisionOption = MPSNNConvolutionAccumulatorPrecisionOption.half


def test_conv_checklist_66_half_data_with_float32_kernel_type():
    ds = ArraySource(descriptor(1, 1, 1, 1), np.array([1], np.float16), data_type=MPSDataType.float16,
                     kernel_type=MPSDataType.float32)
    with pytest.raises(MPSValueError, match="needs dataType\\(\\)=float32"):
        MPSCNNConvolution(device=DEVICE, weights=ds)


def test_conv_checklist_67_weights_layout():
    ds = ArraySource(descriptor(1, 1, 1, 1), [1.0], weightsLayout=1)
    with pytest.raises(MPSValueError, match="only OHWI"):
        MPSCNNConvolution(device=DEVICE, weights=ds)


class CopyWithDevice(ArraySource):
    def copy(self, zone=None, /, device=None):
        self.calls.append("copy(zone, device)")
        return ArraySource(self.desc, self.w)


class CopyZoneOnly(ArraySource):
    def copy(self, zone=None, /):
        self.calls.append("copy(zone)")
        return ArraySource(self.desc, self.w)


class NoCopy(ArraySource):
    copy = None


@pytest.mark.parametrize("cls, call, shared", [(CopyWithDevice, "copy(zone, device)", False),
                                               (CopyZoneOnly, "copy(zone)", False), (NoCopy, None, True)])
def test_conv_checklist_68_copy_duplicates_data_source(cls, call, shared):
    ds = cls(descriptor(1, 1, 1, 1), [1.0])
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    other = k.copy()
    assert (other.dataSource is ds) is shared
    if call:
        assert ds.calls[-1] == call


def test_conv_checklist_69_accumulator_default():
    assert conv().accumulatorPrecisionOption == MPSNNConvolutionAccumulatorPrecisionOption.float


@pytest.mark.parametrize("cls", [MPSCNNConvolution, MPSCNNFullyConnected, MPSCNNNeuron])
def test_conv_checklist_70_device_alone_is_unavailable(cls):
    with pytest.raises(TypeError, match="unavailable"):
        cls(device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_71_deprecated_pointer_initializer(backend):
    rng = np.random.default_rng(71)
    w = rng.uniform(-1, 1, 18).astype(np.float16).astype(np.float32)
    d = descriptor(3, 3, 2, 1)
    old = quiet(MPSCNNConvolution, device=DEVICE, convolutionDescriptor=d, kernelWeights=w, biasTerms=[0.5],
                flags=MPSCNNConvolutionFlags.none)
    new = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, [0.5]))
    src = image(rng.uniform(-1, 1, (4, 4, 2)))
    np.testing.assert_array_equal(values(run(old, src, blank(4, 4, 1), backend)),
                                  values(run(new, src, blank(4, 4, 1), backend)))
    with pytest.raises(MPSValueError, match="flags=3"):
        quiet(MPSCNNConvolution, device=DEVICE, convolutionDescriptor=d, kernelWeights=w, biasTerms=None, flags=3)


def test_conv_checklist_72_pointer_kernels_cannot_be_archived():
    k = quiet(MPSCNNConvolution, device=DEVICE, convolutionDescriptor=descriptor(1, 1, 1, 1), kernelWeights=[1.0],
              biasTerms=None, flags=MPSCNNConvolutionFlags.none)
    with pytest.raises(MPSArchiveError, match="deprecated pointer initializer cannot be archived"):
        NSKeyedArchiver.archivedData(withRootObject=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_73_archive_round_trip(backend, tmp_path):
    rng = np.random.default_rng(73)
    k = batch_norm_prelu_conv(rng)
    k.edgeMode = MPSImageEdgeMode.clamp
    k.destinationFeatureChannelOffset = 4
    save(k, tmp_path / "k.mpsconv")
    back = load(tmp_path / "k.mpsconv", device=DEVICE)
    assert type(back) is MPSCNNConvolution
    for name in ("offset", "edgeMode", "label", "destinationFeatureChannelOffset", "kernelWidth", "kernelHeight",
                 "groups", "strideInPixelsX", "clipRect", "options", "accumulatorPrecisionOption"):
        assert getattr(back, name) == getattr(k, name), name
    src = image(rng.uniform(-1, 1, (5, 7, 8)))
    np.testing.assert_array_equal(values(run(back, src, blank(4, 5, 12), backend)),
                                  values(run(k, src, blank(4, 5, 12), backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_77_reload_from_data_source(backend):
    ds = ArraySource(descriptor(1, 1, 1, 1), np.array([1.0], np.float32))
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    src = image([[[3.0]]])
    ds.w = np.array([2.0], np.float32)
    assert values(run(k, src, blank(1, 1, 1), backend))[0, 0, 0, 0] == 3.0
    k.reloadWeightsAndBiasesFromDataSource()
    assert values(run(k, src, blank(1, 1, 1), backend))[0, 0, 0, 0] == 6.0


def test_conv_checklist_78_reload_with_data_source_ignores_argument():
    ds = ArraySource(descriptor(1, 1, 1, 1), np.array([1.0], np.float32))
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    ds.w = np.array([2.0], np.float32)
    other = ArraySource(descriptor(1, 1, 1, 1), np.array([5.0], np.float32))
    with pytest.warns(DeprecationWarning):
        k.reloadWeightsAndBiasesWithDataSource(other)
    assert values(run(k, image([[[3.0]]]), blank(1, 1, 1)))[0, 0, 0, 0] == 6.0
    assert other.calls == []


# -- fully connected (80–83)


def fc(cin, cout, kw, kh, weights=None, **props):
    return conv(kw, kh, cin, cout, weights=weights, cls=MPSCNNFullyConnected, **props)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_80_fully_connected(backend):
    out = run(fc(4, 1, 2, 2), image(np.full((2, 2, 4), 0.5)), blank(1, 1, 1), backend)
    assert values(out)[0, 0, 0, 0] == 8.0


def test_conv_checklist_81_fully_connected_errors():
    with pytest.raises(MPSValueError, match="must cover the whole source"):
        run(fc(4, 1, 2, 2), image(np.ones((3, 2, 4))), blank(1, 1, 1))
    with pytest.raises(MPSValueError, match="stride 1"):
        fc(4, 1, 2, 2, strideInPixelsX=2)
    with pytest.raises(MPSValueError, match="groups 1"):
        fc(8, 8, 2, 2, groups=2)
    with pytest.raises(MPSValueError, match="writes one pixel"):
        run(fc(4, 1, 2, 2), image(np.ones((2, 2, 4))), blank(2, 2, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_checklist_82_fully_connected_is_convolution_and_matvec(backend):
    rng = np.random.default_rng(82)
    w = rng.uniform(-1, 1, (3, 4, 5, 2)).astype(np.float16).astype(np.float32)  # [O][H][W][I]
    s = rng.uniform(-1, 1, (4, 5, 2))
    k = fc(2, 3, 5, 4, weights=w)
    k.offset = MPSOffset(-9, 4, 0)  # ignored
    got = values(run(k, image(s), blank(1, 1, 3), backend))[0, 0, 0]
    np.testing.assert_allclose(got, w.reshape(3, -1).astype(np.float64) @ s.reshape(-1), rtol=1e-5, atol=1e-6)
    c = conv(5, 4, 2, 3, weights=w)
    c.offset = MPSOffset(5 // 2, 4 // 2, 0)
    c.clipRect = MTLRegionMake2D(0, 0, 1, 1)
    np.testing.assert_allclose(values(run(c, image(s), blank(1, 1, 3), backend))[0, 0, 0], got, rtol=1e-6)


def test_conv_checklist_83_fully_connected_allocating_encode():
    k = fc(4, 6, 3, 3)
    out = run(k, image(np.ones((3, 3, 4))))
    assert (out.width, out.height, out.featureChannels) == (1, 1, 6)
    assert k.padding.paddingMethod() == MPSNNPaddingMethod.sizeValidOnly



def test_reload_with_a_changed_descriptor_is_used_by_the_next_encode():
    """Plans cached for the old weights are dropped when the weights or descriptor change."""
    d = descriptor(1, 1, 1, 1)
    ds = ArraySource(d, np.array([1.0], np.float32))
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    src = image([[[-3.0]]])
    assert values(run(k, src, blank(1, 1, 1)))[0, 0, 0, 0] == -3.0
    changed = d.copy()
    changed.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.absolute)
    ds.desc = changed
    k.reloadWeightsAndBiasesFromDataSource()
    assert values(run(k, src, blank(1, 1, 1)))[0, 0, 0, 0] == 3.0


def test_copies_do_not_share_cached_plans():
    k = conv()
    run(k, image(np.ones((3, 3, 1))), blank(3, 3, 1))
    other = k.copy()
    assert other._encoder is not k._encoder and not other._encoder.plans and not other._encoder.prepared_weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_accumulator_meets_the_float16_error_bound(backend):
    """accumulatorPrecisionOption = .half is honoured within the fp16-accumulation bound of the reference."""
    from tolerances import half_accumulation_bound

    rng = np.random.default_rng(8)
    w = rng.uniform(-1, 1, (6, 3, 3, 5)).astype(np.float16).astype(np.float32)
    x = rng.uniform(-1, 1, (7, 8, 5))
    k = conv(3, 3, 5, 6, weights=w)
    k.accumulatorPrecisionOption = MPSNNConvolutionAccumulatorPrecisionOption.half
    assert k.accumulatorPrecisionOption == MPSNNConvolutionAccumulatorPrecisionOption.half
    got = values(run(k, image(x), blank(8, 7, 6), backend))[0]
    exact = values(run(conv(3, 3, 5, 6, weights=np.abs(w)), image(np.abs(x)), blank(8, 7, 6), "reference"))[0]
    expected = values(run(conv(3, 3, 5, 6, weights=w), image(x), blank(8, 7, 6), "reference"))[0]
    assert (np.abs(got - expected) <= half_accumulation_bound(exact, 3 * 3 * 5)).all()


# -- the steady-state encode (``Encoder.repeat``): the same images and settings skip validation and planning

SETTING_CHANGES = {
    "offset": lambda k: setattr(k, "offset", MPSOffset(2, 0, 0)),
    "clipRect": lambda k: setattr(k, "clipRect", MTLRegion(MTLOrigin(1, 2, 0), MTLSize(3, 2, 1))),
    "edgeMode": lambda k: setattr(k, "edgeMode", MPSImageEdgeMode.clamp),
    "destinationFeatureChannelOffset": lambda k: setattr(k, "destinationFeatureChannelOffset", 4),
    "sourceFeatureChannelOffset": lambda k: setattr(k, "sourceFeatureChannelOffset", 4),
    "options": lambda k: setattr(k, "options", MPSKernelOptions.allowReducedPrecision),
}


@pytest.mark.parametrize("change", sorted(SETTING_CHANGES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_encode_follows_a_changed_setting(change, backend):
    """Encode, change one property, encode the same images again: the second encode sees the change,
    though the first left a steady-state encode to repeat. The same two encodes by kernels that never
    encoded before (so validate and plan both times) give the same image."""
    rng = np.random.default_rng(31)
    w, b = rng.uniform(-1, 1, (4, 3, 3, 4)), rng.uniform(-1, 1, 4)
    src = image(rng.uniform(-1, 1, (6, 7, 8)))
    k = conv(3, 3, 4, 4, weights=w, bias=b)
    got = blank(7, 6, 8, fill=0.5)
    run(k, src, got, backend)
    assert (id(src), id(got)) in k._encoder.repeats
    SETTING_CHANGES[change](k)
    run(k, src, got, backend)
    want = blank(7, 6, 8, fill=0.5)
    run(conv(3, 3, 4, 4, weights=w, bias=b), src, want, backend)
    fresh = conv(3, 3, 4, 4, weights=w, bias=b)
    SETTING_CHANGES[change](fresh)
    run(fresh, src, want, backend)
    np.testing.assert_array_equal(values(got), values(want))


def test_repeated_encodes_skip_validation_and_record_the_same_work():
    """Ping-pong between two images, three rounds: only the first encode of each pair validates, and
    the images hold what kernels that validate every encode give."""
    rng = np.random.default_rng(32)
    w = rng.uniform(-1, 1, (3, 3, 3, 3))
    x = rng.uniform(-1, 1, (5, 4, 3))
    k = conv(3, 3, 3, 3, weights=w)
    a, b = image(x), blank(4, 5, 3)
    with mock.patch.object(k, "_check_pair", wraps=k._check_pair) as checked:
        for _ in range(3):
            run(k, a, b)
            run(k, b, a)
    assert checked.call_count == 2
    want_a, want_b = image(x), blank(4, 5, 3)
    for _ in range(3):
        run(conv(3, 3, 3, 3, weights=w), want_a, want_b)
        run(conv(3, 3, 3, 3, weights=w), want_b, want_a)
    np.testing.assert_array_equal(values(a), values(want_a))
    np.testing.assert_array_equal(values(b), values(want_b))


def test_a_repeated_encode_still_refuses_a_committed_command_buffer():
    rng = np.random.default_rng(33)
    k = conv(3, 3, 1, 1, weights=rng.uniform(-1, 1, (1, 3, 3, 1)))
    src, dst = image(rng.uniform(-1, 1, (4, 4, 1))), blank(4, 4, 1)
    run(k, src, dst)
    cb = QUEUE.makeCommandBuffer()
    cb.commit()
    with pytest.raises(MPSCommandBufferError, match="committed"):
        k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    assert cb._work == []


def test_temporary_images_are_validated_on_every_encode():
    """A temporary source's read count is consumed by each encode, and a released one is refused: such
    encodes are never repeated from the steady state."""
    rng = np.random.default_rng(34)
    k = conv(3, 3, 1, 1, weights=rng.uniform(-1, 1, (1, 3, 3, 1)))
    dst = blank(4, 4, 1)
    cb = QUEUE.makeCommandBuffer()
    tmp = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=4, height=4, featureChannels=1))
    tmp.readCount = 2
    k.encode(commandBuffer=cb, sourceImage=tmp, destinationImage=dst)
    k.encode(commandBuffer=cb, sourceImage=tmp, destinationImage=dst)
    assert tmp.readCount == 0 and not k._encoder.repeats
    with pytest.raises(MPSCommandBufferError, match="released"):
        k.encode(commandBuffer=cb, sourceImage=tmp, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()


def test_a_repeated_encode_uses_reloaded_weights_and_the_backend_in_force():
    rng = np.random.default_rng(35)
    w = rng.uniform(-1, 1, (2, 3, 3, 2))
    ds = ArraySource(descriptor(3, 3, 2, 2), w)
    k = MPSCNNConvolution(device=DEVICE, weights=ds)
    src, dst = image(rng.uniform(-1, 1, (5, 5, 2))), blank(5, 5, 2)
    first = values(run(k, src, dst, "reference")).copy()
    ds.w = -w
    k.reloadWeightsAndBiasesFromDataSource()
    np.testing.assert_allclose(values(run(k, src, dst, "reference")), -first, rtol=1e-6, atol=1e-6)
    cb = QUEUE.makeCommandBuffer()
    with use_backend("torch"):
        k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    assert k._encoder.repeats[id(src), id(dst)].work.backend.name == "torch"
