"""Dispatch and command-buffer additions that need no GPU: the autotune cache file, backend choice,
and replayable command buffers (on the CPU a replay runs the recorded work again)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, ArraySource, blank, descriptor, image, run, values
from mpsconv import MPSCNNConvolution, MPSCommandBufferError, MTLCommandBufferStatus, use_backend
from mpsconv.backends import REGISTRY, choose, select, tuning, usable
from mpsconv.core.geometry import EdgeMode, NeuronSpec, resolve_forward
from tolerances import assert_close


def problem(**overrides):
    args = dict(owner="test", src_shape=(1, 6, 6, 4), dst_shape=(1, 6, 6, 4), offset=(1, 1, 0),
                clip=((0, 0, 0), (6, 6, 1)), kernel=(3, 3), stride=(1, 1), dilation=(1, 1), src_channel_offset=0,
                src_channel_max=1 << 62, dst_channel_offset=0, in_channels=4, out_channels=4, groups=1,
                edge=int(EdgeMode.zero), neuron=NeuronSpec())
    args.update(overrides)
    return resolve_forward(**args)


@pytest.mark.parametrize("text", ["{ not json", "[1, 2]", '{"a": 3}', ""])
def test_a_corrupt_cache_file_reads_as_empty(tmp_path, text):
    path = tmp_path / tuning.FILE_NAME
    path.write_text(text)
    assert tuning.load(path) == {}


def test_the_cache_is_written_whole_and_read_back(tmp_path):
    path = tmp_path / "sub" / tuning.FILE_NAME
    tuning._store(path, {"sig": "triton:64x64x32w4s4"})
    assert json.loads(path.read_text()) == {"sig": "triton:64x64x32w4s4"}
    assert tuning.load(path) == {"sig": "triton:64x64x32w4s4"}
    assert [p.name for p in path.parent.iterdir()] == [tuning.FILE_NAME]  # no temporary left behind


def test_an_unwritable_cache_directory_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write the autotune cache"):
        tuning._store(blocker / tuning.FILE_NAME, {"a": "b"})


def test_the_signature_separates_what_decides_speed_and_ignores_where_the_window_sits():
    base = tuning.signature(problem(), DEVICE)
    assert tuning.signature(problem(offset=(2, 2, 0)), DEVICE) == base
    assert tuning.signature(problem(formats=(3, 3)), DEVICE) != base
    assert tuning.signature(problem(kernel=(1, 1)), DEVICE) != base
    assert tuning.signature(problem(reduced_precision=True), DEVICE) != base
    assert tuning.signature(problem(float32_weights=True), DEVICE) != base


@pytest.mark.parametrize("kernel_type", ["float16", "float32"])
def test_the_tuner_times_weights_of_the_kernels_precision(monkeypatch, kernel_type):
    """float16 images with float32 kernel weights take float32 products, another speed: the choice for
    them must be timed on such weights, and a kernel's problem must say which it has."""
    from mpsconv import MPSDataType
    from mpsconv.metal import device_from_name

    rng = np.random.default_rng(3)
    source = ArraySource(descriptor(3, 3, 4, 4), rng.uniform(-1, 1, 144), rng.uniform(-1, 1, 4))
    source.kernelWeightsDataType = lambda: getattr(MPSDataType, kernel_type)
    k = MPSCNNConvolution(device=DEVICE, weights=source)
    p = k._problem(image(rng.uniform(-1, 1, (6, 6, 4))), blank(6, 6, 4), "test")
    assert p.float32_weights == (kernel_type == "float32")
    seen = []

    class Fake:
        name = "fake"
        plan = staticmethod(lambda problem, device, variant: variant)
        prepare = staticmethod(lambda weights, bias, prelu, device: seen.append(weights.array()))
        bind = staticmethod(lambda plan, src, dst: plan)
        run = staticmethod(lambda bound, prepared: None)
        variants = staticmethod(lambda problem: ["a", "b"])

    monkeypatch.setattr(tuning.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(tuning, "_streamed", lambda backend, bound, prepared, reps: 1.0)
    monkeypatch.setattr(tuning, "_capture", lambda *args: None)
    tuning.measure(p, device_from_name("cpu"), tuning._options([Fake()], p))
    exact = [np.array_equal(w.astype(np.float16).astype(np.float32), w) for w in seen]
    assert exact == [kernel_type == "float16"] * 2


def test_cpu_dispatch_never_times_and_never_picks_triton():
    from mpsconv.metal import device_from_name

    cpu, p = device_from_name("cpu"), problem()
    backend, plan = choose(p, cpu)
    assert backend is REGISTRY["torch"] and plan is not None
    assert select(p, cpu, gradient=True) is REGISTRY["torch"]
    assert usable(cpu)[:2] == ["reference", "torch"]


def test_tuning_holds_the_bound_encodes_of_the_finalists_only(monkeypatch):
    """Each bound encode owns its scratch (split-K workspace, packed image): timing a dozen options must
    not hold a dozen of them. Fake options with fixed times, the CUDA clocks replaced by those times."""
    import weakref

    from mpsconv.metal import device_from_name

    times = {f"v{i}": t for i, t in enumerate([5.0, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 6.0, 4.0, 0.5, 10.0, 2.5])}
    live, peak = set(), [0]

    class Bound:
        def __init__(self, variant):
            self.variant = variant
            live.add(variant)
            peak[0] = max(peak[0], len(live))
            weakref.finalize(self, live.discard, variant)

    class Fake:
        name = "fake"
        plan = staticmethod(lambda problem, device, variant: variant)
        prepare = staticmethod(lambda weights, bias, prelu, device: None)
        bind = staticmethod(lambda plan, src, dst: Bound(plan))
        run = staticmethod(lambda bound, prepared: None)

        @staticmethod
        def variants(problem):
            return list(times)

    monkeypatch.setattr(tuning.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(tuning, "_streamed", lambda backend, bound, prepared, reps: times[bound.variant])
    monkeypatch.setattr(tuning, "_capture", lambda *args: None)
    options = tuning._options([Fake()], problem())
    best = tuning.measure(problem(), device_from_name("cpu"), options, finalists=3)
    assert best[1] == "v9"
    assert peak[0] <= 4  # the finalists so far and the option being timed
    assert not live  # nothing outlives the choice


def test_a_forced_backend_without_gradients_is_refused_for_gradients():
    from mpsconv import MPSValueError

    with use_backend("triton"), pytest.raises(MPSValueError, match="gradient"):
        select(problem(), DEVICE, gradient=True)


def test_replay_runs_the_recorded_work_again_on_new_contents():
    rng = np.random.default_rng(0)
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(descriptor(3, 3, 4, 4), rng.uniform(-1, 1, 144),
                                                             rng.uniform(-1, 1, 4)))
    src, dst = image(rng.uniform(-1, 1, (6, 5, 4))), blank(5, 6, 4)
    cb = QUEUE.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.make_replayable()
    with pytest.raises(MPSCommandBufferError, match="not completed"):
        cb.replay()
    cb.commit()
    cb.waitUntilCompleted()
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        cb.make_replayable()
    new = rng.uniform(-1, 1, (1, 6, 5, 4)).astype(np.float32)
    src.writeBytes(new[0], dataLayout=0, imageIndex=0)
    again = cb.replay()
    again.waitUntilCompleted()
    assert again.status == MTLCommandBufferStatus.completed and again is not cb
    assert_close(values(dst), values(run(k, image(new), blank(5, 6, 4), "reference")), "float32", "replay")


def test_replay_needs_make_replayable():
    cb = QUEUE.makeCommandBuffer()
    cb.commit()
    cb.waitUntilCompleted()
    with pytest.raises(MPSCommandBufferError, match="make_replayable"):
        cb.replay()
