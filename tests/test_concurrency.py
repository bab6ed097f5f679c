"""Thread safety under load (issue 7, item 3; the contract is docs/reliability.md "Threads", after
spec kernel-image.md §7.6).

Every result is checked bit for bit against the same kernel run on one thread first: a race that
mixes two encodes' images, weights or scratch memory shows as a wrong pixel, not only as a crash.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from helpers import DEVICE, FMT, blank, conv, image
from mpsconv import MPSCommandBufferError, MTLCommandBufferStatus
from mpsconv.encoder import Encoder

THREADS, ENCODES = 8, 500
INPUTS = 4  # distinct sources; thread t's i-th encode reads input (t + i) % INPUTS


def _kernel(rng):
    return conv(3, 3, 4, 8, weights=rng.standard_normal(8 * 3 * 3 * 4), bias=rng.standard_normal(8))


@pytest.fixture(autouse=True)
def eager_thread_switches():
    """Switch threads every microsecond instead of every 5 ms, so races show up in a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    kernel = _kernel(rng)
    sources = [image(rng.uniform(-1, 1, (6, 5, 4))) for _ in range(INPUTS)]
    queue = DEVICE.makeCommandQueue()
    expected = []
    for src in sources:  # the single-thread answers
        dst = blank(5, 6, 8)
        cb = queue.makeCommandBuffer()
        kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()
        expected.append(dst.numpy().copy())
    return kernel, sources, expected


def _hammer(worker, threads=THREADS):
    """Run ``worker(t)`` on ``threads`` threads at once; re-raise the first failure."""
    errors, start = [], threading.Barrier(threads)

    def body(t):
        try:
            start.wait()
            worker(t)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    pool = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("queues", ["one queue", "a queue per thread"])
