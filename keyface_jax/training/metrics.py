"""Training metrics: TensorBoard event files + JSONL (process 0 only), FLOP counts and MFU."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax

from keyface_jax.paths import AppendLog, PathLike, as_path

# Dense peak FLOP/s per device for the dtype a run computes in (bf16 on accelerators). Figures are
# the vendors' published dense (non-sparse) numbers.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "gh200": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0, device=None) -> float | None:
    """The configured peak, else the table's entry for the device kind, else None (e.g. CPU)."""
    if override:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return None


def compiled_flops(lowered) -> float | None:
    """FLOPs of one call of a lowered (global, unpartitioned) program, from XLA's cost analysis."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def mfu(flops_per_step: float | None, step_seconds: float, num_devices: int,
        peak: float | None) -> float | None:
    if not flops_per_step or not peak or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * num_devices * peak)


class MetricWriter:
    """Scalars to `workdir/tensorboard` (TensorBoard event files) and `workdir/metrics.jsonl`,
    on a local disk or GCS (tensorboardX writes gs:// itself; the JSONL is a `paths.AppendLog`).
    Only process 0 writes; the others accept calls and drop them."""

    def __init__(self, workdir: PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            workdir = as_path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"), flush_secs=10)
            self._jsonl = AppendLog(workdir / "metrics.jsonl")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        for name, value in clean.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps(dict(step=int(step), time=time.time(), **clean)) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def read_jsonl(path: PathLike) -> list[dict]:
    return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]
