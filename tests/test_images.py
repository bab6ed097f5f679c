"""kernel-image.md checklist: images (65–88) and Metal's format conversions (§4.1)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from helpers import DEVICE, QUEUE, blank, conv, image, run, values
from mpsconv import *

FMT = MPSImageFeatureChannelFormat
NUMPY = {FMT.unorm8: np.uint8, FMT.unorm16: np.uint16, FMT.float16: np.float16, FMT.float32: np.float32}


def make(width=3, height=2, channels=9, images=1, fmt=FMT.float32):
    return MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(
        channelFormat=fmt, width=width, height=height, featureChannels=channels, numberOfImages=images))


def test_ki_checklist_65_format_raw_values():
    assert [int(FMT[n]) for n in ("none", "unorm8", "unorm16", "float16", "float32", "_reserved0", "count")] == \
        [0, 1, 2, 3, 4, 5, 6]


def test_ki_checklist_66_bare_descriptor():
    d = MPSImageDescriptor()
    assert (d.width, d.height, d.featureChannels, d.numberOfImages, int(d.usage)) == (1, 1, 1, 1, 3)
    assert d.channelFormat == FMT.none and make(fmt=FMT.none).featureChannelFormat == FMT.float16


def test_ki_checklist_67_texture_type():
    img = make(channels=9, images=2)
    assert img.textureType == MTLTextureType.type2DArray and img.texture.arrayLength == 6
    assert make(channels=4).textureType == MTLTextureType.type2D


def test_ki_checklist_68_to_70_pixel_format_precision_pixel_size():
    assert [make(channels=c, fmt=FMT.float16).pixelFormat for c in (1, 2, 3, 9)] == [25, 65, 115, 115]
    assert [make(fmt=f).precision for f in (FMT.unorm8, FMT.unorm16, FMT.float16, FMT.float32)] == [8, 16, 11, 24]
    assert make(channels=3, fmt=FMT.float16).pixelSize == 8 and make(channels=1).pixelSize == 4


@pytest.mark.parametrize("fmt", [FMT.unorm8, FMT.unorm16, FMT.float16, FMT.float32])
def test_ki_checklist_71_write_read_round_trip_bytes(fmt):
    img = make(4, 3, 7, fmt=fmt)
    raw = np.random.default_rng(71).integers(0, 256, 4 * 3 * 7 * np.dtype(NUMPY[fmt]).itemsize, dtype=np.uint8)
    img.writeBytes(raw, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
    back = np.zeros_like(raw)
    img.readBytes(back, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
    np.testing.assert_array_equal(back, raw)


def test_ki_checklist_72_hwc_and_chw_are_transposes():
    img = image(np.random.default_rng(72).uniform(-1, 1, (3, 4, 6)))
    hwc, chw = np.zeros((3, 4, 6), np.float32), np.zeros((6, 3, 4), np.float32)
    img.readBytes(hwc, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
    img.readBytes(chw, dataLayout=MPSDataLayout.featureChannelsxHeightxWidth, imageIndex=0)
    np.testing.assert_array_equal(chw, hwc.transpose(2, 0, 1))


def full_region(img):
    return MTLRegionMake2D(0, 0, img.width, img.height)


def test_ki_checklist_73_channel_window():
    src = np.broadcast_to(np.arange(12.0), (2, 3, 12))
    img = image(src)
    out = np.zeros((2, 3, 4), np.float32)
    img.readBytes(out, dataLayout=0, bytesPerRow=3 * 4 * 4, region=full_region(img),
                  featureChannelInfo=MPSImageReadWriteParams(4, 4), imageIndex=0)
    assert (out == np.arange(4, 8)).all()


@pytest.mark.parametrize("offset, count, match", [(2, 4, "multiple of 4"), (0, 0, "must be > 0"),
                                                  (4, 6, "must be a multiple of 4 when featureChannelOffset > 0")])
def test_ki_checklist_74_channel_window_errors(offset, count, match):
    img = make(3, 2, 12)
    with pytest.raises(MPSValueError, match=match):
        img.readBytes(np.zeros(100, np.float32), dataLayout=0, bytesPerRow=3 * 4 * 4, region=full_region(img),
                      featureChannelInfo=MPSImageReadWriteParams(offset, count), imageIndex=0)


def test_trailing_partial_channel_group_is_allowed():
    """OPEN §4.5: offset 4, count 3 on a 7-channel image reaches the last channel and is allowed."""
    img = image(np.broadcast_to(np.arange(7.0), (1, 1, 7)))
    out = np.zeros(3, np.float32)
    img.readBytes(out, dataLayout=0, bytesPerRow=12, region=full_region(img),
                  featureChannelInfo=MPSImageReadWriteParams(4, 3), imageIndex=0)
    assert out.tolist() == [4, 5, 6]


def test_ki_checklist_75_bytes_per_row_gap_untouched():
    img = image(np.ones((2, 2, 1)))
    buf = np.full(2 * 16, -7.0, np.float32)  # 64 bytes per row, 8 used
    img.readBytes(buf, dataLayout=0, bytesPerRow=64, region=full_region(img),
                  featureChannelInfo=MPSImageReadWriteParams(0, 1), imageIndex=0)
    assert buf[[0, 1, 16, 17]].tolist() == [1, 1, 1, 1]
    assert (np.delete(buf, [0, 1, 16, 17]) == -7).all()


def test_ki_checklist_76_image_index():
    data = np.random.default_rng(76).uniform(-1, 1, (2, 2, 3, 5))
    img = image(data)
    out = np.zeros((2, 3, 5), np.float32)
    img.readBytes(out, dataLayout=0, imageIndex=1)
    np.testing.assert_array_equal(out, data[1].astype(np.float32))
    with pytest.raises(MPSValueError, match="imageIndex=2"):
        img.readBytes(out, dataLayout=0, imageIndex=2)


def test_ki_checklist_77_temporary_image_has_no_cpu_access():
    t = MPSTemporaryImage(commandBuffer=QUEUE.makeCommandBuffer(), imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=2, height=2, featureChannels=1))
    for method in (t.readBytes, t.writeBytes):
        with pytest.raises(MPSValueError, match="no CPU access"):
            method(np.zeros(4, np.float32), dataLayout=0, imageIndex=0)
    t.readCount = 0


def test_ki_checklist_78_padding_lanes_stay_zero():
    img = make(2, 2, 9)
    img.writeBytes(np.full(2 * 2 * 9, 3.0, np.float32), dataLayout=0, imageIndex=0)
    lanes = img.texture._storage[..., 9:]
    assert lanes.shape[-1] == 3 and (lanes == 0).all()
    n = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        MPSCNNNeuronType.linear, a=1.0, b=5.0))
    out = run(n, img, make(2, 2, 9))
    assert (out.texture._storage[..., 9:] == 0).all() and (values(out) == 8).all()


def test_ki_checklist_79_resource_size():
    img = make(3, 2, 9, images=2, fmt=FMT.float16)
    expected = 2 * 3 * 3 * 2 * 8
    assert img.resourceSize() == expected and img._storage is None  # does not allocate
    img.texture
    assert img.resourceSize() == expected
    assert make(3, 2, 12).subImage(featureChannelRange=range(4, 8)).resourceSize() == 0


def test_ki_checklist_80_sub_image():
    img = image(np.broadcast_to(np.arange(12.0), (2, 2, 12)))
    view = img.subImage(featureChannelRange=range(4, 8))
    assert view.featureChannels == 4 and (values(view) == np.arange(4, 8)).all() and view.parent is img
    with pytest.raises(MPSValueError, match="multiples of 4"):
        img.subImage(featureChannelRange=range(2, 6))
    assert img.subImage(featureChannelRange=(4, 12)).featureChannels == 8


def test_ki_checklist_81_batch_representation_shares_storage():
    img = image(np.zeros((3, 2, 2, 4)))
    views = img.batchRepresentation()
    assert len(views) == 3 and all(v.numberOfImages == 1 for v in views)
    views[1].writeBytes(np.full(16, 9.0, np.float32), dataLayout=0, imageIndex=0)
    assert (values(img)[1] == 9).all() and (values(img)[[0, 2]] == 0).all()
    assert len(img.batchRepresentation(withSubRange=range(1, 3))) == 2


def test_ki_checklist_82_image_from_texture():
    tex = DEVICE.makeTexture(MTLTextureDescriptor(textureType=MTLTextureType.type2DArray,
                                                  pixelFormat=MTLPixelFormat.rgba32Float, width=3, height=2,
                                                  arrayLength=6, usage=MTLTextureUsage.shaderRead | 2))
    img = MPSImage(texture=tex, featureChannels=9)
    assert img.numberOfImages == 2 and img.resourceSize() == 0
    img.writeBytes(np.arange(2 * 3 * 9, dtype=np.float32), dataLayout=0, imageIndex=1)
    again = MPSImage(texture=tex, featureChannels=9)  # a second view sees the write
    out = np.zeros(2 * 3 * 9, np.float32)
    again.readBytes(out, dataLayout=0, imageIndex=1)
    assert (out == np.arange(2 * 3 * 9)).all()
    with pytest.raises(MPSValueError, match="not a multiple"):
        MPSImage(texture=tex, featureChannels=13)


def temporary(cb, channels=1):
    return MPSTemporaryImage(commandBuffer=cb, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT.float32, width=3, height=3, featureChannels=channels))


def test_ki_checklist_83_batch_increment_read_count():
    cb = QUEUE.makeCommandBuffer()
    t, u, plain = temporary(cb), temporary(cb), make()
    assert MPSImageBatchIncrementReadCount([t, t, u, plain], 2) == 3
    assert (t.readCount, u.readCount) == (3, 3)
    t.readCount = u.readCount = 0
    assert MPSImageBatchResourceSize([plain, plain]) == plain.resourceSize()
    seen = []
    MPSImageBatchIterate([t, t, u], lambda img, i: seen.append(i) or NSIntegerMin)
    assert seen == [0, 2]


def test_ki_checklist_84_85_read_count():
    cb = QUEUE.makeCommandBuffer()
    t = temporary(cb)
    assert t.readCount == 1
    k = conv()
    k.encode(commandBuffer=cb, sourceImage=blank(3, 3, 1), destinationImage=t)
    assert t.readCount == 1  # a write does not count
    k.encode(commandBuffer=cb, sourceImage=t, destinationImage=blank(3, 3, 1))
    assert t.readCount == 0
    with pytest.raises(MPSCommandBufferError, match="released"):
        k.encode(commandBuffer=cb, sourceImage=t, destinationImage=blank(3, 3, 1))
    cb.commit()


def test_ki_checklist_86_temporary_on_other_or_committed_buffer():
    cb, other = QUEUE.makeCommandBuffer(), QUEUE.makeCommandBuffer()
    t = temporary(cb)
    with pytest.raises(MPSCommandBufferError, match="another command buffer"):
        conv().encode(commandBuffer=other, sourceImage=t, destinationImage=blank(3, 3, 1))
    cb.commit()
    with pytest.raises(MPSCommandBufferError, match="already committed"):
        conv().encode(commandBuffer=cb, sourceImage=t, destinationImage=blank(3, 3, 1))
    assert t.readCount == 1


def test_ki_checklist_87_read_count_frozen_at_zero():
    t = temporary(QUEUE.makeCommandBuffer())
    t.readCount = 0
    with pytest.raises(MPSCommandBufferError, match="readCount is 0"):
        t.readCount = 2


def test_ki_checklist_88_allocated_destination_kinds():
    k = conv()
    cb = QUEUE.makeCommandBuffer()
    out = k.encode(commandBuffer=cb, sourceImage=image(np.ones((3, 3, 1))))
    assert isinstance(out, MPSTemporaryImage) and out.readCount == 1
    out.readCount = 0
    k.destinationImageAllocator = MPSImage.defaultAllocator()
    out = k.encode(commandBuffer=cb, sourceImage=image(np.ones((3, 3, 1))))
    cb.commit()
    cb.waitUntilCompleted()
    assert type(out) is MPSImage and values(out)[0, 1, 1, 0] == 9


def test_temporary_views_hold_their_parent():
    cb = QUEUE.makeCommandBuffer()
    t = temporary(cb, channels=8)
    view = t.subImage(featureChannelRange=range(4, 8))
    assert isinstance(view, MPSTemporaryImage) and t.readCount == 2
    view.readCount = 0
    assert t.readCount == 1
    t.readCount = 0


def _temporary_chain(channels, rng):
    """Kernels of a chain of 3x3 convolutions through ``channels`` (random weights and bias)."""
    return [conv(3, 3, a, b, weights=rng.uniform(-1, 1, b * 9 * a), bias=rng.uniform(-1, 1, b))
            for a, b in zip(channels, channels[1:])]


def test_temporary_images_reuse_the_memory_of_released_ones():
    # 5 -> t1 (8) -> t2 (6) -> t3 (3) -> out (4): t3 is made once t1 is released, in t1's bytes, and
    # its padding lane (which held t1's values) reads zero again; the result is the same network's
    # through MPSImages
    rng = np.random.default_rng(11)
    channels = [5, 8, 6, 3, 4]
    kernels = _temporary_chain(channels, rng)
    src = blank(7, 5, 5, rng=rng)

    def network(temporary: bool):
        cb, x, storages = QUEUE.makeCommandBuffer(), src, []
        for i, (kernel, c) in enumerate(zip(kernels, channels[1:])):
            d = MPSImageDescriptor(channelFormat=FMT.float32, width=7, height=5, featureChannels=c)
            last = i == len(kernels) - 1
            y = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d) if temporary and not last else \
                MPSImage(device=DEVICE, imageDescriptor=d)
            kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
            storages.append(y._storage)
            x = y
        cb.commit()
        cb.waitUntilCompleted()
        return values(x), storages

    want, _ = network(False)
    got, (t1, t2, t3, _) = network(True)
    assert t3.data_ptr() == t1.data_ptr() and t2.data_ptr() != t1.data_ptr()
    assert torch.count_nonzero(t3[..., 3:]) == 0
    np.testing.assert_array_equal(got, want)


def _placed(image) -> int:
    """Where a temporary image's bytes start in its command buffer's block (placing it now)."""
    storage = image._ensure_storage()
    return storage.data_ptr() - storage.untyped_storage().data_ptr()


def test_temporary_images_split_released_memory_and_join_released_neighbours():
    # one released image of 8 channels serves two of 4 side by side; once both are released, their
    # joined bytes serve one of 8 again, where a's bytes alone could not (a queue of its own: no block
    # or plan from other buffers)
    cb = DEVICE.makeCommandQueue().makeCommandBuffer()
    d8, d4 = (MPSImageDescriptor(channelFormat=FMT.float32, width=16, height=16, featureChannels=c) for c in (8, 4))
    four = 16 * 16 * 4 * 4
    big = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d8)
    assert _placed(big) == 0
    big.readCount = 0
    a, b = (MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d4) for _ in range(2))
    assert (_placed(a), _placed(b)) == (0, four)
    a.readCount = 0
    apart = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d8)  # a's bytes alone are too few
    assert _placed(apart) == 2 * four
    b.readCount = 0
    joined = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d8)
    assert _placed(joined) == 0
    assert joined._storage.untyped_storage().nbytes() == 4 * four  # the block grew once, for apart
    apart.readCount = joined.readCount = 0
    cb.commit()


def test_temporary_images_grow_one_block_under_the_images_placed_in_it():
    # 5 -> 8 -> 16 -> 32 -> 12 -> 3 channels (1024, 2048, 4096 and 3072 bytes of temporaries): the
    # 16- and 32-channel images fit no released gap, so the block grows under images already encoded
    # (their views and the work bound to them follow it); the 12-channel one takes the bytes of the
    # first two. The block ends at the most bytes alive at once, and the result is the same network's
    # through MPSImages
    rng = np.random.default_rng(12)
    channels = [5, 8, 16, 32, 12, 3]
    kernels = _temporary_chain(channels, rng)
    src = blank(6, 5, 5, rng=rng)

    def network(temporary: bool):
        cb, x, made = DEVICE.makeCommandQueue().makeCommandBuffer(), src, []
        for i, (kernel, c) in enumerate(zip(kernels, channels[1:])):
            d = MPSImageDescriptor(channelFormat=FMT.float32, width=6, height=5, featureChannels=c)
            y = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d) if temporary and i < len(kernels) - 1 else \
                MPSImage(device=DEVICE, imageDescriptor=d)
            kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
            made.append(y._storage)  # (a temporary's is dropped once the next layer has read it)
            x = y
        storages = made[:-1]
        cb.commit()
        cb.waitUntilCompleted()
        return values(x), storages

    want, _ = network(False)
    got, storages = network(True)
    np.testing.assert_array_equal(got, want)
    block = storages[0].untyped_storage()
    assert all(s.untyped_storage().data_ptr() == block.data_ptr() for s in storages)
    assert [s.data_ptr() - block.data_ptr() for s in storages] == [0, 1024, 3072, 0]
    assert block.nbytes() == 4096 + 3072


def _chain_network(channels, kernels, src, temporary: bool, queue=None):
    """``src`` through ``kernels`` in one command buffer, the images between as temporaries (or
    MPSImages); the result's values and the byte offsets of the temporaries in their block."""
    cb, x, offsets = (queue or QUEUE).makeCommandBuffer(), src, []
    for i, (kernel, c) in enumerate(zip(kernels, channels[1:])):
        d = MPSImageDescriptor(channelFormat=FMT.float32, width=src.width, height=src.height, featureChannels=c)
        y = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d) if temporary and i < len(kernels) - 1 else \
            MPSImage(device=DEVICE, imageDescriptor=d)
        kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
        if isinstance(y, MPSTemporaryImage):
            offsets.append((y._storage.data_ptr() - y._storage.untyped_storage().data_ptr(), y._storage))
        x = y
    block = offsets[0][1].untyped_storage() if offsets else None
    cb.commit()
    cb.waitUntilCompleted()
    return values(x), [o for o, _ in offsets], block.nbytes() if block is not None else 0


