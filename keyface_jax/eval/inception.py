"""The FID InceptionV3 in JAX, reading pytorch-fid's weights file (no torchvision needed).

FID's feature network is the TensorFlow "inception-2015-12-05" graph, which differs from
torchvision's InceptionV3: average pools in the Mixed blocks ignore padding
(count_include_pad=False), and the last block (Mixed_7c) max-pools its pool branch. pytorch-fid
ported its weights to `pt_inception-2015-12-05-6726825d.pth` (a torch state dict with
torchvision's key names, 1008 classes). Get that file from pytorch-fid's GitHub release
"fid_weights" (mseitzer/pytorch-fid) and pass its path; it is a pickle, so reading it needs torch
once (`convert` writes a safetensors copy that loads without torch).

Features are the 2048-d global average pool: images in [0, 1] are resized to 299×299 by bilinear
interpolation with half-pixel centres and no antialiasing (torch's F.interpolate(...,
align_corners=False)), scaled to [−1, 1], and run through the network (eval-mode batch norm,
ε = 0.001). Layout inside: NHWC activations, HWIO kernels.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from keyface_jax.eval.frechet import require_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WHERE = (f"download {WEIGHTS_NAME} from pytorch-fid's GitHub release 'fid_weights' "
         "(mseitzer/pytorch-fid) and pass its path (or a safetensors copy made with "
         "`python -m keyface_jax.eval.inception --convert IN.pth OUT.safetensors`).")
BN_EPS = 1e-3
SIZE = 299


def _a(p, i, pool):   # InceptionA: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1
    return [(f"{p}.branch1x1", i, 64, (1, 1)), (f"{p}.branch5x5_1", i, 48, (1, 1)),
            (f"{p}.branch5x5_2", 48, 64, (5, 5)), (f"{p}.branch3x3dbl_1", i, 64, (1, 1)),
            (f"{p}.branch3x3dbl_2", 64, 96, (3, 3)), (f"{p}.branch3x3dbl_3", 96, 96, (3, 3)),
            (f"{p}.branch_pool", i, pool, (1, 1))]


def _c(p, c7):        # InceptionC: factorised 7x7 convolutions
    return [(f"{p}.branch1x1", 768, 192, (1, 1)), (f"{p}.branch7x7_1", 768, c7, (1, 1)),
            (f"{p}.branch7x7_2", c7, c7, (1, 7)), (f"{p}.branch7x7_3", c7, 192, (7, 1)),
            (f"{p}.branch7x7dbl_1", 768, c7, (1, 1)), (f"{p}.branch7x7dbl_2", c7, c7, (7, 1)),
            (f"{p}.branch7x7dbl_3", c7, c7, (1, 7)), (f"{p}.branch7x7dbl_4", c7, c7, (7, 1)),
            (f"{p}.branch7x7dbl_5", c7, 192, (1, 7)), (f"{p}.branch_pool", 768, 192, (1, 1))]


def _e(p, i):         # InceptionE: expanded filter bank
    return [(f"{p}.branch1x1", i, 320, (1, 1)), (f"{p}.branch3x3_1", i, 384, (1, 1)),
            (f"{p}.branch3x3_2a", 384, 384, (1, 3)), (f"{p}.branch3x3_2b", 384, 384, (3, 1)),
            (f"{p}.branch3x3dbl_1", i, 448, (1, 1)), (f"{p}.branch3x3dbl_2", 448, 384, (3, 3)),
            (f"{p}.branch3x3dbl_3a", 384, 384, (1, 3)),
            (f"{p}.branch3x3dbl_3b", 384, 384, (3, 1)), (f"{p}.branch_pool", i, 192, (1, 1))]


# (name, in, out, kernel): every BasicConv2d (conv without bias, batch norm, ReLU)
CONVS = (
    [("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)),
     ("Conv2d_2b_3x3", 32, 64, (3, 3)), ("Conv2d_3b_1x1", 64, 80, (1, 1)),
     ("Conv2d_4a_3x3", 80, 192, (3, 3))]
    + _a("Mixed_5b", 192, 32) + _a("Mixed_5c", 256, 64) + _a("Mixed_5d", 288, 64)
    + [("Mixed_6a.branch3x3", 288, 384, (3, 3)), ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
       ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)), ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3))]
    + _c("Mixed_6b", 128) + _c("Mixed_6c", 160) + _c("Mixed_6d", 160) + _c("Mixed_6e", 192)
    + [("Mixed_7a.branch3x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
       ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)),
       ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
       ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)),
       ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3))]
    + _e("Mixed_7b", 1280) + _e("Mixed_7c", 2048))
# stride-2 or unpadded convolutions; every other one is stride 1 with "same" padding
VALID = {"Conv2d_1a_3x3": 2, "Conv2d_2a_3x3": 1, "Conv2d_4a_3x3": 1, "Mixed_6a.branch3x3": 2,
         "Mixed_6a.branch3x3dbl_3": 2, "Mixed_7a.branch3x3_2": 2, "Mixed_7a.branch7x7x3_4": 2}
PARTS = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
IGNORED = ("fc.weight", "fc.bias")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict key the network needs, with its torch shape."""
    out = {}
    for name, cin, cout, (kh, kw) in CONVS:
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for part in PARTS[1:]:
            out[f"{name}.{part}"] = (cout,)
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch state dict from .safetensors / .npz (no torch) or .pth / .pt (needs torch)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a torch pickle: reading it needs torch once; or convert it "
                          "on a machine with torch (python -m keyface_jax.eval.inception "
                          "--convert IN.pth OUT.safetensors)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def prepare_params(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Torch state dict → per-conv {kernel HWIO, scale, shift} with batch norm folded in.
    Raises ValueError on missing, unexpected or mis-shaped keys."""
    shapes = expected_shapes()
    state = {k: v for k, v in state.items()
             if not k.endswith("num_batches_tracked") and k not in IGNORED}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in shapes if k in state and tuple(np.shape(state[k])) != shapes[k])
    if missing or unexpected or wrong:
        raise ValueError(f"not a pytorch-fid InceptionV3 state dict: {len(missing)} missing "
                         f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, "
                         f"{len(wrong)} mis-shaped {wrong[:4]}")
    params = {}
    for name, *_ in CONVS:
        g = lambda part: np.asarray(state[f"{name}.{part}"], np.float32)
        scale = g("bn.weight") / np.sqrt(g("bn.running_var") + BN_EPS)
        params[name] = dict(kernel=np.transpose(g("conv.weight"), (2, 3, 1, 0)),
                            scale=scale, shift=g("bn.bias") - g("bn.running_mean") * scale)
    return params


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict of the right keys and shapes with He-scaled random values (for tests)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("bn.weight"):
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


# ---------------------------------------------------------------- network (JAX)

def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights, half-pixel centres, source index clamped at 0 (torch's
    align_corners=False rule), no antialiasing. The source index is computed in float32 as torch
    does (in float64 the weights differ by up to ~1e-4 at 400 px)."""
    f32 = np.float32
    m = np.zeros((n_out, n_in), np.float32)
    scale = f32(n_in / n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0.astype(f32)).astype(f32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w)
    np.add.at(m, (np.arange(n_out), i1), w)
    return m


