"""The autoencoder reconstruction report (`python -m keyface_jax.eval.reconstruction`)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from keyface_jax.config_lib import load_config
from keyface_jax.eval import reconstruction
from keyface_jax.generation.runner import load_autoencoder
from keyface_jax.media.video import write_video

CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "autoencoder.py") + ":tiny"


def test_cli_scores_every_video_and_pools_them(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        write_video(str(videos / f"{name}.mp4"), rng.integers(0, 255, (6, 32, 32, 3), np.uint8), 25.0)
    monkeypatch.chdir(tmp_path)  # relative output path, as the demo passes it
    rc = reconstruction.main(["--autoencoder", "random", "--videos", "videos", "--frames", "4",
                              "--output", "report/recon.json", "--config", CONFIG])
    assert rc == 0
    scores = json.loads((tmp_path / "report" / "recon.json").read_text())
    assert sorted(scores["per_video"]) == ["a", "b"] and scores["frames"] == 4
    # The pooled PSNR is that of the mean squared error over the same frames, scored directly.
    from keyface_jax.data.video_frames import evaluation_frames, load_video_frames
    frames = evaluation_frames(load_video_frames("videos"), 4)
    model = load_autoencoder(load_config(CONFIG).autoencoder, "random")
    direct = reconstruction.reconstruction_scores(model, frames)
    np.testing.assert_allclose(scores["psnr"], direct["psnr"], rtol=1e-6)
    assert np.isfinite(scores["sharpness_ratio"]) and scores["videos"] == str(videos.resolve())


def test_cli_names_a_folder_without_videos(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = reconstruction.main(["--autoencoder", "random", "--videos", str(tmp_path / "empty"),
                              "--output", str(tmp_path / "r.json"), "--config", CONFIG])
    assert rc == 2 and "empty" in capsys.readouterr().err
