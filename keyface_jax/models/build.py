"""Building networks abstractly (no weights allocated), counting parameters and FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keyface_jax.models.keyface import KeyFaceConfig, build_network


def abstract_network(config: KeyFaceConfig, dtype=None, param_dtype=jnp.float32):
    """The network with `ShapeDtypeStruct` leaves: shapes and sharding names, no memory."""
    return nnx.eval_shape(lambda: build_network(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                param_dtype=param_dtype))


def count_params(module_or_state) -> int:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(state)))


def input_shapes(config: KeyFaceConfig, batch: int = 1, frames: int = 14) -> dict[str, tuple[int, ...]]:
    """The shapes of one network call's inputs, the one definition every batch builder uses: x and
    c_noise, then the conditions (audio, and identity + valence/arousal for the keyframe network or
    first/last for the interpolation network)."""
    s, c = config.latent_size, config.latent_channels
    shapes = dict(x=(batch, frames, s, s, c), c_noise=(batch,),
                  audio=(batch, frames, config.audio_tokens_per_frame, config.audio_dim))
    if config.kind == "keyframe":
        shapes.update(identity=(batch, s, s, c), valence=(batch, frames), arousal=(batch, frames))
    else:
        shapes.update(first=(batch, s, s, c), last=(batch, s, s, c))
    return shapes


def example_inputs(config: KeyFaceConfig, batch: int = 1, frames: int = 14, dtype=jnp.float32) -> dict:
    """Abstract inputs of one network call (keyword arguments besides x and c_noise included)."""
    return {name: jax.ShapeDtypeStruct(shape, dtype)
            for name, shape in input_shapes(config, batch, frames).items()}


def forward_flops(config: KeyFaceConfig, batch: int = 1, frames: int = 14, dtype=None) -> float:
    """FLOPs of one forward call from XLA's cost analysis of the lowered (uncompiled) program."""
    net = abstract_network(config, dtype=dtype)
    graphdef, state = nnx.split(net)
    inputs = example_inputs(config, batch, frames)

    def forward(state, inputs):
        kwargs = dict(inputs)
        return nnx.merge(graphdef, state)(kwargs.pop("x"), kwargs.pop("c_noise"), **kwargs)

    cost = jax.jit(forward).lower(state, inputs).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def random_conditions(config: KeyFaceConfig, batch: int, frames: int,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded Gaussian conditions of one network call: audio, and identity + valence/arousal
    (keyframe) or first/last (interpolation); emotions squashed into [−1, 1]."""
    conds = {}
    for name, shape in input_shapes(config, batch, frames).items():
        if name in ("x", "c_noise"):
            continue
        value = rng.standard_normal(shape).astype(np.float32)
        conds[name] = np.tanh(value) if name in ("valence", "arousal") else value
    return conds
