"""Small shared builders for the tests.

Networks are built abstractly and filled from numpy (eager NNX initialisation dispatches thousands
of small ops, slow on 2 CPU cores), and called through `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import interpolation, keyframe
from keyface_jax.config_lib import network_config
from keyface_jax.models.build import random_conditions
from keyface_jax.models.keyface import build_network


def tiny_config(kind: str, **model_overrides):
    cfg = (keyframe if kind == "keyframe" else interpolation).get_config("tiny").model
    for key, value in model_overrides.items():
        cfg[key] = value
    return network_config(cfg)


def random_state(abstract_state, seed: int = 0, scale: float = 0.2):
    """Seeded values for every parameter (zero-initialised ones included): weights N(0, 1/fan_in),
    vectors 1 + N(0, scale²) for scales, N(0, scale²) otherwise."""
    rng = np.random.default_rng(seed)
    out = []
    for path, var in nnx.to_flat_state(abstract_state):
        shape, dtype = var.shape, var.dtype
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) >= 2 and path[-1] == "kernel":
            value = noise / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + scale * noise
        else:
            value = scale * noise
        out.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.from_flat_state(out)


def tiny_network(kind: str, seed: int = 0, config=None, **kw):
    config = config or tiny_config(kind)
    abstract = nnx.eval_shape(lambda: build_network(config, rngs=nnx.Rngs(seed), **kw))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, random_state(state, seed)), config


def network_inputs(config, batch: int = 2, frames: int = 4, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    s, c = config.latent_size, config.latent_channels
    inputs = dict(x=rng.standard_normal((batch, frames, s, s, c)), c_noise=rng.standard_normal(batch))
    inputs.update(random_conditions(config, batch, frames, rng))
    return {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}


@functools.partial(jax.jit, static_argnums=0)
def _jitted_call(graphdef, state, inputs, extra):
    kwargs = dict(inputs)
    net = nnx.merge(graphdef, state)
    return net(kwargs.pop("x"), kwargs.pop("c_noise"), **kwargs, **extra)


def call(net, inputs: dict, **extra):
    """net(x, c_noise, **conditions) under jit."""
    graphdef, state = nnx.split(net)
    return _jitted_call(graphdef, state, inputs, extra)


def call_unet(unet, x, c_noise, context, y):
    graphdef, state = nnx.split(unet)
    return _jitted_unet(graphdef, state, x, c_noise, context, y)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_unet(graphdef, state, x, c_noise, context, y):
    return nnx.merge(graphdef, state)(x, c_noise, context, y)
