"""Noise-level (σ) schedules for sampling (spec §5; sgm `AYSDiscretization`)."""

from __future__ import annotations

import numpy as np

# "Align Your Steps" σ values for SVD-like video models; the list the reference uses for 10 steps.
AYS_SIGMAS = (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)
AYS_MIN_STEPS = 10


def ays_sigmas(num_steps: int = AYS_MIN_STEPS) -> np.ndarray:
    """Decreasing σ schedule with a final 0 appended: float32 [num_network_evals + 1].

    As in the reference: num_steps = 10 gives the fixed 11-value list (11 Euler steps, 11 network
    evaluations; the reference's "11/12" progress bar), num_steps > 10 log-linearly interpolates
    that list onto num_steps points (num_steps evaluations), fewer than 10 is an error. So 10 and 11
    give the same schedule; we keep that quirk so configs mean what they meant in the reference.
    """
    if num_steps < AYS_MIN_STEPS:
        raise ValueError(f"the AYS schedule needs num_steps >= {AYS_MIN_STEPS}, got {num_steps}")
    base = np.asarray(AYS_SIGMAS, np.float64)
    if num_steps == AYS_MIN_STEPS:
        sigmas = base
    else:
        # Interpolate ln σ on a uniform grid (ascending order for np.interp), then flip back.
        log_ascending = np.log(base[::-1])
        grid = np.linspace(0.0, 1.0, num_steps)
        sigmas = np.exp(np.interp(grid, np.linspace(0.0, 1.0, len(base)), log_ascending))[::-1]
    return np.append(sigmas, 0.0).astype(np.float32)
