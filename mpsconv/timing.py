"""Timing helpers the benchmarks share (our addition): medians with their spread, and whether the
machine was busy while they ran."""
from __future__ import annotations

import os
import statistics


def spread(times: list[float]) -> tuple[float, float, float]:
    """``(median, fastest, slowest)`` of per-call times; the quartiles' spread where there are many
    (a scheduler step now and then is not the machine's speed)."""
    ordered = sorted(times)
    q = len(ordered) // 4
    return statistics.median(ordered), ordered[q], ordered[-1 - q]


def busy() -> float | None:
    """The 1-minute load average beyond this process, as a share of the cores (None where unknown)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    return max(0.0, load - 1.0) / (os.cpu_count() or 1)


def spread_warning(times: dict, limit: float = 1.3) -> str | None:
    """A warning when a contender's slowest (third quartile, round) took ``limit`` times its fastest,
    or the machine is busy: the ratios may then be off. ``times``: ``{name: (median, fastest, slowest)}``."""
    wide = [name for name, (_, lo, hi) in times.items() if hi > limit * lo]
    load = busy()
    notes = []
    if wide:
        notes.append(f"spread over {limit:.1f}x for {', '.join(wide)}")
    if load is not None and load > 0.25:
        notes.append(f"load average beyond this process is {load:.0%} of the cores")
    return "; ".join(notes) + " (the machine may be busy; the ratios may be off)" if notes else None
