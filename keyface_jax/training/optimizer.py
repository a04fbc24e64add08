"""The optimizer: AdamW as the reference (spec §4), warm-up, schedule and optional clipping."""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant or cosine decay to 0 at
    `total_steps`."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule: {optim.schedule!r}; choose one of {SCHEDULES}")
    warmup = int(optim.warmup_steps)
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    else:
        after = optax.cosine_decay_schedule(optim.lr, max(int(optim.total_steps) - warmup, 1))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule) for `config.optim`. Gradient accumulation is done by the train
    step (a scan over micro-batches inside one jitted call), not by optax.MultiSteps."""
    schedule = learning_rate_schedule(optim)
    parts = []
    if optim.grad_clip and optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay))
    return optax.chain(*parts), schedule
