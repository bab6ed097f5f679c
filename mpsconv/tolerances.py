"""Per-format tolerances against the float64 reference backend: the one table, shared by the tests
and ``mpsconv verify``.

Float32 results differ from float64 only by accumulation order; float16 and unorm results are
rounded to the storage format, so a value on a rounding boundary may land one step away.
"""
from __future__ import annotations

import numpy as np

#: (rtol, atol) per destination feature-channel format
TOLERANCES = {
    "float32": (1e-5, 1e-4),
    "float16": (2e-3, 2e-3),  # one float16 ulp (2**-10 relative) either way
    "bfloat16": (1.6e-2, 1.6e-2),  # one bfloat16 ulp (2**-7 relative) either way, and bf16 products
    "unorm8": (0.0, 1.0 / 255 + 1e-6),  # one storage step
    "unorm16": (0.0, 1.0 / 65535 + 1e-6),
}


def mismatches(actual, expected, fmt: str) -> np.ndarray:
    """Where ``actual`` is not within ``fmt``'s tolerance of ``expected`` (NaN and inf must match)."""
    rtol, atol = TOLERANCES[fmt]
    return ~np.isclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol,
                       equal_nan=True)


def error_ratio(actual, expected, fmt: str) -> float:
    """The largest ``|actual - expected| / (atol + rtol·|expected|)``: how close to ``fmt``'s tolerance
    the values came (1 is the limit; values that are NaN or infinite where expected count as 0 when
    they match, infinity when they do not)."""
    rtol, atol = TOLERANCES[fmt]
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = np.where(same, 0.0, np.abs(a - e) / (atol + rtol * np.abs(e)))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(ratio.max()) if ratio.size else 0.0