def test_temporary_images_of_a_network_encoded_again_go_where_packing_them_puts_them():
    # 3 -> 4 -> 8 -> 12 -> 4 -> 2 channels on 8x8 (1, 2, 3 and 1 KiB of temporaries). Placed as they
    # come, the 12-channel image fits no released gap and goes above the 8-channel one: 6 KiB. The
    # queue's next buffer with the same images places them as packed with every lifetime known: the
    # largest first, the rest around it, 5 KiB (the bytes alive at once, 8 and 12 channels)
    rng = np.random.default_rng(13)
    channels = [3, 4, 8, 12, 4, 2]
    kernels = _temporary_chain(channels, rng)
    src = blank(8, 8, 3, rng=rng)
    queue = DEVICE.makeCommandQueue()
    want, _, _ = _chain_network(channels, kernels, src, False)
    first = _chain_network(channels, kernels, src, True, queue)
    again = _chain_network(channels, kernels, src, True, queue)
    assert first[1:] == ([0, 1024, 3072, 0], 6144)
    assert again[1:] == ([0, 3072, 0, 3072], 5120)
    np.testing.assert_array_equal(first[0], want)
    np.testing.assert_array_equal(again[0], want)
    # another network on the queue keeps its own plan; one that begins as this one and then makes
    # other images follows the plan as far as it holds, then places them as they come
    other = [3, 8, 4]
    _chain_network(other, _temporary_chain(other, rng), src, True, queue)
    assert _chain_network(channels, kernels, src, True, queue)[1:] == ([0, 3072, 0, 3072], 5120)
    changed = [3, 4, 8, 16, 4, 2]
    kernels_changed = _temporary_chain(changed, rng)
    want_changed, _, _ = _chain_network(changed, kernels_changed, src, False)
    got, offsets, size = _chain_network(changed, kernels_changed, src, True, queue)
    assert offsets == [0, 3072, 5120, 0] and size == 5120 + 4096  # 16 channels fit no gap
    np.testing.assert_array_equal(got, want_changed)
    assert _chain_network(changed, kernels_changed, src, True, queue)[1:] == ([0, 4096, 0, 4096], 6144)


