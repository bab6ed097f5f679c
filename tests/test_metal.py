"""kernel-image.md checklist: command buffers and threading (109–118), buffers and devices."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import DEVICE, QUEUE, blank, conv, image, run, values
from mpsconv import *


def encode_box(cb, dst, src=None):
    conv().encode(commandBuffer=cb, sourceImage=src or image(np.ones((3, 3, 1))), destinationImage=dst)


def test_ki_checklist_109_status():
    assert [int(MTLCommandBufferStatus[n]) for n in ("notEnqueued", "enqueued", "committed", "scheduled", "completed",
                                                     "error")] == [0, 1, 2, 3, 4, 5]
    cb = QUEUE.makeCommandBuffer()
    assert cb.status == MTLCommandBufferStatus.notEnqueued
    cb.commit()
    cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.completed and cb.error is None


def test_ki_checklist_110_encode_after_commit_and_double_commit():
    cb = QUEUE.makeCommandBuffer()
    cb.commit()
    dst = blank(3, 3, 1, fill=2)
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        encode_box(cb, dst)
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        cb.commit()
    with pytest.raises(MPSCommandBufferError):
        MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor())
    assert (values(dst) == 2).all()


def test_ki_checklist_111_completed_handler():
    cb = QUEUE.makeCommandBuffer()
    dst = blank(3, 3, 1)
    encode_box(cb, dst)
    seen = []
    caller = threading.get_ident()
    cb.addCompletedHandler(lambda b: seen.append((b.status, values(dst)[0, 1, 1, 0], threading.get_ident())))
    cb.commit()
    cb.waitUntilCompleted()
    assert len(seen) == 1 and seen[0][:2] == (MTLCommandBufferStatus.completed, 9) and seen[0][2] != caller
    with pytest.raises(MPSCommandBufferError):
        cb.addCompletedHandler(lambda b: None)


def test_ki_checklist_114_queue_order():
    a, b = QUEUE.makeCommandBuffer(), QUEUE.makeCommandBuffer()
    mid, out = blank(3, 3, 1), blank(3, 3, 1)
    encode_box(a, mid)
    encode_box(b, out, src=mid)  # B reads A's result
    order = []
    a.addCompletedHandler(lambda _: order.append("A"))
    b.addCompletedHandler(lambda _: order.append("B"))
    a.enqueue()
    b.enqueue()
    b.commit()  # B waits for A, committed later
    assert b.status == MTLCommandBufferStatus.committed
    a.commit()
    b.waitUntilCompleted()
    a.waitUntilCompleted()
    assert order == ["A", "B"] and values(out)[0, 1, 1, 0] == 49  # box sum of [4 6 4; 6 9 6; 4 6 4]


def test_ki_checklist_115_open_compute_encoder():
    cb = QUEUE.makeCommandBuffer()
    encoder = cb.computeCommandEncoder()
    with pytest.raises(MPSCommandBufferError, match="endEncoding"):
        encode_box(cb, blank(3, 3, 1))
    encoder.endEncoding()
    encode_box(cb, blank(3, 3, 1))
    cb.commit()


def test_ki_checklist_116_threads_with_kernel_copies():
    rng = np.random.default_rng(116)
    k = conv(weights=rng.uniform(-1, 1, 9))
    sources = [image(rng.uniform(-1, 1, (6, 6, 1))) for _ in range(8)]
    expected = [values(run(k, s, blank(6, 6, 1))) for s in sources]
    results = [None] * 8

    def work(i):
        mine = k.copy()
        cb = QUEUE.makeCommandBuffer()
        dst = blank(6, 6, 1)
        mine.encode(commandBuffer=cb, sourceImage=sources[i], destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()
        results[i] = values(dst)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_ki_checklist_117_supports_device():
    assert MPSSupportsMTLDevice(None) is False and MPSSupportsMTLDevice(MTLCreateSystemDefaultDevice()) is True
    assert MPSGetPreferredDevice() is MTLCreateSystemDefaultDevice()
    assert MTLCopyAllDevices()[-1].torch_device.type == "cpu"


def test_ki_checklist_113_properties_captured_at_encode():
    k = conv()
    dst = blank(3, 3, 1)
    cb = QUEUE.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=image(np.ones((3, 3, 1))), destinationImage=dst)
    k.offset = MPSOffset(5, 5, 0)
    cb.commit()
    cb.waitUntilCompleted()
    assert values(dst)[0, 1, 1, 0] == 9


def test_wait_before_commit_raises():
    with pytest.raises(MPSCommandBufferError, match="commit"):
        QUEUE.makeCommandBuffer().waitUntilCompleted()


def test_failed_work_lands_in_status_and_error():
    cb = QUEUE.makeCommandBuffer()

    def boom():
        raise RuntimeError("device fault")

    cb._record(boom)
    seen = []
    cb.addCompletedHandler(lambda b: seen.append(b.status))
    cb.commit()
    with pytest.raises(MPSCommandBufferError, match="device fault"):
        cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.error and cb.error.code == MTLCommandBufferError.internal
    assert cb.error.domain == MTLCommandBufferErrorDomain and seen == [MTLCommandBufferStatus.error]


def test_buffers():
    buf = DEVICE.makeBuffer(length=16, options=MTLResourceOptions.storageModeShared)
    assert buf.length == 16 and (buf.contents() == 0).all()
    buf.contents()[:4] = [1, 2, 3, 4]
    copy = DEVICE.makeBuffer(bytes=buf.contents(), length=8)
    assert copy.contents()[:4].tolist() == [1, 2, 3, 4]
    backing = np.zeros(8, np.float32)
    shared = DEVICE.makeBuffer(bytesNoCopy=backing, length=32)
    shared.contents()[:4] = np.frombuffer(np.float32(2.5).tobytes(), np.uint8)
    assert backing[0] == 2.5
    with pytest.raises(MPSValueError, match="length=0"):
        DEVICE.makeBuffer(length=0)
    private = DEVICE.makeBuffer(length=4, options=MTLResourceOptions.storageModePrivate)
    with pytest.raises(MPSValueError, match="private"):
        private.contents()
    img = image(np.arange(4.0).reshape(1, 4, 1))
    img.readBytes(buf, dataLayout=0, imageIndex=0)
    assert np.frombuffer(buf.contents().tobytes(), np.float32).tolist() == [0, 1, 2, 3]


def test_device_override(monkeypatch):
    monkeypatch.setenv("MPSCONV_DEVICE", "cpu")
    assert MTLCreateSystemDefaultDevice().torch_device.type == "cpu"
    monkeypatch.setenv("MPSCONV_DEVICE", "cuda:7")
    with pytest.raises(MPSDeviceError, match="not usable"):
        MTLCreateSystemDefaultDevice()
    monkeypatch.setenv("MPSCONV_DEVICE", "tpu")
    with pytest.raises(MPSDeviceError, match="not cpu, cuda or cuda:N"):
        MTLCreateSystemDefaultDevice()


def test_backend_override(monkeypatch):
    monkeypatch.setenv("MPSCONV_BACKEND", "nope")
    with pytest.raises(ValueError, match="MPSCONV_BACKEND='nope' is not a backend"):
        run(conv(), image(np.ones((3, 3, 1))), blank(3, 3, 1))
    monkeypatch.setenv("MPSCONV_BACKEND", "reference")
    calls = []
    from mpsconv.backends import reference

    monkeypatch.setattr(reference.BACKEND, "run", lambda *a: calls.append(a))
    run(conv(), image(np.ones((3, 3, 1))), blank(3, 3, 1))
    assert len(calls) == 1


def test_backend_override_is_read_by_every_encode(monkeypatch):
    """A repeated encode of the same kernel and images (the steady state) still follows a change of
    ``MPSCONV_BACKEND`` made through ``os.environ`` in between."""
    k, src, dst = conv(), image(np.ones((3, 3, 1))), blank(3, 3, 1)
    monkeypatch.setenv("MPSCONV_BACKEND", "torch")
    run(k, src, dst)
    from mpsconv.backends import reference

    calls = []
    monkeypatch.setattr(reference.BACKEND, "run", lambda *a: calls.append(a))
    monkeypatch.setenv("MPSCONV_BACKEND", "reference")
    run(k, src, dst)
    run(k, src, dst)
    monkeypatch.setenv("MPSCONV_BACKEND", "torch")
    run(k, src, dst)
    assert len(calls) == 2


def test_ki_checklist_112_results_correct_after_completion():
    rng = np.random.default_rng(112)
    src = image(rng.uniform(-1, 1, (6, 6, 1)))
    k = conv(weights=rng.uniform(-1, 1, 9))
    expected = values(run(k, src, blank(6, 6, 1), "reference"))
    dst = blank(6, 6, 1, fill=3)
    cb = QUEUE.makeCommandBuffer()
    k.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    np.testing.assert_allclose(values(dst), expected, rtol=1e-5, atol=1e-6)


def test_ki_checklist_118_other_device_raises():
    from mpsconv.metal import MTLDevice

    other = MTLDevice._make("cpu")  # a second device object (users cannot make one)
    k = conv()
    foreign_cb = other.makeCommandQueue().makeCommandBuffer()
    with pytest.raises(MPSDeviceError, match="the command buffer is on"):
        k.encode(commandBuffer=foreign_cb, sourceImage=blank(3, 3, 1), destinationImage=blank(3, 3, 1))
    foreign_image = MPSImage(device=other, imageDescriptor=MPSImageDescriptor(
        channelFormat=MPSImageFeatureChannelFormat.float32, width=3, height=3, featureChannels=1))
    with pytest.raises(MPSDeviceError, match="the kernel is on"):
        k.encode(commandBuffer=QUEUE.makeCommandBuffer(), sourceImage=foreign_image, destinationImage=blank(3, 3, 1))


def _threads_during_work() -> int:
    seen = []
    cb = DEVICE.makeCommandQueue().makeCommandBuffer()
    cb._record(lambda: seen.append(torch.get_num_threads()))
    cb.commit()
    cb.waitUntilCompleted()
    return seen[0]


def test_the_cpu_thread_count_follows_mpsconv_num_threads_and_comes_back(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("MPSCONV_NUM_THREADS", "1")
    assert _threads_during_work() == 1 and torch.get_num_threads() == before
    monkeypatch.setenv("MPSCONV_NUM_THREADS", "lots")
    with pytest.raises(MPSCommandBufferError, match="MPSCONV_NUM_THREADS='lots' is not a thread count"):
        _threads_during_work()
    assert torch.get_num_threads() == before


def test_auto_threads_leave_the_cores_other_processes_use(monkeypatch):
    from mpsconv import config

    monkeypatch.delenv("MPSCONV_NUM_THREADS", raising=False)
    monkeypatch.setattr(config._LOAD, "busy_cores", lambda: config._LOAD.cores)  # every core busy elsewhere
    assert _threads_during_work() == 1
    monkeypatch.setattr(config._LOAD, "busy_cores", lambda: 0)
    assert _threads_during_work() == min(torch.get_num_threads(), config._LOAD.cores)


@pytest.mark.parametrize("make", [lambda: DEVICE.makeCommandQueue(), lambda: QUEUE.makeCommandBuffer()],
                         ids=["queue", "command buffer"])
@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_queues_and_command_buffers_refuse_copies_by_name(make, how):
    import copy
    import pickle

    obj = make()
    f = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how]
    with pytest.raises(MPSTypeError, match=f"{type(obj).__name__} cannot be copied or pickled; make another"):
        f(obj)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_temporaries_refuse_copies_by_name_and_states_that_are_not_temporary_copy(how):
    import copy
    import pickle

    f = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))
    src, cb = image(np.random.default_rng(4).uniform(-1, 1, (4, 4, 1))), QUEUE.makeCommandBuffer()
    kernel = conv(weights=np.random.default_rng(5).uniform(-1, 1, 9))
    temporaries = [MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
                       channelFormat=MPSImageFeatureChannelFormat.float32, width=4, height=4, featureChannels=1)),
                   kernel.temporaryResultState(commandBuffer=cb, sourceImage=src)]
    for obj in temporaries:
        with pytest.raises(MPSTypeError, match=f"{type(obj).__name__} cannot be copied or pickled; a temporary"):
            f(obj)
    state = kernel.resultState(sourceImage=src)
    assert f(state).isTemporary is False
    cb.commit()


def test_a_device_copied_or_unpickled_is_the_same_object():
    import copy
    import pickle

    for device in MTLCopyAllDevices():
        assert copy.copy(device) is copy.deepcopy(device) is pickle.loads(pickle.dumps(device)) is device
