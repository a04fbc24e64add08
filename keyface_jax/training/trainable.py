"""Which parameters train: named presets plus glob patterns → an optax boolean mask pytree.

The reference (spec §4) passes `to_freeze=["time_"]`, `to_unfreeze=["time_embed"]`: every
parameter whose name contains "time_" (time_stack, time_mixer, time_pos_embed, time_embed) is
frozen, then the timestep MLP `time_embed` is re-enabled; everything else trains, the audio
projection (and the interpolation model's learned mask token) included.

A parameter's name is its NNX path joined with '.', e.g.
`diffusion_model.input_blocks.1.0.time_stack.in_layers.0.kernel` or `audio_proj.bias`.
Patterns are `fnmatch` globs over that name (`*` also crosses dots). Resolution, in order:
  1. the preset's rules (last matching rule wins; unmatched = frozen);
  2. `freeze` globs → frozen;
  3. `unfreeze` globs → trainable (so unfreeze wins, as in the reference).
A user glob that matches no parameter raises (a typo would otherwise silently train nothing new).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx

# preset → ordered (glob, trainable) rules; a parameter no rule matches is frozen.
PRESETS: dict[str, tuple[tuple[str, bool], ...]] = {
    # as the reference: all but the temporal modules; the timestep MLP trains.
    "reference": (("*", True), ("*time_*", False), ("*time_embed*", True)),
    "all": (("*", True),),
    # spatial layers and conditioning only: every "time_" module frozen, time_embed too.
    "spatial_only": (("*", True), ("*time_*", False)),
    "none": (),
}


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_name(path: Sequence[Any]) -> str:
    """A pytree key path → dotted name; the `.value` of an NNX Variable is dropped."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return ".".join(_key_name(k) for k in keys)


def _params(tree):
    return nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree


def param_names(tree) -> list[str]:
    """Dotted names of every parameter leaf, in pytree leaf order."""
    return [param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(_params(tree))]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(names: list[str], patterns: Sequence[str], what: str):
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise ValueError(f"trainable.{what}: patterns {unused} match no parameter "
                         f"(names look like {names[:3]})")


def is_trainable(name: str, preset: str = "reference", freeze: Sequence[str] = (),
                 unfreeze: Sequence[str] = ()) -> bool:
    """Whether the parameter called `name` trains under this selection."""
    if preset not in PRESETS:
        raise ValueError(f"trainable.preset: unknown {preset!r}; choose from {sorted(PRESETS)}")
    flag = False
    for pattern, value in PRESETS[preset]:
        if fnmatch.fnmatchcase(name, pattern):
            flag = value
    if _matches(name, freeze):
        flag = False
    if _matches(name, unfreeze):
        flag = True
    return flag


def trainable_mask(params, preset: str = "reference", freeze: Sequence[str] = (),
                   unfreeze: Sequence[str] = ()):
    """A pytree shaped like `params` (an nnx.State of Params, any pytree, or a module: its Param
    state) with a Python bool per leaf: True = trains. Usable as `optax.masked`'s mask."""
    params = _params(params)
    freeze, unfreeze = tuple(freeze), tuple(unfreeze)
    names = param_names(params)
    _check_patterns(names, freeze, "freeze")
    _check_patterns(names, unfreeze, "unfreeze")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: is_trainable(param_name(path), preset, freeze, unfreeze), params)


def trainable_mask_from_config(params, config: Mapping | None):
    """From a config section with optional `preset` ("reference"), `freeze`, `unfreeze` lists."""
    config = dict(config or {})
    unknown = sorted(set(config) - {"preset", "freeze", "unfreeze"})
    if unknown:
        raise ValueError(f"trainable config: unknown fields {unknown} (preset, freeze, unfreeze)")
    return trainable_mask(params, config.get("preset", "reference"),
                          tuple(config.get("freeze", ())), tuple(config.get("unfreeze", ())))


def count_trainable(params, mask) -> tuple[int, int]:
    """(trainable, total) numbers of parameter values."""
    sizes = [int(np.prod(np.shape(x))) for x in jax.tree.leaves(_params(params))]
    flags = jax.tree.leaves(mask)
    if len(flags) != len(sizes):
        raise ValueError(f"mask has {len(flags)} leaves, params {len(sizes)}")
    return sum(s for s, f in zip(sizes, flags) if f), sum(sizes)


def masked_optimizer(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """`tx` on the trainable parameters; frozen ones get zero updates and no optimizer state.

    (`optax.masked` alone would pass frozen parameters' raw gradients through as updates.)
    """
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
