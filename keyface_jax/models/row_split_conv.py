"""A spatial convolution over frames whose rows are split over devices (the `context` axis).

Each device convolves its own rows plus a halo: the `pad` rows above it from the previous device
and the `k − stride − pad` rows below it from the next one (`ppermute`; the first and last devices
receive zeros, which is the zero padding), then a valid convolution along the rows. The result is
the rows of the whole convolution that this device owns, exactly.

Written out under `shard_map` rather than left to XLA's partitioner, whose own row-split
convolutions are wrong in jax 0.10.2 on CPU (both Shardy and GSPMD): on a mesh with a further axis
over which the activations are replicated (tensor=2 × context=2), the kernel gradient of a 3×3
convolution comes out summed over that axis too (×2); and with the kernel split over its output
channels, small (8×8) frames get a wrong input gradient.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from keyface_jax.activation_sharding import ActivationSharding

NAMES = ("act_batch", "act_height", None, None)   # [N, H, W, C]: rows split, width and channels whole


def row_split_conv(ctx: ActivationSharding, x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[int]) -> jax.Array | None:
    """conv(x [N, H, W, C], kernel [kh, kw, C, O]) with symmetric `padding`, rows split as the
    rules split `act_height`; None when the rows are not split or do not split evenly (the caller
    then convolves normally)."""
    axes = ctx.axes("act_height")
    n = ctx.size("act_height")
    kh, stride, pad = kernel.shape[0], strides[0], padding[0]
    rows = x.shape[1] // n if n else 0
    below = kh - stride - pad
    if n == 1 or x.shape[1] % n or rows % stride or not (0 <= pad <= rows and 0 <= below <= rows):
        return None
    axis = axes if len(axes) > 1 else axes[0]
    down = [(i, i + 1) for i in range(n - 1)]     # device i's last rows → device i + 1

    def local(x, kernel):
        parts = [x]
        if pad:
            parts.insert(0, jax.lax.ppermute(x[:, rows - pad:], axis, down))
        if below:
            parts.append(jax.lax.ppermute(x[:, :below], axis, [(j, i) for i, j in down]))
        return jax.lax.conv_general_dilated(
            jnp.concatenate(parts, axis=1), kernel, window_strides=tuple(strides),
            padding=[(0, 0), (padding[1], padding[1])], dimension_numbers=("NHWC", "HWIO", "NHWC"))

    spec = ctx.spec(x.shape, NAMES)
    return jax.shard_map(local, mesh=ctx.mesh, in_specs=(spec, PartitionSpec()), out_specs=spec,
                         check_vma=False)(x, kernel)
