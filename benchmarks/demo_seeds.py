"""The demo's headline figures over several complete runs (different DEMO_SEED), with min and mean,
and the lip-sync bar per run and held-out recording (r at lag 0 ≥ 0.6 and ≥ 3 × the control's r).

    for s in 0 1 2; do KEYFACE_DEMO_DIR=$PWD/outputs/seed$s DEMO_SEED=$s bash launch/demo.sh; done
    .venv/bin/python benchmarks/demo_seeds.py outputs/seed0 outputs/seed1 outputs/seed2

Writes benchmarks/results/demo_seeds.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

BAR_R, BAR_RATIO = 0.6, 3.0
CLIPS = {"tts": "", "jfk": "jfk_"}   # held-out recording → summary key prefix
FIGURES = ("lip_sync_r_lag0", "lip_sync_control_r", "jfk_lip_sync_r_lag0", "jfk_lip_sync_control_r",
           "lip_sync_r_keyframes", "lip_sync_r_inbetween", "jfk_lip_sync_r_keyframes",
           "jfk_lip_sync_r_inbetween",
           "sharpness_to_input", "identity_first_window", "identity_last_window",
           "heldout_face_similarity_to_own_input", "heldout_face_similarity_to_nearest_other",
           "autoencoder_psnr_unseen", "autoencoder_psnr_training_frames", "seconds_timed_total")


def lip_sync_passes(summary: dict, prefix: str) -> bool:
    r, control = summary[f"{prefix}lip_sync_r_lag0"], summary[f"{prefix}lip_sync_control_r"]
    return r >= BAR_R and r >= BAR_RATIO * max(control, 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="demo output folders (KEYFACE_DEMO_DIR of each run)")
    p.add_argument("--output", default=str(pathlib.Path(__file__).parent / "results" /
                                          "demo_seeds.json"))
    args = p.parse_args(argv)
    runs = {}
    for folder in args.runs:
        with open(os.path.join(folder, "report", "metrics.json")) as f:
            report = json.load(f)
        summary = report["summary"]
        runs[folder] = dict(seed=report.get("seed"), **{k: summary.get(k) for k in FIGURES},
                            **{f"bar_{clip}": lip_sync_passes(summary, prefix)
                               for clip, prefix in CLIPS.items()})
    stats = {}
    for key in FIGURES:
        values = [r[key] for r in runs.values() if isinstance(r[key], (int, float))
                  and math.isfinite(r[key])]
        if values:
            stats[key] = dict(min=min(values), mean=sum(values) / len(values), n=len(values))
    out = dict(runs=runs, stats=stats,
               all_pass={clip: all(r[f"bar_{clip}"] for r in runs.values()) for clip in CLIPS})
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print("| figure | " + " | ".join(f"seed {r['seed']}" for r in runs.values()) + " | min | mean |")
    print("|---|" + "---|" * (len(runs) + 2))
    for key in FIGURES:
        cells = [f"{r[key]:.3g}" if isinstance(r[key], (int, float)) else "–" for r in runs.values()]
        s = stats.get(key)
        print(f"| {key} | " + " | ".join(cells)
              + (f" | {s['min']:.3g} | {s['mean']:.3g} |" if s else " | – | – |"))
    for clip in CLIPS:
        print(f"| lip-sync bar, {clip} | " + " | ".join(
            "pass" if r[f"bar_{clip}"] else "FAIL" for r in runs.values()) + " | | |")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
