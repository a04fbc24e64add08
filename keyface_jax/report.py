"""Figures for a finished run: a contact sheet of a video's frames, the training-loss curves of
one or more run folders, and one metrics JSON that gathers the evaluation and the training.

    python -m keyface_jax.report --video out.mp4 --runs runs/autoencoder runs/keyframe \\
        runs/interpolation --evaluation metrics_eval.json --output report/

Every path may be local or gs://. Exit status: 0 written; 2 a bad command line, a video without
frames or runs without metrics (the reason is printed).
"""

from __future__ import annotations

import argparse
import math
import os
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
    fig.tight_layout()
    with staged_output(path) as local:
        fig.savefig(local, dpi=110, format="png")
    plt.close(fig)
    return dict(path=os.fspath(as_path(path)), runs=summary)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True)
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--evaluation", help="metrics JSON of keyface_jax.evaluate")
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
        evaluation = read_json(args.evaluation)
        evaluation.pop("signals", None)
        report["evaluation"] = evaluation
    if args.extra:
        report.update(read_json(args.extra))
    path = output / "metrics.json"
    write_json(path, report, indent=1)
    print(f"report: {path}\n  contact sheet {report['contact_sheet']['path']}"
          + (f"\n  losses {report['training']['path']}" if args.runs else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
