"""What the interpolation guidance buys on a finished demo run: the held-out clips generated again
under each guidance variant, with the same networks, seed and inputs, and evaluated alike.

    .venv/bin/python benchmarks/demo_guidance.py --demo outputs/demo [--seconds 12] \\
        [--variants autoguidance_1/3 none audio_cfg autoguidance_2/3]

Variants (the keyframes are the same in all of them; only the in-between frames change):
  - `autoguidance_F`: autoguidance by the interpolation run's checkpoint at fraction F of training
    (`--interpolation_bad fraction:F`; the demo's default is 1/3), scale 2;
  - `none`: the main interpolation network's conditional prediction alone;
  - `audio_cfg`: classifier-free guidance on the audio (the main network without audio as the
    guiding branch), scale 2, the plain-CFG baseline autoguidance is measured against; only for
    runs whose interpolation model was trained with audio dropout (not DEMO_INTERPOLATION_DROPOUT=0).
Every variant samples with the demo's own guidance scales (its `sampling.json`; GenerationOptions'
defaults where a run has none); `VARIANT@field=value,...` overrides GenerationOptions fields
(or ModelSources ones: `keyframe_bad=auto` adds keyframe autoguidance).
Clips: the demo's two held-out recordings (TTS, JFK), the first `--seconds` of each, on the demo's
first training face. Per clip and variant: lip sync at lag 0 and its 1-s-shifted control, identity
similarity and sharpness against the input crop. Writes benchmarks/results/demo_guidance.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from keyface_jax.eval.video import evaluate_file  # noqa: E402
from keyface_jax.generation.pipeline import GenerationOptions  # noqa: E402
from keyface_jax.generation.runner import ModelSources, Setup, run  # noqa: E402
from keyface_jax.generation.inputs import ClipRequest  # noqa: E402

CLIPS = {"tts": ("heldout", "speech.wav"), "jfk": ("heldout_jfk", "speech.wav")}


def typed_option(key: str, value):
    """`value` as the type of the default of GenerationOptions' (or ModelSources') field `key`."""
    for defaults in (GenerationOptions(), ModelSources()):
        if hasattr(defaults, key):
            return type(getattr(defaults, key))(value)
    raise ValueError(f"sampling option {key!r}: not a GenerationOptions or ModelSources field")


def sampling_options(spec: str) -> dict:
    """'audio_scale=3,num_steps=20' → {'audio_scale': 3.0, 'num_steps': 20} (GenerationOptions
    or ModelSources fields, e.g. keyframe_bad, typed by their defaults)."""
    out = {}
    for part in (p for p in spec.split(",") if p):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"sampling option {part!r}: expected FIELD=VALUE with a GenerationOptions field")
        out[key] = typed_option(key, value)
    return out


def demo_sampling(demo: str) -> dict:
    """The guidance scales launch/demo.sh sampled with ({} for runs older than its sampling.json)."""
    path = os.path.join(demo, "sampling.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {key: typed_option(key, value) for key, value in json.load(f).items()}


def trained_without_audio_dropout(run: str, min_logs: int = 10) -> bool:
    """Whether a training run logged audio_keep_frac = 1 at every one of at least `min_logs` logs
    (launch/demo.sh with DEMO_INTERPOLATION_DROPOUT=0 trains the interpolation model so)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        kept = [row["audio_keep_frac"] for row in map(json.loads, filter(str.strip, f))
                if "audio_keep_frac" in row]
    return len(kept) >= min_logs and all(value == 1.0 for value in kept)


def variant_setup(demo: str, variant: str) -> Setup:
    runs = os.path.join(demo, "runs")
    variant, _, options = variant.partition("@")
    bad, guidance = "none", "autoguidance"
    if variant.startswith("autoguidance_"):
        num, _, den = variant.split("_", 1)[1].partition("/")
        bad = f"fraction:{float(num) / float(den or 1)}"
    elif variant == "audio_cfg":
        if trained_without_audio_dropout(os.path.join(runs, "interpolation")):
            raise ValueError(f"{demo}: variant audio_cfg needs an interpolation model trained with "
                             "audio dropout (its no-audio branch); this one never dropped the audio "
                             "(run the demo without DEMO_INTERPOLATION_DROPOUT=0)")
        guidance = "audio_cfg"
    elif variant != "none":
        raise ValueError(f"unknown variant {variant!r}")
    chosen = {**demo_sampling(demo), **sampling_options(options)}
    model_fields = {k: chosen.pop(k) for k in list(chosen) if not hasattr(GenerationOptions, k)}
    sources = ModelSources(keyframe=os.path.join(runs, "keyframe"),
                           interpolation=os.path.join(runs, "interpolation"),
                           interpolation_bad=bad,
                           autoencoder=os.path.join(runs, "autoencoder", "export"), **model_fields)
    return Setup(sources, GenerationOptions(interpolation_guidance=guidance, **chosen))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a finished launch/demo.sh output folder")
    p.add_argument("--variants", nargs="*",
                   default=["autoguidance_1/3", "none", "audio_cfg", "autoguidance_2/3"])
    p.add_argument("--seconds", type=float, default=12.0, help="length of each clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(pathlib.Path(__file__).parent / "results" /
                                          "demo_guidance.json"))
    args = p.parse_args(argv)
    demo = os.path.abspath(args.demo)
    with open(os.path.join(demo, "videos", "manifest.json")) as f:
        face = os.path.join(demo, "videos", "faces", json.load(f)["faces"][0] + ".png")
    results = {}
    for variant in args.variants:
        start = time.time()
        setup = variant_setup(demo, variant)
        folder = os.path.join(demo, "guidance_ab", variant.replace("/", "-").replace(",", "_"))
        requests = [ClipRequest(name=name, face=face, audio=os.path.join(demo, *CLIPS[name]),
                                output=os.path.join(folder, f"{name}.mp4"), seed=args.seed,
                                max_seconds=args.seconds) for name in CLIPS]
        run(setup, requests, os.path.join(folder, "summary.json"), progress=False)
        generated = time.time() - start
        entry = dict(bad_network=setup.bad_description,
                     keyframe_bad_network=setup.keyframe_bad_description,
                     generation_seconds=round(generated, 1))
        for request in requests:
            timeline = os.path.join(demo, CLIPS[request.name][0], "timeline.json")
            rep = evaluate_file(request.output, identity_path=os.path.splitext(request.output)[0]
                                + ".identity.png", manifest=timeline, identity_box_fallback=True)
            sync, ident = rep["lip_sync"], rep["identity"]["summary"]
            entry[request.name] = dict(r_lag0=sync["r_lag0"], r=sync["r"],
                                       control_r=sync["control"]["r"],
                                       identity=ident["mean_similarity"],
                                       sharpness_to_input=ident["sharpness_to_identity"])
        results[variant] = entry
        print(variant, json.dumps(entry), flush=True)
    out = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), demo=demo,
               seconds=args.seconds, seed=args.seed, results=results)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
