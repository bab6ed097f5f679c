"""The public surface under arbitrary input (issue 7, item 1).

A drawn scenario builds a descriptor, sets its fields, builds a kernel from weights (of any
length, type and content), sets the kernel's properties, makes images of any shape and format,
and encodes: each step with values that are mostly valid and often not. Every step either
succeeds or raises an ``MPSConvError`` whose message names what was wrong (the field, or the
class whose argument it was); never another exception. After a refused encode the destination is
bit for bit what it was and nothing is recorded; after a successful one the command buffer
completes and the destination matches the reference backend's (NaN where it has NaN).

CI draws a few hundred scenarios; tests/fuzz/ runs 20,000 or more.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, note, settings, strategies as st

from helpers import DEVICE, FMT, QUEUE, ArraySource
from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDescriptor, MPSCNNConvolutionTranspose, MPSCNNDepthWiseConvolutionDescriptor,
    MPSCNNFullyConnected, MPSCNNSubPixelConvolutionDescriptor, MPSConvError, MPSImage, MPSImageDescriptor,
    MPSNNDefaultPadding, MPSNNNeuronDescriptor, MPSOffset, MTLOrigin, MTLRegion, MTLSize, use_backend,
)
from mpsconv.tolerances import mismatches

# -- values: mostly valid, often not

small = st.integers(1, 5)
hostile_int = st.one_of(st.integers(-3, 0), st.sampled_from([2**31, 2**63 - 1, 10**20]), st.floats(allow_nan=True),
                        st.just("3"), st.none(), st.booleans(), st.just([1]))


def sometimes(valid, invalid=hostile_int, p=12):
    """``valid`` about ``p`` times in ``p + 1``, else ``invalid`` (shrinking toward valid)."""
    return st.sampled_from([True] * p + [False]).flatmap(lambda ok: valid if ok else invalid)


# Neuron parameters: no subnormals. The backends compute neurons in float32, the reference in float64
# (spec §5.1: "at least float32"); a·x underflows to 0 in float32 for a subnormal a, and power's
# fractional exponents turn that into any difference at all (docs/reliability.md, Numerics).
FLOATS = st.floats(-2, 2, width=32, allow_subnormal=False) | st.sampled_from([math.nan, math.inf, -math.inf, 0.0])
FORMATS = sometimes(st.sampled_from([FMT.float32, FMT.float16, FMT.bfloat16, FMT.unorm8, FMT.unorm16]),
                    st.sampled_from([0, 5, 6, 99, "float32", None]), p=10)


@st.composite
def weight_arrays(draw, count: int):
    """Weights for ``count`` values: right or wrong length, dtype, layout, content."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["ok"] * 12 + ["nan", "strided", "readonly", "list", "bytes", "tensor", "float64",
                                              "int"] * 2 + ["length", "0-d", "complex", "object", "str", "bool"]))
    n = count if kind != "length" else draw(st.sampled_from([0, 1, max(0, count - 1), count + 1, 2 * count]))
    values = rng.uniform(-1, 1, n).astype(np.float32)
    if kind == "nan":
        values[rng.integers(0, max(1, n), 3) % max(1, n)] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if kind == "strided":
        return np.repeat(values, 2)[::2]
    if kind == "readonly":
        values.setflags(write=False)
    if kind == "0-d":
        return np.array(values[0] if n else 1.0, np.float32)
    if kind == "list":
        return values.tolist()
    if kind == "bytes":
        return values.tobytes()
    if kind == "tensor":
        return torch.from_numpy(values)
    if kind == "float64":
        return values.astype(np.float64)
    if kind == "int":
        return rng.integers(-2, 3, n)
    if kind == "complex":
        return values.astype(np.complex64)
    if kind == "object":
        return np.array([None] * n, dtype=object)
    if kind == "str":
        return np.array(["1.0"] * n)
    if kind == "bool":
        return values > 0
    return values


