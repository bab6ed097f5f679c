"""Regression tests: layouts on which PyTorch's CPU convolution misbehaves, found by the property
tests. Each runs the torch backend against the reference on the exact failing geometry."""
from __future__ import annotations

import pytest

from mpsconv import MPSCNNFullyConnected, MPSCNNNeuronType, MPSImageEdgeMode, MPSOffset, MPSRectNoClip
from mpsconv import MPSImageFeatureChannelFormat as FMT
from test_properties import build, check_against_reference


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
