"""Timing helpers shared by the benchmarks (jax and the standard library only, so that the
accelerator check can import them on a lent machine)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int = 15) -> float:
    """Median wall time of `fn()` (its outputs waited for) over `repeats` calls, after one
    untimed call that holds any compilation."""
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))
