"""Porting helpers (issue 6): kernels from torch.nn layers and back, checked by running both."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import DEVICE, QUEUE, blank, image, values
from mpsconv import *
from mpsconv.layout import (
    MPSCNNConvolutionWeights, TorchLayers, from_torch, to_torch, torch_output_size, weights_from_hwio, weights_from_oihw,
    weights_to_hwio, weights_to_oihw,
)
from tolerances import assert_close


def run(kernel, x_nchw, out_hw, out_c):
    src = image(x_nchw.permute(0, 2, 3, 1).numpy())
    dst = blank(out_hw[1], out_hw[0], out_c, images=x_nchw.shape[0])
    cb = QUEUE.makeCommandBuffer()
    kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst) if x_nchw.shape[0] == 1 else \
        kernel.encodeBatch(commandBuffer=cb, sourceImages=[src], destinationImages=[dst])
    cb.commit()
    cb.waitUntilCompleted()
    return values(dst)


CONVS = [  # (cin, cout, k, stride, padding, dilation, groups, size)
    (3, 5, 3, 1, 1, 1, 1, (9, 11)),
    (8, 8, (3, 5), (2, 1), (1, 2), 1, 2, (10, 7)),
    (2, 3, 3, 2, 0, 2, 1, (12, 12)),
    (6, 6, 3, 1, 1, 1, 6, (7, 8)),
    (3, 4, 4, 2, 1, 1, 1, (9, 9)),
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CONVS)
def test_conv2d_round_trip(case, backend):
    cin, cout, k, s, p, d, g, (h, w) = case
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(cin, cout, k, s, p, d, g).double()
    x = torch.randn(1, cin, h, w, dtype=torch.float64)
    expected = layer(x).permute(0, 2, 3, 1).detach().numpy()
    kernel = from_torch(layer, DEVICE)
    with use_backend(backend):
        got = run(kernel, x, expected.shape[1:3], cout)
    assert_close(got, expected, "float32", str(case))
    ks, ss, ps, ds = (torch.nn.modules.utils._pair(v) for v in (k, s, p, d))
    assert expected.shape[1] == torch_output_size(h, ks[0], ss[0], ps[0], ds[0])
    back = to_torch(kernel).double()
    assert back.padding == tuple(ps) and back.stride == tuple(ss) and back.groups == g
    np.testing.assert_allclose(back(x).detach().numpy(), layer(x).detach().numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [(3, 4, 3, 2, 1, 1, 1, 1, (5, 6)), (8, 8, 4, 2, 1, 0, 1, 2, (4, 4)),
                                  (2, 3, 3, 3, 0, 2, 2, 1, (3, 5)), (3, 5, 5, 1, 2, 0, 1, 1, (6, 4))])
def test_conv_transpose2d_round_trip(case):
    cin, cout, k, s, p, op, d, g, (h, w) = case
    torch.manual_seed(1)
    layer = torch.nn.ConvTranspose2d(cin, cout, k, s, p, op, g, dilation=d).double()
    x = torch.randn(1, cin, h, w, dtype=torch.float64)
    expected = layer(x).permute(0, 2, 3, 1).detach().numpy()
    assert expected.shape[1] == torch_output_size(h, k, s, p, d, transposed=True, output_padding=op)
    kernel = from_torch(layer, DEVICE)
    assert isinstance(kernel, MPSCNNConvolutionTranspose)
    got = run(kernel, x, expected.shape[1:3], cout)
    assert_close(got, expected, "float32", str(case))
    back = to_torch(kernel).double()
    out = back(x, output_size=list(layer(x).shape[2:]))
    np.testing.assert_allclose(out.detach().numpy(), layer(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_linear_after_flatten_and_fused_neuron():
    """A Linear fed by flatten(NCHW) becomes a fully connected kernel over the HxWxC image."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(3 * 4 * 5, 7).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    expected = torch.relu(layer(x.flatten(1))).detach().numpy()
    relu = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.reLU, a=0.0)
    kernel = from_torch(layer, DEVICE, neuron=relu, input_shape=(3, 4, 5))
    assert isinstance(kernel, MPSCNNFullyConnected) and (kernel.kernelWidth, kernel.kernelHeight) == (5, 4)
    got = run(kernel, x, (1, 1), 7)
    assert_close(got[:, 0, 0], expected, "float32")
    back = to_torch(kernel).double()
    np.testing.assert_allclose(back(x.permute(0, 2, 3, 1).permute(0, 3, 1, 2).flatten(1)).detach().numpy(),
                               layer(x.flatten(1)).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_array_layouts_round_trip():
    rng = np.random.default_rng(3)
    oihw = rng.standard_normal((5, 2, 3, 4)).astype(np.float32)
    ohwi = weights_from_oihw(oihw)
    assert ohwi.shape == (5, 3, 4, 2) and ohwi[4, 1, 3, 0] == oihw[4, 0, 1, 3]
    np.testing.assert_array_equal(weights_to_oihw(ohwi), oihw)
    hwio = weights_to_hwio(ohwi)
    assert hwio.shape == (3, 4, 2, 5) and hwio[1, 3, 0, 4] == oihw[4, 0, 1, 3]
    np.testing.assert_array_equal(weights_from_hwio(hwio), ohwi)


def test_bad_input_is_refused():
    d = MPSCNNConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=2, outputFeatureChannels=4)
    with pytest.raises(MPSValueError, match="needs 72"):
        MPSCNNConvolutionWeights(d, np.zeros(71))
    with pytest.raises(MPSValueError, match="outputFeatureChannels"):
        MPSCNNConvolutionWeights(d, np.zeros(72), np.zeros(3))
    with pytest.raises(MPSValueError, match="rank-4"):
        weights_from_oihw(np.zeros((4, 2, 3)))
    with pytest.raises(MPSValueError, match="padding_mode"):
        from_torch(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), DEVICE)
    with pytest.raises(MPSTypeError, match="Conv2d, ConvTranspose2d, Linear and Sequential"):
        from_torch(torch.nn.ReLU(), DEVICE)
    with pytest.raises(MPSValueError, match="in_features=6"):
        from_torch(torch.nn.Linear(6, 2), DEVICE, input_shape=(1, 2, 2))
    kernel = from_torch(torch.nn.Conv2d(2, 2, 3, padding=1), DEVICE)
    kernel.offset = MPSOffset(x=3, y=1, z=0)
    with pytest.raises(MPSValueError, match="cannot be negative"):
        to_torch(kernel)


