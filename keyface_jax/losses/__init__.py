"""Auxiliary training losses: LPIPS-VGG (the keyframe model's perceptual pixel loss, spec §4)."""

from keyface_jax.losses.lpips import LPIPS
from keyface_jax.losses.lpips_import import load_lpips, lpips_from_state_dicts

__all__ = ["LPIPS", "load_lpips", "lpips_from_state_dicts"]
