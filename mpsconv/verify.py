"""``mpsconv verify``: every kernel of the family on one device, each fast backend against the
reference backend, on random data (our addition)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import backends, config
from .binary import MPSCNNBinaryConvolution
from .convolution import MPSCNNConvolution, MPSCNNFullyConnected
from .datasource import _ArrayDataSource
from .descriptor import (
    MPSCNNBinaryConvolutionType, MPSCNNConvolutionDescriptor, MPSCNNConvolutionGradientOption,
    MPSCNNDepthWiseConvolutionDescriptor, MPSCNNSubPixelConvolutionDescriptor,
)
from .errors import MPSConvError
from .gradient import MPSCNNConvolutionGradient, MPSCNNConvolutionTransposeGradient, MPSCNNFullyConnectedGradient
from .image import MPSImage, MPSImageDescriptor, MPSImageFeatureChannelFormat as FMT
from .layout import MPSCNNConvolutionWeights
from .core.activations import MPSCNNNeuronType
from .neuron import MPSNNNeuronDescriptor
from .tolerances import error_ratio, mismatches
from .transpose import MPSCNNConvolutionTranspose
from .types import MPSDataType, MPSOffset


@dataclass
class Case:
    name: str
    fmt: str
    run: Callable  # (device, rng) -> list of arrays to compare


def _image(device, values, fmt="float32"):
    return MPSImage.from_numpy(np.asarray(values, np.float64), featureChannelFormat=FMT[fmt], device=device)


def _blank(device, w, h, c, n=1, fmt="float32"):
    return MPSImage(device=device, imageDescriptor=MPSImageDescriptor(
        channelFormat=FMT[fmt], width=w, height=h, featureChannels=c, numberOfImages=n))


def _desc(cls, k, cin, cout, **props):
    d = cls(kernelWidth=k, kernelHeight=k, inputFeatureChannels=cin, outputFeatureChannels=cout)
    for name, value in props.items():
        setattr(d, name, value)
    return d


def _weights(rng, d, depthwise=False):
    ig = 1 if depthwise else d.inputFeatureChannels // d.groups
    count = d.outputFeatureChannels * d.kernelHeight * d.kernelWidth * ig
    return MPSCNNConvolutionWeights(d, rng.uniform(-1, 1, count), rng.uniform(-1, 1, d.outputFeatureChannels))


def _forward(kernel_cls, d, src_shape, dst_shape, fmt="float32", depthwise=False, setup=None):
    def run(device, rng):
        kernel = kernel_cls(device=device, weights=_weights(rng, d, depthwise))
        if setup:
            setup(kernel)
        dst = _blank(device, dst_shape[2], dst_shape[1], dst_shape[3], dst_shape[0], fmt)
        cb = device.makeCommandQueue().makeCommandBuffer()
        kernel.encode(commandBuffer=cb, sourceImage=_image(device, rng.uniform(-1, 1, src_shape), fmt),
                      destinationImage=dst)
        cb.commit()
        cb.waitUntilCompleted()
        return [dst.numpy()]
    return run


def _neuron(kind, a=0.0, b=0.0, c=0.0):
    return MPSNNNeuronDescriptor.cnnNeuronDescriptor(kind, a=a, b=b, c=c)


def _conv_with(setup_desc, dst_channels=8, **kw):
    d = _desc(MPSCNNConvolutionDescriptor, 3, 4, 8)
    setup_desc(d)
    return _forward(MPSCNNConvolution, d, (2, 9, 10, 4), (2, 9, 10, dst_channels), **kw)


def _slice_and_clip(kernel):
    kernel.destinationFeatureChannelOffset = 4
    kernel.offset = MPSOffset(x=1, y=0, z=0)


def _binary(device, rng):
    class Bits(_ArrayDataSource):  # bit-packed weights: channel c in bit c % 32 of word c // 32
        def dataType(self):
            return MPSDataType.uInt32

    d = _desc(MPSCNNConvolutionDescriptor, 3, 8, 4)
    words = rng.integers(0, 256, (4, 3, 3, 1)).astype(np.uint32)
    kernel = MPSCNNBinaryConvolution(device=device, convolutionData=Bits(d, words, None, label="bits"),
                                     scaleValue=0.5, type=MPSCNNBinaryConvolutionType.xnor, flags=0)
    dst = _blank(device, 7, 6, 4)
    cb = device.makeCommandQueue().makeCommandBuffer()
    kernel.encode(commandBuffer=cb, sourceImage=_image(device, rng.uniform(-1, 1, (6, 7, 8))), destinationImage=dst)
    cb.commit()
    cb.waitUntilCompleted()
    return [dst.numpy()]


def _gradient(fwd_cls, grad_cls, d, src_shape, dst_shape):
    def run(device, rng):
        ds = _weights(rng, d)
        fwd, grad = fwd_cls(device=device, weights=ds), grad_cls(device=device, weights=ds)
        grad.gradientOption = MPSCNNConvolutionGradientOption.all
        src = _image(device, rng.uniform(-1, 1, src_shape))
        cb = device.makeCommandQueue().makeCommandBuffer()
        state = fwd.resultState(sourceImage=src)
        n, h, w, c = dst_shape
        fwd.encode(commandBuffer=cb, sourceImage=src, destinationState=state, destinationImage=_blank(device, w, h, c, n))
        d_src = _blank(device, src_shape[2], src_shape[1], src_shape[3], src_shape[0])
        e = _image(device, rng.uniform(-1, 1, dst_shape))
        grad.destinationImageDescriptor(sourceImages=[e, src], sourceStates=[state])  # sets the offsets
        grad.encode(commandBuffer=cb, sourceGradient=e, sourceImage=src, gradientState=state, destinationGradient=d_src)
        cb.commit()
        cb.waitUntilCompleted()
        return [d_src.numpy()] + [np.frombuffer(buf.contents().tobytes(), np.float32)
                                  for buf in (state.gradientForWeights, state.gradientForBiases)]
    return run


def cases() -> list[Case]:
    """The self-check table: each row is one kernel configuration."""
    rows = [
        Case("conv 3x3 + bias", "float32", _conv_with(lambda d: None)),
        Case("conv 3x3 fp16 storage", "float16", _conv_with(lambda d: None, fmt="float16")),
        Case("conv slice + offset", "float32", _conv_with(lambda d: None, 16, setup=_slice_and_clip)),
        Case("conv stride 2 dilation 2 groups 2", "float32", _forward(
            MPSCNNConvolution, _desc(MPSCNNConvolutionDescriptor, 3, 8, 8, strideInPixelsX=2, strideInPixelsY=2,
                                     dilationRateX=2, dilationRateY=2, groups=2), (1, 11, 9, 8), (1, 6, 5, 8))),
        Case("depthwise 3x3", "float32", _forward(
            MPSCNNConvolution, _desc(MPSCNNDepthWiseConvolutionDescriptor, 3, 6, 6), (1, 8, 7, 6), (1, 8, 7, 6),
            depthwise=True)),
        Case("sub-pixel x2", "float32", _forward(
            MPSCNNConvolution, _desc(MPSCNNSubPixelConvolutionDescriptor, 3, 3, 8, subPixelScaleFactor=2),
            (1, 5, 6, 3), (1, 10, 12, 2))),
        Case("fully connected", "float32", _forward(
            MPSCNNFullyConnected, _desc(MPSCNNConvolutionDescriptor, 4, 3, 10), (3, 4, 4, 3), (3, 1, 1, 10))),
        Case("transpose stride 2", "float32", _forward(
            MPSCNNConvolutionTranspose, _desc(MPSCNNConvolutionDescriptor, 3, 5, 4, strideInPixelsX=2,
                                              strideInPixelsY=2), (1, 5, 6, 5), (1, 10, 12, 4))),
        Case("binary xnor", "float32", _binary),
        Case("conv gradient", "float32", _gradient(
            MPSCNNConvolution, MPSCNNConvolutionGradient,
            _desc(MPSCNNConvolutionDescriptor, 3, 4, 8, strideInPixelsX=2, strideInPixelsY=2), (2, 9, 9, 4),
            (2, 5, 5, 8))),
        Case("fully connected gradient", "float32", _gradient(
            MPSCNNFullyConnected, MPSCNNFullyConnectedGradient, _desc(MPSCNNConvolutionDescriptor, 3, 4, 6),
            (2, 3, 3, 4), (2, 1, 1, 6))),
        Case("transpose gradient", "float32", _gradient(
            MPSCNNConvolutionTranspose, MPSCNNConvolutionTransposeGradient,
            _desc(MPSCNNConvolutionDescriptor, 3, 4, 5, strideInPixelsX=2, strideInPixelsY=2), (1, 4, 5, 4),
            (1, 8, 10, 5))),
    ]
    for kind in MPSCNNNeuronType:
        if kind in (MPSCNNNeuronType.none, MPSCNNNeuronType.count) or kind.name == "pReLU":
            continue
        params = dict(a=0.5, b=0.25, c=2.0) if kind.name != "logarithm" else dict(a=-1.0, b=0.5, c=2.0)

        def fuse(d, kind=kind, params=params):
            d.fusedNeuronDescriptor = _neuron(kind, **params)
        rows.append(Case(f"conv + {kind.name}", "float32", _conv_with(fuse)))
    prelu = np.linspace(-1, 1, 8, dtype=np.float32).tobytes()
    rows.append(Case("conv + pReLU (per channel)", "float32", _conv_with(
        lambda d: setattr(d, "fusedNeuronDescriptor", MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(prelu)))))
    return rows


def verify(device, *, seed: int = 0, out=print) -> bool:
    """Run every case on ``device`` with each usable non-reference backend; print a table; True if all pass."""
    names = [name for name in backends.usable(device) if name != "reference"]
    out(f"{'kernel':<34} " + " ".join(f"{name:>10}" for name in names) + "   worst error / tolerance")
    ok = True
    for case in cases():
        with config.use_backend("reference"):
            want = case.run(device, np.random.default_rng(seed))
        cells, worst = [], 0.0
        for name in names:
            try:
                with config.use_backend(name):
                    got = case.run(device, np.random.default_rng(seed))
            except MPSConvError as e:
                if "does not support" in str(e):
                    cells.append("n/a")
                    continue
                raise
            bad = sum(int(mismatches(g, w, case.fmt).sum()) for g, w in zip(got, want))
            worst = max(worst, *(error_ratio(g, w, case.fmt) for g, w in zip(got, want)))
            cells.append("pass" if bad == 0 else f"FAIL({bad})")
            ok &= bad == 0
        out(f"{case.name:<34} " + " ".join(f"{cell:>10}" for cell in cells) + f"   {worst:.2g}")
    return ok
