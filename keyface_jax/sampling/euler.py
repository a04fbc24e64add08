"""Deterministic Euler sampler for the EDM ODE (spec §5; sgm `EulerEDMSampler`, s_churn = 0).

The generic loop: `sample(denoise_fn, noise, sigmas)`. Guidance lives in the denoise_fn (see
`keyface_jax.sampling.guided`), so the loop is the same for keyframes, interpolation and previews.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# denoise_fn(x [B, ...], sigma [B]) -> the x0 prediction D(x; σ) [B, ...].
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def initial_noise(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Unit Gaussian noise [B, *shape], one draw per key [B]: a sample depends on its own key only
    (a batch of N clips matches N single-clip calls)."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, dtype))(keys)


def euler_step(x: jax.Array, denoised: jax.Array, sigma: jax.Array,
               sigma_next: jax.Array) -> jax.Array:
    """One Euler step of dx/dσ = (x − D)/σ from σ to σ_next (scalars); σ_next = 0 gives x ≈ D."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def sample(denoise_fn: DenoiseFn, noise: jax.Array, sigmas: jax.Array, *,
           python_loop: bool = False) -> jax.Array:
    """Integrates from σ_0 down to σ_last (normally 0): len(sigmas) − 1 network evaluations.

    Args:
      denoise_fn: (x [B, ...], sigma [B]) -> D(x; σ) [B, ...] (guidance included).
      noise: [B, ...] unit Gaussian noise; scaled here by √(1 + σ_0²) as in the reference (the
        marginal std of x0 + σ_0·ε for unit-variance data).
      sigmas: [S] decreasing noise levels, e.g. `ays_sigmas(10)`; a traced array, so schedules of
        the same length share one compilation.
      python_loop: unrolled Python loop instead of `lax.fori_loop` (debugging, printing inside).
    Returns:
      [B, ...] float32 samples.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    batch = noise.shape[0]
    x = noise.astype(jnp.float32) * jnp.sqrt(1.0 + sigmas[0] ** 2)

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, jnp.broadcast_to(sigma, (batch,)))
        return euler_step(x, denoised.astype(jnp.float32), sigma, sigma_next)

    num_steps = sigmas.shape[0] - 1
    if python_loop:
        for i in range(num_steps):
            x = step(i, x)
        return x
    return jax.lax.fori_loop(0, num_steps, step, x)
