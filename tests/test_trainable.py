"""Trainable-parameter selection: presets and globs against the real module tree, and the split
into trainable and frozen Params that the optimizer and the train step see."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import keyframe
from keyface_jax.config_lib import network_config
from keyface_jax.models.build import abstract_network, count_params
from keyface_jax.models.layers import Linear, SiLU
from keyface_jax.training.trainable import PRESETS, param_names, split_network
from tests.helpers import tiny_config

TEMPORAL = ("time_stack", "time_mixer", "time_pos_embed")


def _counts(net, preset="reference", **globs) -> tuple[int, int]:
    """(trainable, total) parameter values when `net` is split under a trainable config."""
    _, trainable, frozen = split_network(net, dict(preset=preset, **globs))
    return count_params(trainable), count_params(trainable) + count_params(frozen)


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
    total = count_params(net)
    temporal, n_modules = _temporal_count(net)
    time_embed = count_params(net.diffusion_model.time_embed)
    assert n_modules > 0 and temporal > 0 and time_embed > 0
    counts = {p: _counts(net, p) for p in PRESETS if p != "none"}
    assert all(t == total for _, t in counts.values())
    assert counts["all"][0] == total
    with pytest.raises(ValueError, match="leaves nothing to train"):
        split_network(net, dict(preset="none"))
    assert counts["reference"][0] == total - temporal          # time_embed trains
    assert counts["spatial_only"][0] == total - temporal - time_embed
    # The audio projection (and the interpolation mask token) train under the reference preset.
    trainable = set(param_names(split_network(net, dict(preset="reference"))[1]))
    flags = {name: name in trainable for name in param_names(net)}
    assert flags["audio_proj.kernel"] and flags["diffusion_model.time_embed.0.kernel"]
    if kind == "interpolation":
        assert flags["learned_mask"]
    assert not flags["diffusion_model.input_blocks.1.0.time_stack.in_layers.0.scale"]
    assert not flags["diffusion_model.input_blocks.1.1.time_mixer.mix_factor"]
    if variant == "full":  # the SVD UNet's temporal layers: ~41% of its parameters
        assert 0.3 < temporal / total < 0.5


def test_globs_override_the_preset():
    net = abstract_network(tiny_config("keyframe"))
    names = param_names(net)
    params = nnx.state(net, nnx.Param)
    audio = sum(int(np.prod(np.shape(v))) for n, v in zip(names, jax.tree.leaves(params))
                if n.startswith("audio_proj."))
    mixers = [n for n in names if "time_mixer" in n]
    base, total = _counts(net)
    assert _counts(net, freeze=["audio_proj.*"])[0] == base - audio
    # unfreeze wins over the preset and over freeze, as the reference's to_unfreeze.
    assert _counts(net, freeze=["*"], unfreeze=["*time_mixer*"])[0] == len(mixers)  # a scalar each
    assert _counts(net, "all", freeze=["*time_*"], unfreeze=["*time_embed*"]) == _counts(net)
    with pytest.raises(ValueError, match="match no parameter"):
        split_network(net, dict(freeze=["diffusion_model.tme_stack*"]))
    with pytest.raises(ValueError, match="unknown 'temporal'"):
        split_network(net, dict(preset="temporal"))
    with pytest.raises(ValueError, match="unknown fields"):
        split_network(net, dict(presets="all"))


class _Small(nnx.Module):
    """A few layers named like the UNet's (the selection only sees names)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.time_embed = nnx.List([Linear(3, 4, rngs=rngs), SiLU(), Linear(4, 4, rngs=rngs)])
        self.time_stack = Linear(4, 4, rngs=rngs)
        self.proj_in = Linear(4, 2, rngs=rngs)


def test_frozen_parameters_get_no_optimizer_state():
    _, trainable, frozen = split_network(_Small(), dict(preset="reference"))
    assert param_names(trainable) == ["proj_in.bias", "proj_in.kernel", "time_embed.0.bias",
                                      "time_embed.0.kernel", "time_embed.2.bias",
                                      "time_embed.2.kernel"]
    assert param_names(frozen) == ["time_stack.bias", "time_stack.kernel"]
    opt_state = optax.adamw(1e-2, weight_decay=0.1).init(trainable)
    # Adam moments exist only for trainable leaves (mu and nu: two per trainable leaf).
    moments = [x for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(trainable))
