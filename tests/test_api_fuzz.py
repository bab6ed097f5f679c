"""Every property setter and a table of public calls under bad values: one coercion rule for the
whole API (integers are ``int``, NumPy integers or ``__index__`` objects; real numbers are
``numbers.Real``; bools are ``bool``), an ``MPSConvError`` naming the property, and the value kept."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

import mpsconv
from helpers import DEVICE, QUEUE, ArraySource, blank, descriptor, values
from mpsconv import (
    MPSCNNBinaryConvolution, MPSCNNBinaryConvolutionType, MPSCNNConvolution, MPSCNNConvolutionGradient,
    MPSCNNConvolutionTranspose, MPSCNNConvolutionTransposeGradient, MPSCNNConvolutionWeights,
    MPSCNNDepthWiseConvolutionDescriptor, MPSCNNFullyConnected, MPSCNNNeuron, MPSCNNNeuronGradient, MPSCNNNeuronType,
    MPSCNNSubPixelConvolutionDescriptor, MPSCommandBuffer, MPSConvError, MPSDataLayout, MPSImage, MPSImageDescriptor,
    MPSImageFeatureChannelFormat, MPSMemoryError, MPSNNDefaultPadding, MPSNNNeuronDescriptor, MPSNNPadding,
    MPSNNPaddingMethod, MPSState, MPSTemporaryImage, MTLTextureDescriptor,
)


def objects():
    """One of each public class with settable properties, fresh."""
    d = descriptor(3, 3, 4, 4)
    ds = ArraySource(d, np.ones(144))
    relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    cb = QUEUE.makeCommandBuffer()
    image_descriptor = MPSImageDescriptor(channelFormat=MPSImageFeatureChannelFormat.float32, width=3, height=3,
                                          featureChannels=4)
    return {
        "descriptor": descriptor(3, 3, 4, 4),
        "depthwise descriptor": MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3,
                                                                      inputFeatureChannels=4, outputFeatureChannels=4),
        "subpixel descriptor": MPSCNNSubPixelConvolutionDescriptor(kernelWidth=3, kernelHeight=3,
                                                                    inputFeatureChannels=4, outputFeatureChannels=16),
        "neuron descriptor": MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.tanH),
        "convolution": MPSCNNConvolution(device=DEVICE, weights=ds),
        "fully connected": MPSCNNFullyConnected(device=DEVICE, weights=ds),
        "transpose": MPSCNNConvolutionTranspose(device=DEVICE, weights=ds),
        "binary": MPSCNNBinaryConvolution(device=DEVICE, convolutionData=ArraySource(d, np.ones(144)), scaleValue=1.0,
                                          type=MPSCNNBinaryConvolutionType.xnor, flags=0),
        "neuron": MPSCNNNeuron(device=DEVICE, neuronDescriptor=relu),
        "gradient": MPSCNNConvolutionGradient(device=DEVICE, weights=ds),
        "transpose gradient": MPSCNNConvolutionTransposeGradient(device=DEVICE, weights=ds),
        "neuron gradient": MPSCNNNeuronGradient(device=DEVICE, neuronDescriptor=relu),
        "image descriptor": image_descriptor,
        "image": blank(3, 3, 4),
        "temporary image": MPSTemporaryImage(commandBuffer=cb, imageDescriptor=image_descriptor),
        "state": MPSState(device=DEVICE, bufferSize=16),
        "temporary state": MPSState.temporaryState(commandBuffer=cb, bufferSize=16),
        "mps command buffer": MPSCommandBuffer(QUEUE),
        "weights": MPSCNNConvolutionWeights(d, np.ones((4, 3, 3, 4), np.float32), np.zeros(4, np.float32)),
    }


def setters(obj):
    for name in sorted(dir(type(obj))):
        if name.startswith("_"):
            continue
        attribute = next((vars(k)[name] for k in type(obj).__mro__ if name in vars(k)), None)
        if isinstance(attribute, property) and attribute.fset is not None:
            yield name


#: Values no numeric, enum, option-set, flag or array property takes.
NOT_NUMBERS = ["3", b"1", 1.5, math.nan, math.inf, [1], (1, 2), complex(1, 1), np.float32(1.0), object()]
#: Integers beyond Swift's Int.
OUT_OF_RANGE = [2**70, -(2**70)]
#: Properties that take any object (Swift protocol types, strings) or None by design.
ANY_OBJECT = {"label", "predicate", "heapProvider"}
NONE_ALLOWED = {"label", "predicate", "heapProvider", "neuron", "bias_array"}
BOOLEANS = {"serializeWeightsAndBiases"}
#: Float properties: every real number is a value (NaN and the infinities too).
FLOATS = {"a", "b", "c"}
NOT_REAL = ["3", b"1", [1], (1, 2), complex(1, 1), object()]


def _snapshot(obj, name):
    try:  # (addresses left out: a property may hand out a new view object each time)
        return re.sub(r" at 0x[0-9a-f]+", "", repr(getattr(obj, name)))
    except Exception as exc:  # noqa: BLE001 - a getter that raises is compared by its class
        return f"<{type(exc).__name__}>"


def _cases():
    for label, obj in objects().items():
        for name in setters(obj):
            yield pytest.param(label, name, id=f"{label}.{name}")


@pytest.mark.parametrize("label, name", list(_cases()))
def test_every_property_setter_refuses_what_it_cannot_hold_and_keeps_its_value(label, name):
    obj = objects()[label]
    if name in ANY_OBJECT:
        return
    bad = (NOT_REAL if name in FLOATS else NOT_NUMBERS + OUT_OF_RANGE) + ([] if name in NONE_ALLOWED else [None]) \
        + ([] if name in BOOLEANS else [True])
    for value in bad:
        before = _snapshot(obj, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                setattr(obj, name, value)
            except MPSConvError as exc:
                assert name in str(exc) or "sourceFeatureChannel" in str(exc), (value, str(exc))
                assert _snapshot(obj, name) == before, (value, "changed by a refused set")
                continue
        pytest.fail(f"{label}.{name} = {value!r} was accepted (now {_snapshot(obj, name)})")


class _Padding(MPSNNPadding):
    def __init__(self, method):
        self.method = method

    def paddingMethod(self):
        return self.method


def _encode_with_padding(method):
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 4, 4), np.ones(144)))
    kernel.padding = _Padding(method)
    return kernel.encode(commandBuffer=QUEUE.makeCommandBuffer(), sourceImage=blank(5, 5, 4))


def _texture(**fields):
    t = MTLTextureDescriptor()
    for name, value in fields.items():
        setattr(t, name, value)
    return DEVICE.makeTexture(descriptor=t)


def _image():
    return blank(2, 2, 4)


CALLS = [  # (what, call, error class, words the message has)
    ("a padding policy's method that is a string", lambda: _encode_with_padding("x"), MPSConvError, "paddingMethod"),
    ("a padding policy's method that is None", lambda: _encode_with_padding(None), MPSConvError, "paddingMethod"),
    ("readBytes with a string layout", lambda: _image().readBytes(bytearray(64), dataLayout="hwc", imageIndex=0),
     MPSConvError, "dataLayout"),
    ("writeBytes with a float image index", lambda: _image().writeBytes(
        np.zeros(16, np.float32), dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0.0),
     MPSConvError, "imageIndex"),
    ("setPurgeableState(99)", lambda: _image().setPurgeableState(99), MPSConvError, "MPSPurgeableState"),
    ("MPSState with a string size", lambda: MPSState(device=DEVICE, bufferSize="x"), MPSConvError, "bufferSize"),
    ("MPSState with a string resource", lambda: MPSState(resource="buf"), MPSConvError, "resource"),
    ("makeTexture of width -1", lambda: _texture(width=-1), MPSConvError, "width"),
    ("makeTexture of width 0", lambda: _texture(width=0), MPSConvError, "width"),
    ("makeTexture of 2**20 x 2**20", lambda: _texture(width=2**20, height=2**20), MPSMemoryError, "needs"),
    ("torch_output_size with stride 0", lambda: mpsconv.torch_output_size(5, 3, stride=0), MPSConvError, "stride"),
    ("use_backend('bogus')", lambda: mpsconv.use_backend("bogus"), MPSConvError, "bogus"),
    ("use_memory_limit(0)", lambda: mpsconv.use_memory_limit(0), MPSConvError, "nbytes"),
    ("makeBuffer(length=10**13)", lambda: DEVICE.makeBuffer(length=10**13), MPSMemoryError, "makeBuffer"),
    ("from_numpy of a 149 GiB broadcast", lambda: MPSImage.from_numpy(np.broadcast_to(np.float32(0), (
        100000, 100000, 4)), device=DEVICE), MPSMemoryError, "from_numpy"),
    ("from_numpy of strings", lambda: MPSImage.from_numpy(np.full((2, 2, 1), "a")), MPSConvError, "dtype"),
    ("makeCommandQueue with a string count", lambda: DEVICE.makeCommandQueue(maxCommandBufferCount="x"),
     MPSConvError, "maxCommandBufferCount"),
    ("MTLRegionMake2D of a string", lambda: mpsconv.MTLRegionMake2D("a", 0, 1, 1), MPSConvError, "MTLRegionMake2D"),
    ("MPSImageBatchIncrementReadCount by a string", lambda: mpsconv.MPSImageBatchIncrementReadCount(
        [_image()], "x"), MPSConvError, "amount"),
    ("cnnNeuronDescriptor with a string parameter", lambda: MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        MPSCNNNeuronType.reLU, a="x"), MPSConvError, "a="),
    ("a descriptor's batch norm with a string epsilon", lambda: descriptor(1, 1, 4, 4)
     .setBatchNormalizationParametersForInferenceWithMean([0] * 4, variance=[1] * 4, gamma=[1] * 4, beta=[0] * 4,
                                                          epsilon="x"), MPSConvError, "epsilon"),
    ("addScheduledHandler(None)", lambda: QUEUE.makeCommandBuffer().addScheduledHandler(None), MPSConvError,
     "callable"),
    ("MPSCNNConvolutionWeights of complex numbers", lambda: MPSCNNConvolutionWeights(
        descriptor(1, 1, 1, 1), np.array([1j])), MPSConvError, "real numbers"),
    ("sourceRegion of a string", lambda: MPSCNNConvolution(device=DEVICE, weights=ArraySource(
        descriptor(3, 3, 4, 4), np.ones(144))).sourceRegion("abc"), MPSConvError, "destinationSize"),
    ("a padding method of the wrong kind", lambda: MPSNNDefaultPadding.padding(1.5), MPSConvError, "method"),
    ("a padding method that is a string", lambda: MPSNNDefaultPadding.padding(str(int(MPSNNPaddingMethod.sizeSame))),
     MPSConvError, "method"),
]


@pytest.mark.parametrize("what, call, error, words", CALLS, ids=[c[0] for c in CALLS])
def test_bad_arguments_raise_the_library_error_that_names_them(what, call, error, words):
    with pytest.raises(error) as caught:
        call()
    assert words in str(caught.value)


# -- nothing half-written, nothing changed by a refusal, valid sparse work runs


def test_a_refused_state_driven_transpose_batch_writes_no_element():
    rng = np.random.default_rng(0)
    d = descriptor(3, 3, 4, 4)
    conv = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 144)))
    transpose = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 144)))
    transpose.kernelOffsetX = 3
    cb = QUEUE.makeCommandBuffer()
    sources = [blank(5, 5, 4, rng=rng) for _ in range(2)]
    states = conv.resultStateBatch(sourceImage=sources)
    outs = [blank(5, 5, 4) for _ in range(2)]
    conv.encodeBatch(commandBuffer=cb, sourceImages=sources, destinationImages=outs, destinationStates=states)
    destinations = [blank(5, 5, 4, fill=7.0), blank(5, 5, 1, fill=7.0)]  # the second has too few channels
    with pytest.raises(MPSConvError, match="feature channels"):
        transpose.encodeBatch(commandBuffer=cb, sourceImages=outs, convolutionGradientStates=states,
                              destinationImages=destinations)
    assert transpose.kernelOffsetX == 3
    cb.commit()
    cb.waitUntilCompleted()
    assert (values(destinations[0]) == 7.0).all()


class _WrongSize(mpsconv.MPSImageAllocator):
    def image(self, commandBuffer, imageDescriptor, kernel=None):
        return blank(1, 1, 1)


def test_a_refused_allocating_encode_leaves_the_placement_its_policy_set():
    transpose = MPSCNNConvolutionTranspose(device=DEVICE, weights=ArraySource(descriptor(3, 3, 4, 4), np.ones(144)))
    transpose.kernelOffsetX, transpose.offset = 5, mpsconv.MPSOffset(1, 2, 0)
    transpose.destinationImageAllocator = _WrongSize()
    with pytest.raises(MPSConvError, match="feature channels"):
        transpose.encode(commandBuffer=QUEUE.makeCommandBuffer(), sourceImage=blank(5, 5, 4))
    assert (transpose.kernelOffsetX, transpose.kernelOffsetY, transpose.offset) == (5, 0, mpsconv.MPSOffset(1, 2, 0))


@pytest.mark.parametrize("stride, dilation", [(10**6, 1), (1, 10**6), (2**31 - 1, 2**31 - 1)])
def test_windows_far_apart_run_in_the_memory_their_taps_need(stride, dilation):
    """A huge stride or dilation on a 4x4 image: most taps read the zero edge, and the encode runs
    (it once was refused for the scratch the span of the window would take); against the definition,
    tap by tap, in Python integers."""
    rng = np.random.default_rng(1)
    w, b = rng.uniform(-1, 1, (4, 3, 3, 4)), rng.uniform(-1, 1, 4)
    d = descriptor(3, 3, 4, 4, strideInPixelsX=stride, strideInPixelsY=stride, dilationRateX=dilation,
                   dilationRateY=dilation)
    kernel = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, b, kernel_type=mpsconv.MPSDataType.float32))
    src, dst = blank(4, 4, 4, rng=rng), blank(4, 4, 4)
    cb = QUEUE.makeCommandBuffer()
    kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    x = values(src)[0]
    want = np.empty((4, 4, 4))
    for v in range(4):
        for u in range(4):  # offset 0: the centre tap of output (u, v) reads (u·stride, v·stride)
            want[v, u] = b
            for q in range(3):
                for p in range(3):
                    y, xx = v * stride + (q - 1) * dilation, u * stride + (p - 1) * dilation
                    if 0 <= y < 4 and 0 <= xx < 4:
                        want[v, u] += w[:, q, p, :] @ x[y, xx]
    np.testing.assert_allclose(values(dst)[0], want, rtol=1e-5, atol=1e-5)


# -- every public callable, each parameter in turn given each bad value

#: Calls that would block or run work: their arguments are covered by the encode and command
#: buffer tests.
BLOCKING = {"waitUntilCompleted", "waitUntilScheduled", "commit", "replay", "enqueue", "commitAndContinue"}
BAD_ARGUMENTS = [None, "x", b"1", 1.5, math.nan, -1, 0, True, 2**70, [1], object()]


def _public_callables():
    for label, obj in objects().items():
        for name in dir(obj):
            if name.startswith("_") or name in BLOCKING:
                continue
            try:
                attribute = getattr(obj, name)
            except Exception:  # noqa: BLE001 - a property that refuses to be read here is not a callable
                continue
            if callable(attribute) and not isinstance(attribute, type):
                yield f"{label}.{name}", attribute
    for name in mpsconv.__all__:
        value = getattr(mpsconv, name)
        if not callable(value) or (isinstance(value, type) and issubclass(value, (BaseException, int))):
            continue
        yield name, value


def _calls(target):
    """``(args, kwargs)``: each parameter in turn given each bad value, the others their defaults
    (None where they have none); a class's keyword overloads get the bad value alone."""
    import inspect

    try:
        parameters = [p for p in inspect.signature(target).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return
    for p in parameters:
        for value in BAD_ARGUMENTS:
            if isinstance(target, type):
                yield ([value], {}) if p.kind == p.POSITIONAL_ONLY else ([], {p.name: value})
                continue
            args, kwargs = [], {}
            for q in parameters:
                given = value if q is p else (None if q.default is inspect.Parameter.empty else q.default)
                if isinstance(given, mpsconv._api._Overload):
                    given = None
                (args.append(given) if q.kind == q.POSITIONAL_ONLY else kwargs.__setitem__(q.name, given))
            yield args, kwargs


def test_every_public_callable_answers_bad_arguments_with_a_library_error():
    """No bare ``TypeError``, ``AttributeError``, ``ValueError`` ... from inside the library: a call
    either works or raises an ``MPSConvError`` (Python's own complaint about the call's shape, raised
    before the library runs, is not the library's)."""
    bare = []
    for where, target in _public_callables():
        for args, kwargs in _calls(target):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    target(*args, **kwargs)
                except MPSConvError:
                    pass
                except TypeError as exc:
                    if exc.__traceback__.tb_next is not None:  # raised inside the library
                        bare.append(f"{where}{args}{kwargs}: TypeError: {exc}")
                except Exception as exc:  # noqa: BLE001 - what the test looks for
                    bare.append(f"{where}{args}{kwargs}: {type(exc).__name__}: {exc}")
    assert not bare, f"{len(bare)} bare exceptions, e.g.\n" + "\n".join(bare[:10])


# -- drawn: several parameters bad at once, and nothing changed by a refusal

from hypothesis import given, settings, strategies as st  # noqa: E402

_TARGETS = None


def _targets():
    global _TARGETS
    if _TARGETS is None:
        _TARGETS = [(where, target) for where, target in _public_callables()]
    return _TARGETS


VALUES = st.sampled_from(BAD_ARGUMENTS + [1, 2, 4, 16, -(2**63), 2**63 - 1, (0, 0, 0), ((0, 0, 0), (1, 1, 1)),
                                          np.int64(3), np.float32(0.5), "float32", [None], []])


def _snapshot_properties(obj):
    shown = {}
    for name in dir(type(obj)):
        attribute = next((vars(k)[name] for k in type(obj).__mro__ if name in vars(k)), None)
        if not name.startswith("_") and isinstance(attribute, property):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shown[name] = _snapshot(obj, name)
    return shown


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_drawn_calls_raise_library_errors_and_a_refusal_changes_nothing(data):
    import inspect

    where, target = data.draw(st.sampled_from(_targets()), label="callable")
    try:
        parameters = [p for p in inspect.signature(target).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return
    args, kwargs = [], {}
    for p in parameters:
        if isinstance(target, type) and p.kind != p.POSITIONAL_ONLY and not data.draw(st.booleans()):
            continue
        value = data.draw(VALUES, label=p.name)
        (args.append(value) if p.kind == p.POSITIONAL_ONLY else kwargs.__setitem__(p.name, value))
    owner = getattr(target, "__self__", None)
    before = _snapshot_properties(owner) if owner is not None and not isinstance(owner, type) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            target(*args, **kwargs)
        except MPSConvError:
            if before is not None:
                assert _snapshot_properties(owner) == before, f"{where} changed its object while refusing"
        except TypeError as exc:
            assert exc.__traceback__.tb_next is None, f"{where}{args}{kwargs}: TypeError: {exc}"
