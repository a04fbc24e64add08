"""Guided denoisers for the Euler loop: each builds `denoise_fn(x, sigma) -> D(x; σ)` from networks.

Guidance branches are folded into the batch axis, so one guided step is one network call on a
[B·n, ...] batch instead of n calls. The fold is sample-major ([B, n] → B·n): when the batch is
sharded over devices, every device holds all branches of its own samples and folding and unfolding
need no communication.

A network_fn is F(x_in [B,T,h,w,C], c_noise [B], **conditions) -> [B,T,h,w,C], e.g. a merged
KeyframeNet / InterpolationNet; `denoise` wraps it in the v-prediction preconditioning.
Conditions are this clip batch's arrays (leading axis B); branch flags (`*_keep`) are added here.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.diffusion.scalings import denoise
from keyface_jax.sampling import guidance
from keyface_jax.sampling.euler import DenoiseFn

NetworkFn = Callable[..., jax.Array]

# Keyframe 3-branch guider (spec §5): zeroing the audio context also removes audio from the label
# vector y (the network zeroes the projected audio used for both); valence/arousal stay on.
KEYFRAME_BRANCHES = (
    dict(audio_keep=0.0, identity_keep=0.0),  # uncond
    dict(audio_keep=0.0, identity_keep=1.0),  # ref: identity only
    dict(audio_keep=1.0, identity_keep=1.0),  # full
)
# Unconditional branch of the 2-branch preview guider: the reference's force_uc_zero_embeddings
# (cond_frames, audio_emb) for each network kind.
KEYFRAME_UNCOND = dict(audio_keep=0.0, identity_keep=0.0)
INTERPOLATION_UNCOND = dict(audio_keep=0.0, cond_keep=0.0)


def fold_branches(tree, num_branches: int):
    """Repeats every [B, ...] leaf to [B·n, ...], sample-major (a sample's n copies adjacent)."""
    return jax.tree.map(lambda a: jnp.repeat(a, num_branches, axis=0), tree)


def branch_flags(branches: Sequence[Mapping[str, float]], batch: int) -> dict[str, jax.Array]:
    """Per-branch keep flags → float32 [B·n] arrays matching `fold_branches`' order."""
    names = sorted(branches[0])
    if any(sorted(b) != names for b in branches):
        raise ValueError(f"all branches must set the same flags, got {list(branches)}")
    return {name: jnp.tile(jnp.asarray([b[name] for b in branches], jnp.float32), batch)
            for name in names}


def multi_branch_denoiser(network_fn: NetworkFn, conditions: Mapping[str, jax.Array],
                          branches: Sequence[Mapping[str, float]]
                          ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    """(x [B,...], sigma [B]) -> n predictions [B,...], one per branch, from one network call.

    Conditions are folded here, once: call this outside the sampling loop so the per-step work is
    folding x and σ only.
    """
    clash = set(conditions) & set(branches[0])
    if clash:
        raise ValueError(f"conditions must not set the guidance flags {sorted(clash)}")
    n = len(branches)
    batch = jax.tree.leaves(conditions)[0].shape[0]
    folded = dict(fold_branches(dict(conditions), n), **branch_flags(branches, batch))

    def denoise_branches(x, sigma):
        d = denoise(network_fn, fold_branches(x, n), fold_branches(sigma, n), **folded)
        d = d.reshape((batch, n) + d.shape[1:])
        return tuple(d[:, i] for i in range(n))

    return denoise_branches


def keyframe_cfg_denoiser(network_fn: NetworkFn, conditions,
                          audio_scale=guidance.KEYFRAME_AUDIO_SCALE,
                          ref_scale=guidance.KEYFRAME_REF_SCALE) -> DenoiseFn:
    """Keyframe audio/reference guidance; conditions: identity, audio, valence, arousal."""
    branches = multi_branch_denoiser(network_fn, conditions, KEYFRAME_BRANCHES)
    return lambda x, sigma: guidance.audio_ref_cfg(*branches(x, sigma), audio_scale, ref_scale)


def keyframe_cfg_autoguidance_denoiser(network_fn: NetworkFn, bad_fn: NetworkFn, conditions,
                                       audio_scale=guidance.KEYFRAME_AUDIO_SCALE,
                                       ref_scale=guidance.KEYFRAME_REF_SCALE,
                                       autoguidance_scale=guidance.AUTOGUIDANCE_SCALE) -> DenoiseFn:
    """The 3-branch guider plus autoguidance by a weaker keyframe network on the full branch (one
    more network call per step): `guidance.audio_ref_autoguidance`."""
    branches = multi_branch_denoiser(network_fn, conditions, KEYFRAME_BRANCHES)

    def guided(x, sigma):
        d_bad = denoise(bad_fn, x, sigma, **conditions)   # no keep flags: every condition on
        return guidance.audio_ref_autoguidance(*branches(x, sigma), d_bad, audio_scale, ref_scale,
                                               autoguidance_scale)
    return guided


def linear_cfg_denoiser(network_fn: NetworkFn, conditions, uncond: Mapping[str, float],
                        frame_scales) -> DenoiseFn:
    """Training-preview guidance: 2 branches (uncond flags as given, then all conditions on) with a
    per-frame scale frame_scales [T]."""
    cond = {name: 1.0 for name in uncond}
    branches = multi_branch_denoiser(network_fn, conditions, (dict(uncond), cond))
    return lambda x, sigma: guidance.linear_prediction_cfg(*branches(x, sigma), frame_scales)


def autoguidance_denoiser(good_fn: NetworkFn, bad_fn: NetworkFn, conditions,
                          scale=guidance.AUTOGUIDANCE_SCALE) -> DenoiseFn:
    """Autoguidance with two network calls per step (any two architectures)."""
    def guided(x, sigma):
        return guidance.autoguidance(denoise(bad_fn, x, sigma, **conditions),
                                     denoise(good_fn, x, sigma, **conditions), scale)
    return guided


def stacked_autoguidance_denoiser(graphdef: nnx.GraphDef, stacked_state: nnx.State, conditions,
                                  scale=guidance.AUTOGUIDANCE_SCALE) -> DenoiseFn:
    """Autoguidance as one vmapped call over stacked [bad, good] parameters (same graphdef).

    x is shared, not batched, under the vmap: XLA sees the two networks as one program with a
    leading parameter axis (batched matmuls, grouped convolutions). Same FLOPs as two calls, but on
    CPU it ran ~2× slower (grouped convolutions) and it needs a stacked copy of both parameter
    sets, so the samplers use `autoguidance_denoiser`; kept for accelerators where it may win.
    """
    def guided(x, sigma):
        per_network = lambda state: denoise(nnx.merge(graphdef, state), x, sigma, **conditions)
        d = jax.vmap(per_network)(stacked_state)
        return guidance.autoguidance(d[0], d[1], scale)
    return guided
