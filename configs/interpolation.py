"""Interpolation model: 14 consecutive frames between two keyframes, audio-conditioned.

    python -m keyface_jax.describe --config configs/interpolation.py:full
"""

from configs import common


def get_config(arg: str = "tiny"):
    return common.base_config("interpolation", arg)
