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

`block` needs the least memory (benchmarks/pod_memory.py, the full keyframe train step, FSDP on a
v5p:2x2x1, batch 1 per chip: 12.47 GiB of temporaries per chip instead of 50.59 with `xla`
attention, 6.01 instead of 23.36 with `chunked`); the others trade memory for less recomputation. Any name of
`jax.checkpoint_policies` (e.g. `dots_saveable`) is accepted as well.
"""

from __future__ import annotations

from typing import Callable

import jax

from keyface_jax.models.chunked_attention import LSE_NAME, OUTPUT_NAME

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_attention": jax.checkpoint_policies.save_only_these_names(OUTPUT_NAME, LSE_NAME),
    "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
