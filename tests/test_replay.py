"""The CPU replay engine (``backends.onnx``): a replayed command buffer through ONNX Runtime gives the
reference's numbers, keeps NaN and infinities exact by running the recorded work where they could
arise, and leaves alone what it cannot express."""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest
import torch

from helpers import DEVICE, QUEUE, ArraySource, blank, descriptor, image, values
from mpsconv import (
    MPSCNNConvolution, MPSCNNNeuronType, MPSDataType, MPSValueError, MPSImageDescriptor, MPSImageEdgeMode,
    MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MPSOffset, MPSTemporaryImage, MTLOrigin, MTLRegion, MTLSize,
    use_backend,
)
from mpsconv.backends import onnx as engine
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not engine.available(), reason="onnx / onnxruntime are not installed")
FLOAT32 = MPSImageFeatureChannelFormat.float32


@pytest.fixture(autouse=True)
def always_the_engine(monkeypatch):
    """The engine is kept only where it beats the recorded work on this machine; here it always is,
    so that these tests run it."""
    monkeypatch.setattr(engine.Replay, "faster", lambda self: True)


def _conv(rng, cin, cout, k=3, neuron=None, groups=1, **props):
    d = descriptor(k, k, cin, cout, groups=groups, **props)
    if neuron is not None:
        d.fusedNeuronDescriptor = neuron
    w = rng.uniform(-1, 1, (cout, k, k, cin // groups)).astype(np.float32)
    return MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, rng.uniform(-1, 1, cout).astype(np.float32)))


def _temporary(cb, w, h, c, reads):
    t = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=FLOAT32, width=w, height=h, featureChannels=c))
    t.readCount = reads
    return t


def _network(rng):
    """Five encodes: a strided, dilated and offset window through a temporary image, a grouped layer,
    two branches into channel slices of one image, a layer that reads that joined image."""
    relu6 = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLUN, a=0.0, b=0.75)  # clips often
    leaky = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLUN, a=0.2, b=0.5)
    first = _conv(rng, 3, 8, 3, relu6, strideInPixelsX=2, strideInPixelsY=2, dilationRateX=2)
    first.offset = MPSOffset(1, 0, 0)
    grouped = _conv(rng, 8, 8, 3, MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.1), groups=2)
    left, right = _conv(rng, 8, 4, 1), _conv(rng, 8, 4, 3, leaky)
    right.destinationFeatureChannelOffset = 4
    last = _conv(rng, 8, 5, 1)
    last.offset = MPSOffset(0, 0, 0)
    return first, grouped, left, right, last


def _encode(kernels, cb, src, temporary: bool):
    first, grouped, left, right, last = kernels
    if temporary:
        a, b = _temporary(cb, 6, 5, 8, 1), _temporary(cb, 6, 5, 8, 2)
        joined = _temporary(cb, 6, 5, 8, 1)
    else:
        a, b, joined = blank(6, 5, 8), blank(6, 5, 8), blank(6, 5, 8)
    out = blank(6, 5, 5, fill=0.5)
    first.encode(commandBuffer=cb, sourceImage=src, destinationImage=a)
    grouped.encode(commandBuffer=cb, sourceImage=a, destinationImage=b)
    left.encode(commandBuffer=cb, sourceImage=b, destinationImage=joined)
    right.encode(commandBuffer=cb, sourceImage=b, destinationImage=joined)
    last.encode(commandBuffer=cb, sourceImage=joined, destinationImage=out)
    return (out,) if temporary else (a, b, joined, out)


def _recorded(kernels, src, temporary: bool):
    """``(command buffer, images)``: ``_network``'s encodes made replayable, committed and completed."""
    cb = QUEUE.makeCommandBuffer()
    images = _encode(kernels, cb, src, temporary)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    return cb, images


def _reference(kernels, src, temporary):
    with use_backend("reference"):
        cb = QUEUE.makeCommandBuffer()
        images = _encode(kernels, cb, src, temporary)
        cb.commit()
        cb.waitUntilCompleted()
    return [values(i) for i in images]


def _recorded_network(seed: int, temporary: bool, backend: str | None = None):
    """``(rng, kernels, source, command buffer, images)``: ``_network`` made from ``seed`` with a random
    source, recorded (``_recorded``, on ``backend`` where one is given); ``rng`` goes on from there."""
    rng = np.random.default_rng(seed)
    kernels = _network(rng)
    src = image(rng.uniform(-1, 1, (9, 11, 3)))
    with use_backend(backend) if backend else contextlib.nullcontext():
        cb, images = _recorded(kernels, src, temporary)
    return rng, kernels, src, cb, images