def _conv(params, name, x):
    import jax
    import jax.numpy as jnp

    p = params[name]
    kh, kw = p["kernel"].shape[:2]
    stride = VALID.get(name, 1)
    pad = "VALID" if name in VALID else ((kh // 2, kh // 2), (kw // 2, kw // 2))
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(y * p["scale"] + p["shift"], 0.0)


def _max_pool(x, k=3, stride=2, pad=0):
    import jax
    import jax.numpy as jnp

    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                                 padding)


def _avg_pool_exclude_pad(x):
    """3×3, stride 1, padding 1, dividing by the number of real (unpadded) inputs."""
    import jax
    import jax.numpy as jnp

    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    return total / count


def _block_a(params, p, x):
    import jax.numpy as jnp

    c = functools.partial(_conv, params)
    b1 = c(f"{p}.branch1x1", x)
    b5 = c(f"{p}.branch5x5_2", c(f"{p}.branch5x5_1", x))
    b3 = c(f"{p}.branch3x3dbl_3", c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x)))
    bp = c(f"{p}.branch_pool", _avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


def _block_b(params, p, x):
    import jax.numpy as jnp

    c = functools.partial(_conv, params)
    b3 = c(f"{p}.branch3x3", x)
    bd = c(f"{p}.branch3x3dbl_3", c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x)))
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


