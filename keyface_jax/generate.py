"""Long talking-face videos from a face and an audio track, one clip or a manifest of many.

    # one clip (tiny random weights: a smoke run of the whole pipeline)
    python -m keyface_jax.generate --face face.png --audio speech.wav --output out/clip.mp4
    # trained models (run folders of keyface_jax.train, Orbax exports or reference checkpoints)
    python -m keyface_jax.generate --manifest clips.jsonl --output_dir out/ \\
        --keyframe runs/keyframe --interpolation runs/interpolation --autoencoder runs/autoencoder \\
        --emotion happy --intensity 1.2 --seed 23
    # export the jitted samplers and decoder for serving (jax.export)
    python -m keyface_jax.generate --export out/exported ...

Manifest rows (JSONL or CSV): face, audio, and optionally name, output, emotion, intensity, seed,
max_seconds, features. Finished clips are skipped when a run is repeated; bad clips are reported in
<output_dir>/summary.json and do not stop the others. Any path (inputs, weights, outputs, the
manifest) may be local (relative or absolute) or gs://.

Weights (--keyframe, --interpolation, --autoencoder): a training run folder (DIR, or DIR@STEP), an
Orbax export, a reference checkpoint, `random`, or KIND:PATH with KIND one of random, svd,
reference, orbax, run.

Exit status: 0 every clip was made (or already existed); 1 at least one clip failed (each named on
stderr, with its reason, and in summary.json; the others were made); 2 nothing was generated: a bad
command line, or models or weights that do not load (the reason is printed).
`--verbose` (or KEYFACE_VERBOSE=1) shows the libraries' INFO logging too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from keyface_jax import console, cpu_allocator
from keyface_jax.conversion.io import CheckpointError
from keyface_jax.generation.manifest import read_manifest, requests_from_rows
from keyface_jax.generation.pipeline import GenerationOptions
from keyface_jax.generation.runner import ModelSources, Setup, run
from keyface_jax.paths import as_path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    clip = p.add_argument_group("what to generate")
    clip.add_argument("--face", help="face image or video (first frame) of a single clip")
    clip.add_argument("--audio", help="audio (any format) of a single clip")
    clip.add_argument("--output", help="mp4 of a single clip (default <output_dir>/<audio stem>.mp4)")
    clip.add_argument("--manifest", help="JSONL / CSV of clips")
    clip.add_argument("--output_dir", default="outputs/generated")
    clip.add_argument("--emotion", default="neutral",
                      help="state name, 'a,b,c' blended over the clip, or a per-frame file")
    clip.add_argument("--intensity", type=float, default=1.0)
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--max_seconds", type=float, default=None)
    _add_fields(p.add_argument_group("models"), ModelSources)
    _add_fields(p.add_argument_group("sampling"), GenerationOptions)
    p.add_argument("--clips_per_group", type=int, default=16)
    p.add_argument("--export", default="", help="write jax.export'ed samplers/decoder here and exit")
    p.add_argument("--verbose", action="store_true", help="the libraries' INFO logging too")
    args = p.parse_args(argv)
    if not args.export and not args.manifest and not (args.face and args.audio):
        p.error("give --face and --audio, or --manifest (or --export)")
    return args


def dataclass_fields(cls):
    return dataclasses.fields(cls)


def _flag_value(kind):
    if kind is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    return kind


def _add_fields(group, cls) -> None:
    """One --flag per dataclass field, typed by its default."""
    for field in dataclass_fields(cls):
        group.add_argument(f"--{field.name}", type=_flag_value(type(field.default)),
                           default=field.default)


def main(argv=None) -> int:
    args = parse_args(argv)
    console.setup_logging(args.verbose)
    cpu_allocator.warn_if_missing()
    sources = ModelSources(**{f.name: getattr(args, f.name) for f in dataclass_fields(ModelSources)})
    try:
        options = GenerationOptions(**{f.name: getattr(args, f.name)
                                       for f in dataclass_fields(GenerationOptions)})
        setup = Setup(sources, options)
    except (CheckpointError, ValueError) as e:   # weights or configs that do not load
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.export:
        from keyface_jax.generation.export import export_pipeline
        try:
            print(json.dumps(export_pipeline(setup.generator, args.export), indent=1))
        except ValueError as e:   # options the exported samplers do not carry
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        return 0
    defaults = dict(emotion=args.emotion, intensity=args.intensity, seed=args.seed,
                    max_seconds=args.max_seconds)
    if args.manifest:
        try:
            rows = read_manifest(args.manifest)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    else:
        rows = [dict(face=args.face, audio=args.audio, **({"output": args.output} if args.output else {}))]
    requests = requests_from_rows(rows, args.output_dir, defaults)
    summary_dir = (as_path(args.output_dir) if args.manifest or not args.output
                   else as_path(args.output).parent)
    summary = run(setup, requests, os.fspath(summary_dir / "summary.json"),
                  clips_per_group=args.clips_per_group)
    counts = {}
    for clip in summary.clips.values():
        counts[clip["status"]] = counts.get(clip["status"], 0) + 1
    for clip in summary.clips.values():
        if clip["status"] == "error":
            print(f"error {clip['name']}: {clip['error']}", file=sys.stderr)
    print(f"generated: {counts}; summary {summary.path}", flush=True)
    return 0 if counts.get("error", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
