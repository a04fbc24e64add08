"""Videos → a TFDS ArrayRecord dataset of per-frame latents, audio tokens and valence/arousal.

    python -m data_pipelines.prepare --config configs/keyframe.py:tiny --videos DIR_OR_LIST \
        --output OUT --vae random [--audio_features logmel:32] [--emotions DIR|module:attr] \
        [--crop centre|haar] [--store_frames] [--workers 2] [--num_hosts N --host_index I]

Rerunning the same command resumes (finished videos are not redone). With several hosts each
runs the command with its own --host_index on a shared OUT; host 0 merges. Details:
data_pipelines/stages.py and data_pipelines/README.md.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from data_pipelines import stages
from data_pipelines.video_arrays import PrepareOptions
from keyface_jax import console
from keyface_jax.media.video_list import list_videos

config_flags.DEFINE_config_file("config", None, "model config (autoencoder, audio_dim)",
                                lock_config=True)
flags.DEFINE_string("videos", None, "folder of videos or a list file", required=True)
flags.DEFINE_string("output", None, "dataset folder", required=True)
flags.DEFINE_string("vae", None, "SVD VAE weights (diffusers folder or file), an Orbax export "
                    "with an autoencoder (e.g. the autoencoder trainer's WORKDIR/export), or 'random'",
                    required=True)
flags.DEFINE_string("name", stages.tfds_io.DATASET_NAME, "TFDS dataset name")
flags.DEFINE_string("audio_features", "", "audio extractor spec; default logmel:<audio_dim>")
flags.DEFINE_string("emotions", "neutral", "folder of per-video files, module:attr, or neutral")
flags.DEFINE_string("work_dir", "", "work cache (default OUT/_prepare)")
flags.DEFINE_string("vae_dtype", "float32", "VAE compute dtype (bfloat16 on accelerators)")
flags.DEFINE_integer("batch_size", 8, "frames per VAE call")
flags.DEFINE_integer("workers", 1, "processes on this host (each with its own encoder)")
flags.DEFINE_integer("num_hosts", None, "hosts sharing the list (default: jax.process_count())")
flags.DEFINE_integer("host_index", None, "this host (default: jax.process_index())")
flags.DEFINE_float("shard_mb", 512.0, "shard size")
flags.DEFINE_bool("wait", True, "wait for the other hosts between stages")
flags.DEFINE_bool("skip_failed", False, "mark videos failing with unexpected errors skipped")
flags.DEFINE_bool("progress", True, "progress bar")
flags.DEFINE_bool("verbose", False, "the libraries' INFO lines too (also KEYFACE_VERBOSE=1)")
# PrepareOptions fields, same names (image_size 0: the config's autoencoder.image_size).
_FIELDS = {f.name: f for f in dataclasses.fields(PrepareOptions)
           if f.name not in ("vae", "audio_features", "emotions")}
for _f in _FIELDS.values():
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[type(_f.default)]
    define(_f.name, 0 if _f.name == "image_size" else _f.default, f"PrepareOptions.{_f.name}")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    console.setup_logging(flags.FLAGS.verbose)
    import jax

    from data_pipelines.tools import audio_extractor, build_tools
    from keyface_jax.config_lib import autoencoder_config
    from keyface_jax.data.schema import require_local
    from keyface_jax.paths import canonical
    config = FLAGS.config
    require_local(FLAGS.videos, "--videos")
    require_local(FLAGS.output, "--output")
    values = {name: getattr(FLAGS, name) for name in _FIELDS}
    values["image_size"] = values["image_size"] or config.autoencoder.image_size
    audio_spec = FLAGS.audio_features or f"logmel:{config.model.audio_dim}"
    # Paths recorded in the dataset resolved, so a re-run matches whatever form they had.
    vae = FLAGS.vae if FLAGS.vae == "random" else canonical(FLAGS.vae)
    emotions = canonical(FLAGS.emotions) if os.path.exists(FLAGS.emotions) else FLAGS.emotions
    opts = PrepareOptions(vae=vae, audio_features=audio_spec, emotions=emotions, **values)
    run = stages.RunConfig(
        output=FLAGS.output, name=FLAGS.name, workers=FLAGS.workers, batch_size=FLAGS.batch_size,
        num_hosts=FLAGS.num_hosts or jax.process_count(),
        host_index=FLAGS.host_index if FLAGS.host_index is not None else jax.process_index(),
        shard_mb=FLAGS.shard_mb, wait=FLAGS.wait, skip_failed=FLAGS.skip_failed,
        progress=FLAGS.progress, work_dir=FLAGS.work_dir)
    vae_cfg = autoencoder_config(config.autoencoder, dtype=jax.numpy.dtype(FLAGS.vae_dtype))
    audio = audio_extractor(audio_spec)
    if audio.dim != config.model.audio_dim:
        print(f"warning: audio features have {audio.dim} dims, the config's model expects "
              f"{config.model.audio_dim}", file=sys.stderr)
    size, latent = opts.image_size, vae_cfg.latent_channels
    dataset = dict(latent_shape=[size // 8, size // 8, latent], audio_dim=audio.dim,
                   audio_features=getattr(audio, "name", audio_spec),
                   frame_shape=[size, size, 3] if opts.store_frames else None)
    summary = stages.prepare(
        list_videos(FLAGS.videos), opts, run, dataset=dataset,
        tools_factory=lambda: build_tools(opts, vae_cfg, run.batch_size, audio),
        worker_args=(vae_cfg, run.batch_size))
    print(stages.format_summary(summary))
    print(json.dumps({k: summary[k] for k in ("status", "processed", "skipped", "frames")}))
    return 0 if summary["status"] in ("done", "host done", "waiting") else 1


if __name__ == "__main__":
    app.run(main)