def test_weights_source_reloads_new_arrays():
    """MPSCNNConvolutionWeights: a kernel built on it picks up new arrays at reload, and only then."""
    torch.manual_seed(4)
    layer = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    kernel = from_torch(layer, DEVICE)
    ds = kernel.dataSource
    assert isinstance(ds, MPSCNNConvolutionWeights) and ds.bias_array is None
    before = run(kernel, x, (5, 6), 3)
    ds.weights_array = -ds.weights_array
    ds.bias_array = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(run(kernel, x, (5, 6), 3), before)  # not reloaded yet
    kernel.reloadWeightsAndBiasesFromDataSource()
    assert_close(run(kernel, x, (5, 6), 3), -before + [1.0, 2.0, 3.0], "float32")
    with pytest.raises(MPSValueError, match="54 are needed"):
        ds.weights_array = np.zeros(53)
    with pytest.raises(MPSValueError, match="outputFeatureChannels"):
        ds.bias_array = [1.0]


# -- 'same', replicate, and whole nn.Sequential models


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("k, d, mode", [(1, 1, "zeros"), (2, 1, "zeros"), (3, 1, "replicate"), (4, 1, "zeros"),
                                        (5, 2, "replicate"), ((2, 3), (1, 2), "zeros"), (4, 1, "replicate")])
def test_same_padding_and_replicate(backend, k, d, mode):
    """padding='same' for any kernel (an even one pads one more at the bottom and right, as PyTorch
    does) and padding_mode='replicate' (the clamp edge), against PyTorch itself on random data."""
    torch.manual_seed(1)
    layer = torch.nn.Conv2d(3, 4, k, padding="same", dilation=d, padding_mode=mode).eval()
    x = torch.randn(1, 3, 7, 9)
    kernel = from_torch(layer, DEVICE)
    assert kernel.edgeMode == (MPSImageEdgeMode.clamp if mode == "replicate" else MPSImageEdgeMode.zero)
    with use_backend(backend):
        got = run(kernel, x, (7, 9), 4)
    with torch.no_grad():
        want = layer(x).permute(0, 2, 3, 1).numpy()
    assert_close(got, want, "float32", f"k={k} d={d} {mode}")
    valid = torch.nn.Conv2d(3, 4, 3, padding="valid", padding_mode="replicate").eval()
    with torch.no_grad():
        assert_close(run(from_torch(valid, DEVICE), x, (5, 7), 4), valid(x).permute(0, 2, 3, 1).numpy(), "float32")


