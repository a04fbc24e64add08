"""Trainable-parameter selection: presets and globs against the real module tree, optax masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import keyframe
from keyface_jax.config_lib import network_config
from keyface_jax.models.build import abstract_network, count_params
from keyface_jax.models.layers import Linear, SiLU
from keyface_jax.training.trainable import (PRESETS, count_trainable, masked_optimizer,
                                            param_names, trainable_mask,
                                            trainable_mask_from_config)
from tests.helpers import tiny_config

TEMPORAL = ("time_stack", "time_mixer", "time_pos_embed")


def _temporal_count(net) -> tuple[int, int]:
    """(parameters inside temporal modules, number of such modules), from the module objects."""
    total, modules = 0, 0
    for path, node in nnx.iter_graph(net):
        if path and path[-1] in TEMPORAL:
            total += count_params(node)
            modules += 1
    return total, modules


@pytest.mark.parametrize("kind,variant", [("keyframe", "tiny"), ("interpolation", "tiny"),
                                          ("keyframe", "full")])
def test_presets_match_module_tree_counts(kind, variant):
    cfg = (tiny_config(kind) if variant == "tiny"
           else network_config(keyframe.get_config("full").model))
    net = abstract_network(cfg)
    params = nnx.state(net, nnx.Param)
    total = count_params(net)
    temporal, n_modules = _temporal_count(net)
    time_embed = count_params(net.diffusion_model.time_embed)
    assert n_modules > 0 and temporal > 0 and time_embed > 0
    counts = {p: count_trainable(params, trainable_mask(params, p)) for p in PRESETS}
    assert all(t == total for _, t in counts.values())
    assert counts["all"][0] == total and counts["none"][0] == 0
    assert counts["reference"][0] == total - temporal          # time_embed trains
    assert counts["spatial_only"][0] == total - temporal - time_embed
    # The audio projection (and the interpolation mask token) train under the reference preset.
    mask = nnx.to_flat_state(trainable_mask(params, "reference"))
    flags = {".".join(map(str, path)): bool(v.get_value()) for path, v in mask}
    assert flags["audio_proj.kernel"] and flags["diffusion_model.time_embed.0.kernel"]
    if kind == "interpolation":
        assert flags["learned_mask"]
    assert not flags["diffusion_model.input_blocks.1.0.time_stack.in_layers.0.scale"]
    assert not flags["diffusion_model.input_blocks.1.1.time_mixer.mix_factor"]
    if variant == "full":  # the SVD UNet's temporal layers: ~41% of its parameters
        assert 0.3 < temporal / total < 0.5


def test_globs_override_the_preset():
    params = nnx.state(abstract_network(tiny_config("keyframe")), nnx.Param)
    names = param_names(params)
    audio = sum(int(np.prod(np.shape(v))) for n, v in zip(names, jax.tree.leaves(params))
                if n.startswith("audio_proj."))
    mixers = [n for n in names if "time_mixer" in n]
    base, total = count_trainable(params, trainable_mask(params))
    no_audio = trainable_mask(params, freeze=["audio_proj.*"])
    assert count_trainable(params, no_audio)[0] == base - audio
    # unfreeze wins over the preset and over freeze, as the reference's to_unfreeze.
    both = trainable_mask(params, freeze=["*"], unfreeze=["*time_mixer*"])
    assert count_trainable(params, both)[0] == len(mixers)  # one scalar per mixer
    cfg_mask = trainable_mask_from_config(params, dict(preset="all", freeze=["*time_*"],
                                                       unfreeze=["*time_embed*"]))
    assert jax.tree.leaves(cfg_mask) == jax.tree.leaves(trainable_mask(params, "reference"))
    with pytest.raises(ValueError, match="match no parameter"):
        trainable_mask(params, freeze=["diffusion_model.tme_stack*"])
    with pytest.raises(ValueError, match="unknown 'temporal'"):
        trainable_mask(params, "temporal")
    with pytest.raises(ValueError, match="unknown fields"):
        trainable_mask_from_config(params, dict(presets="all"))


class _Small(nnx.Module):
    """A few layers named like the UNet's (the mask logic only sees names; eager optax is slow
    on the full tiny network's hundreds of leaves)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.time_embed = nnx.List([Linear(3, 4, rngs=rngs), SiLU(), Linear(4, 4, rngs=rngs)])
        self.time_stack = Linear(4, 4, rngs=rngs)
        self.proj_in = Linear(4, 2, rngs=rngs)


def test_masked_optimizer_freezes_and_keeps_no_state():
    params = nnx.state(_Small(), nnx.Param)
    mask = trainable_mask(params, "reference")
    flags = jax.tree.leaves(mask)
    assert param_names(params) == ["proj_in.bias", "proj_in.kernel", "time_embed.0.bias",
                                   "time_embed.0.kernel", "time_embed.2.bias",
                                   "time_embed.2.kernel", "time_stack.bias", "time_stack.kernel"]
    assert flags == [True] * 6 + [False] * 2
    tx = masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    changed = [bool(np.any(np.asarray(a) != np.asarray(b)))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new))]
    assert changed == flags
    # Adam moments exist only for trainable leaves (mu and nu: two per trainable leaf).
    moments = [x for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0]
    assert len(moments) == 2 * sum(flags)