@pytest.mark.parametrize("temporary", [False, True], ids=["images", "temporary images"])
def test_replays_through_the_engine_match_the_reference(temporary):
    rng, kernels, src, cb, images = _recorded_network(1, temporary, "torch")
    for round_ in range(2):  # new contents each time: the replay reads the source as it is then
        x = rng.uniform(-1, 1, (1, 9, 11, 3))
        src.torch().copy_(torch.from_numpy(x))
        for i in images:
            i.torch().fill_(float("nan"))  # every value must be written again
        cb.replay().waitUntilCompleted()
        assert isinstance(cb._cpu_replay, engine.Replay)
        for got, want in zip(images, _reference(kernels, src, temporary)):
            assert_close(values(got), want, "float32", f"round {round_}")


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf, 1e37], ids=["nan", "inf", "-inf", "huge"])
def test_values_that_could_make_nan_or_infinity_take_the_recorded_work(special):
    """ONNX Runtime's Relu and Clip map NaN to 0; the neuron formulas keep NaN and give NaN for
    0·(-inf). A source with a non-finite value, or one large enough that a layer could overflow,
    runs the recorded work: the results are the reference's, NaN and infinities where it has them."""
    _, kernels, src, cb, images = _recorded_network(2, False)
    storage = src.torch()
    storage[0, 4, 5, 1] = special
    cb.replay().waitUntilCompleted()
    replay = cb._cpu_replay
    assert isinstance(replay, engine.Replay) and not replay.ran_session
    for got, want in zip(images, _reference(kernels, src, False)):
        np.testing.assert_array_equal(np.isnan(values(got)), np.isnan(want))
        assert_close(values(got), want, "float32", f"source with {special}")


@pytest.mark.parametrize("lane", [5.0, math.nan], ids=["finite", "nan"])
def test_a_padding_lane_the_first_layer_does_not_read_changes_nothing(lane):
    """The session reads a 3-channel image's whole 4-lane storage with a zero weight for the fourth
    lane (no copy of the three): a finite value there (as a wrapped texture's fourth component may
    hold) adds exactly nothing, a NaN sends the replay to the recorded work; either way the reference's
    numbers."""
    _, kernels, src, cb, images = _recorded_network(8, True)
    src._ensure_storage()[..., 3] = lane
    cb.replay().waitUntilCompleted()
    assert cb._cpu_replay.ran_session == math.isfinite(lane)
    for got, want in zip(images, _reference(kernels, src, True)):
        assert np.isfinite(values(got)).all()
        assert_close(values(got), want, "float32", f"padding lane {lane}")


def _replayed(kernel, src, dst):
    cb = QUEUE.makeCommandBuffer()
    kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    cb.replay().waitUntilCompleted()
    return cb._cpu_replay


def test_what_the_engine_cannot_express_runs_as_recorded():
    rng = np.random.default_rng(3)
    src = image(rng.uniform(-1, 1, (6, 7, 4)))
    clamped = _conv(rng, 4, 4)
    clamped.edgeMode = MPSImageEdgeMode.clamp
    sigmoid = _conv(rng, 4, 4, neuron=MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.sigmoid))
    clipped = _conv(rng, 4, 4)
    clipped.clipRect = MTLRegion(MTLOrigin(1, 1, 0), MTLSize(3, 3, 1))
    half = _conv(rng, 4, 4)
    cases = [(clamped, src, blank(7, 6, 4)), (sigmoid, src, blank(7, 6, 4)), (clipped, src, blank(7, 6, 4)),
             (half, image(rng.uniform(-1, 1, (6, 7, 4)), MPSImageFeatureChannelFormat.float16),
              blank(7, 6, 4, fmt=MPSImageFeatureChannelFormat.float16))]
    for kernel, source, dst in cases:
        assert _replayed(kernel, source, dst) is False
        want = blank(7, 6, 4, fmt=dst.featureChannelFormat)
        with use_backend("reference"):
            cb = QUEUE.makeCommandBuffer()
            kernel.encode(commandBuffer=cb, sourceImage=source, destinationImage=want)
            cb.commit()
            cb.waitUntilCompleted()
        assert_close(values(dst), values(want), dst.featureChannelFormat.name, str(kernel))


def test_an_image_read_from_outside_and_written_runs_as_recorded():
    """Ping-pong: the second encode writes the first's source, which the session would read and
    write at once."""
    rng = np.random.default_rng(4)
    k = _conv(rng, 4, 4)
    a, b = image(rng.uniform(-1, 1, (5, 5, 4))), blank(5, 5, 4)
    cb = QUEUE.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=a, destinationImage=b)
    k.encode(commandBuffer=cb, sourceImage=b, destinationImage=a)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    cb.replay().waitUntilCompleted()
    assert cb._cpu_replay is False