def test_a_hinted_high_water_mark_makes_the_temporary_block_that_large_at_once():
    # the chain above grows its block twice as the images come; with the hint it is made once, as
    # large as asked, and gives the same values. A hint beyond the memory there is is left aside,
    # and MPSCommandBuffer.prefetchHeap asks the same of its current buffer
    rng = np.random.default_rng(12)
    channels = [5, 8, 16, 32, 12, 3]
    kernels = _temporary_chain(channels, rng)
    src = blank(6, 5, 5, rng=rng)
    want, _, _ = _chain_network(channels, kernels, src, False)

    def hinted(nbytes, wrap=False, limit=None):
        queue = DEVICE.makeCommandQueue()  # (no plan from an earlier buffer)
        cb, x, blocks = queue.makeCommandBuffer(), src, []
        if wrap:
            cb = MPSCommandBuffer(commandBuffer=cb)
            cb.prefetchHeap(forWorkloadSize=nbytes)
        else:
            MPSHintTemporaryMemoryHighWaterMark(cb, nbytes)
        for i, (kernel, c) in enumerate(zip(kernels, channels[1:])):
            d = MPSImageDescriptor(channelFormat=FMT.float32, width=6, height=5, featureChannels=c)
            y = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d) if i < len(kernels) - 1 else \
                MPSImage(device=DEVICE, imageDescriptor=d)
            if limit is None:
                kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
            else:
                with use_memory_limit(limit):
                    kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
            if isinstance(y, MPSTemporaryImage):
                blocks.append((y._storage.untyped_storage().data_ptr(), y._storage.untyped_storage().nbytes()))
            x = y
        cb.commit()
        cb.waitUntilCompleted()
        np.testing.assert_array_equal(values(x), want)
        return blocks

    blocks = hinted(10000)
    assert set(blocks) == {blocks[0]} and blocks[0][1] == 10000  # made once, never moved
    assert hinted(10000, wrap=True)[0][1] == 10000
    assert [size for _, size in hinted(1 << 40)] == [1024, 3072, 7168, 7168]  # as without the hint
    assert [size for _, size in hinted(2_000_000, limit=1_000_000)] == [1024, 3072, 7168, 7168]


