"""Hostile inputs for the fuzz tests (issue 7): archives to mutate, and a guard that watches what a
load does (audit events that would mean code runs, and the memory it allocates).

The CI tests (test_archive_fuzz.py, test_surface_fuzz.py) draw a few hundred examples; the opt-in
job in tests/fuzz/ runs the same tests with 20,000 or more.
"""
from __future__ import annotations

import collections
import json
import struct
import sys
import threading
import tracemalloc

import numpy as np
import safetensors.numpy

from helpers import ArraySource, DEVICE, batch_norm_prelu_conv, conv, descriptor
from mpsconv import (
    MPSCNNBinaryConvolution, MPSCNNBinaryConvolutionType, MPSCNNConvolutionTranspose,
    MPSCNNDepthWiseConvolutionDescriptor, MPSCNNFullyConnected, MPSCNNNeuron, MPSCNNSubPixelConvolutionDescriptor,
    MPSCNNConvolution, MPSNNNeuronDescriptor, MPSCNNNeuronType, NSKeyedArchiver, NSKeyedUnarchiver,
)
from mpsconv import coding

#: How the surface fuzz job's scenarios ended (tests/fuzz/test_surface.py counts, conftest prints).
SURFACE_OUTCOMES = collections.Counter()

# -- archives to start from: every archivable class, with arrays and nested fields


def _base_objects():
    rng = np.random.default_rng(7)
    objects = {}
    objects["convolution"] = k = batch_norm_prelu_conv(rng)
    dw = MPSCNNDepthWiseConvolutionDescriptor(kernelWidth=3, kernelHeight=3, inputFeatureChannels=4,
                                              outputFeatureChannels=4)
    objects["depthwise"] = MPSCNNConvolution(device=DEVICE, weights=ArraySource(dw, rng.uniform(-1, 1, 36)))
    sp = MPSCNNSubPixelConvolutionDescriptor(kernelWidth=1, kernelHeight=1, inputFeatureChannels=4,
                                             outputFeatureChannels=8)
    sp.subPixelScaleFactor = 2
    objects["subpixel"] = MPSCNNConvolution(device=DEVICE, weights=ArraySource(sp, rng.uniform(-1, 1, 32)))
    objects["transpose"] = conv(3, 3, 4, 4, weights=rng.uniform(-1, 1, 144), cls=MPSCNNConvolutionTranspose,
                                strideInPixelsX=2, strideInPixelsY=2)
    objects["fully_connected"] = conv(2, 2, 4, 3, weights=rng.uniform(-1, 1, 48), bias=rng.uniform(-1, 1, 3),
                                      cls=MPSCNNFullyConnected)
    objects["binary"] = MPSCNNBinaryConvolution(
        device=DEVICE, convolutionData=ArraySource(descriptor(3, 3, 4, 2), rng.integers(0, 2**32, 18, dtype=np.uint32)),
        scaleValue=0.5, type=MPSCNNBinaryConvolutionType.xnor, flags=0)
    objects["neuron_kernel"] = MPSCNNNeuron(device=DEVICE, neuronDescriptor=MPSNNNeuronDescriptor.cnnNeuronDescriptor(
        MPSCNNNeuronType.linear, a=2.0, b=-1.0))
    objects["neuron_descriptor"] = MPSNNNeuronDescriptor.cnnNeuronDescriptor(MPSCNNNeuronType.softPlus, a=0.5, b=2.0)
    objects["descriptor"] = k._data_source.desc  # its descriptor, batch norm and PReLU included
    return objects


_BASES = None


def base_archives() -> dict[str, bytes]:
    """Valid archives of every archivable class, made once."""
    global _BASES
    if _BASES is None:
        _BASES = {name: NSKeyedArchiver.archivedData(withRootObject=obj) for name, obj in _base_objects().items()}
    return _BASES


def split(data: bytes) -> tuple[str, dict, dict]:
    """A valid archive's ``(class name, fields, tensors)``."""
    return coding._parse(data)


def signed(class_name: str, fields, tensors: dict, header_edit=None) -> bytes:
    """An archive with a correct digest over whatever it holds: what an attacker can write, since the
    digest guards against damage, not forgery. ``header_edit(header)`` may then change the
    safetensors header (shapes, offsets, dtypes) without fixing the data."""
    fields_json = json.dumps(fields)
    metadata = {"format": coding.FORMAT, "version": coding.VERSION, "class": class_name, "fields": fields_json,
                "digest": coding._digest(class_name, fields_json, tensors)}
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    if header_edit is None:
        return data
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header_edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


# -- the guard

#: Audit events that would mean a load runs code or starts something (PEP 578).
FORBIDDEN_EVENTS = ("exec", "compile", "pickle.find_class", "marshal.loads", "os.system", "os.exec", "os.spawn",
                    "os.posix_spawn", "subprocess.Popen", "ctypes.dlopen", "import", "builtins.input", "socket.")

_watch = threading.local()


def _audit(event, args):
    seen = getattr(_watch, "events", None)
    if seen is not None and event.startswith(FORBIDDEN_EVENTS):
        seen.append(event)


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records while a guard is active

#: Peak bytes a load may allocate (Python and NumPy, traced by tracemalloc): docs/reliability.md.
def allocation_cap(archive_bytes: int) -> int:
    return 4 * archive_bytes + (1 << 20)  # measured: 3.5x (archive, its arrays, their read and rounding)


class Guarded:
    """``load(data)`` outcome: the object or the exception, the forbidden events seen, the peak
    traced allocation."""

    def __init__(self, data, ofClass=object):
        _watch.events = []
        tracemalloc.start()
        try:
            self.value = NSKeyedUnarchiver.unarchivedObject(ofClass, data, device=DEVICE)
            self.error = None
        except Exception as exc:  # noqa: BLE001 - classified by the test
            self.value, self.error = None, exc
        finally:
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            self.events, _watch.events = _watch.events, None


def warm_up() -> None:
    """Load every base archive once, so lazy imports happen before the guard watches for them."""
    for data in base_archives().values():
        NSKeyedUnarchiver.unarchivedObject(object, data, device=DEVICE)
