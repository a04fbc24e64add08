"""Figures for a finished run: a contact sheet of a video's frames, the training-loss curves of
one or more run folders, and one metrics JSON that gathers the evaluations and the training.

    python -m keyface_jax.report --video out.mp4 --runs runs/autoencoder runs/keyframe \\
        runs/interpolation --evaluation metrics_eval.json --output report/ \\
        [--more_evaluations jfk=jfk_eval.json heldout_face=face_eval.json] \\
        [--reconstruction recon.json] [--stage_times stages.tsv] [--extra timings.json]

metrics.json's `summary` holds the headline figures, flat (see `headline`): lip sync at lag 0 and
its 1-s-shifted control per evaluated clip, sharpness against the input crop, identity, the
held-out face's similarity to its own input and to the nearest other face, the autoencoder on
unseen and on training frames, the last losses and the stage times.

Every path may be local or gs://. Exit status: 0 written; 2 a bad command line, a video without
frames or runs without metrics (the reason is printed).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import numpy as np
from PIL import Image, ImageDraw

from keyface_jax import console
from keyface_jax.media.errors import MediaError
from keyface_jax.media.video import FrameReader
from keyface_jax.paths import as_path, local_copy, read_json, staged_output, write_json
from keyface_jax.training.metrics import read_jsonl


def contact_sheet(video: str, path, *, columns: int = 6, rows: int = 4, tile: int = 160) -> dict:
    """A grid of frames evenly spread over the video, each labelled with its time."""
    with local_copy(video) as local:
        frames = list(FrameReader(local))
    if not frames:
        raise ValueError(f"{video}: no frames")
    count = min(columns * rows, len(frames))
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), "black")
    draw = ImageDraw.Draw(sheet)
    for k, index in enumerate(picks):
        x, y = (k % columns) * tile, (k // columns) * tile
        sheet.paste(Image.fromarray(frames[index]).resize((tile, tile), Image.Resampling.BILINEAR), (x, y))
        draw.text((x + 4, y + 4), f"{index / 25:.1f}s", fill="yellow")
    with staged_output(path) as local:
        sheet.save(local, format="png")
    return dict(path=os.fspath(as_path(path)), frames=[int(i) for i in picks],
                video_frames=len(frames))


def read_metrics(run: str) -> list[dict]:
    path = as_path(run) / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def loss_plot(runs: list[str], path) -> dict:
    """One panel per run: loss against step (log scale), from each run's metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {os.path.basename(os.path.normpath(r)): read_metrics(r) for r in runs}
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        raise ValueError(f"no metrics.jsonl in {runs}")
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
    summary = {}
    for ax, (name, rows) in zip(axes[0], curves.items()):
        steps = [r["step"] for r in rows if "loss" in r]
        losses = [r["loss"] for r in rows if "loss" in r]
        ax.plot(steps, losses, marker=".", lw=1)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        summary[name] = dict(steps=steps[-1] if steps else 0, first_loss=losses[0] if losses else None,
                             last_loss=losses[-1] if losses else None)
        scores = [r["eval_psnr"] for r in rows if "eval_psnr" in r]
        if scores:   # the autoencoder trainer's end-of-run score on training frames
            summary[name]["eval_psnr"] = scores[-1]
    fig.tight_layout()
    with staged_output(path) as local:
        fig.savefig(local, dpi=110, format="png")
    plt.close(fig)
    return dict(path=os.fspath(as_path(path)), runs=summary)


def _get(tree, *keys):
    for key in keys:
        if not isinstance(tree, dict) or tree.get(key) is None:
            return None
        tree = tree[key]
    return tree


def _clip_figures(prefix: str, evaluation: dict) -> dict:
    sync = evaluation.get("lip_sync") or {}
    ident = _get(evaluation, "identity", "summary") or {}
    out = {f"{prefix}lip_sync_r_lag0": sync.get("r_lag0"),
           f"{prefix}lip_sync_r": sync.get("r"),
           f"{prefix}lip_sync_control_r": _get(sync, "control", "r"),
           # keyframe model vs interpolation model: lag-0 r over keyframes / in-between frames
           f"{prefix}lip_sync_r_keyframes": _get(sync, "keyframe_split", "keyframes_r"),
           f"{prefix}lip_sync_r_inbetween": _get(sync, "keyframe_split", "inbetween_r"),
           f"{prefix}identity_first_window": ident.get("first_similarity"),
           f"{prefix}identity_last_window": ident.get("last_similarity"),
           f"{prefix}sharpness_to_input": ident.get("sharpness_to_identity"),
           # frames dlib tracked no face in, measured inside the identity image's face box
           f"{prefix}fallback_box_frames": _get(evaluation, "face", "fallback_box_frames")}
    comp = _get(evaluation, "identity", "compare") or {}
    if "others" in comp:
        out.update({f"{prefix}similarity_to_own_input": comp.get("own"),
                    f"{prefix}similarity_to_nearest_other": comp.get("nearest_other_similarity")})
    return out