def test_padding_modes_without_an_mps_edge_mode_are_refused_by_name():
    for mode in ("reflect", "circular"):
        with pytest.raises(MPSValueError, match=f"padding_mode='{mode}'.*'reflect' and 'circular' have no MPS edge"):
            from_torch(torch.nn.Conv2d(2, 2, 3, padding="same", padding_mode=mode), DEVICE)


def _randomized_batch_norm(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
    return bn


def small_model():
    """A MobileNet-style stem and block, then one of each activation MPS fuses, then a classifier."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), _randomized_batch_norm(nn.BatchNorm2d(16), 1),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), _randomized_batch_norm(nn.BatchNorm2d(16), 2),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1), _randomized_batch_norm(nn.BatchNorm2d(8, affine=False), 3),
        nn.Conv2d(8, 8, 2, padding="same"), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"), nn.PReLU(),
        nn.Conv2d(8, 8, 1), nn.Sigmoid(), nn.Tanh(),  # the second has nothing to fuse into: a neuron kernel
        nn.Conv2d(8, 8, 1), nn.ELU(0.7),
        nn.Conv2d(8, 8, 1), nn.Softplus(beta=2.0),
        nn.Conv2d(8, 8, 1), nn.Hardsigmoid(),
        nn.Conv2d(8, 8, 1), nn.Softsign(),
        nn.Dropout(0.5),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.GELU(),
        nn.Flatten(), nn.Linear(4 * 12 * 10, 10),
    ).eval()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_sequential_ports_as_one_list_of_kernels(backend):
    model = small_model()
    layers = from_torch(model, DEVICE, input_shape=(3, 12, 10))
    assert isinstance(layers, TorchLayers) and len(layers) == 13
    assert isinstance(layers[6], MPSCNNNeuron) and layers[6].neuronType == MPSCNNNeuronType.tanH
    assert layers[0].fusedNeuronDescriptor.neuronType == MPSCNNNeuronType.reLUN
    assert layers.output_shape(12, 10) == (10, 1, 1)
    x = torch.randn(2, 3, 12, 10)
    src = image(x.permute(0, 2, 3, 1).numpy())
    with use_backend(backend):
        cb = QUEUE.makeCommandBuffer()
        out = layers.encode(commandBuffer=cb, sourceImage=src)
        cb.commit()
        cb.waitUntilCompleted()
    with torch.no_grad():
        want = model(x).numpy()
    assert (out.width, out.height, out.featureChannels, out.numberOfImages) == (1, 1, 10, 2)
    assert_close(values(out)[:, 0, 0, :], want, "float32")


@pytest.mark.parametrize("modules, error, message", [
    (lambda nn: [nn.Conv2d(2, 4, 1), nn.SiLU()], MPSValueError, "SiLU.*has no MPSCNNNeuronType"),
    (lambda nn: [nn.Conv2d(2, 4, 1), nn.GELU(approximate="tanh")], MPSValueError, "has no MPSCNNNeuronType"),
    (lambda nn: [nn.Conv2d(2, 4, 1), nn.MaxPool2d(2)], MPSTypeError, r"Sequential\[1\] is MaxPool2d"),
    (lambda nn: [nn.Conv2d(2, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)], MPSValueError, "does not follow a Conv2d"),
    (lambda nn: [nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(4 * 9, 3)], MPSValueError, "pass input_shape"),
    (lambda nn: [nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)], MPSValueError, "running stat"),
])
def test_what_a_sequential_cannot_port_is_named(modules, error, message):
    with pytest.raises(error, match=message):
        from_torch(torch.nn.Sequential(*modules(torch.nn)).eval(), DEVICE)