def test_a_finished_buffers_temporary_block_serves_the_queues_next_one():
    # CPU: once a buffer's work has run, its block stays with the queue (MPSSetHeapCacheDuration, 5 s
    # unless set) and the next buffer's temporary images take it instead of new memory, where nothing
    # holds it and it has the size the next buffer's plan asks. The 6-channel images' padding lanes,
    # which held the last buffer's values, read zero again, and every buffer gives the MPSImage
    # network's values
    rng = np.random.default_rng(15)
    channels = [5, 6, 16, 6, 3]
    kernels = _temporary_chain(channels, rng)
    src = blank(7, 6, 5, rng=rng)
    want, _, _ = _chain_network(channels, kernels, src, False)
    queue = DEVICE.makeCommandQueue()

    def frame(replayable=False, seconds=None, network=(channels, kernels, want)):
        chans, kerns, expected = network
        cb, x, lanes = queue.makeCommandBuffer(), src, []
        if seconds is not None:
            MPSSetHeapCacheDuration(cb, seconds)
        for i, (kernel, c) in enumerate(zip(kerns, chans[1:])):
            d = MPSImageDescriptor(channelFormat=FMT.float32, width=7, height=6, featureChannels=c)
            y = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d) if i < len(kerns) - 1 else \
                MPSImage(device=DEVICE, imageDescriptor=d)
            kernel.encode(commandBuffer=cb, sourceImage=x, destinationImage=y)
            if c % 4 and isinstance(y, MPSTemporaryImage):
                lanes.append(y._storage[..., c:])
            x = y
        block = cb._temporary_heap.arena
        if replayable:
            cb.make_replayable()
        cb.commit()
        cb.waitUntilCompleted()
        np.testing.assert_array_equal(values(x), expected)
        assert lanes and all(torch.count_nonzero(lane) == 0 for lane in lanes)
        return cb, block, x

    frame()
    _, second, _ = frame()  # its plan's size, which the first buffer's block may not have
    kept = queue._temporary_block[0]
    assert kept is second
    del second
    _, third, _ = frame()
    assert third is kept  # the same memory, made once
    del third
    # another network, without a plan yet, takes any larger block: its 14-channel image lies where the
    # 16-channel one wrote, so its padding lanes must be zeroed again
    other = [5, 14, 3]
    other_kernels = _temporary_chain(other, rng)
    other_want, _, _ = _chain_network(other, other_kernels, src, False)
    _, fourth, _ = frame(network=(other, other_kernels, other_want))
    assert fourth is kept
    del kept, fourth
    replayed, held, out = frame(replayable=True)
    _, after, _ = frame()
    assert after is not held  # the replay still reads and writes its block
    out.torch().zero_()
    replayed.replay().waitUntilCompleted()
    np.testing.assert_array_equal(values(out), want)
    del after
    frame(seconds=0)
    assert queue._temporary_block is None
    frame(seconds=0.01)
    kept = queue._temporary_block[0]
    time.sleep(0.05)
    _, fifth, _ = frame()
    assert fifth is not kept  # kept too long: freed, and a new one made


