"""LPIPS-VGG perceptual distance (Zhang et al. 2018, `lpips` package v0.1), channels last.

The keyframe model's pixel loss (spec §4) compares a decoded frame with the original through
`lpips.LPIPS(net="vgg", version="0.1")`. That network is, exactly:
  1. ScalingLayer: x ← (x − shift) / scale with shift (−.030, −.088, −.188) and scale
     (.458, .448, .450), per RGB channel; inputs are images in [−1, 1].
  2. torchvision VGG16 `features[0:30]`, tapped after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
     (torchvision indices 3, 8, 15, 22, 29).
  3. Per tap: unit-normalise over channels, x / (‖x‖₂ + 1e-10); squared difference of the two
     images; a 1×1 conv C→1 without bias (`linK.model.1`, after an eval-mode Dropout at index 0);
     mean over space.
  4. Sum of the five per-tap values → one distance per image.

The attribute tree mirrors the two published weight files, so the NNX path maps onto their keys:
`features.N.kernel` ↔ torchvision `features.N.weight`, `linK.model.1.kernel` ↔ LPIPS v0.1
`linK.model.1.weight`. Weights are loaded by `keyface_jax.losses.lpips_import`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.models.layers import Conv, Identity

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10  # lpips.normalize_tensor: x / (‖x‖ + eps)

# torchvision vgg16().features: index → (in, out) for every 3×3 conv; each conv is followed by a
# ReLU at index + 1; max-pools (2×2, stride 2) sit at 4, 9, 16, 23.
VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256),
               12: (256, 256), 14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512),
               24: (512, 512), 26: (512, 512), 28: (512, 512)}
VGG16_POOLS = (4, 9, 16, 23)
VGG16_TAPS = (3, 8, 15, 22, 29)          # relu1_2 … relu5_3, the ends of lpips' slice1..slice5
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_NUM_FEATURES = VGG16_TAPS[-1] + 1       # features[0:30]: the final max-pool (30) is unused


class ReLU(nnx.Module):
    def __call__(self, x):
        return jax.nn.relu(x)


class MaxPool2(nnx.Module):
    """2×2 max-pool, stride 2, no padding, floor mode (torch `MaxPool2d(2, 2)`)."""

    def __call__(self, x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class NetLinLayer(nnx.Module):
    """lpips `NetLinLayer`: [Dropout (identity at eval), 1×1 conv C→1 without bias]."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.model = nnx.List([Identity(), Conv(channels, 1, (1, 1), use_bias=False, rngs=rngs,
                                                dtype=dtype, param_dtype=param_dtype)])

    def __call__(self, x):
        return self.model[1](x)


class LPIPS(nnx.Module):
    """LPIPS-VGG v0.1. `__call__(x0, x1)`: two image batches [N, H, W, 3] in [−1, 1] → [N].

    Build it abstractly and fill it from the weight files (`lpips_import.load_lpips`); the random
    initialisation here only exists so the module can be constructed. Frozen in training: callers
    wrap its state in `stop_gradient`. `dtype` is the conv compute dtype; normalisation and the
    distance are always computed in float32.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        layers = []
        for i in range(_NUM_FEATURES):
            if i in VGG16_CONVS:
                layers.append(Conv(*VGG16_CONVS[i], (3, 3), **kw))
            elif i in VGG16_POOLS:
                layers.append(MaxPool2())
            else:
                layers.append(ReLU())
        self.features = nnx.List(layers)
        for k, ch in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(ch, **kw))

    def vgg_taps(self, x):
        """Scaled images [N, H, W, 3] → the five VGG16 activations (relu1_2 … relu5_3)."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        return taps

    def __call__(self, x0, x1):
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS takes two [N, H, W, 3] image batches of one shape, got "
                             f"{x0.shape} and {x1.shape}")
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        n = x0.shape[0]
        # One VGG pass over both batches: half the compiled program of two calls.
        both = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale
        total = jnp.zeros((n,), jnp.float32)
        for k, feats in enumerate(self.vgg_taps(both)):
            f = _unit_normalize(feats.astype(jnp.float32))
            diff = jnp.square(f[:n] - f[n:])
            total = total + getattr(self, f"lin{k}")(diff).astype(jnp.float32).mean(axis=(1, 2, 3))
        return total


def _unit_normalize(x):
    """lpips.normalize_tensor over channels: x / (‖x‖₂ + 1e-10). Where every channel is zero,
    sqrt'(0) is inf, but that location's ReLU masks the gradient, so no NaN reaches the input."""
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + NORMALIZE_EPS)
