"""Shared test helpers: devices, images, data sources, one-call encode-and-run."""
from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import numpy as np

from mpsconv import (
    MPSCNNConvolution, MPSCNNConvolutionDataSource, MPSCNNConvolutionDescriptor, MPSDataType, MPSImage,
    MPSImageDescriptor, MPSImageFeatureChannelFormat, MPSNNNeuronDescriptor, MPSOffset, MTLCreateSystemDefaultDevice,
    use_backend,
)

FMT = MPSImageFeatureChannelFormat
DEVICE = MTLCreateSystemDefaultDevice()
QUEUE = DEVICE.makeCommandQueue()


def image(values, fmt=FMT.float32) -> MPSImage:
    """An image holding ``values`` ((H, W, C) or (N, H, W, C))."""
    return MPSImage.from_numpy(np.asarray(values, dtype=np.float64), featureChannelFormat=fmt, device=DEVICE)


def blank(width, height, channels, images=1, fmt=FMT.float32, fill=None, rng=None) -> MPSImage:
    """A new image, zero-filled, filled with ``fill``, or random when ``rng`` is given."""
    if rng is not None:
        return image(rng.uniform(-1, 1, (images, height, width, channels)), fmt)
    if fill is not None:
        return image(np.full((images, height, width, channels), float(fill)), fmt)
    return MPSImage(device=DEVICE, imageDescriptor=MPSImageDescriptor(
        channelFormat=fmt, width=width, height=height, featureChannels=channels, numberOfImages=images))


class ArraySource(MPSCNNConvolutionDataSource):
    """A data source over NumPy arrays that counts its lifecycle calls."""

    def __init__(self, descriptor, weights, bias=None, data_type=MPSDataType.float32, kernel_type=None, label=None,
                 **optional):
        self.desc, self.w, self.b, self.data_type, self._label = descriptor, weights, bias, data_type, label
        self.kernel_type = kernel_type
        self.calls: list[str] = []
        self.load_result = True
        for name, value in optional.items():
            setattr(self, name, (lambda v: (lambda: v))(value))

    def dataType(self):
        self.calls.append("dataType")
        return self.data_type

    def descriptor(self):
        self.calls.append("descriptor")
        return self.desc

    def weights(self):
        self.calls.append("weights")
        return self.w

    def biasTerms(self):
        self.calls.append("biasTerms")
        return self.b

    def load(self):
        self.calls.append("load")
        return self.load_result

    def purge(self):
        self.calls.append("purge")

    def label(self):
        self.calls.append("label")
        return self._label

    def __getattr__(self, name):
        if name == "kernelWeightsDataType" and self.__dict__.get("kernel_type") is not None:
            return lambda: self.kernel_type
        raise AttributeError(name)


def descriptor(kw=3, kh=3, cin=1, cout=1, **props) -> MPSCNNConvolutionDescriptor:
    d = MPSCNNConvolutionDescriptor(kernelWidth=kw, kernelHeight=kh, inputFeatureChannels=cin,
                                    outputFeatureChannels=cout)
    for name, value in props.items():
        setattr(d, name, value)
    return d


def conv(kw=3, kh=3, cin=1, cout=1, weights=None, bias=None, cls=MPSCNNConvolution, kernel_type=None, **props):
    """A convolution kernel; weights default to all ones (OHWI)."""
    d = descriptor(kw, kh, cin, cout, **props)
    count = cout * kh * kw * (cin // d.groups)
    w = np.ones(count, np.float32) if weights is None else np.asarray(weights, np.float32).reshape(-1)
    return cls(device=DEVICE, weights=ArraySource(d, w, bias, kernel_type=kernel_type))


def batch_norm_prelu_conv(rng):
    """A 3x2, 8 -> 8 convolution (stride 2 in x, 2 groups) with batch normalization, a per-channel
    PReLU, a bias, offset (1, 0, 0) and a label: every part an archive must carry."""
    d = descriptor(3, 2, 8, 8, strideInPixelsX=2, groups=2)
    d.setBatchNormalizationParametersForInferenceWithMean(
        rng.uniform(-1, 1, 8), variance=rng.uniform(0.5, 2, 8), gamma=rng.uniform(-1, 1, 8),
        beta=rng.uniform(-1, 1, 8), epsilon=1e-3)
    d.fusedNeuronDescriptor = MPSNNNeuronDescriptor.cnnNeuronPReLUDescriptor(rng.uniform(0, 1, 8).astype(np.float32))
    k = MPSCNNConvolution(device=DEVICE, weights=ArraySource(d, rng.uniform(-1, 1, 192), rng.uniform(-1, 1, 8)))
    k.offset, k.label = MPSOffset(1, 0, 0), "layer"
    return k


def run(kernel, src, dst=None, backend=None, **kwargs):
    """Encode (allocating when ``dst`` is None), commit, wait; returns the destination."""
    with use_backend(backend) if backend else contextlib.nullcontext():
        cb = QUEUE.makeCommandBuffer()
        if dst is None:
            dst = kernel.encode(commandBuffer=cb, sourceImage=src, **kwargs)
        else:
            kernel.encode(commandBuffer=cb, sourceImage=src, destinationImage=dst, **kwargs)
        cb.commit()
        cb.waitUntilCompleted()
    return dst


def framework_transpose_geometry(k: int, d: int, n: int, s: int, t: int):
    """``(padding, output size)`` of PyTorch's ``conv_transpose2d`` that equals a transpose kernel with
    ``kernelOffset = t`` on an ``n``-pixel source (spec §10.3: ``pad = T + (Kd - 1) - (Kd >> 1)``),
    or None where PyTorch cannot express it (negative padding, no output)."""
    kd = (k - 1) * d + 1
    pad = t + (kd - 1) - (kd >> 1)
    size = (n - 1) * s - 2 * pad + kd
    return None if pad < 0 or size < 1 else (pad, size)


def values(img) -> np.ndarray:
    """An image's feature values, NHWC float64."""
    return np.asarray(img.numpy(), dtype=np.float64)


def quiet(fn, *args, **kwargs):
    """Call a deprecated API without the DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


@contextlib.contextmanager
def launched_kernels(launchers: list | None = None):
    """The Triton kernels the triton backend launches meanwhile, as ``"<kernel> g<groups merged>"`` (a
    list, filled in); their ``launch.Launcher``s go into ``launchers`` where one is given."""
    from mpsconv.backends import triton

    names, launch = [], triton._launch

    def spy(bound, prepared, scratch):
        launches = launch(bound, prepared, scratch)
        names.extend(f"{launcher.kernel.fn.__name__} g{bound.plan.config.merge}" for launcher, _, _ in launches)
        if launchers is not None:
            launchers.extend(launcher for launcher, _, _ in launches)
        return launches

    with mock.patch.object(triton, "_launch", spy):
        yield names
