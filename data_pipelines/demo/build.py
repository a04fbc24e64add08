"""Builds the offline demo dataset: talking-face mp4s with sound, emotion labels and a manifest.

    python -m data_pipelines.demo.build --output DIR --num_videos 4 --seconds 6 --size 256 --seed 0

Writes DIR/videos/<name>.mp4, DIR/emotions/<name>.json, DIR/faces/<face>.png (each face at rest,
as the videos frame it) and DIR/manifest.json (formats in `data_pipelines/demo/__init__.py`).
The same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import fractions
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image
from scipy import signal

from data_pipelines.demo import EMOTION_FORMAT, MANIFEST_FORMAT
from data_pipelines.demo.face import FaceAnimator, FacePose
from data_pipelines.demo.photos import face_rig
from data_pipelines.demo.sources import load_speech_corpus
from data_pipelines.demo.timeline import (emotion_track, frame_audio_stats, frame_controls,
                                          plan_segments, render_audio)
from keyface_jax.data.schema import AUDIO_RATE, FPS


def write_mp4(path: str, frames, fps: float, audio: np.ndarray, audio_rate: int,
              audio_codec: str = "aac", crf: int = 20) -> None:
    """H.264 (yuv420p) + mono AAC or PCM mp4; `frames` yields [H, W, 3] uint8, audio is float32."""
    import av

    rate = fractions.Fraction(fps).limit_denominator(1001)
    codec = {"aac": "aac", "pcm": "pcm_s16le"}[audio_codec]
    with av.open(path, "w", format="mp4") as out:
        video = None
        for i, frame in enumerate(frames):
            if video is None:
                video = out.add_stream("libx264", rate=rate)
                video.height, video.width = frame.shape[:2]
                video.pix_fmt = "yuv420p"
                video.options = {"crf": str(crf), "preset": "veryfast"}
                # one thread: x264's output depends on the thread count, and it must not depend on
                # the machine for the files to be reproducible
                video.codec_context.thread_count = 1
                sound = out.add_stream(codec, rate=audio_rate, layout="mono")
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            for packet in video.encode(vf):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
        chunk = 1024
        for start in range(0, pcm.size, chunk):
            af = av.AudioFrame.from_ndarray(pcm[None, start:start + chunk], format="s16",
                                            layout="mono")
            af.sample_rate = audio_rate
            af.pts = start
            for packet in sound.encode(af):
                out.mux(packet)
        for packet in sound.encode():
            out.mux(packet)


def _groups(num_videos: int, nsv_fraction: float) -> list[str]:
    """Spreads round(N·fraction) "nsv" videos evenly over the indices."""
    return ["nsv" if math.floor((i + 1) * nsv_fraction) > math.floor(i * nsv_fraction) else "speech"
            for i in range(num_videos)]


def build_video(index: int, output: str, seconds: float, size: int, fps: float, seed: int,
                audio_rate: int, group: str, corpus, animator: FaceAnimator,
                prefix: str = "demo", audio_codec: str = "aac", head_motion: float = 1.0) -> dict:
    """Writes one video and its emotion file; returns its manifest entry."""
    rng = np.random.default_rng([seed, index])
    name = f"{prefix}_{index:04d}"
    num_frames = int(round(seconds * fps))
    duration = num_frames / fps
    segments = plan_segments(duration, group, rng)
    wav = render_audio(segments, duration, corpus, rng)
    n25 = int(round(duration * FPS))
    db25, _ = frame_audio_stats(wav, FPS, n25)
    valence, arousal = emotion_track(segments, db25, rng)
    poses = frame_controls(segments, wav, fps, num_frames, valence, arousal, rng, head_motion)

    g = math.gcd(audio_rate, AUDIO_RATE)
    track = wav if audio_rate == AUDIO_RATE else signal.resample_poly(
        wav, audio_rate // g, AUDIO_RATE // g).astype(np.float32)
    video_rel = os.path.join("videos", f"{name}.mp4")
    emotion_rel = os.path.join("emotions", f"{name}.json")
    write_mp4(os.path.join(output, video_rel), (animator.render(p) for p in poses), fps,
              track, audio_rate, audio_codec)
    with open(os.path.join(output, emotion_rel), "w") as f:
        json.dump(dict(format=EMOTION_FORMAT, fps=FPS, num_frames=n25,
                       valence=[round(float(v), 4) for v in valence],
                       arousal=[round(float(a), 4) for a in arousal]), f)
    segs = [s.as_dict() for s in segments]
    return dict(name=name, video=video_rel, emotion=emotion_rel, group=group, fps=fps,
                num_frames=num_frames, num_frames_25fps=n25, duration=round(duration, 6),
                audio_rate=audio_rate, width=size, height=size, segments=segs,
                nsv=[s for s in segs if s["kind"] in ("laugh", "sigh")])


def union_box(boxes) -> list[float]:
    """The smallest (top, bottom, left, right) box holding all `boxes`."""
    boxes = np.asarray(boxes, np.float64)
    return [float(boxes[:, 0].min()), float(boxes[:, 1].max()),
            float(boxes[:, 2].min()), float(boxes[:, 3].max())]


def build_dataset(output: str, num_videos: int = 4, seconds: float = 6.0, size: int = 256,
                  fps: float = 25.0, seed: int = 0, audio_rate: int = 48000,
                  nsv_fraction: float = 0.5, speech: list[str] | None = None,
                  prefix: str = "demo", audio_codec: str = "aac", babble: bool = False,
                  faces: tuple[str, ...] = ("astronaut",), crop_scale: float | None = None,
                  max_open: float = 0.3, photo_cache: str = "", head_motion: float = 1.0,
                  verbose: bool = False) -> dict:
    """Builds the whole dataset under `output`; returns (and writes) the manifest. Video i shows
    faces[i % len(faces)] (`photos.ALL_FACES`), framed by `photos.face_rig(crop_scale)`."""
    if num_videos < 1 or seconds <= 0 or size < 64 or size % 2 or fps <= 0:
        raise ValueError("need num_videos ≥ 1, seconds > 0, an even size ≥ 64 and fps > 0")
    if head_motion < 0:
        raise ValueError(f"head_motion must be ≥ 0 (a scale of the random head drift), got {head_motion}")
    if not 0.0 <= nsv_fraction <= 1.0:
        raise ValueError(f"nsv_fraction must be in [0, 1], got {nsv_fraction}")
    os.makedirs(os.path.join(output, "videos"), exist_ok=True)
    os.makedirs(os.path.join(output, "emotions"), exist_ok=True)
    corpus = None if babble else load_speech_corpus(speech)
    if corpus is None and not babble:
        print("demo: no recorded speech found (pip install --no-deps pyannote.audio ships a 30 s "
              "sample); using procedural babble", file=sys.stderr)
    if not faces:
        raise ValueError("need at least one face")
    cache = photo_cache or os.path.join(output, "photos")
    animators = {name: FaceAnimator(face_rig(name, size, cache, crop_scale), size, max_open)
                 for name in dict.fromkeys(faces)}
    # one still per face, at rest (mouth closed, eyes open): identity inputs and references
    os.makedirs(os.path.join(output, "faces"), exist_ok=True)
    for name, animator in animators.items():
        Image.fromarray(animator.render(FacePose())).save(os.path.join(output, "faces", f"{name}.png"))
    videos = []
    for i, group in enumerate(_groups(num_videos, nsv_fraction)):
        start = time.time()
        face = faces[i % len(faces)]
        videos.append(dict(build_video(i, output, seconds, size, fps, seed, audio_rate, group,
                                       corpus, animators[face], prefix, audio_codec, head_motion),
                           face=face, mouth_box=list(animators[face].mouth_box())))
        if verbose:
            print(f"{videos[-1]['video']}: {face}, {group}, {videos[-1]['num_frames']} frames, "
                  f"{time.time() - start:.1f} s", flush=True)
    manifest = dict(
        format=MANIFEST_FORMAT, seed=seed, fps=fps, size=size, seconds=seconds,
        audio_rate=audio_rate, emotion_fps=FPS,
        face_source="skimage.data.astronaut" if tuple(faces) == ("astronaut",) else "photos",
        faces=list(dict.fromkeys(faces)), crop_scale=crop_scale, max_open=max_open,
        head_motion=head_motion, mouth_box=union_box([v["mouth_box"] for v in videos]),
        speech_source=corpus.name if corpus else "babble",
        speech_files=[os.path.basename(p) for p in corpus.paths] if corpus else [],
        videos=videos)
    with open(os.path.join(output, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="dataset folder to write")
    p.add_argument("--num_videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each video")
    p.add_argument("--size", type=int, default=256, help="square frame side in pixels")
    p.add_argument("--fps", type=float, default=25.0, help="video frame rate (25 or 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audio_rate", type=int, default=48000, help="sample rate of the mp4 audio")
    p.add_argument("--audio_codec", choices=("aac", "pcm"), default="aac")
    p.add_argument("--nsv_fraction", type=float, default=0.5,
                   help="share of videos in the 'nsv' group (laughs/sighs)")
    p.add_argument("--speech", nargs="*", default=None,
                   help="audio files to cut speech from (default: package samples)")
    p.add_argument("--babble", action="store_true",
                   help="procedural formant babble instead of recorded speech")
    p.add_argument("--prefix", default="demo", help="video name prefix")
    p.add_argument("--faces", default="astronaut",
                   help="comma-separated faces (data_pipelines/demo/photos.py), one per video in turn")
    p.add_argument("--crop_scale", type=float, default=None,
                   help="face-aligned crop side in inter-ocular distances (default: the "
                        "astronaut's hand-placed framing; other faces use photos.DEFAULT_CROP_SCALE)")
    p.add_argument("--max_open", type=float, default=0.3,
                   help="lip gap at full opening, as a fraction of the mouth width")
    p.add_argument("--head_motion", type=float, default=1.0,
                   help="scale of the random head drift (0 = still head; laughs, sighs and loud "
                        "speech still move it)")
    p.add_argument("--photo_cache", default="", help="where fetched photos are kept "
                                                     "(default OUTPUT/photos)")
    args = p.parse_args(argv)
    start = time.time()
    manifest = build_dataset(args.output, args.num_videos, args.seconds, args.size, args.fps,
                             args.seed, args.audio_rate, args.nsv_fraction, args.speech,
                             args.prefix, args.audio_codec, args.babble,
                             tuple(f for f in args.faces.split(",") if f), args.crop_scale,
                             args.max_open, args.photo_cache, args.head_motion, verbose=True)
    print(f"wrote {len(manifest['videos'])} videos ({manifest['speech_source']} speech) to "
          f"{args.output} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