@st.composite
def scenarios(draw):
    """A list of ``(step name, field, callable(state))`` making and encoding one kernel."""
    steps = []
    kind = draw(st.sampled_from(["plain", "plain", "depthwise", "subpixel"]))
    kw, kh, cin, cout, r = draw(small), draw(small), draw(st.integers(1, 9)), draw(st.integers(1, 9)), 1
    if kind == "depthwise":
        cout = cin
    if kind == "subpixel":
        r = draw(st.integers(1, 3))
        cout = r * r * draw(st.integers(1, 3))
    cls = {"plain": MPSCNNConvolutionDescriptor, "depthwise": MPSCNNDepthWiseConvolutionDescriptor,
           "subpixel": MPSCNNSubPixelConvolutionDescriptor}[kind]
    sizes = {name: draw(sometimes(st.just(value), p=40)) for name, value in (
        ("kernelWidth", kw), ("kernelHeight", kh), ("inputFeatureChannels", cin), ("outputFeatureChannels", cout))}
    steps.append(("descriptor", cls.__name__, lambda s: s.update(desc=cls(**sizes))))
    fields = {"strideInPixelsX": sometimes(small), "strideInPixelsY": sometimes(small),
              "dilationRateX": sometimes(st.integers(1, 3)), "dilationRateY": sometimes(st.integers(1, 3)),
              "groups": sometimes(st.sampled_from([1] * 6 + [2, 3, 4]))}
    if kind == "subpixel":
        fields["subPixelScaleFactor"] = sometimes(st.just(r))
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=3)):
        value = draw(fields[name])
        steps.append(("descriptor field", name, lambda s, n=name, v=value: setattr(s["desc"], n, v)))
    if draw(st.booleans()):
        neuron_type = draw(sometimes(st.integers(0, 15), st.sampled_from([16, 17, -1, "reLU", None])))
        a, b, c = draw(FLOATS), draw(FLOATS), draw(FLOATS)
        steps.append(("neuron", "MPSNNNeuronDescriptor", lambda s: s.update(
            neuron=MPSNNNeuronDescriptor.cnnNeuronDescriptor(neuron_type, a=a, b=b, c=c))))
        steps.append(("descriptor field", "fusedNeuronDescriptor",
                      lambda s: setattr(s["desc"], "fusedNeuronDescriptor", s["neuron"])))

    per_out = kh * kw * (1 if kind == "depthwise" else cin)
    weights = draw(weight_arrays(cout * per_out))
    bias = draw(st.one_of(st.none(), weight_arrays(cout)))
    kernel_cls = draw(sometimes(st.just(MPSCNNConvolution) if kind != "plain" else st.sampled_from(
        [MPSCNNConvolution] * 3 + [MPSCNNFullyConnected, MPSCNNConvolutionTranspose]),
        st.sampled_from([MPSCNNFullyConnected, MPSCNNConvolutionTranspose])))
    steps.append(("kernel", kernel_cls.__name__, lambda s: s.update(
        kernel=kernel_cls(device=DEVICE, weights=ArraySource(s["desc"], weights, bias)))))

    coord = sometimes(st.integers(-3, 6), st.sampled_from([2**31, -2**31 - 1, 2**62, math.nan, "1", None]), p=12)
    props = {
        "offset": st.builds(MPSOffset, coord, coord, sometimes(st.just(0), st.integers(-1, 2))),
        "clipRect": st.one_of(st.builds(lambda ox, oy, w, h: MTLRegion(MTLOrigin(ox, oy, 0), MTLSize(w, h, 1)),
                                        coord, coord, coord, coord),
                              st.sampled_from(["(0,0,0,1,1,1)", None])),
        "edgeMode": sometimes(st.sampled_from([0, 1]), st.sampled_from([2, -1, "zero", None])),
        "destinationFeatureChannelOffset": sometimes(st.sampled_from([0, 0, 4, 8]), st.sampled_from([1, 3, -4])),
        "sourceFeatureChannelOffset": sometimes(st.sampled_from([0, 0, 4]), st.sampled_from([1, 2, -4, 10**9])),
        "sourceFeatureChannelMaxCount": sometimes(st.sampled_from([2**64 - 1, 4, 8, 3]),
                                                  st.sampled_from([0, -1, "all"])),
        # a padding method: the policy is made in the step (a bad method is refused there)
        "padding": sometimes(st.sampled_from([0x10, 0x1C, 0x00, 0x14]), st.sampled_from([0x3, 0x8000, -1])),
    }
    for name in draw(st.lists(st.sampled_from(sorted(props)), unique=True, max_size=4)):
        value = draw(props[name])
        if name == "padding":
            steps.append(("padding policy", "MPSNNDefaultPadding", lambda s, v=value: setattr(
                s["kernel"], "padding", MPSNNDefaultPadding.padding(v))))
            continue
        steps.append(("kernel property", name, lambda s, n=name, v=value: setattr(s["kernel"], n, v)))

    def image_spec(channels):
        """Mostly one image of the kernel's channels; sometimes batches, other channel counts, and
        sizes no image can have."""
        images = sometimes(st.sampled_from([1, 1, 1, 2, 3]), st.sampled_from([-1, 0]))
        count = sometimes(st.sampled_from([channels] * 3 + list(range(1, 13))), st.sampled_from([0, -1, 2**40]))
        return st.tuples(images, st.integers(1, 9), st.integers(1, 9), count, FORMATS)

    src_spec = draw(image_spec(cin))
    dst_spec = draw(sometimes(image_spec(cout // (r * r) if kind == "subpixel" else cout), st.none(), p=3))
    # None: the allocating encode
    seed = draw(st.integers(0, 2**32 - 1))
    steps.append(("image", "sourceImage", lambda s: s.update(src=_image(src_spec, seed))))
    if dst_spec is not None:
        steps.append(("image", "destinationImage", lambda s: s.update(dst=_image(dst_spec, seed + 1))))
    steps.append(("encode", draw(st.sampled_from(["encode"] * 3 + ["encodeBatch"])), None))
    return steps


def _image(spec, seed):
    """An image of ``spec`` holding random values (some outside unorm's [0, 1]), written through
    ``torch()`` (float formats) or ``from_numpy`` (unorm)."""
    n, h, w, c, fmt = spec
    image = MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(
        channelFormat=fmt, width=w, height=h, featureChannels=c, numberOfImages=n))
    if n * h * w * c <= 1 << 16:
        values = torch.from_numpy(np.random.default_rng(seed).uniform(-1.5, 1.5, (n, h, w, c)))
        if image.featureChannelFormat in (FMT.float32, FMT.float16, FMT.bfloat16):
            image.torch()[...] = values.to(image.torch().dtype)
        else:
            image = MPSImage.from_numpy(values, featureChannelFormat=image.featureChannelFormat, device=DEVICE)
    return image


def _encode(state, backend, batch: bool):
    """Encode ``state``'s kernel with ``backend`` (a batch encodes the source twice, into the
    destination and a twin of it); returns (command buffer, destinations)."""
    kernel, src, dst = state["kernel"], state["src"], state.get("dst")
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        if dst is None:
            kernel.destinationImageAllocator = MPSImage.defaultAllocator()  # readable on the CPU
            if batch:
                return cb, kernel.encodeBatch(commandBuffer=cb, sourceImages=[src, src])
            return cb, [kernel.encode(commandBuffer=cb, sourceImage=src)]
        if batch:
            kernel.encodeBatch(commandBuffer=cb, sourceImages=[src, src], destinationImages=[dst, state["twin"]])
            return cb, [dst, state["twin"]]
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    return cb, [dst]


def _like(image, storage):
    """A new image of ``image``'s shape and format holding ``storage`` (None: never written)."""
    twin = MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(
        channelFormat=image.featureChannelFormat, width=image.width, height=image.height,
        featureChannels=image.featureChannels, numberOfImages=image.numberOfImages))
    if storage is not None:
        twin._ensure_storage().copy_(storage)
    return twin


def _named(exc: MPSConvError, field: str, owner: str) -> bool:
    text = str(exc)
    return field in text or owner in text


#: power, exponential, logarithm: c^(a·x) and (a·x)^c multiply the float32 rounding of x by up to
#: |c·ln(...)| (about 100 with parameters in [-2, 2]), beyond float32's tolerance row; their float32
#: results are held to float16's (1e-3 relative) instead.
ILL_CONDITIONED = {12, 13, 14}


def _describe(state) -> str:
    """What a mismatch report needs: the kernel's resolved parameters and the images."""
    k = state["kernel"]
    loaded = k._loaded
    return (f"{type(k).__name__} {loaded.descriptor}, neuron {loaded.neuron}, weights "
            f"{loaded.weights.reshape(-1)[:8]}, bias {loaded.bias[:4]}, offset {k.offset}, clip {k.clipRect}, "
            f"edge {k.edgeMode}, channel offsets {k.sourceFeatureChannelOffset}/{k.destinationFeatureChannelOffset}; "
            f"source {state['src']} {state['src'].numpy().reshape(-1)[:8]}, destination {state.get('dst')}")


def run_scenario(steps, backend="torch"):
    state = {}
    for step, field, action in steps:
        note(f"{step} {field}")
        if step == "encode":
            batch = field == "encodeBatch"
            break
        try:
            action(state)
        except MPSConvError as exc:
            owner = {"descriptor field": type(state.get("desc")).__name__, "image": "MPSImage",
                     "kernel property": type(state.get("kernel")).__name__}.get(step, field)
            assert _named(exc, field, owner), f"{step} {field}: the message does not name it: {exc}"
            return "refused at " + step
    else:
        raise AssertionError("no encode step")
    dst = state.get("dst")
    before = None if dst is None or dst._storage is None else dst._storage.clone()
    if dst is not None and batch:
        state["twin"] = _like(dst, before)
    watched = [image for image in (dst, state.get("twin")) if image is not None]
    kernel = state["kernel"]
    saved = (kernel.offset, kernel.edgeMode)
    try:
        cb, outs = _encode(state, backend, batch)
    except MPSConvError as exc:
        assert _named(exc, "encode", type(kernel).__name__), f"encode: {exc}"
        for image in watched:
            assert (image._storage is None if before is None else torch.equal(image._storage, before)), \
                "a refused encode changed (or allocated) a destination"
        return "refused at encode"
    except Exception as exc:
        raise AssertionError(f"encode raised {type(exc).__name__}: {exc}; {_describe(state)}") from exc
    try:
        cb.commit()
        cb.waitUntilCompleted()
    except Exception as exc:  # the encode accepted it: the work must not fail
        raise AssertionError(f"the work failed: {exc}; {_describe(state)}") from exc
    # the same encode on the reference backend, into destinations holding the same bits
    kernel.offset, kernel.edgeMode = saved  # an allocating encode sets offset; start from the same one
    if dst is not None:
        state["dst"] = _like(dst, before)
        state["twin"] = _like(dst, before)
    ref_cb, expected = _encode(state, "reference", batch)
    ref_cb.commit()
    ref_cb.waitUntilCompleted()
    for out, ref in zip(outs, expected):
        got, want = out.numpy().astype(np.float64), ref.numpy().astype(np.float64)
        fmt = FMT(out.featureChannelFormat).name
        if fmt == "float32" and kernel._loaded.neuron.type in ILL_CONDITIONED:
            fmt = "float16"
        bad = mismatches(got, want, fmt)
        assert not bad.any(), f"{int(bad.sum())} values differ from the reference ({fmt}); first at " \
                              f"{tuple(np.argwhere(bad)[0])}: {got[bad][0]} vs {want[bad][0]}; {_describe(state)}"
    return "encoded"


@settings(max_examples=max(300, settings.default.max_examples))  # the fuzz job's profile sets more
@given(scenarios())
def test_every_call_succeeds_and_matches_the_reference_or_raises_a_named_error(steps):
    run_scenario(steps)
