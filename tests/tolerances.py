"""Per-format tolerances against the float64 reference backend: the one table lives in
``mpsconv/tolerances.py``; this adds the test assertion.

Every fast path is compared with ``assert_close(actual, expected, fmt)``. Float32 results differ
from float64 only by accumulation order; float16 and unorm results are rounded to the storage
format, so a value that lies on a rounding boundary may land one step away.
"""
from __future__ import annotations

import numpy as np

from mpsconv.tolerances import TOLERANCES, mismatches


def assert_close(actual, expected, fmt: str, context: str = "") -> None:
    """Element-wise closeness with the format's tolerance; NaN and inf must match exactly."""
    rtol, atol = TOLERANCES[fmt]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape}, but should be {expected.shape} [{context}]"
    bad = mismatches(actual, expected, fmt)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} values differ (rtol={rtol}, atol={atol}); first at {idx}: "
            f"{actual[idx]!r}, but should be {expected[idx]!r} [{context}]"
        )


def half_accumulation_bound(terms_abs_sum, count: int):
    """Error bound for ``accumulatorPrecisionOption = .half`` (spec §0.2: each multiply-add may be
    rounded to float16): ``count · 2**-11 · Σ|w·x|`` per output, ``count`` the terms summed.

    mpsconv accumulates in float32 even then (the spec allows it); any implementation that rounds
    its accumulator to float16 must still stay inside this bound.
    """
    return count * 2.0**-11 * np.asarray(terms_abs_sum, dtype=np.float64)