def headline(report: dict) -> dict:
    """The flat dict of headline figures (None where a part is missing)."""
    out = _clip_figures("", report.get("evaluation") or {})
    for name, evaluation in (report.get("evaluations") or {}).items():
        out.update(_clip_figures(f"{name}_", evaluation))
    recon = report.get("autoencoder_unseen")
    if recon is not None:
        out.update(autoencoder_psnr_unseen=recon.get("psnr"),
                   autoencoder_sharpness_unseen=recon.get("sharpness_ratio"))
        for name, scores in (recon.get("per_video") or {}).items():
            out[f"autoencoder_psnr_unseen_{name}"] = scores.get("psnr")
    for name, run in (_get(report, "training", "runs") or {}).items():
        out[f"{name}_last_loss"] = run.get("last_loss")
        if run.get("eval_psnr") is not None:
            out[f"{name}_psnr_training_frames"] = run["eval_psnr"]
    stages = report.get("stage_seconds") or {}
    for name, seconds in stages.items():
        out[f"seconds_{name}"] = seconds
    if stages:   # the job's wall time without the package downloads (installs are not timed)
        out["seconds_timed_total"] = sum(v for k, v in stages.items() if k != "packages")
    return out


def read_stage_times(path: str) -> dict:
    """{stage: seconds} from lines 'N/M NAME<TAB>SECONDS SINCE START' in order (launch/demo.sh);
    stages are keyed by their name in snake case ("3/8 autoencoder" → "autoencoder")."""
    marks = [line.split("\t") for line in as_path(path).read_text().splitlines() if line.strip()]
    slug = lambda name: re.sub(r"[^a-z0-9]+", "_", name.split(" ", 1)[-1].lower()).strip("_")
    return {slug(name): int(b) - int(a) for (name, a), (_, b) in zip(marks, marks[1:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True)
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--evaluation", help="metrics JSON of keyface_jax.evaluate")
    p.add_argument("--more_evaluations", nargs="*", default=[], metavar="NAME=JSON",
                   help="evaluations of other clips, kept under `evaluations`")
    p.add_argument("--reconstruction", help="JSON of keyface_jax.eval.reconstruction (unseen frames)")
    p.add_argument("--stage_times", help="stage marks (NAME<TAB>seconds since start) to durations")
    p.add_argument("--extra", help="JSON object merged into the report (e.g. timings)")
    p.add_argument("--output", required=True, help="folder for contact_sheet.png, losses.png, metrics.json")
    p.add_argument("--verbose", action="store_true", help="the libraries' INFO logging too")
    args = p.parse_args(argv)
    console.setup_logging(args.verbose)
    output = as_path(args.output)
    try:
        report = dict(video=os.fspath(as_path(args.video)),
                      contact_sheet=contact_sheet(args.video, output / "contact_sheet.png"))
        if args.runs:
            report["training"] = loss_plot(args.runs, output / "losses.png")
    except (ValueError, MediaError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    if args.evaluation:
        report["evaluation"] = _read_evaluation(args.evaluation)
    for item in args.more_evaluations:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"--more_evaluations {item!r}: give NAME=JSON")
        report.setdefault("evaluations", {})[name] = _read_evaluation(path)
    if args.reconstruction:
        report["autoencoder_unseen"] = read_json(args.reconstruction)
    if args.stage_times:
        report["stage_seconds"] = read_stage_times(args.stage_times)
    if args.extra:
        report.update(read_json(args.extra))
    report["summary"] = headline(report)
    path = output / "metrics.json"
    write_json(path, report, indent=1)
    print(f"report: {path}\n  contact sheet {report['contact_sheet']['path']}"
          + (f"\n  losses {report['training']['path']}" if args.runs else ""))
    return 0


def _read_evaluation(path: str) -> dict:
    evaluation = read_json(path)
    evaluation.pop("signals", None)
    return evaluation


if __name__ == "__main__":
    raise SystemExit(main())
