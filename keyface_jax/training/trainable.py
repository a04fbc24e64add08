"""Which parameters train: named presets plus glob patterns, and the network split into trainable
and frozen Params (`split_network`): gradients and optimizer state exist only for the first.

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
from typing import Any, Callable, Iterable, Sequence

import jax
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


def trainable_filter(trainable_cfg) -> Callable:
    """An NNX filter (path, value) → bool selecting the Params that train under `config.trainable`."""
    preset = trainable_cfg.get("preset", "reference")
    freeze, unfreeze = tuple(trainable_cfg.get("freeze", ())), tuple(trainable_cfg.get("unfreeze", ()))
    return lambda path, _: is_trainable(param_name(path), preset, freeze, unfreeze)


def split_network(network, trainable_cfg):
    """(graphdef, trainable Params, frozen Params) under `config.trainable` (preset, freeze,
    unfreeze). A glob that matches no parameter, an unknown field and non-Param state are errors:
    KeyFace networks hold none, and silently dropping e.g. batch statistics would be a bug."""
    unknown = sorted(set(trainable_cfg) - {"preset", "freeze", "unfreeze"})
    if unknown:
        raise ValueError(f"config.trainable: unknown fields {unknown} (preset, freeze, unfreeze)")
    names = param_names(network)
    _check_patterns(names, tuple(trainable_cfg.get("freeze", ())), "freeze")
    _check_patterns(names, tuple(trainable_cfg.get("unfreeze", ())), "unfreeze")
    graphdef, trainable, frozen, rest = nnx.split(
        network, nnx.All(nnx.Param, trainable_filter(trainable_cfg)), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"network has non-parameter state {list(nnx.to_flat_state(rest))[:3]}")
    if not jax.tree.leaves(trainable):
        raise ValueError(f"config.trainable {dict(trainable_cfg)} leaves nothing to train")
    return graphdef, trainable, frozen