def test_temporary_block_that_cannot_grow_keeps_the_images_placed_in_it(monkeypatch):
    cb = QUEUE.makeCommandBuffer()
    small, large = (MPSImageDescriptor(channelFormat=FMT.float32, width=8, height=8, featureChannels=c)
                    for c in (4, 64))
    first = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=small)
    kept = first._ensure_storage()
    block = kept.untyped_storage()
    before = block.nbytes()
    resize = torch.UntypedStorage.resize_

    def refuse(storage, nbytes):
        if nbytes > before:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate (test)")
        return resize(storage, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", refuse)
    second = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=large)
    with pytest.raises(MPSMemoryError, match="MPSTemporaryImage"):
        second._ensure_storage()
    monkeypatch.undo()
    assert second._storage is None and block.nbytes() == before
    kept.copy_(torch.arange(kept.numel(), dtype=torch.float32).view(kept.shape))  # its bytes are still there
    assert float(first._storage[0, 7, 7, 3]) == kept.numel() - 1
    assert second._ensure_storage().untyped_storage().data_ptr() == first._storage.untyped_storage().data_ptr()
    first.readCount = second.readCount = 0
    cb.commit()
    # a buffer whose first temporary image got no block at all commits as one that made none
    cb = QUEUE.makeCommandBuffer()
    zeros = torch.zeros

    def no_block(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8:  # (the block; images' own storages are typed)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate (test)")
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", no_block)
    lone = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=small)
    with pytest.raises(MPSMemoryError, match="MPSTemporaryImage"):
        lone._ensure_storage()
    monkeypatch.undo()
    lone.readCount = 0
    cb.commit()
    cb.waitUntilCompleted()
    assert cb.status == MTLCommandBufferStatus.completed


