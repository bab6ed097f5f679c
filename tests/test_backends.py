"""Regression tests: layouts on which PyTorch's CPU convolution misbehaves, found by the property
tests. Each runs the torch backend against the reference on the exact failing geometry."""
from __future__ import annotations

import weakref

import numpy as np
import pytest

from helpers import DEVICE, QUEUE, blank, conv, image, run, values
from mpsconv import MPSCNNFullyConnected, MPSCNNNeuronType, MPSDataType, MPSImageEdgeMode, MPSOffset, MPSRectNoClip
from mpsconv import MPSImageFeatureChannelFormat as FMT, load, save
from test_properties import build, check_against_reference
from tolerances import assert_close


def problem(**changes):
    p = dict(g=1, cin=1, cout=1, kernel=(1, 1), stride=(1, 1), dilation=(1, 1), src=(1, 1, 1, 1), dst=(1, 1, 1, 1),
             sfo=0, dfo=0, clip=MPSRectNoClip, offset=MPSOffset(0, 0, 0), edge=MPSImageEdgeMode.zero,
             neuron=MPSCNNNeuronType.none, bias=False, src_fmt=FMT.float32, dst_fmt=FMT.float32, seed=0)
    p.update(changes)
    return p


CASES = {
    # conv2d, N >= 2, weights [1, 1, 1, 7] whose strides read as both layouts
    "ambiguous_weight_strides": problem(kernel=(1, 7), stride=(1, 2), src=(2, 1, 1, 1), dst=(2, 2, 1, 1),
                                        edge=MPSImageEdgeMode.clamp),
    # conv2d, a one-pixel one-channel input sliced from a 4-lane image: strides (4, 1, 4, 4)
    "degenerate_input_strides": problem(kernel=(4, 4), stride=(1, 2), dst=(1, 3, 1, 1)),
    # oneDNN pointwise convolution, N = 2, 1x1 output, one output channel
    "pointwise_ambiguous_output": problem(cin=2, kernel=(4, 7), src=(2, 4, 7, 2), dst=(2, 1, 1, 1)),
    # oneDNN pointwise convolution crashed on pads far larger than the window
    "far_offset_pads": problem(cin=2, cout=2, kernel=(5, 6), stride=(2, 3), dilation=(2, 3), src=(1, 5, 2, 2),
                               dst=(1, 5, 7, 2), offset=MPSOffset(-20, 3, 0)),
}


@pytest.mark.parametrize("path", ["onednn_everywhere", "in_place_everywhere"])
@pytest.mark.parametrize("name", list(CASES))
def test_pytorch_layout_regressions(name, path, request):
    request.getfixturevalue(path)  # the oneDNN path, or the one into the destination itself
    p = CASES[name]
    cls = MPSCNNFullyConnected if name == "pointwise_ambiguous_output" else None
    kernel, src, prior = build(p, cls) if cls else build(p)
    check_against_reference(p, kernel, src, prior, "torch")


@pytest.mark.parametrize("groups", [1, 2])
def test_a_kernel_keeps_only_onednns_copy_of_its_weights(onednn_everywhere, groups, tmp_path):
    """Once oneDNN holds a kernel's weights in its blocked layout, the kernel drops its own float32
    array (a network's weights take one copy's memory, not two). Every reader still gets the same
    values, read back from oneDNN's copy: another geometry, the reference backend, an exported state,
    an archive, and a reload from that state."""
    rng = np.random.default_rng(11)
    w = rng.uniform(-1, 1, 16 * 3 * 3 * (8 // groups)).astype(np.float32)
    k = conv(3, 3, 8, 16, weights=w, bias=rng.uniform(-1, 1, 16).astype(np.float32), groups=groups,
             kernel_type=MPSDataType.float32)
    effective = k._loaded.weights.copy()
    array = weakref.ref(k._loaded.kept._array)
    src = image(rng.uniform(-1, 1, (2, 9, 7, 8)))
    fast = values(run(k, src, blank(7, 9, 16, images=2), backend="torch"))
    assert array() is None, "the kernel still holds its float32 weights beside oneDNN's copy"
    np.testing.assert_array_equal(k._loaded.weights, effective)
    assert_close(fast, values(run(k, src, blank(7, 9, 16, images=2), backend="reference")), "float32")
    other = image(rng.uniform(-1, 1, (1, 5, 11, 8)))  # another geometry: reordered from oneDNN's copy
    assert_close(values(run(k, other, blank(11, 5, 16), backend="torch")),
                 values(run(k, other, blank(11, 5, 16), backend="reference")), "float32")

    state = k.exportWeightsAndBiases(QUEUE.makeCommandBuffer())
    np.testing.assert_array_equal(np.frombuffer(state.weights.contents().tobytes(), np.float32),
                                  effective.reshape(-1))
    save(k, tmp_path / "k.mpsconv")
    np.testing.assert_array_equal(load(tmp_path / "k.mpsconv", device=DEVICE)._loaded.weights, effective)
    cb = QUEUE.makeCommandBuffer()
    k.reloadWeightsAndBiases(cb, state=state)
    cb.commit()
    np.testing.assert_array_equal(values(run(k, src, blank(7, 9, 16, images=2), backend="torch")), fast)
