"""Training previews: mp4s of the right frame count and size for both networks (latent pictures and
VAE-decoded ones), one compilation for all previews, the same clips after a resume."""

import os

import av
import jax
import numpy as np
from flax import nnx
from helpers import random_state
from jax.sharding import NamedSharding, PartitionSpec

from configs import interpolation, keyframe
from keyface_jax.conversion.io import write_safetensors
from keyface_jax.conversion.nnx_torch import export_torch_state_dict
from keyface_jax.config_lib import autoencoder_config, network_config
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.build import abstract_network
from keyface_jax.sharding import make_mesh
from keyface_jax.data.batch_layout import batch_sharding, to_global
from keyface_jax.data.synthetic_batches import SyntheticBatches
from keyface_jax.training.previews import BATCH_FILE, PreviewWriter
from keyface_jax.training.state import TrainState
from keyface_jax.training.trainable import split_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 4


def _config(module, **train):
    config = module.get_config(f"tiny,frames={FRAMES}")
    config.train.update(train)
    return config


def _run_parts(config, seed=0):
    """(mesh, graphdef, train state with seeded random weights on the mesh, first global batch)."""
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    net_cfg = network_config(config.model)
    graphdef, trainable, frozen = split_network(abstract_network(net_cfg), config.trainable)
    params = random_state(nnx.merge_state(trainable, frozen), seed)
    _, trainable, frozen = split_network(nnx.merge(graphdef, params), config.trainable)
    state = jax.device_put(TrainState(step=0, rng=None, params=trainable, frozen=frozen,
                                      opt_state=None),
                           NamedSharding(mesh, PartitionSpec()))
    data = SyntheticBatches(net_cfg, config.train.batch_size, FRAMES, seed)
    first = to_global(data.global_batch_at(0), batch_sharding(mesh))
    return mesh, graphdef, state, first


def _video_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_latent_previews_of_the_keyframe_net(tmp_path):
    config = _config(keyframe, preview_every=2, steps=5)
    mesh, graphdef, state, first = _run_parts(config)
    writer = PreviewWriter(config, str(tmp_path), graphdef, first, mesh)
    seconds = [writer.maybe_write(step, state) for step in range(1, 6)]
    assert [s > 0 for s in seconds] == [False, True, False, True, True]  # every 2 steps and the last
    assert sorted(os.listdir(tmp_path / "previews")) == [
        BATCH_FILE, "step_000002.mp4", "step_000004.mp4", "step_000005.mp4"]
    video = _video_frames(tmp_path / "previews" / "step_000004.mp4")
    size = config.autoencoder.image_size
    assert video.shape == (FRAMES, 2 * size, 2 * size, 3)  # 2 clips (rows) × [truth | sample]
    # Same weights and noise: the same picture each time; the sample is not the ground truth.
    np.testing.assert_array_equal(video, _video_frames(tmp_path / "previews" / "step_000002.mp4"))
    assert np.abs(video[:, :, :size].astype(int) - video[:, :, size:]).mean() > 5
    # With an EMA copy the preview samples from it (same shapes: no new compilation).
    writer.maybe_write(4, state.replace(ema=jax.tree.map(lambda p: 0.5 * p, state.params)))
    ema_video = _video_frames(tmp_path / "previews" / "step_000004.mp4")
    assert np.abs(ema_video[:, :, size:].astype(int) - video[:, :, size:]).mean() > 1
    # The ground truth half stays (up to H.264 blocks that straddle the seam).
    assert np.abs(ema_video[:, :, :size].astype(int) - video[:, :, :size]).mean() < 1
    assert writer._sample._cache_size() == 1  # compiled once for all previews


def test_decoded_previews_of_the_interpolation_net_and_resume(tmp_path):
    config = _config(interpolation, preview_every=3, steps=3)
    vae = nnx.eval_shape(lambda: AutoencoderKL(autoencoder_config(config.autoencoder,
                                                                  use_encoder=False),
                                               rngs=nnx.Rngs(0)))
    decoder_sd = export_torch_state_dict(random_state(nnx.state(vae.decoder, nnx.Param), seed=4))
    write_safetensors({f"decoder.{k}": v for k, v in decoder_sd.items()}, tmp_path / "vae.safetensors")
    config.init.autoencoder = str(tmp_path / "vae.safetensors")
    mesh, graphdef, state, first = _run_parts(config)
    writer = PreviewWriter(config, str(tmp_path), graphdef, first, mesh)
    assert writer.maybe_write(3, state) > 0
    video = _video_frames(tmp_path / "previews" / "step_000003.mp4")
    size = config.autoencoder.image_size
    assert video.shape == (FRAMES, 2 * size, 2 * size, 3)
    assert video.std() > 5  # decoded pictures, not a flat frame
    # A resumed run previews the clips of the first run, whatever batch it starts on.
    later = to_global({k: v[::-1].copy() for k, v in jax.device_get(first).items()},
                      batch_sharding(mesh))
    resumed = PreviewWriter(config, str(tmp_path), graphdef, later, mesh)
    np.testing.assert_array_equal(jax.device_get(resumed._truth_latents),
                                  jax.device_get(writer._truth_latents))


# That previews leave training bitwise unchanged is checked by tests/test_train.py: its
# reference run writes previews, the runs compared with it bitwise do not.