def test_the_safety_bound_follows_the_layers():
    """A source of 1e3 through weights whose rows sum to 1e17 stays finite in float32 but could reach
    1e20 · 1e17 after two layers: the first replay runs the recorded work, the second, from a source of
    1e-30, the session."""
    d = descriptor(1, 1, 4, 4)
    big = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, np.full(16, 2.5e16, np.float32),
                                                               kernel_type=MPSDataType.float32))
    src, mid, out = image(np.full((2, 2, 4), 1e3)), blank(2, 2, 4), blank(2, 2, 4)
    cb = QUEUE.makeCommandBuffer()
    big.encode(commandBuffer=cb, sourceImage=src, destinationImage=mid)
    big.encode(commandBuffer=cb, sourceImage=mid, destinationImage=out)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    cb.replay().waitUntilCompleted()
    assert isinstance(cb._cpu_replay, engine.Replay) and not cb._cpu_replay.ran_session  # 1e3·1e17·1e17 > LIMIT
    src.torch().fill_(1e-30)
    cb.replay().waitUntilCompleted()
    assert cb._cpu_replay.ran_session
    np.testing.assert_allclose(values(out), np.full((1, 2, 2, 4), 1e-30 * 1e17 * 1e17), rtol=1e-5)


def _deep_chain(rng, layers: int, tail: tuple = ()):
    """``layers`` 1x1 ReLU layers through temporary images, weights ±1.5 (rows summing to 6: a bound
    of 6**48 ≈ 2e37 over 48 layers, while the values themselves stay far smaller), then layers whose
    weights are ±``tail``."""
    relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU)
    scales = [1.5] * layers + list(tail)
    kernels = []
    for scale in scales:
        d = descriptor(1, 1, 4, 4)
        d.fusedNeuronDescriptor = relu
        w = (scale * np.sign(rng.uniform(-1, 1, 16))).astype(np.float32)
        kernels.append(MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, w, rng.uniform(-1, 1, 4).astype(
            np.float32), kernel_type=MPSDataType.float32)))
    return kernels


def _chain_encode(kernels, cb, src, out):
    x = src
    for i, k in enumerate(kernels):
        y = out if i == len(kernels) - 1 else _temporary(cb, 5, 5, 4, 1)
        k.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
        x = y


def _chain_replay(kernels, src, backend: str = "reference"):
    """The chain replayed (through the engine where it can), and the same chain committed once with
    ``backend``: ``(replay, replayed values, backend's values)``."""
    out = blank(5, 5, 4)
    cb = QUEUE.makeCommandBuffer()
    _chain_encode(kernels, cb, src, out)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    out.torch().fill_(float("nan"))
    cb.replay().waitUntilCompleted()
    with use_backend(backend):
        want = blank(5, 5, 4)
        once = QUEUE.makeCommandBuffer()
        _chain_encode(kernels, once, src, want)
        once.commit()
        once.waitUntilCompleted()
    return cb._cpu_replay, values(out), values(want)


def test_checkpoints_let_deep_networks_through_the_session():
    """48 ReLU layers whose bound from the source alone passes LIMIT (as ResNet-50's does): the
    session reports images between them, the bound starts again from their values, and the replay
    runs in the session with the reference's numbers."""
    rng = np.random.default_rng(6)
    kernels = _deep_chain(rng, 48)
    replay, got, want = _chain_replay(kernels, image(rng.uniform(-1, 1, (5, 5, 4))))
    assert isinstance(replay, engine.Replay) and replay.ran_session and len(replay.checks) >= 2
    assert replay.checks[0][1] is None  # ReLU outputs: no negative value to report
    assert np.abs(want).max() > 1.0  # values of some size, not zeros
    assert_close(got, want, "float32", "48 layers")


def test_a_checkpoint_too_large_for_the_layers_after_it_runs_the_recorded_work():
    """The same chain and two layers of weights ±1e20: the values reported after the first (about
    1e20) could overflow in the second (they do: infinities, and NaN from 0·(-inf) where the float32
    sum overflowed), so the recorded work runs after the session and writes what it writes when
    committed without a replay, bit for bit."""
    rng = np.random.default_rng(7)
    kernels = _deep_chain(rng, 48, tail=(1e20, 1e20))
    replay, got, want = _chain_replay(kernels, image(rng.uniform(-1, 1, (5, 5, 4))), backend="torch")
    assert isinstance(replay, engine.Replay) and not replay.ran_session
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_array_equal(got, want)


def test_images_the_session_does_not_know_keep_their_contents():
    """Only what the command buffer writes changes; a blank image elsewhere stays as it was."""
    rng = np.random.default_rng(5)
    k = _conv(rng, 4, 4)
    src, dst, other = image(rng.uniform(-1, 1, (5, 5, 4))), blank(5, 5, 4), blank(5, 5, 4, fill=0.25)
    assert isinstance(_replayed(k, src, dst), engine.Replay)
    np.testing.assert_array_equal(values(other), np.full((1, 5, 5, 4), 0.25))