@pytest.mark.parametrize("kernels", ["one shared kernel", "a copy() per thread"])
def test_threads_times_encodes_give_the_single_thread_results(queues, kernels):
    """8 threads x 500 encodes, 5 encodes per command buffer, each with a completed handler."""
    kernel, sources, expected = _setup()
    shared_queue = DEVICE.makeCommandQueue()
    handled = [0] * THREADS

    def worker(t):
        queue = shared_queue if queues == "one queue" else DEVICE.makeCommandQueue()
        mine = kernel if kernels == "one shared kernel" else kernel.copy(device=DEVICE)
        for first in range(0, ENCODES, 5):
            cb = queue.makeCommandBuffer()
            dsts = []
            for i in range(first, first + 5):
                dst = blank(5, 6, 8)
                mine.encode(commandBuffer=cb, sourceImage=sources[(t + i) % INPUTS], destinationImage=dst)
                dsts.append((i, dst))
            cb.addCompletedHandler(lambda buffer, t=t: handled.__setitem__(t, handled[t] + 1))
            cb.commit()
            cb.waitUntilCompleted()
            for i, dst in dsts:
                got = dst.numpy()
                if not np.array_equal(got, expected[(t + i) % INPUTS]):
                    raise AssertionError(f"thread {t}, encode {i}: the result differs from the single-thread run")

    _hammer(worker)
    assert handled == [ENCODES // 5] * THREADS


def test_handlers_of_one_queue_run_once_in_enqueue_order_across_threads():
    kernel, sources, _ = _setup()
    queue = DEVICE.makeCommandQueue()
    order, ran, lock = [], [], threading.Lock()

    def worker(t):
        for i in range(100):
            cb = queue.makeCommandBuffer()
            kernel.encode(commandBuffer=cb, sourceImage=sources[i % INPUTS], destinationImage=blank(5, 6, 8))
            cb.addCompletedHandler(ran.append)
            with lock:  # the queue's order is enqueue order
                cb.enqueue()
                order.append(cb)
            cb.commit()

    _hammer(worker)
    for cb in order:
        cb.waitUntilCompleted()
    assert ran == order  # each handler once, in the queue's order


def test_one_command_buffer_hammered_by_threads_records_each_successful_encode_once():
    """§7.6.3: an encode that overlaps another on the same buffer raises MPSCommandBufferError; the
    others are all recorded, once each, and nothing else goes wrong."""
    kernel, sources, expected = _setup()
    cb = DEVICE.makeCommandQueue().makeCommandBuffer()
    done, refused, lock = [], [0], threading.Lock()

    def worker(t):
        for i in range(60):
            dst = blank(5, 6, 8)
            try:
                kernel.encode(commandBuffer=cb, sourceImage=sources[t % INPUTS], destinationImage=dst)
            except MPSCommandBufferError as exc:
                assert "another encode into this command buffer is in progress" in str(exc)
                with lock:
                    refused[0] += 1
                continue
            with lock:
                done.append((t, dst))

    _hammer(worker)
    assert len(done) + refused[0] == THREADS * 60
    assert len(cb._work) == len(done)
    cb.commit()
    cb.waitUntilCompleted()
    for t, dst in done:
        np.testing.assert_array_equal(dst.numpy(), expected[t % INPUTS])


def test_commit_from_many_threads_commits_once():
    kernel, sources, expected = _setup()
    cb = DEVICE.makeCommandQueue().makeCommandBuffer()
    dst = blank(5, 6, 8)
    kernel.encode(commandBuffer=cb, sourceImage=sources[0], destinationImage=dst)
    calls, lock = [], threading.Lock()
    cb.addCompletedHandler(calls.append)
    outcomes = []

    def worker(t):
        try:
            cb.commit()
            result = "committed"
        except MPSCommandBufferError as exc:
            assert "already committed" in str(exc)
            result = "refused"
        with lock:
            outcomes.append(result)

    _hammer(worker)
    cb.waitUntilCompleted()
    assert sorted(outcomes) == ["committed"] + ["refused"] * (THREADS - 1)
    assert calls == [cb] and cb.status == MTLCommandBufferStatus.completed
    np.testing.assert_array_equal(dst.numpy(), expected[0])


def test_many_threads_wait_on_one_buffer():
    kernel, sources, expected = _setup()
    queue = DEVICE.makeCommandQueue()
    cb = queue.makeCommandBuffer()
    dst = blank(5, 6, 8, fmt=FMT.float32)
    kernel.encode(commandBuffer=cb, sourceImage=sources[1], destinationImage=dst)
    cb.commit()
    _hammer(lambda t: cb.waitUntilCompleted())
    np.testing.assert_array_equal(dst.numpy(), expected[1])


def test_an_encode_overlapping_another_on_the_same_buffer_raises_and_commit_waits_for_neither(monkeypatch):
    """Deterministic form of the test above: the first encode is held inside the buffer (its plan
    look-up blocks) while a second encode and a commit arrive from other threads."""
    kernel, sources, expected = _setup()
    cb = DEVICE.makeCommandQueue().makeCommandBuffer()
    inside, release = threading.Event(), threading.Event()
    plan = Encoder.plan

    def held_plan(self, *args):
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)
        return plan(self, *args)

    monkeypatch.setattr(Encoder, "plan", held_plan)
    dst = blank(5, 6, 8)
    first = threading.Thread(name="first", target=lambda: kernel.encode(commandBuffer=cb, sourceImage=sources[2],
                                                                        destinationImage=dst))
    first.start()
    assert inside.wait(10)
    with pytest.raises(MPSCommandBufferError, match="another encode into this command buffer is in progress"):
        kernel.encode(commandBuffer=cb, sourceImage=sources[0], destinationImage=blank(5, 6, 8))
    with pytest.raises(MPSCommandBufferError, match="still running on another thread"):
        cb.commit()
    release.set()
    first.join()
    assert cb.status == MTLCommandBufferStatus.notEnqueued and len(cb._work) == 1
    cb.commit()
    cb.waitUntilCompleted()
    np.testing.assert_array_equal(dst.numpy(), expected[2])