def test_temporary_image_memory_is_not_reused_while_a_view_reads_it():
    cb = QUEUE.makeCommandBuffer()
    d = MPSImageDescriptor(channelFormat=FMT.float32, width=3, height=3, featureChannels=8)
    parent = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d)
    conv(cin=1, cout=8, weights=np.arange(72)).encode(commandBuffer=cb, sourceImage=blank(3, 3, 1, fill=1.0),
                                                      destinationImage=parent)
    view = parent.subImage(featureChannelRange=range(4, 8))
    conv(cin=4, cout=1).encode(commandBuffer=cb, sourceImage=view, destinationImage=blank(3, 3, 1))
    assert view.readCount == 0 and parent.readCount == 1
    held = _placed(parent)
    other = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d)
    assert _placed(other) != held  # the parent still holds its bytes
    parent.readCount = 0
    again = MPSTemporaryImage(commandBuffer=cb, imageDescriptor=d)
    assert _placed(again) == held
    other.readCount = again.readCount = 0
    cb.commit()


# -- conversions (§4.1)


def test_unorm_conversion_clamps_rounds_and_maps_nan_to_zero():
    img = image(np.array([[[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan, 0.5 / 255, 1.5 / 255]]]), FMT.unorm8)
    raw = np.zeros(8, np.uint8)
    img.readBytes(raw, dataLayout=0, imageIndex=0)
    assert raw.tolist() == [0, 0, 128, 255, 255, 0, 0, 2]  # ties to even: 0.5 -> 0, 1.5 -> 2
    assert values(img)[0, 0, 0, 2] == np.float32(128 / 255)


