"""Named rematerialisation policies for the UNet's blocks (`config.model.remat_policy`).

With `config.model.remat=True` every UNet block (an input/output block: ResBlock + transformer,
or a resampler; the middle block) runs under `jax.checkpoint`: the backward pass recomputes the
block's forward from its input, keeping only what the policy names.

| policy                 | kept from the forward                     | recomputed in the backward       |
|------------------------|-------------------------------------------|----------------------------------|
| `none`                 | everything (no remat)                     | nothing                          |
| `block` (full default) | block inputs                              | the whole block                  |
| `block_save_attention` | block inputs, attention outputs (and the  | all but attention                |
|                        | memory-efficient forms' log-sum-exp)      |                                  |
| `block_save_dots`      | block inputs, matmul outputs without      | norms, activations, convolutions,|
|                        | batch dims (projections, feed-forward)    | attention                        |
| `block_ffn`            | block inputs; while a block's backward    | the whole block, and each        |
|                        | runs, its feed-forward inputs only        | feed-forward once more           |

`block_ffn` nests a checkpoint around each transformer feed-forward inside the block's: the
block's recomputed forward keeps one GEGLU's wide intermediates (8× the channels) at a time instead of
all three of its transformer's feed-forwards, for one more feed-forward forward per step.

benchmarks/pod_memory.py, the full keyframe train step, FSDP on a v5p:2x2x1, batch 1 per chip,
temporaries per chip: `none` 50.59 GiB (`xla` attention) / 23.36 (`chunked`); `block` 12.47 / 6.01;
`block_ffn` 12.48 / 5.78, and 10.03 / 3.42 with libtpu's scheduler held to 5 % of HBM, for 6.9 %
more FLOPs than `block`. `block_save_*` trade memory for less recomputation. Any name of
`jax.checkpoint_policies` (e.g. `dots_saveable`) is accepted as well.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from keyface_jax.models.chunked_attention import LSE_NAME, OUTPUT_NAME

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_attention": jax.checkpoint_policies.save_only_these_names(OUTPUT_NAME, LSE_NAME),
    "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "block_ffn": jax.checkpoint_policies.nothing_saveable,
}
# Policies that also checkpoint each feed-forward inside the block's checkpoint.
NESTED_FEED_FORWARD = ("block_ffn",)


def remat_policy(remat: bool, name: str | None) -> tuple[bool, Callable | None]:
    """(rematerialise?, jax.checkpoint policy) of `config.model.remat` / `remat_policy`: remat off
    → no remat; on with no name → `block`. Raises ValueError for unknown names."""
    name = name or ("block" if remat else "none")
    if name in REMAT_POLICIES:
        policy = REMAT_POLICIES[name]
    elif hasattr(jax.checkpoint_policies, name) and not name.startswith("_"):
        policy = getattr(jax.checkpoint_policies, name)
    else:
        raise ValueError(f"config.model.remat_policy {name!r}: choose one of {sorted(REMAT_POLICIES)} "
                         "or a jax.checkpoint_policies name")
    return bool(remat) and name != "none", policy


def remat_feed_forward(remat: bool, name: str | None) -> bool:
    """Whether each transformer feed-forward runs under a checkpoint of its own (`block_ffn`)."""
    return bool(remat) and name in NESTED_FEED_FORWARD


def checkpoint_module(module: nnx.Module, fn: Callable, *args, policy: Callable | None = None):
    """fn(module, *args) under jax.checkpoint, as a pure function of the module's state.

    Not nnx.remat: nnx.remat writes the state back after the call, which fails for frozen
    parameters (they live at the jit trace level, below the gradient's), and there is nothing to
    write back anyway."""
    graphdef, state = nnx.split(module)
    pure = lambda state, *args: fn(nnx.merge(graphdef, state), *args)
    return jax.checkpoint(pure, policy=policy)(state, *args)
