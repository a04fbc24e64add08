"""Generic PyTorch state dict ↔ NNX parameter mapping for modules whose tree mirrors the torch one.

An NNX path maps to a torch key by joining its parts with '.' and renaming the leaf
`kernel`/`scale` → `weight`. Kernels are stored (in, out) / HWIO / DHWIO, so a torch weight
(out, in, *spatial) is moved to (*spatial, in, out); every other array is copied as is.
Model-agnostic: knows nothing about any particular network.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight"}
_MAX_LISTED = 20


def nnx_path_to_torch_key(path: tuple) -> str:
    """('decoder', 'up', 0, 'block', 1, 'norm1', 'scale') → 'decoder.up.0.block.1.norm1.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def torch_to_nnx_value(array: Any, target_shape: tuple[int, ...], leaf_name: str,
                       key: str = "?") -> np.ndarray:
    """A torch tensor's values in NNX layout: `kernel` (out, in, *spatial) → (*spatial, in, out)
    (Linear: transpose; Conv2d OIHW → HWIO; Conv3d OIDHW → DHWIO). Raises ValueError on a shape
    mismatch, naming the key and both shapes."""
    source = np.asarray(array)
    value = source
    if leaf_name == "kernel" and source.ndim >= 2:
        value = np.transpose(source, (*range(2, source.ndim), 1, 0))
    if tuple(value.shape) != tuple(target_shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(source.shape)} (as {leaf_name}: "
                         f"{tuple(value.shape)}) does not match model shape {tuple(target_shape)}")
    return np.ascontiguousarray(value)


def nnx_to_torch_value(array: Any, leaf_name: str) -> np.ndarray:
    """Inverse of `torch_to_nnx_value`: `kernel` (*spatial, in, out) → (out, in, *spatial)."""
    value = np.asarray(array)
    if leaf_name == "kernel" and value.ndim >= 2:
        n = value.ndim
        value = np.transpose(value, (n - 1, n - 2, *range(n - 2)))
    return np.ascontiguousarray(value)


def _as_state(module_or_state, filter) -> nnx.State:
    if isinstance(module_or_state, nnx.State):
        return module_or_state
    return nnx.state(module_or_state, filter)


def _torch_keys(flat) -> list[str]:
    keys = [nnx_path_to_torch_key(path) for path, _ in flat]
    seen, dupes = set(), set()
    for k in keys:
        (dupes if k in seen else seen).add(k)
    if dupes:
        raise ValueError(f"several NNX parameters map to the same torch key: {sorted(dupes)}")
    return keys


def _listing(title: str, items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def load_torch_state_dict(module_or_state, state_dict: Mapping[str, Any], *,
                          filter=nnx.Param) -> nnx.State:
    """Fills every parameter of a module (possibly abstract, from `nnx.eval_shape`) or State from
    a torch-named numpy state dict; strict: any missing target key, unexpected source key or shape
    mismatch raises one ValueError listing them all. A module is updated in place; the new State
    is returned either way. Values take the target's dtype."""
    is_state = isinstance(module_or_state, nnx.State)
    flat = nnx.to_flat_state(_as_state(module_or_state, filter))
    keys = _torch_keys(flat)
    new, missing, bad = [], [], []
    for (path, var), key in zip(flat, keys):
        if key not in state_dict:
            missing.append(key)
            continue
        target = var.get_value()
        try:
            value = torch_to_nnx_value(state_dict[key], target.shape, str(path[-1]), key)
        except ValueError as err:
            bad.append(str(err))
            continue
        new.append((path, var.replace(jnp.asarray(value, dtype=target.dtype))))
    unexpected = sorted(set(state_dict) - set(keys))
    if missing or unexpected or bad:
        parts = [_listing(t, items) for t, items in (
            ("missing keys (in the model, not in the checkpoint)", missing),
            ("unexpected keys (in the checkpoint, not in the model)", unexpected),
            ("shape mismatches", bad)) if items]
        raise ValueError("state dict does not match the model:\n" + "\n".join(parts))
    state = nnx.from_flat_state(new)
    if not is_state:
        nnx.update(module_or_state, state)
    return state


def export_torch_state_dict(module_or_state, *, filter=nnx.Param) -> dict[str, np.ndarray]:
    """NNX parameters → torch-named numpy arrays in torch layout (inverse of the loader)."""
    flat = nnx.to_flat_state(_as_state(module_or_state, filter))
    keys = _torch_keys(flat)
    return {key: nnx_to_torch_value(var.get_value(), str(path[-1]))
            for (path, var), key in zip(flat, keys)}
