"""Weights: the rounding rules every backend's weights go through, and a binary kernel's parameters.

A kernel's weights are converted once, when it is made (``datasource.load_weights``): dequantized,
batch norm folded, then rounded to the kernel weight type by ``round_weights`` (float16
round-to-nearest-even unless the data source asks for float32). Kernels reading bfloat16 images
multiply weights rounded to bfloat16 (``round_for_source``). ``KeptWeights`` holds them once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..types import MPSDataType
from .formats import MPSImageFeatureChannelFormat


def round_weights(weights: np.ndarray, kernel_type: MPSDataType) -> np.ndarray:
    """MPS's weight precision: float16, rounded to nearest even, unless the data source's
    ``kernelWeightsDataType()`` is float32. Float32 ``weights`` asked to stay float32 come back as
    they are, not copied."""
    weights = weights.astype(np.float32, copy=False)
    if kernel_type == MPSDataType.float16:
        weights = weights.astype(np.float16).astype(np.float32)
    return weights


def round_for_source(weights: np.ndarray, src_format: int) -> np.ndarray:
    """Our extension of that rule to bfloat16 images (a format of ours): their kernels multiply
    weights rounded to bfloat16 (round-to-nearest-even), on every backend. Other sources: ``weights``."""
    if src_format != MPSImageFeatureChannelFormat.bfloat16:
        return weights
    return torch.from_numpy(np.asarray(weights, np.float32)).to(torch.bfloat16).float().numpy()


class KeptWeights:
    """A kernel's effective float32 weights ``[O, kH, kW, I/G]``, held once.

    The array is what the kernel computes with until a backend keeps an exact copy in a layout of its
    own (oneDNN's blocked one, on the CPU) and says so (``rely_on``): the array is then dropped, and
    ``array()`` reads the values back from that copy, for the few readers that need them as an array
    (archives, exported states, other backends, the replay engine's graph). A kernel's weights then
    take the memory of one copy, as MPS's do once the kernel is made. The values never change: new
    weights (a reload) are a new ``KeptWeights``."""

    __slots__ = ("_array", "_restore", "shape")

    def __init__(self, array: np.ndarray):
        self._array = array
        self._restore: Callable[[], np.ndarray] | None = None
        self.shape: tuple = array.shape

    def array(self) -> np.ndarray:
        """The weights as a float32 array (read back, new, when only a backend's copy is kept)."""
        array = self._array
        return array if array is not None else self._restore()

    def for_source(self, src_format: int) -> "KeptWeights":
        """The weights a kernel multiplies for sources of ``src_format`` (``round_for_source``): these
        same ones, or for bfloat16 sources a new holder of the rounded values."""
        if src_format != MPSImageFeatureChannelFormat.bfloat16:
            return self  # not round_for_source(self.array()): that would read a dropped array back
        return KeptWeights(round_for_source(self.array(), src_format))

    def __reduce__(self):
        # a copy (copy.deepcopy, pickle) holds the values, not the backend's copy they may live in
        return KeptWeights, (self.array(),)

    def rely_on(self, restore: Callable[[], np.ndarray]) -> None:
        """Drop the array: ``restore()`` gives the same values, exactly, from a copy a backend keeps."""
        self._restore = restore  # before the array goes: a reader on another thread finds one of them
        self._array = None


@dataclass(frozen=True)
class BinaryParams:
    """A binary kernel's parameters, copied at construction."""

    bits: np.ndarray  # uint32 [O][kH][kW][ceil(I/32)]; channel c is bit c % 32 of word c // 32
    in_bias: np.ndarray  # float32 [I]
    in_scale: np.ndarray  # float32 [I]
    out_bias: np.ndarray  # float32 [O]
    out_scale: np.ndarray  # float32 [O]

    def unpacked(self, in_channels: int) -> np.ndarray:
        """``bit(o, q, p, c)`` as a 0/1 array ``[O][kH][kW][I]``."""
        shifts = np.arange(32, dtype=np.uint32)
        bits = (self.bits[..., None] >> shifts) & np.uint32(1)
        return bits.reshape(*self.bits.shape[:3], -1)[..., :in_channels].astype(np.uint8)
