"""The train step: a pure function (state, batch, aux) → (state, metrics) for `jax.jit`.

- The step's PRNG key is fold_in(run key, step): a resumed run draws exactly the noise an
  uninterrupted one would have drawn.
- Gradient accumulation scans over `accum_steps` micro-batches inside the one jitted call.
- Non-finite loss or gradients: `nan_policy="skip"` keeps the old parameters and optimizer state
  (the step counter still advances, so the data and keys move on); "stop" applies nothing either
  and reports `finite = 0` so the driver stops with the step number.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from keyface_jax.diffusion.objective import ObjectiveConfig, keyface_loss

NAN_POLICIES = ("stop", "skip")


def _split_micro_batches(batch: Mapping, accum_steps: int) -> Mapping:
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} does not divide into {accum_steps} micro-batches")
        return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])
    return jax.tree.map(split, batch)


def make_train_step(graphdef, objective: ObjectiveConfig, tx: optax.GradientTransformation,
                    schedule: Callable, *, accum_steps: int = 1, ema_decay: float = 0.0,
                    nan_policy: str = "stop", aux_graphdefs: Mapping[str, Any] | None = None):
    """Builds step(state, batch, aux) → (state, metrics) of the diffusion objective. `aux` holds
    frozen helper networks' states (the VAE decoder / LPIPS of the pixel losses) with graphdefs in
    `aux_graphdefs`."""
    aux_graphdefs = dict(aux_graphdefs or {})

    def loss_fn(params, frozen, batch, key, aux):
        network = nnx.merge(graphdef, params, frozen)
        helpers = {name: nnx.merge(aux_graphdefs[name], state) for name, state in aux.items()}
        return keyface_loss(network, batch, key, objective, decoder=helpers.get("decoder"),
                            lpips=helpers.get("lpips"))

    return make_update_step(loss_fn, tx, schedule, accum_steps=accum_steps, ema_decay=ema_decay,
                            nan_policy=nan_policy)


def make_update_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable, *,
                     accum_steps: int = 1, ema_decay: float = 0.0, nan_policy: str = "stop"):
    """step(state, batch, aux) → (state, metrics) for any loss_fn(params, frozen, batch, key, aux)
    → (loss, metrics with "loss"): gradients (accumulated), optimizer update, NaN policy, EMA.
    Every trainer (diffusion networks, the autoencoder) shares this one update."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"config.train.nan_policy: {nan_policy!r}; choose one of {NAN_POLICIES}")
    if accum_steps < 1:
        raise ValueError(f"config.optim.accum_steps must be >= 1, got {accum_steps}")

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, frozen, batch, key, aux):
        if accum_steps == 1:
            (_, metrics), grads = grad_fn(params, frozen, batch, key, aux)
            return grads, metrics
        micro = _split_micro_batches(batch, accum_steps)

        def body(acc, inputs):
            index, mb = inputs
            (_, metrics), grads = grad_fn(params, frozen, mb, jax.random.fold_in(key, index), aux)
            return jax.tree.map(jnp.add, acc, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        summed, metrics = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        return (jax.tree.map(lambda g: g / accum_steps, summed),
                jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))

    def step(state, batch, aux):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, metrics = gradients(state.params, state.frozen, batch, key, aux)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params = keep(params, state.params)
        opt_state = keep(opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return step
