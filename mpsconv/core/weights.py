"""Weights: the rounding rules every backend's weights go through, and a binary kernel's parameters.

A kernel's weights are converted once, when it is made (``datasource.load_weights``): dequantized,
batch norm folded, then rounded to the kernel weight type by ``round_weights`` (float16
round-to-nearest-even unless the data source asks for float32). Kernels reading bfloat16 images
multiply weights rounded to bfloat16 (``round_for_source``).
"""
from __future__ import annotations

from dataclasses import dataclass

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