class _Clocked:
    """A stand-in for the session and the recorded work: each call takes ``seconds``, or ``disturbed``
    while the other ran less than ``spin_s`` ago (as PyTorch's threads spin after its work)."""

    def __init__(self, seconds: float, disturbed: float = 0.0, spin_s: float = 0.0):
        self.seconds, self.disturbed, self.spin_s = seconds, disturbed, spin_s
        self.other, self.ended = None, -math.inf

    def __call__(self, *args) -> None:
        near = self.other is not None and time.perf_counter() - self.other.ended < self.spin_s
        time.sleep(self.disturbed if near else self.seconds)
        self.ended = time.perf_counter()

    run_with_iobinding = __call__


@pytest.mark.parametrize("session_s, recorded_s, want", [(0.0005, 0.002, True), (0.002, 0.0005, False)])
def test_the_engine_is_kept_where_its_session_is_faster(monkeypatch, session_s, recorded_s, want):
    """``faster`` times each side after the other's threads have stopped spinning: a session slowed
    for 15 ms after the recorded work still wins where it is faster alone."""
    monkeypatch.undo()  # the real ``faster``, not the fixture's
    recorded = _Clocked(recorded_s)
    session = _Clocked(session_s, disturbed=0.003, spin_s=0.015)
    session.other = recorded
    replay = engine.Replay(session, None, [], [], [], [recorded])
    assert replay.faster() is want


def test_a_large_source_after_small_ones_still_takes_the_recorded_work():
    """The bound's answer for small sources is remembered (``Replay.within``); a larger source is
    judged again: 1e35 through rows summing to about 10 could pass LIMIT."""
    rng = np.random.default_rng(8)
    k = _conv(rng, 4, 4, 3)
    src, dst = image(rng.uniform(-1, 1, (5, 5, 4))), blank(5, 5, 4)
    cb = QUEUE.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.make_replayable()
    cb.commit()
    cb.waitUntilCompleted()
    for scale, session in ((1.0, True), (0.5, True), (1e35, False), (2.0, True)):
        src.torch().copy_(torch.from_numpy(rng.uniform(-1, 1, (1, 5, 5, 4)) * scale))
        dst.torch().fill_(float("nan"))
        cb.replay().waitUntilCompleted()
        assert isinstance(cb._cpu_replay, engine.Replay) and not cb._cpu_replay.checks
        assert cb._cpu_replay.ran_session is session, scale
        with use_backend("reference"):
            want = blank(5, 5, 4)
            once = QUEUE.makeCommandBuffer()
            k.encode(commandBuffer=once, sourceImage=src, destinationImage=want)
            once.commit()
            once.waitUntilCompleted()
        assert_close(values(dst) / scale, values(want) / scale, "float32", f"source scaled by {scale:g}")


@pytest.mark.parametrize("raw, stops", [(None, True), ("0", True), ("1", False), ("on", False)])
def test_the_engine_threads_stop_spinning_after_a_replay_unless_asked(monkeypatch, raw, stops):
    """``MPSCONV_REPLAY_SPIN``: by default the session's threads stop spinning when a replay returns
    (ONNX Runtime's ``session.force_spinning_stop``), so that PyTorch work after it has its cores;
    with 1 they keep spinning, as ONNX Runtime's own default has them. Either way the replay gives the
    reference's values; a value that is not a flag is refused at the first replay, which can be made
    again once it is fixed."""
    if raw is None:
        monkeypatch.delenv("MPSCONV_REPLAY_SPIN", raising=False)
    else:
        monkeypatch.setenv("MPSCONV_REPLAY_SPIN", raw)
    _, kernels, src, cb, images = _recorded_network(5, True, "torch")
    cb.replay().waitUntilCompleted()
    options = cb._cpu_replay.session.get_session_options()
    if stops:
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    else:
        with pytest.raises(RuntimeError, match="force_spinning_stop"):
            options.get_session_config_entry("session.force_spinning_stop")
    assert_close(values(images[0]), _reference(kernels, src, True)[0], "float32", raw)


def test_a_replay_spin_setting_that_is_not_a_flag_is_refused(monkeypatch):
    _, kernels, src, cb, images = _recorded_network(6, True, "torch")
    monkeypatch.setenv("MPSCONV_REPLAY_SPIN", "sometimes")
    with pytest.raises(MPSValueError, match="MPSCONV_REPLAY_SPIN='sometimes'"):
        cb.replay()
    assert cb._cpu_replay is None  # nothing compiled: the next replay tries again
    monkeypatch.setenv("MPSCONV_REPLAY_SPIN", "1")
    cb.replay().waitUntilCompleted()
    assert isinstance(cb._cpu_replay, engine.Replay)
    assert_close(values(images[0]), _reference(kernels, src, True)[0], "float32")
