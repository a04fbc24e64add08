"""Autoencoder reconstruction quality on frames it did not train on.

    python -m keyface_jax.eval.reconstruction --autoencoder runs/ae/export \\
        --videos heldout/videos --output recon.json [--frames 64]

Frames (25 fps, spread evenly over the videos of a folder) go through the encoder's posterior
mode and the decoder one frame at a time (as generation decodes), and are scored against the
originals: PSNR (dB, on [−1, 1] pixels, of the mean squared error over all frames, as the
trainer's end-of-run score) and the
sharpness (variance of the Laplacian of the grey frame) of the reconstructions over that of the
originals, the ceiling of what a generator decoding through this autoencoder can keep. Pooled
over all frames, and per video (e.g. an unseen face apart from unseen frames of a known one).
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keyface_jax import console, paths
from keyface_jax.eval.identity import laplacian_variance

# frames per jitted call: one compiled shape, small enough for any memory
CHUNK = 8


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef, state, frames):
    model = nnx.merge(graphdef, state)
    x = frames.astype(jnp.float32) / 127.5 - 1.0
    mean, _ = model.encode(x)
    decoded = jnp.clip(model.decode(mean, num_frames=1), -1.0, 1.0)
    return jnp.mean((decoded - x) ** 2, axis=(1, 2, 3)), decoded


def reconstruction_scores(autoencoder, frames: np.ndarray) -> dict:
    """PSNR and sharpness ratio of uint8 frames [N, H, W, 3] through `autoencoder`."""
    graphdef, state = nnx.split(autoencoder)
    n = len(frames)
    if n == 0:
        raise ValueError("no frames to reconstruct")
    padded = np.concatenate([frames, np.repeat(frames[-1:], -n % CHUNK, axis=0)])
    mses, sharp_ratio = [], []
    for start in range(0, len(padded), CHUNK):
        chunk = padded[start:start + CHUNK]
        values, decoded = _reconstruct(graphdef, state, jnp.asarray(chunk))
        decoded = np.clip(np.rint((np.asarray(decoded) + 1) * 127.5), 0, 255).astype(np.uint8)
        for k in range(min(CHUNK, n - start)):
            mses.append(float(values[k]))
            original = laplacian_variance(chunk[k])
            sharp_ratio.append(laplacian_variance(decoded[k]) / original if original > 0 else np.nan)
    psnr = lambda mse: float(10.0 * np.log10(4.0 / max(mse, 1e-12)))
    return dict(frames=n, psnr=psnr(np.mean(mses)), psnr_worst_frame=psnr(np.max(mses)),
                sharpness_ratio=float(np.nanmean(sharp_ratio)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--autoencoder", required=True, help="Orbax export / autoencoder run folder")
    p.add_argument("--config", default="configs/autoencoder.py:tiny",
                   help="config whose `autoencoder` section describes the network")
    p.add_argument("--videos", required=True, help="folder (or list file) of videos not trained on")
    p.add_argument("--frames", type=int, default=64, help="frames scored, spread over the videos")
    p.add_argument("--output", required=True, help="JSON to write")
    p.add_argument("--verbose", action="store_true", help="the libraries' INFO lines too")
    args = p.parse_args(argv)
    console.setup_logging(args.verbose)

    from keyface_jax.config_lib import load_config
    from keyface_jax.data.video_frames import evaluation_frames, load_video_frames
    from keyface_jax.generation.runner import load_autoencoder

    try:
        videos = load_video_frames(args.videos)
        frames = evaluation_frames(videos, args.frames)
    except ValueError as e:
        print(f"reconstruction: {e}", file=sys.stderr)
        return 2
    model = load_autoencoder(load_config(args.config).autoencoder, args.autoencoder)
    per_video = {name: reconstruction_scores(model, evaluation_frames(
                     {name: v}, max(1, args.frames // len(videos)))) for name, v in videos.items()}
    scores = dict(reconstruction_scores(model, frames), per_video=per_video,
                  videos=paths.canonical(args.videos), autoencoder=paths.canonical(args.autoencoder))
    paths.write_json(args.output, scores, indent=1)
    print(f"autoencoder on {scores['frames']} unseen frames: PSNR {scores['psnr']:.2f} dB, "
          f"sharpness {scores['sharpness_ratio']:.2f}× the originals' → {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