def _block_c(params, p, x):
    import jax.numpy as jnp

    c = functools.partial(_conv, params)
    b1 = c(f"{p}.branch1x1", x)
    b7 = c(f"{p}.branch7x7_3", c(f"{p}.branch7x7_2", c(f"{p}.branch7x7_1", x)))
    bd = x
    for k in range(1, 6):
        bd = c(f"{p}.branch7x7dbl_{k}", bd)
    bp = c(f"{p}.branch_pool", _avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


def _block_d(params, p, x):
    import jax.numpy as jnp

    c = functools.partial(_conv, params)
    b3 = c(f"{p}.branch3x3_2", c(f"{p}.branch3x3_1", x))
    b7 = x
    for k in range(1, 5):
        b7 = c(f"{p}.branch7x7x3_{k}", b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


def _block_e(params, p, x, max_pool_branch: bool):
    import jax.numpy as jnp

    c = functools.partial(_conv, params)
    b1 = c(f"{p}.branch1x1", x)
    t = c(f"{p}.branch3x3_1", x)
    b3 = jnp.concatenate([c(f"{p}.branch3x3_2a", t), c(f"{p}.branch3x3_2b", t)], -1)
    d = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x))
    bd = jnp.concatenate([c(f"{p}.branch3x3dbl_3a", d), c(f"{p}.branch3x3dbl_3b", d)], -1)
    pooled = _max_pool(x, 3, 1, 1) if max_pool_branch else _avg_pool_exclude_pad(x)
    return jnp.concatenate([b1, b3, bd, c(f"{p}.branch_pool", pooled)], -1)


def forward(params, images, resize: bool = True):
    """images [B, H, W, 3] float in [0, 1] → pool features [B, 2048]."""
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32)
    if resize:
        ry = jnp.asarray(resize_matrix(x.shape[1], SIZE))
        rx = jnp.asarray(resize_matrix(x.shape[2], SIZE))
        x = jnp.einsum("oh,bhwc,pw->bopc", ry, x, rx, precision="highest")
    x = 2.0 * x - 1.0
    c = functools.partial(_conv, params)
    x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x)))
    x = _max_pool(x)
    x = _max_pool(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)))
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(params, name, x)
    x = _block_b(params, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(params, name, x)
    x = _block_d(params, "Mixed_7a", x)
    x = _block_e(params, "Mixed_7b", x, max_pool_branch=False)
    x = _block_e(params, "Mixed_7c", x, max_pool_branch=True)
    return x.mean(axis=(1, 2))


class InceptionFeatures:
    """FID feature extractor: uint8 images [B, H, W, 3] → [B, 2048] (a `FeatureExtractor`).

    `InceptionFeatures(path)` reads pytorch-fid's weights (see the module docstring);
    `InceptionFeatures(state_dict=...)` takes an already-loaded dict (tests use random ones).
    WeightsMissing is raised, naming where to get the file, when the path does not exist."""

    dim = 2048

    def __init__(self, path: str | os.PathLike | None = None, *,
                 state_dict: dict[str, np.ndarray] | None = None):
        import jax

        if state_dict is None:
            state_dict = read_state_dict(require_file(path, "FID InceptionV3 weights", WHERE))
        self.params = jax.tree.map(jax.numpy.asarray, prepare_params(state_dict))
        self._forward = jax.jit(forward, static_argnames="resize")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
        x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
        return np.asarray(self._forward(self.params, x), np.float64)


def convert(src: str, dst: str) -> None:
    """pytorch-fid .pth → safetensors (checked against the expected keys)."""
    from safetensors.numpy import save_file

    state = read_state_dict(src)
    prepare_params(state)          # validates keys and shapes
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()
               if k in expected_shapes()}, dst)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Convert pytorch-fid's InceptionV3 weights.")
    p.add_argument("--convert", nargs=2, metavar=("IN_PTH", "OUT_SAFETENSORS"), required=True)
    args = p.parse_args(argv)
    convert(*args.convert)
    print(f"wrote {args.convert[1]}")


if __name__ == "__main__":
    main()