def test_float16_conversion_rounds_to_nearest_even_and_overflows_to_inf():
    img = image(np.array([[[1 + 2**-11, 1 + 3 * 2**-11, 70000.0, -70000.0]]]), FMT.float16)
    assert values(img)[0, 0, 0].tolist() == [1.0, 1 + 2**-9, np.inf, -np.inf]


def test_interop_numpy_torch_dlpack():
    data = np.random.default_rng(1).uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32)
    img = image(data)
    np.testing.assert_array_equal(np.asarray(img), data)
    np.testing.assert_array_equal(torch.from_dlpack(img).cpu().numpy(), data)
    assert img.torch().data_ptr() == img.texture._storage.data_ptr()  # a view, not a copy
    half = image(data[0], FMT.float16)
    assert half.numpy().dtype == np.float16 and image(data[0] * 0 + 0.5, FMT.unorm8).numpy().dtype == np.float32


def test_reading_before_completion_shows_old_data():
    dst = blank(3, 3, 1, fill=-1)
    cb = QUEUE.makeCommandBuffer()
    conv().encode(commandBuffer=cb, sourceImage=image(np.ones((3, 3, 1))), destinationImage=dst)
    assert (values(dst) == -1).all()
    cb.commit()
    cb.waitUntilCompleted()
    assert values(dst)[0, 1, 1, 0] == 9


