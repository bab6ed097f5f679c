"""Per-class fields of the secure archives (``coding.py`` frames them; this module fills them).

Each archivable class maps to ``encode(obj) -> (fields, tensors)`` and ``decode(obj, fields,
tensors, device)``. Decoding goes through the class's normal construction path, so an archive
can never build an object a constructor would refuse.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import binary, convolution, descriptor, gradient, neuron, transpose
from .binary import MPSCNNBinaryConvolution
from .convolution import _WeightedKernel
from .datasource import _ArrayDataSource
from .descriptor import MPSCNNConvolutionDescriptor, MPSCNNConvolutionGradientOption, _BatchNorm
from .errors import MPSArchiveError
from .image import MPSImage, MPSTemporaryImage
from .kernel import MPSCNNKernel, MPSImageEdgeMode, MPSKernelOptions, MPSNNDefaultPadding
from .metal import MTLCreateSystemDefaultDevice, MTLDevice
from .neuron import MPSCNNNeuron, MPSNNNeuronDescriptor, NeuronKernel, float32_values
from .types import MPSDataType, MPSOffset, MTLOrigin, MTLRegion, MTLSize


def _classes() -> dict:

    classes = {
        "MPSNNNeuronDescriptor": neuron.MPSNNNeuronDescriptor,
        "MPSCNNConvolutionDescriptor": descriptor.MPSCNNConvolutionDescriptor,
        "MPSCNNDepthWiseConvolutionDescriptor": descriptor.MPSCNNDepthWiseConvolutionDescriptor,
        "MPSCNNSubPixelConvolutionDescriptor": descriptor.MPSCNNSubPixelConvolutionDescriptor,
        "MPSCNNConvolution": convolution.MPSCNNConvolution,
        "MPSCNNFullyConnected": convolution.MPSCNNFullyConnected,
        "MPSCNNConvolutionTranspose": transpose.MPSCNNConvolutionTranspose,
        "MPSCNNConvolutionGradient": gradient.MPSCNNConvolutionGradient,
        "MPSCNNFullyConnectedGradient": gradient.MPSCNNFullyConnectedGradient,
        "MPSCNNConvolutionTransposeGradient": gradient.MPSCNNConvolutionTransposeGradient,
        "MPSCNNBinaryConvolution": binary.MPSCNNBinaryConvolution,
        "MPSCNNBinaryFullyConnected": binary.MPSCNNBinaryFullyConnected,
        "MPSCNNNeuron": neuron.MPSCNNNeuron,
        "MPSCNNNeuronGradient": gradient.MPSCNNNeuronGradient,
    }
    for name in dir(neuron):
        value = getattr(neuron, name)
        if isinstance(value, type) and issubclass(value, neuron.MPSCNNNeuron):
            classes[name] = value
    return classes


def class_named(name: str):
    return _classes().get(name)


def _f32(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))


def _tensor(tensors: dict, name: str) -> np.ndarray:
    if name not in tensors:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive lacks the array {name!r}")
    return tensors[name]


def _field(fields: dict, name: str):
    if name not in fields:
        raise MPSArchiveError(f"NSKeyedUnarchiver: the archive lacks the field {name!r}")
    return fields[name]


# -- neuron descriptors


def _encode_neuron(d, prefix: str, tensors: dict) -> dict:

    if d.data is not None:
        tensors[prefix + "data"] = _f32(float32_values(d.data, "archive", "data"))
    return {"type": int(d.neuronType), "a": d.a, "b": d.b, "c": d.c, "data": d.data is not None}


def _decode_neuron(fields: dict, prefix: str, tensors: dict):
    d = MPSNNNeuronDescriptor._make(0, 0.0, 0.0, 0.0)
    d.neuronType = _field(fields, "type")
    d.a, d.b, d.c = float(fields["a"]), float(fields["b"]), float(fields["c"])
    if _field(fields, "data"):
        d.data = _tensor(tensors, prefix + "data").astype("<f4").tobytes()
    return d


# -- convolution descriptors

_DESCRIPTOR_INTS = ("kernelWidth", "kernelHeight", "inputFeatureChannels", "outputFeatureChannels",
                    "strideInPixelsX", "strideInPixelsY", "groups", "dilationRateX", "dilationRateY")


def _encode_descriptor(d, prefix: str, tensors: dict) -> dict:
    fields = {name: getattr(d, name) for name in _DESCRIPTOR_INTS}
    fields["class"] = type(d).__name__
    if hasattr(d, "subPixelScaleFactor"):
        fields["subPixelScaleFactor"] = d.subPixelScaleFactor
    fields["fused"] = _encode_neuron(d._fused, prefix + "fused.", tensors)
    fields["legacy"] = None if d._neuron is None else _encode_neuron(d._neuron._descriptor, prefix + "legacy.", tensors)
    fields["neuron_source"] = d._neuron_source
    fields["batch_norm"] = None
    if d._batch_norm is not None:
        fields["batch_norm"] = d._batch_norm.epsilon
        for name, values in zip(("mean", "variance", "gamma", "beta"), d._batch_norm.arrays()):
            tensors[prefix + "bn." + name] = _f32(values)
    return fields


def _decode_descriptor(d, fields: dict, prefix: str, tensors: dict, device) -> None:

    type(d).__init__(d)
    try:
        for name in _DESCRIPTOR_INTS + (("subPixelScaleFactor",) if "subPixelScaleFactor" in fields else ()):
            setattr(d, name, _field(fields, name))
    except (TypeError, ValueError) as exc:
        raise MPSArchiveError(f"NSKeyedUnarchiver: invalid descriptor field: {exc}") from None
    d._fused = _decode_neuron(_field(fields, "fused"), prefix + "fused.", tensors)
    if fields.get("legacy") is not None:
        legacy = _decode_neuron(fields["legacy"], prefix + "legacy.", tensors)
        d._neuron = MPSCNNNeuron(device=device or MTLCreateSystemDefaultDevice(), neuronDescriptor=legacy)
    d._neuron_source = fields.get("neuron_source", "fused")
    if fields.get("batch_norm") is not None:
        arrays = [_tensor(tensors, prefix + "bn." + n).copy() for n in ("mean", "variance", "gamma", "beta")]
        d._batch_norm = _BatchNorm(*arrays, float(fields["batch_norm"]))


# -- kernels


def _encode_kernel_base(k: MPSCNNKernel) -> dict:
    padding = k.padding
    if type(padding) is not MPSNNDefaultPadding:
        raise MPSArchiveError(f"{type(k).__name__}: its padding policy {type(padding).__name__} cannot be archived "
                              "(only MPSNNDefaultPadding objects are secure-codable here)")
    allocator = k.destinationImageAllocator
    if allocator is MPSTemporaryImage.defaultAllocator():
        allocator_name = "temporary"
    elif allocator is MPSImage.defaultAllocator():
        allocator_name = "image"
    else:
        raise MPSArchiveError(f"{type(k).__name__}: its destinationImageAllocator {type(allocator).__name__} cannot "
                              "be archived (only the two default allocators are secure-codable here)")
    return {
        "options": int(k.options), "label": k.label, "offset": list(k.offset),
        "clipRect": [list(k.clipRect.origin), list(k.clipRect.size)],
        "destinationFeatureChannelOffset": k.destinationFeatureChannelOffset,
        "sourceFeatureChannelOffset": k.sourceFeatureChannelOffset,
        "sourceFeatureChannelMaxCount": k.sourceFeatureChannelMaxCount,
        "edgeMode": int(k.edgeMode), "padding": int(padding.paddingMethod()), "padding_custom_edge": padding._custom_edge,
        "allocator": allocator_name,
    }


def _decode_kernel_base(k: MPSCNNKernel, fields: dict) -> None:
    try:
        k.options = MPSKernelOptions(_field(fields, "options"))
        k.label = fields.get("label")
        k.offset = MPSOffset(*_field(fields, "offset"))
        origin, size = _field(fields, "clipRect")
        k.clipRect = MTLRegion(MTLOrigin(*origin), MTLSize(*size))
        k.destinationFeatureChannelOffset = _field(fields, "destinationFeatureChannelOffset")
        k.sourceFeatureChannelOffset = _field(fields, "sourceFeatureChannelOffset")
        k.sourceFeatureChannelMaxCount = _field(fields, "sourceFeatureChannelMaxCount")
        k.edgeMode = MPSImageEdgeMode(_field(fields, "edgeMode"))
        k.padding = MPSNNDefaultPadding(_field(fields, "padding"), _custom_edge=bool(fields.get("padding_custom_edge")))
    except (TypeError, ValueError) as exc:
        raise MPSArchiveError(f"NSKeyedUnarchiver: invalid kernel field: {exc}") from None
    k.destinationImageAllocator = (MPSTemporaryImage if fields.get("allocator") == "temporary" else MPSImage) \
        .defaultAllocator()


def _encode_convolution(k) -> tuple[dict, dict]:
    if not k._archivable:
        raise MPSArchiveError(f"{type(k).__name__}: a kernel made with the deprecated pointer initializer cannot be "
                              "archived; build it from a data source")
    tensors = {"weights": np.ascontiguousarray(k._loaded.weights, np.float32), "bias": _f32(k._loaded.bias)}
    fields = _encode_kernel_base(k)
    fields["accumulator"] = int(k.accumulatorPrecisionOption)
    fields["kernel_weights_type"] = int(k._loaded.kernel_weights_type)
    fields["data_source_label"] = k._loaded.label
    if hasattr(k, "_kernel_offset"):
        fields["kernel_offset"] = list(k._kernel_offset)
    if hasattr(k, "_gradient_option"):
        fields["gradient_option"] = int(k._gradient_option)
    fields["descriptor"] = _encode_descriptor(k._loaded.descriptor, "descriptor.", tensors)
    return fields, tensors


def _decode_convolution(k, fields: dict, tensors: dict, device) -> None:

    descriptor_fields = _field(fields, "descriptor")
    cls = class_named(descriptor_fields.get("class", "MPSCNNConvolutionDescriptor"))
    if cls is None or not issubclass(cls, MPSCNNConvolutionDescriptor):
        raise MPSArchiveError(f"NSKeyedUnarchiver: invalid descriptor class {descriptor_fields.get('class')!r}")
    descriptor = cls.__new__(cls)
    _decode_descriptor(descriptor, descriptor_fields, "descriptor.", tensors, device)
    descriptor._batch_norm = None  # the archived weights are the effective ones: batch norm is folded in
    weights = _tensor(tensors, "weights")
    try:
        kernel_type = MPSDataType(_field(fields, "kernel_weights_type"))
    except ValueError:
        raise MPSArchiveError("NSKeyedUnarchiver: invalid kernel_weights_type") from None
    source = _ArrayDataSource(descriptor, weights, _tensor(tensors, "bias"), kernel_type,
                              fields.get("data_source_label"))
    if "kernel_offset" in fields:
        k._kernel_offset = tuple(int(v) for v in fields["kernel_offset"])
    if "gradient_option" in fields:
        k._gradient_option, k._serialize = MPSCNNConvolutionGradientOption(fields["gradient_option"]), False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        k._init_data_source(device, source)
    _decode_kernel_base(k, fields)
    k.accumulatorPrecisionOption = fields.get("accumulator", 1)


def _encode_binary(k) -> tuple[dict, dict]:
    p = k._binary_params
    tensors = {"bits": p.bits.astype(np.int64), "in_bias": _f32(p.in_bias), "in_scale": _f32(p.in_scale),
               "out_bias": _f32(p.out_bias), "out_scale": _f32(p.out_scale)}
    fields = _encode_kernel_base(k)
    fields.update(type=int(k.type), flags=int(k.flags), data_source_label=k.label)
    fields["descriptor"] = _encode_descriptor(k._desc, "descriptor.", tensors)
    return fields, tensors


def _decode_binary(k, fields: dict, tensors: dict, device) -> None:

    descriptor = MPSCNNConvolutionDescriptor.__new__(MPSCNNConvolutionDescriptor)
    _decode_descriptor(descriptor, _field(fields, "descriptor"), "descriptor.", tensors, device)
    bits = _tensor(tensors, "bits")
    if bits.dtype != np.int64 or (bits.size and (bits.min() < 0 or bits.max() >= 2**32)):
        raise MPSArchiveError("NSKeyedUnarchiver: the array 'bits' must hold 32-bit words as int64 values in "
                              f"[0, 2**32); it is {bits.dtype} {bits.shape}")
    source = _ArrayDataSource(descriptor, bits.astype(np.uint32), None,
                              label=fields.get("data_source_label"))
    k._init_binary(dict(device=device, convolutionData=source, type=_field(fields, "type"),
                        flags=_field(fields, "flags"), outputBiasTerms=_tensor(tensors, "out_bias"),
                        outputScaleTerms=_tensor(tensors, "out_scale"), inputBiasTerms=_tensor(tensors, "in_bias"),
                        inputScaleTerms=_tensor(tensors, "in_scale")), scale_value=None)
    _decode_kernel_base(k, fields)


def encode_object(obj) -> tuple[str, dict, dict]:

    name = type(obj).__name__
    if class_named(name) is not type(obj):
        raise MPSArchiveError(f"NSKeyedArchiver: {name} is not secure-codable in mpsconv")
    tensors: dict = {}
    if isinstance(obj, MPSNNNeuronDescriptor):
        fields = _encode_neuron(obj, "", tensors)
    elif isinstance(obj, MPSCNNConvolutionDescriptor):
        fields = _encode_descriptor(obj, "", tensors)
    elif isinstance(obj, _WeightedKernel):
        fields, tensors = _encode_convolution(obj)
    elif isinstance(obj, MPSCNNBinaryConvolution):
        fields, tensors = _encode_binary(obj)
    elif isinstance(obj, NeuronKernel):
        fields = _encode_kernel_base(obj)
        fields["neuron"] = _encode_neuron(obj._descriptor, "neuron.", tensors)
    else:  # pragma: no cover - class_named covers exactly the branches above
        raise MPSArchiveError(f"NSKeyedArchiver: {name} is not secure-codable in mpsconv")
    return name, fields, tensors


def decode_into(obj, fields: dict, tensors: dict, device) -> None:

    if device is not None and not isinstance(device, MTLDevice):
        raise MPSArchiveError(f"NSKeyedUnarchiver: device={device!r} must be an MTLDevice")
    if isinstance(obj, (MPSCNNKernel,)) and device is None:
        device = MTLCreateSystemDefaultDevice()
    if isinstance(obj, MPSNNNeuronDescriptor):
        obj.__dict__.update(_decode_neuron(fields, "", tensors).__dict__)
    elif isinstance(obj, MPSCNNConvolutionDescriptor):
        _decode_descriptor(obj, fields, "", tensors, device)
    elif isinstance(obj, _WeightedKernel):
        _decode_convolution(obj, fields, tensors, device)
    elif isinstance(obj, MPSCNNBinaryConvolution):
        _decode_binary(obj, fields, tensors, device)
    elif isinstance(obj, NeuronKernel):
        obj._init_neuron(device, _decode_neuron(_field(fields, "neuron"), "neuron.", tensors))
        _decode_kernel_base(obj, fields)
    else:  # pragma: no cover
        raise MPSArchiveError(f"NSKeyedUnarchiver: cannot decode a {type(obj).__name__}")
