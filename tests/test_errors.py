"""Invalid inputs: one row each, with the error type and message it must give.

After the error, the test commits the command buffer the call was made with (if it is still
open) and checks that every watched image kept its contents: a refused call records nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, ArraySource, blank, conv, descriptor, quiet, values
from mpsconv import *
from mpsconv.metal import MTLDevice

rng = np.random.default_rng(0)
FMT = MPSImageFeatureChannelFormat


def box():
    return conv(3, 3, 4, 4, weights=rng.uniform(-1, 1, 144))


def encode_case(kernel=None, src=None, dst=None, **props):
    """A manual encode of ``kernel`` (default: 3x3, 4 -> 4) after setting ``props``."""
    kernel = kernel or box()
    for name, value in props.items():
        setattr(kernel, name, value)
    src = src if src is not None else blank(5, 5, 4, rng=rng)
    dst = dst if dst is not None else blank(5, 5, 4, rng=rng)
    cb = QUEUE.makeCommandBuffer()
    return (lambda: kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)), [src, dst], cb


def make(fn):
    return (fn, [], None)


def archive(obj=None):
    return NSKeyedArchiver.archivedData(withRootObject=obj or box())


def tampered():
    data = bytearray(archive())
    data[-5] ^= 0xFF
    return bytes(data)


def batch_case(sources, destinations):
    cb = QUEUE.makeCommandBuffer()
    k = box()
    return (lambda: k.encodeBatch(commandBuffer=cb, sourceImages=sources, destinationImages=destinations),
            list(sources) + list(destinations), cb)


def committed_case():
    src, dst = blank(5, 5, 4, rng=rng), blank(5, 5, 4, rng=rng)
    cb = QUEUE.makeCommandBuffer()
    cb.commit()
    return (lambda: box().encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)), [src, dst], None


def open_encoder_case():
    action, watched, cb = encode_case()
    encoder = cb.computeCommandEncoder()

    def act():
        try:
            action()
        finally:
            encoder.endEncoding()
    return act, watched, cb


def temporary_case(released: bool):
    cb, other = QUEUE.makeCommandBuffer(), QUEUE.makeCommandBuffer()
    t = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=5, height=5, featureChannels=4))
    dst = blank(5, 5, 4, rng=rng)
    if released:
        t.readCount = 0
        target = cb
    else:
        target = other
    return (lambda: box().encode(commandBuffer=target, sourceImage=t, destinationImage=dst)), [dst], target


def other_device_case():
    stranger = MTLDevice._make("cpu")  # a second device object (users cannot make one): images on it are not the kernel's
    src = MPSImage(device=stranger, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=5, height=5, featureChannels=4))
    dst = blank(5, 5, 4, rng=rng)
    cb = QUEUE.makeCommandBuffer()
    return (lambda: box().encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)), [dst], cb


def fc_case(src_hw, dst_hw):
    k = conv(3, 3, 4, 2, cls=MPSCNNFullyConnected)
    return encode_case(k, blank(src_hw[1], src_hw[0], 4, rng=rng), blank(dst_hw[1], dst_hw[0], 2, rng=rng))


def allocating_case(kernel, src):
    cb = QUEUE.makeCommandBuffer()
    return (lambda: kernel.encode(commandBuffer=cb, sourceImage=src)), [src], cb


def padded(method):
    k = box()
    k.padding = MPSNNDefaultPadding(method)
    return k


class NoDescriptorMethod(MPSNNPadding):
    def paddingMethod(self):
        return MPSNNPaddingMethod.custom | MPSNNPaddingMethod.sizeSame


def custom_padding_kernel():
    k = box()
    k.padding = NoDescriptorMethod()
    return k


def source(**kwargs):
    return ArraySource(descriptor(3, 3, 4, 4), kwargs.pop("weights", np.ones(144)), **kwargs)


def load_false():
    ds = source()
    ds.load_result = False
    return ds


class Incomplete:
    def descriptor(self):
        return descriptor(3, 3, 4, 4)


def bn(**arrays):
    d = descriptor(1, 1, 1, 2)
    args = dict(variance=[1, 1], gamma=[1, 1], beta=[0, 0], epsilon=1e-3)
    args.update(arrays)
    mean = args.pop("mean", [0, 0])
    return lambda: d.setBatchNormalizationParametersForInferenceWithMean(mean, **args)


def prelu_conv():
    d = descriptor(1, 1, 1, 3)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(np.ones(2, np.float32))
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(3)))


def fp32_kernel():
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), [1.0],
                                                                kernel_type=MPSDataType.float32))


def set_attr(obj, name, value):
    return lambda: setattr(obj, name, value)


def prelu_neuron_case():
    n = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(np.ones(2, np.float32)))
    return encode_case(n)


def dw(cin=4, cout=4, count=None, **props):
    d = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=cin,
                                             outputFeatureChannels=cout)
    for name, value in props.items():
        setattr(d, name, value)
    return lambda: MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(count or cout * 9)))


def sp(n=8, r=2, groups=1, cin=8):
    d = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=cin,
                                            outputFeatureChannels=n)
    d.subPixelScaleFactor, d.groups = r, groups
    return lambda: MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(n * cin // groups)))


def subpixel_kernel():
    d = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4,
                                            outputFeatureChannels=16)
    d.subPixelScaleFactor = 2
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.ones(64)))


def tr(data_type=MPSDataType.float32, desc=None, weights=None):
    d = desc or descriptor(3, 3, 4, 4, strideInPixelsX=2)
    w = weights if weights is not None else np.ones(144)
    return MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(d, w, data_type=data_type))


def tr_case(**props):
    k = tr()
    for name, value in props.items():
        setattr(k, name, value)
    return encode_case(k, blank(3, 3, 4, rng=rng), blank(7, 7, 4, rng=rng))


def state_case():
    action, watched, cb = tr_case()
    src, dst = watched
    return (lambda: tr().encode(commandBuffer=cb, sourceImage=src, convolutionGradientState=object(),
                                destinationImage=dst)), watched, cb


def forward_with_state(kw=3, temporary=False, cb=None):
    k = conv(kw, kw, 4, 4)
    src = blank(5, 5, 4, rng=rng)
    state = k.temporaryResultState(commandBuffer=cb, sourceImage=src) if temporary else k.resultState(sourceImage=src)
    return k, src, state


def foreign_window_state_case():
    _, _, state = forward_with_state(kw=5)
    action, watched, cb = tr_case()
    src, dst = watched
    return (lambda: tr().encode(commandBuffer=cb, sourceImage=src, convolutionGradientState=state,
                                destinationImage=dst)), watched, cb


def released_state_case():
    action, watched, cb = tr_case()
    _, _, state = forward_with_state(temporary=True, cb=cb)
    state.readCount = 0
    src, dst = watched
    return (lambda: tr().encode(commandBuffer=cb, sourceImage=src, convolutionGradientState=state,
                                destinationImage=dst)), watched, cb


def other_kernel_state_case():
    _, src, state = forward_with_state()
    action, watched, cb = encode_case()
    k = box()
    s2, d2 = watched
    return (lambda: k.encode(commandBuffer=cb, sourceImage=s2, destinationState=state, destinationImage=d2)), \
        watched, cb


def stale_state_case():
    k, src, state = forward_with_state()
    k.offset = MPSOffset(1, 1, 0)
    dst = blank(5, 5, 4, rng=rng)
    cb = QUEUE.makeCommandBuffer()
    return (lambda: k.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=dst)), \
        [src, dst], cb


def gradient_case(kind):
    """A forward pass with a state, then a refused gradient encode of one kind."""
    d = descriptor(3, 3, 4, 4)
    ds = ArraySource(d, np.ones(144))
    fwd, grad = MPSCNNConvolution(device=DEVICE, weights=ds), MPSCNNConvolutionGradient(device=DEVICE, weights=ds)
    src = blank(5, 5, 4, rng=rng)
    cb = QUEUE.makeCommandBuffer()
    state = fwd.temporaryResultState(commandBuffer=cb, sourceImage=src) if kind == "released" else \
        fwd.resultState(sourceImage=src)
    fwd.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=blank(5, 5, 4))
    e, dst = blank(5, 5, 4, rng=rng), blank(5, 5, 4, rng=rng)
    args = dict(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=state, destinationGradient=dst)
    if kind == "state type":
        args["gradientState"] = MPSState(device=DEVICE, bufferSize=4)
    elif kind == "gradient size":
        args["sourceGradient"] = blank(4, 5, 4, rng=rng)
    elif kind == "released":
        state.readCount = 0
    elif kind == "destination size":
        args["destinationGradient"] = dst = blank(4, 4, 4, rng=rng)
    elif kind == "other shape":
        other = MPSCNNConvolutionGradient(device=DEVICE, weights=ArraySource(descriptor(1, 1, 4, 4), np.ones(16)))
        return (lambda: other.encode(**args)), [e, dst], cb
    elif kind == "batch lengths":
        return (lambda: grad.encodeBatch(commandBuffer=cb, sourceGradients=[e, e], sourceImages=[src],
                                         gradientStates=[state], destinationGradients=[dst])), [e, dst], cb
    elif kind == "unfilled":
        args["gradientState"] = fwd.resultState(sourceImage=src)
    return (lambda: grad.encode(**args)), [e, dst], cb


def words(o=2, i=40, k=1):
    return np.ones(o * k * k * ((i + 31) // 32), np.uint32)


def bn_conv(kind=MPSCNNBinaryConvolutionType.xnor, flags=0, desc=None, data=None, cls=None, **terms):
    d = desc or descriptor(1, 1, 40, 2)
    args = dict(outputBiasTerms=None, outputScaleTerms=None, inputBiasTerms=None, inputScaleTerms=None)
    args.update(terms)
    ds = ArraySource(d, words() if data is None else data, data_type=MPSDataType.uInt32)
    return lambda: (cls or MPSCNNBinaryConvolution)(device=DEVICE, convolutionData=ds, type=kind, flags=flags, **args)


def binary_case(edge=MPSImageEdgeMode.zero, cls=MPSCNNBinaryConvolution, src_hw=(3, 3), dst_hw=(3, 3)):
    d = descriptor(3, 3, 8, 2)
    k = cls(device=DEVICE, convolutionData=ArraySource(d, np.ones(2 * 9, np.uint32), data_type=MPSDataType.uInt32),
            scaleValue=1.0, type=MPSCNNBinaryConvolutionType.AND, flags=0)
    k.edgeMode = edge
    return encode_case(k, blank(src_hw[1], src_hw[0], 8, rng=rng), blank(dst_hw[1], dst_hw[0], 2, rng=rng))


E, T = MPSValueError, TypeError
ROWS = [
    # -- descriptor and kernel construction
    ("zero kernel", lambda: make(set_attr(MPSCNNConvolutionDescriptor(), "kernelWidth", 0)), E, "kernelWidth=0 must be >= 1"),
    ("zero stride", lambda: make(set_attr(MPSCNNConvolutionDescriptor(), "strideInPixelsY", 0)), E, "strideInPixelsY=0"),
    ("zero dilation", lambda: make(set_attr(MPSCNNConvolutionDescriptor(), "dilationRateX", 0)), E, "dilationRateX=0"),
    ("non-integer kernel", lambda: make(set_attr(MPSCNNConvolutionDescriptor(), "kernelHeight", 2.5)), T, "must be an integer"),
    ("groups not dividing", lambda: make(lambda: conv(3, 3, 8, 12, groups=3)), E, "groups=3 must divide inputFeatureChannels=8"),
    ("channels per group", lambda: make(lambda: conv(3, 3, 6, 8, groups=2)), E, "multiples of 4; got 3 input"),
    ("zero channels", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=ArraySource(MPSCNNConvolutionDescriptor(), []))), E, "must both be >= 1"),
    ("wrong weight count", lambda: make(lambda: conv(3, 3, 4, 4, weights=np.ones(143))), E, "holds 143 elements; 144 are needed"),
    ("wrong bias count", lambda: make(lambda: conv(3, 3, 4, 4, bias=np.ones(3))), E, r"biasTerms\(\) holds 3 elements; 4 are needed"),
    ("weights as too few bytes", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 2), b"\0" * 6))), E, "holds 6 bytes"),
    ("weights of strings", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), ["a"]))), T, "expected numbers"),
    ("NaN epsilon", lambda: make(bn(epsilon=float("nan"))), E, "epsilon=nan must be a finite float"),
    ("partial batch norm", lambda: make(bn(gamma=None)), E, "gamma is None; pass all four"),
    ("batch norm length", lambda: make(bn(beta=[0, 0, 0])), E, "beta holds 3 floats; outputFeatureChannels=2"),
    ("load returns False", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=load_false())), E, r"load\(\) returned False"),
    ("incomplete data source", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=Incomplete())), T, "does not implement"),
    ("int8 weights", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=source(data_type=MPSDataType.int8))), E, "int8 is not accepted"),
    ("half data, float kernel", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=source(weights=np.ones(144, np.float16), data_type=MPSDataType.float16, kernel_type=MPSDataType.float32))), E, "needs dataType"),
    ("uint8 without quantization", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=source(weights=np.ones(144, np.uint8), data_type=MPSDataType.uInt8))), E, "linear or lookupTable"),
    ("weights layout", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, weights=source(weightsLayout=7))), E, "only OHWI"),
    ("pReLU count", lambda: make(prelu_conv), E, "pReLU data holds 2 floats; outputFeatureChannels=3"),
    ("accumulator half with float32 weights", lambda: make(set_attr(fp32_kernel(), "accumulatorPrecisionOption", 0)), E, "not allowed with float32"),
    ("deprecated init flags", lambda: make(lambda: quiet(MPSCNNConvolution, device=DEVICE, convolutionDescriptor=descriptor(1, 1, 1, 1), kernelWeights=[1], biasTerms=None, flags=1)), E, "flags=1"),
    ("initializer keywords", lambda: make(lambda: MPSCNNConvolution(device=DEVICE, descriptor=descriptor())), T, "valid initializers are"),
    ("fully connected stride", lambda: make(lambda: conv(3, 3, 4, 2, cls=MPSCNNFullyConnected, strideInPixelsX=2)), E, "stride 1"),
    ("None neuron descriptor", lambda: make(set_attr(MPSCNNConvolutionDescriptor(), "fusedNeuronDescriptor", None)), T, "never None"),
    ("neuron type out of range", lambda: make(lambda: MPSNNNeuronDescriptor.cnnNeuronDescriptor(16)), E, "sentinel"),
    ("image of zero width", lambda: make(lambda: MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(channelFormat=FMT.float32, width=0, height=1, featureChannels=1))), E, "width=0 must be >= 1"),
    ("reserved image format", lambda: make(lambda: MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(channelFormat=FMT._reserved0))), E, "cannot make an image"),
    # -- kernel properties
    ("negative clip", lambda: make(set_attr(box(), "clipRect", MTLRegion(MTLOrigin(-1, 0, 0), MTLSize(1, 1, 1)))), E, "negative component"),
    ("offset of strings", lambda: make(set_attr(box(), "offset", ("a", 0, 0))), T, "MPSOffset"),
    ("negative channel offset", lambda: make(set_attr(box(), "destinationFeatureChannelOffset", -4)), E, "destinationFeatureChannelOffset=-4 must be >= 0"),
    ("None padding", lambda: make(set_attr(box(), "padding", None)), T, "never None"),
    ("None allocator", lambda: make(set_attr(box(), "destinationImageAllocator", None)), T, "never None"),
    # -- encode
    ("source offset not multiple of 4", lambda: encode_case(sourceFeatureChannelOffset=2, src=blank(5, 5, 8, rng=rng)), E, "sourceFeatureChannelOffset=2 must be a multiple of 4"),
    ("destination offset not multiple of 4", lambda: encode_case(destinationFeatureChannelOffset=6, dst=blank(5, 5, 12, rng=rng)), E, "destinationFeatureChannelOffset=6"),
    ("too few source channels", lambda: encode_case(src=blank(5, 5, 3, rng=rng)), E, "provides 3 feature channels"),
    ("source offset past the channels", lambda: encode_case(sourceFeatureChannelOffset=8), E, "beyond the source's 4 feature channels"),
    ("destination too small", lambda: encode_case(destinationFeatureChannelOffset=4, dst=blank(5, 5, 6, rng=rng)), E, "needs 8"),
    ("source is destination", lambda: (lambda s: encode_case(src=s, dst=s))(blank(5, 5, 4, rng=rng)), E, "shares storage"),
    ("destination is a view of the source", lambda: (lambda s: encode_case(src=s, dst=s.subImage(featureChannelRange=range(4, 8))))(blank(5, 5, 8, rng=rng)), E, "shares storage"),
    ("mirror edge", lambda: encode_case(edgeMode=MPSImageEdgeMode.mirror), E, "edgeMode=mirror is not defined"),
    ("negative offset.z", lambda: encode_case(offset=MPSOffset(0, 0, -1)), E, "offset.z=-1"),
    # found by tests/test_surface_fuzz.py: a NaN offset reached the backend as a float
    ("NaN offset", lambda: make(set_attr(box(), "offset", MPSOffset(float("nan"), 0, 0))), T,
     r"offset=MPSOffset\(x=nan, y=0, z=0\) must be an MPSOffset\(x, y, z\) of integers"),
    ("offset beyond Int", lambda: make(set_attr(box(), "offset", MPSOffset(2**63, 0, 0))), E, "outside Int's range"),
    ("dilation beyond 2**31 - 1", lambda: make(set_attr(MPSCNNConvolutionDescriptor(), "dilationRateY", 2**31)), E,
     r"dilationRateY=2147483648 must be <= 2\*\*31 - 1"),
    ("infinite clipRect", lambda: make(set_attr(box(), "clipRect", MTLRegion(MTLOrigin(0, 0, 0),
                                                                         MTLSize(float("inf"), 1, 1)))), T,
     "clipRect=.* of integers"),
    ("too few source images", lambda: encode_case(offset=MPSOffset(0, 0, 1)), E, "exceeds the source's numberOfImages=1"),
    ("encode after commit", committed_case, MPSCommandBufferError, "already committed"),
    ("open compute encoder", open_encoder_case, MPSCommandBufferError, "endEncoding"),
    ("temporary image of another buffer", lambda: temporary_case(False), MPSCommandBufferError, "another command buffer"),
    ("released temporary image", lambda: temporary_case(True), MPSCommandBufferError, "released"),
    ("image of another device", other_device_case, MPSDeviceError, "the kernel is on"),
    ("not a command buffer", lambda: (lambda a, w, cb: ((lambda: box().encode(commandBuffer=QUEUE, sourceImage=w[0], destinationImage=w[1])), w, cb))(*encode_case()), T, "must be an MTLCommandBuffer"),
    ("not an image", lambda: (lambda a, w, cb: ((lambda: box().encode(commandBuffer=cb, sourceImage=np.zeros((5, 5, 4)), destinationImage=w[1])), w, cb))(*encode_case()), T, "must be an MPSImage"),
    ("positional encode", lambda: (lambda a, w, cb: ((lambda: box().encode(cb, w[0], w[1])), w, cb))(*encode_case()), T, "as keywords"),
    ("batch lengths", lambda: batch_case([blank(5, 5, 4, rng=rng)] * 2, [blank(5, 5, 4, rng=rng)]), E, "same length"),
    ("batch alias", lambda: (lambda a, b: batch_case([a, b], [blank(5, 5, 4, rng=rng), a]))(blank(5, 5, 4, rng=rng), blank(5, 5, 4, rng=rng)), E, r"destinationImage\[1\] shares storage"),
    ("batch of mixed sizes", lambda: batch_case([blank(5, 5, 4, rng=rng), blank(6, 5, 4, rng=rng)], [blank(5, 5, 4, rng=rng), blank(5, 5, 4, rng=rng)]), E, "a batch must agree"),
    ("fully connected window", lambda: fc_case((4, 3), (1, 1)), E, "must cover the whole source"),
    ("fully connected clip", lambda: fc_case((3, 3), (2, 2)), E, "writes one pixel"),
    ("pReLU neuron channels", prelu_neuron_case, E, "needs at least"),
    ("allocating encode of two images", lambda: allocating_case(box(), blank(5, 5, 4, images=2, rng=rng)), E, "numberOfImages == 1"),
    ("reserved padding", lambda: allocating_case(padded(MPSNNPaddingMethod.size_reserved), blank(5, 5, 4, rng=rng)), E, "size_reserved"),
    ("custom padding without method", lambda: allocating_case(custom_padding_kernel(), blank(5, 5, 4, rng=rng)), E, "custom bit"),
    ("valid-only too small", lambda: allocating_case(padded(MPSNNPaddingMethod.sizeValidOnly), blank(2, 2, 4, rng=rng)), E, "destination height 0"),
    # -- images and archives
    ("sub-image range", lambda: make(lambda: blank(2, 2, 12).subImage(featureChannelRange=range(2, 6))), E, "multiples of 4"),
    ("read region outside", lambda: (lambda img: ((lambda: img.readBytes(np.zeros(64, np.float32), dataLayout=0, bytesPerRow=64, region=MTLRegionMake2D(1, 0, 2, 2), featureChannelInfo=MPSImageReadWriteParams(0, 4), imageIndex=0)), [img], None))(blank(2, 2, 4, rng=rng)), E, "outside the 2x2 image"),
    ("read buffer too small", lambda: (lambda img: ((lambda: img.readBytes(np.zeros(3, np.float32), dataLayout=0, imageIndex=0)), [img], None))(blank(2, 2, 4, rng=rng)), E, "needs 64 bytes; the buffer holds 12"),
    ("write from a read-only buffer", lambda: (lambda img: ((lambda: img.readBytes(b"\0" * 64, dataLayout=0, imageIndex=0)), [img], None))(blank(2, 2, 4, rng=rng)), T, "read-only"),
    ("truncated archive", lambda: make(lambda: NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolution, archive()[:-10])), MPSArchiveError, "corrupt|truncated"),
    ("truncated header", lambda: make(lambda: NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolution, archive()[:20])), MPSArchiveError, "truncated"),
    ("tampered archive", lambda: make(lambda: NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolution, tampered())), MPSArchiveError, "digest does not match"),
    ("wrong class", lambda: make(lambda: NSKeyedUnarchiver.unarchivedObject(MPSCNNFullyConnected, archive())), MPSArchiveError, "holds a MPSCNNConvolution, not a MPSCNNFullyConnected"),
    ("wrong class through coder", lambda: make(lambda: MPSCNNNeuron(coder=NSKeyedUnarchiver(forReadingFrom=archive()))), MPSArchiveError, "cannot decode it as MPSCNNNeuron"),
    ("not an archive", lambda: make(lambda: NSKeyedUnarchiver(forReadingFrom=bytes(rng.integers(0, 256, 100, dtype=np.uint8)))), MPSArchiveError, "truncated|not valid|not an mpsconv"),
    ("archive a custom padding", lambda: make(lambda: archive(custom_padding_kernel())), MPSArchiveError, "cannot be archived"),
    # -- depthwise
    ("depthwise multiplier 2", lambda: make(dw(4, 8)), E, "channelMultiplier=2 is not supported"),
    ("depthwise channels not a multiple", lambda: make(dw(4, 6)), E, "multiple of inputFeatureChannels=4"),
    ("depthwise groups", lambda: make(dw(groups=2)), E, "a depthwise descriptor has groups 1"),
    ("depthwise weight count", lambda: make(dw(count=9 * 3)), E, "holds 27 elements; 36 are needed"),
    ("depthwise fully connected", lambda: make(lambda: MPSCNNFullyConnected(device=DEVICE, weights=ArraySource(MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4, outputFeatureChannels=4), np.ones(4)))), T, "plain MPSCNNConvolutionDescriptor"),
    # -- sub-pixel
    ("sub-pixel channels", lambda: make(sp(n=6)), E, "multiple of subPixelScaleFactor² = 4"),
    ("sub-pixel groups", lambda: make(sp(n=8, groups=2)), E, "must be a multiple of 4"),
    ("sub-pixel factor 0", lambda: make(set_attr(MPSCNNSubPixelConvolutionDescriptor(), "subPixelScaleFactor", 0)), E, "subPixelScaleFactor=0 must be >= 1"),
    ("sub-pixel destination channels", lambda: encode_case(subpixel_kernel(), blank(3, 3, 4, rng=rng), blank(6, 6, 3, rng=rng)), E, "needs 4"),
    ("sub-pixel destination offset", lambda: encode_case(subpixel_kernel(), blank(3, 3, 4, rng=rng), blank(6, 6, 8, rng=rng), destinationFeatureChannelOffset=6), E, "destinationFeatureChannelOffset=6"),
    # -- transpose
    ("transpose half data", lambda: make(lambda: tr(MPSDataType.float16, weights=np.ones(144, np.float16))), E, "float16 is not accepted"),
    ("transpose uint8 data", lambda: make(lambda: tr(MPSDataType.uInt8, weights=np.ones(144, np.uint8))), E, "uInt8 is not accepted"),
    ("transpose depthwise descriptor", lambda: make(lambda: tr(desc=MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=4, outputFeatureChannels=4), weights=np.ones(36))), T, "plain MPSCNNConvolutionDescriptor"),
    ("transpose device only", lambda: make(lambda: MPSCNNConvolutionTranspose(device=DEVICE)), T, "unavailable"),
    ("transpose kernel offset", lambda: make(set_attr(tr(), "kernelOffsetX", 1.5)), T, "kernelOffsetX=1.5 must be an integer"),
    ("transpose clamp edge", lambda: tr_case(edgeMode=MPSImageEdgeMode.clamp), E, "edgeMode=clamp is not defined"),
    ("transpose destination channels", lambda: (lambda k: encode_case(k, blank(3, 3, 4, rng=rng), blank(7, 7, 3, rng=rng)))(tr()), E, "needs 4"),
    ("transpose source channels", lambda: (lambda k: encode_case(k, blank(3, 3, 2, rng=rng), blank(7, 7, 4, rng=rng)))(tr()), E, "provides 2 feature channels"),
    ("transpose gradient state of another type", state_case, T, "must be an MPSCNNConvolutionGradientState"),
    ("transpose state of another window", lambda: foreign_window_state_case(), E, "the state path needs the same window"),
    ("transpose released temporary state", lambda: released_state_case(), MPSCommandBufferError, "released"),
    ("forward state of another kernel", lambda: other_kernel_state_case(), E, "made by another kernel"),
    ("forward state made before the offset changed", lambda: stale_state_case(), E, "changed after destinationState was made"),
    ("transpose archived as a convolution", lambda: make(lambda: NSKeyedUnarchiver.unarchivedObject(MPSCNNConvolution, archive(tr()))), MPSArchiveError, "not a MPSCNNConvolution"),
    # -- gradient
    ("gradient state of another type", lambda: gradient_case("state type"), T, "must be an MPSCNNConvolutionGradientState"),
    ("gradient image size", lambda: gradient_case("gradient size"), E, "the forward clip region.s 5x5"),
    ("gradient released state", lambda: gradient_case("released"), MPSCommandBufferError, "released"),
    ("gradient destination size", lambda: gradient_case("destination size"), E, "needs the forward source's size"),
    ("gradient of another shape", lambda: gradient_case("other shape"), E, "a convolution of another shape"),
    ("gradient batch lengths", lambda: gradient_case("batch lengths"), E, "must have the same length"),
    ("gradient state never filled", lambda: gradient_case("unfilled"), E, "was not filled by a forward encode"),
    ("gradient option", lambda: make(set_attr(MPSCNNConvolutionGradient(device=DEVICE, weights=ArraySource(descriptor(1, 1, 1, 1), [1.0])), "gradientOption", 0)), E, "gradientOption must be"),
    # -- binary
    ("binary groups", lambda: make(bn_conv(desc=descriptor(1, 1, 8, 8, groups=2), data=np.ones(8, np.uint32))), E, "groups=2; binary convolution has groups 1"),
    ("binary type", lambda: make(bn_conv(kind=3)), E, "type=3 is not an MPSCNNBinaryConvolutionType"),
    ("binary flags", lambda: make(bn_conv(flags=2)), E, "flags=2 is not an MPSCNNBinaryConvolutionFlags"),
    ("binary word count", lambda: make(bn_conv(data=np.ones(2, np.uint32))), E, "holds 2 elements; 4 are needed"),
    ("binary output terms", lambda: make(bn_conv(outputBiasTerms=[1.0])), E, "outputBiasTerms holds 1 elements; 2 are needed"),
    ("binary input terms", lambda: make(bn_conv(inputScaleTerms=np.ones(39))), E, "inputScaleTerms holds 39 elements; 40 are needed"),
    ("binary sub-pixel descriptor", lambda: make(bn_conv(desc=MPSCNNSubPixelConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=40, outputFeatureChannels=2))), T, "plain MPSCNNConvolutionDescriptor"),
    ("binary initializer keywords", lambda: make(lambda: MPSCNNBinaryConvolution(device=DEVICE, convolutionData=None, type=0)), T, "valid initializers are"),
    ("binary mirror edge", lambda: binary_case(MPSImageEdgeMode.mirror), E, "edgeMode=mirror is not defined"),
    ("binary fully connected stride", lambda: make(bn_conv(desc=descriptor(1, 1, 40, 2, strideInPixelsX=2), cls=MPSCNNBinaryFullyConnected)), E, "stride 1 and dilation 1"),
    ("binary fully connected window", lambda: binary_case(cls=MPSCNNBinaryFullyConnected, src_hw=(4, 3), dst_hw=(1, 1)), E, "must cover the whole source"),
]


@pytest.mark.parametrize("case, error, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_invalid_input(case, error, message):
    action, watched, cb = case()
    before = [values(img) for img in watched]
    recorded = None if cb is None else len(cb._work)
    with pytest.raises(error, match=message):
        action()
    if cb is not None and cb.status < MTLCommandBufferStatus.committed:
        assert len(cb._work) == recorded, "a refused call recorded work"
        cb.commit()
        cb.waitUntilCompleted()
    for img, prior in zip(watched, before):
        np.testing.assert_array_equal(values(img), prior)


def test_table_has_at_least_40_rows():
    assert len(ROWS) >= 40