@pytest.mark.parametrize("fmt, wrong", [(FMT.float32, np.float64), (FMT.float32, np.float16), (FMT.float16, np.float32),
                                        (FMT.unorm8, np.float32), (FMT.unorm16, np.int16)])
def test_byte_io_refuses_an_array_of_another_element_type(fmt, wrong):
    """writeBytes(np.ones(16)) into a float32 image would write the float64 bytes, read back as
    [0, 1.875, 0, 1.875, ...]: refused, naming both types, and nothing is written; reads likewise."""
    img = blank(2, 2, 4, fmt=fmt, fill=0.5)
    before = img.numpy().copy()
    with pytest.raises(MPSTypeError, match=rf"holds {np.dtype(wrong).name} elements; this image stores {fmt.name}"):
        img.writeBytes(np.ones(16, wrong), dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
    np.testing.assert_array_equal(img.numpy(), before)
    out = np.full(16, 7, wrong)
    with pytest.raises(MPSTypeError, match="Convert it"):
        img.readBytes(out, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
    assert (out == 7).all()
    with pytest.raises(MPSTypeError, match="float64 elements"):
        img.writeBytes(torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("fmt", [FMT.float32, FMT.float16, FMT.unorm8, FMT.unorm16])
def test_byte_io_takes_the_storage_type_and_raw_bytes(fmt):
    rng = np.random.default_rng(int(fmt))
    dtype = {FMT.float32: np.float32, FMT.float16: np.float16, FMT.unorm8: np.uint8, FMT.unorm16: np.uint16}[fmt]
    raw = (rng.uniform(0, 1, 16) * (200 if dtype in (np.uint8, np.uint16) else 1)).astype(dtype)
    for data in (raw, raw.view(np.uint8), raw.tobytes(), bytearray(raw.tobytes()), memoryview(raw.tobytes()),
                 torch.from_numpy(raw.copy())):
        img = blank(2, 2, 4, fmt=fmt)
        img.writeBytes(data, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
        back = np.zeros(16, dtype)
        img.readBytes(back, dataLayout=MPSDataLayout.HeightxWidthxFeatureChannels, imageIndex=0)
        np.testing.assert_array_equal(back, raw)
