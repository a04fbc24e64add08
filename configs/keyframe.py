"""Keyframe model: 14 keyframes 13 frames apart, identity + audio + valence/arousal.

    python -m keyface_jax.describe --config configs/keyframe.py:full
"""

from configs import common


def get_config(arg: str = "tiny"):
    return common.base_config("keyframe", arg)
