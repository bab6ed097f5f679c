"""The ``MPSCNNConvolutionDataSource`` protocol and the one weight-loading cycle (docs/semantics.md, "Weights").

``load_weights`` runs ``load()`` -> reads -> ``purge()`` (balanced even when a read fails), then
turns what the data source returned into the kernel's *effective* weights: dequantize (uint8) ->
fold inference batch norm (float32) -> round to the kernel weight type (float16 unless the data
source asks for float32). Everything a kernel computes with is copied; the data source may free
its memory after ``purge()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._api import Strict
from .descriptor import (
    MPSCNNConvolutionDescriptor, MPSCNNConvolutionWeightsLayout, MPSCNNWeightsQuantizationType,
    MPSNNConvolutionAccumulatorPrecisionOption,
)
from .errors import MPSTypeError, MPSValueError
from .core.geometry import NeuronSpec
from .core.weights import KeptWeights, round_weights
from .types import as_enum, MPSDataType

_REQUIRED = ("dataType", "descriptor", "weights", "biasTerms", "load", "purge", "label")


class MPSCNNConvolutionDataSource:
    """``MPSCNNConvolutionDataSource``: subclass it (or duck-type it) to supply a kernel's parameters.

    Required: ``dataType()``, ``descriptor()``, ``weights()``, ``biasTerms()``, ``load()``,
    ``purge()``, ``label()``, ``copy(zone)``. Optional: ``weightsQuantizationType()``,
    ``rangesForUInt8Kernel()``, ``lookupTableForUInt8Kernel()``, ``weightsLayout()``,
    ``kernelWeightsDataType()``, ``update(...)``, ``copy(zone, device)``.

    ``weights()`` returns ``O·kH·kW·(I/G)`` values of ``dataType()`` in ``[O][kH][kW][I/G]`` order:
    a NumPy array, tensor, list, or raw bytes. ``biasTerms()`` returns ``O`` float32 values or None.
    """

    def dataType(self) -> MPSDataType:
        raise NotImplementedError

    def descriptor(self) -> MPSCNNConvolutionDescriptor:
        raise NotImplementedError

    def weights(self):
        raise NotImplementedError

    def biasTerms(self):
        return None

    def load(self) -> bool:
        return True

    def purge(self) -> None:
        return None

    def label(self) -> str | None:
        return None

    def copy(self, zone=None, /, device=None):
        return self


@dataclass(frozen=True)
class LoadedWeights:
    """What a kernel keeps from its data source: effective parameters and a descriptor snapshot."""

    descriptor: MPSCNNConvolutionDescriptor
    kept: KeptWeights  # float32 [O, kH, kW, Ig], effective (folded, rounded)
    bias: np.ndarray  # float32 [O]
    neuron: NeuronSpec
    prelu: np.ndarray | None  # float32 [O] for pReLU
    label: str | None
    kernel_weights_type: MPSDataType  # float16 or float32

    @property
    def weights(self) -> np.ndarray:
        """The effective weights as a float32 array ``[O, kH, kW, Ig]`` (``KeptWeights.array``)."""
        return self.kept.array()


_NUMPY = {MPSDataType.float32: np.float32, MPSDataType.float16: np.float16, MPSDataType.uInt8: np.uint8}


def read_array(data, dtype, count: int, owner: str, what: str) -> np.ndarray:
    """The first ``count`` elements of ``dtype`` from a pointer-like value (array, tensor, list,
    bytes), copied. MPS reads such arguments through a pointer, so a longer buffer (a view into a
    whole weight file, as YOLO-style loaders return) gives its first ``count`` values; a shorter one
    is an error."""
    if data is None:
        raise MPSValueError(f"{owner}: {what} is None")
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = memoryview(data).cast("B")
        itemsize = np.dtype(dtype).itemsize
        if len(raw) < count * itemsize:
            raise MPSValueError(f"{owner}: {what} holds {len(raw)} bytes; {count} elements of "
                                f"{np.dtype(dtype).name} need {count * itemsize}")
        return np.frombuffer(raw[:count * itemsize], dtype=dtype).copy()
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    try:
        values = np.asarray(data)
    except (TypeError, ValueError):
        raise MPSTypeError(f"{owner}: {what} must be an array, tensor, list or bytes, not {type(data).__name__}") from None
    if values.size < count:
        raise MPSValueError(f"{owner}: {what} holds {values.size} elements; {count} are needed (the first {count} "
                            "are read, as through a pointer)")
    if values.dtype.kind not in "fiub":
        raise MPSTypeError(f"{owner}: {what} has dtype {values.dtype}; expected numbers")
    return values.reshape(-1)[:count].astype(dtype, copy=True)


def check_weight_shape(data, shape: tuple[int, int, int, int], owner: str, what: str) -> None:
    """A 4-D weight array must be OHWI, ``[O][kH][kW][I/G]``, as MPS reads it: the same count in another
    layout would be read as other weights. (Flat arrays, lists and bytes are taken in OHWI order.)"""
    have = tuple(getattr(data, "shape", ()))
    if len(have) != 4 or have == tuple(shape):
        return
    o, kh, kw, ig = shape
    layouts = {(o, ig, kh, kw): ("OIHW (PyTorch, Caffe)", "weights_from_oihw"),
               (kh, kw, ig, o): ("HWIO (TensorFlow)", "weights_from_hwio")}
    known = layouts.get(have)
    hint = f" It looks like {known[0]}: convert it with mpsconv.{known[1]}." if known else ""
    raise MPSValueError(f"{owner}: {what} has shape {have}; the descriptor needs OHWI {tuple(shape)} "
                        f"([outputFeatureChannels][kernelHeight][kernelWidth][inputFeatureChannels / groups]).{hint}")


def _optional(ds, name: str):
    method = getattr(ds, name, None)
    return method if callable(method) else None


def _data_type(value, owner: str, what: str) -> MPSDataType:
    return as_enum(value, MPSDataType, owner, what)


def check_protocol(ds, owner: str) -> None:
    missing = [name for name in _REQUIRED if not callable(getattr(ds, name, None))]
    if missing:
        raise MPSTypeError(f"{owner}: weights={type(ds).__name__} does not implement the MPSCNNConvolutionDataSource "
                           f"method(s) {', '.join(missing)}")


def load_weights(ds, owner: str, *, accumulator: MPSNNConvolutionAccumulatorPrecisionOption,
                 check_descriptor, data_types=tuple(_NUMPY)) -> LoadedWeights:
    """Run the data-source cycle once and return the effective parameters.

    ``check_descriptor(descriptor)`` applies the kernel class's own rules to the descriptor;
    ``data_types`` are the ``dataType()`` values the kernel class accepts.
    """
    check_protocol(ds, owner)
    if not ds.load():
        raise MPSValueError(f"{owner}: dataSource.load() returned False; the kernel cannot be built")
    try:
        desc = ds.descriptor()
        if not isinstance(desc, MPSCNNConvolutionDescriptor):
            raise MPSTypeError(f"{owner}: dataSource.descriptor() returned {type(desc).__name__}; expected an "
                               "MPSCNNConvolutionDescriptor")
        desc = desc.copy()  # a snapshot: later changes to the data source's descriptor do not reach the kernel
        desc._check_for_kernel(owner)
        check_descriptor(desc)
        neuron, prelu = desc._resolve_neuron(owner)
        o = desc.outputFeatureChannels
        shape = desc._weight_shape()  # [O][kH][kW][I/G]; depthwise [O][kH][kW] (stored with a last axis of 1)
        count = int(np.prod(shape))

        layout = _optional(ds, "weightsLayout")
        if layout is not None and int(layout()) != MPSCNNConvolutionWeightsLayout.OHWI:
            raise MPSValueError(f"{owner}: dataSource.weightsLayout()={layout()!r}; only OHWI (0) exists")

        data_type = _data_type(ds.dataType(), owner, "dataSource.dataType()")
        if data_type not in data_types:
            raise MPSValueError(f"{owner}: dataSource.dataType()={data_type.name} is not accepted for weights; "
                                f"use {', '.join(t.name for t in data_types)}")
        kernel_type_method = _optional(ds, "kernelWeightsDataType")
        kernel_type = MPSDataType.float16 if kernel_type_method is None else \
            _data_type(kernel_type_method(), owner, "dataSource.kernelWeightsDataType()")
        if kernel_type not in (MPSDataType.float16, MPSDataType.float32):
            raise MPSValueError(f"{owner}: kernelWeightsDataType()={kernel_type.name}; use float16 or float32")
        if kernel_type == MPSDataType.float32:
            if data_type != MPSDataType.float32:
                raise MPSValueError(f"{owner}: kernelWeightsDataType()=float32 needs dataType()=float32, not "
                                    f"{data_type.name}")
            if accumulator == MPSNNConvolutionAccumulatorPrecisionOption.half:
                raise MPSValueError(f"{owner}: float32 kernel weights need accumulatorPrecisionOption=.float")

        data = ds.weights()
        if data_type != MPSDataType.uInt8:
            check_weight_shape(data, shape, owner, "dataSource.weights()")
        raw = read_array(data, _NUMPY[data_type], count, owner, "dataSource.weights()")
        if data_type == MPSDataType.uInt8:
            weights = _dequantize(ds, raw.reshape(o, -1), owner).reshape(shape)
        else:
            weights = raw.astype(np.float32, copy=False).reshape(shape)
        bias_data = ds.biasTerms()
        bias = np.zeros(o, np.float32) if bias_data is None else \
            read_array(bias_data, np.float32, o, owner, "dataSource.biasTerms()")
        label = ds.label()
    finally:
        ds.purge()

    if desc._batch_norm is not None:
        scale, shift = desc._batch_norm.fold()
        weights = weights * scale.reshape(-1, 1, 1, 1)
        bias = bias * scale + shift
    weights = round_weights(weights, kernel_type)
    _check_finite(weights, owner, desc._batch_norm is not None)
    return LoadedWeights(desc, KeptWeights(weights), bias.astype(np.float32), neuron, prelu, label, kernel_type)


def _check_finite(weights: np.ndarray, owner: str, folded: bool) -> None:
    """Weights must be finite (docs/reliability.md "Numerics"): an infinite or NaN weight on a tap
    that reads the zero edge gives inf·0 = NaN where the window is multiplied out and nothing where
    a backend skips the padding, so no answer would be the same on every backend. (float16 rounding
    turns weights beyond 65504 into infinities too.)"""
    bad = ~np.isfinite(weights)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        source = "after folding in the batch-normalization parameters, " if folded else ""
        raise MPSValueError(f"{owner}: dataSource.weights() holds {int(bad.sum())} non-finite values {source}"
                            f"(the first, [o, kH, kW, i] = {list(first)}, is {weights[first]}); weights must be "
                            "finite (float16 kernel weights also beyond ±65504)")


def _dequantize(ds, raw: np.ndarray, owner: str) -> np.ndarray:
    """uint8 weights -> float32, per output channel row."""
    ranges, table = _optional(ds, "rangesForUInt8Kernel"), _optional(ds, "lookupTableForUInt8Kernel")
    qtype_method = _optional(ds, "weightsQuantizationType")
    if qtype_method is not None:
        qtype = MPSCNNWeightsQuantizationType(int(qtype_method()))
    elif ranges is not None:
        qtype = MPSCNNWeightsQuantizationType.linear
    elif table is not None:
        qtype = MPSCNNWeightsQuantizationType.lookupTable
    else:
        qtype = MPSCNNWeightsQuantizationType.none
    o = raw.shape[0]
    if qtype == MPSCNNWeightsQuantizationType.linear:
        if ranges is None:
            raise MPSValueError(f"{owner}: linear uInt8 weights need dataSource.rangesForUInt8Kernel()")
        mm = read_array(ranges(), np.float32, 2 * o, owner, "rangesForUInt8Kernel()").reshape(o, 2)
        lo, hi = mm[:, :1], mm[:, 1:]
        return (raw.astype(np.float32) / np.float32(255.0)) * (hi - lo) + lo
    if qtype == MPSCNNWeightsQuantizationType.lookupTable:
        if table is None:
            raise MPSValueError(f"{owner}: lookup-table uInt8 weights need dataSource.lookupTableForUInt8Kernel()")
        lut = read_array(table(), np.float32, 256, owner, "lookupTableForUInt8Kernel()")
        return lut[raw]
    raise MPSValueError(f"{owner}: uInt8 weights need weightsQuantizationType() linear or lookupTable")


class _ArrayDataSource(Strict, MPSCNNConvolutionDataSource):
    """The data source a kernel synthesizes for the deprecated pointer initializer and for archives."""

    def __init__(self, descriptor, weights: np.ndarray, bias: np.ndarray | None, kernel_type=MPSDataType.float16,
                 label=None):
        self._descriptor = descriptor
        self._weights = weights
        self._bias = bias
        self._kernel_type = kernel_type
        self._label = label

    def dataType(self):
        return MPSDataType.float32

    def descriptor(self):
        return self._descriptor

    def weights(self):
        return self._weights

    def biasTerms(self):
        return self._bias

    def label(self):
        return self._label

    def kernelWeightsDataType(self):
        return self._kernel_type
