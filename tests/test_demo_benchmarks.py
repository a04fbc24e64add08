"""benchmarks/demo_guidance.py's variant grammar: `VARIANT@field=value,...` sets sampling options."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import demo_guidance  # noqa: E402


def test_variant_options_are_typed_generation_fields():
    assert demo_guidance.sampling_options("") == {}
    opts = demo_guidance.sampling_options("audio_scale=3,num_steps=20")
    assert opts == {"audio_scale": 3.0, "num_steps": 20}
    assert type(opts["audio_scale"]) is float and type(opts["num_steps"]) is int
    options = demo_guidance.GenerationOptions(**demo_guidance.sampling_options("ref_scale=1.5"))
    assert options.ref_scale == 1.5 and options.audio_scale == demo_guidance.GenerationOptions().audio_scale


@pytest.mark.parametrize("spec", ["audio_scale", "no_such_field=1"])
def test_bad_variant_options_are_refused(spec):
    with pytest.raises(ValueError, match="GenerationOptions( or ModelSources)? field"):
        demo_guidance.sampling_options(spec)


def test_variants_sample_with_the_demo_own_scales(tmp_path):
    assert demo_guidance.demo_sampling(str(tmp_path)) == {}   # a run from before sampling.json
    (tmp_path / "sampling.json").write_text('{"audio_scale": 3, "ref_scale": 1, "autoguidance_scale": 3}\n')
    assert demo_guidance.demo_sampling(str(tmp_path)) == {
        "audio_scale": 3.0, "ref_scale": 1.0, "autoguidance_scale": 3.0}
    # keyframe autoguidance: its scale is a GenerationOptions field, its network a ModelSources one
    (tmp_path / "sampling.json").write_text(
        '{"audio_scale": 3, "keyframe_autoguidance_scale": 2, "keyframe_bad": "auto"}\n')
    assert demo_guidance.demo_sampling(str(tmp_path)) == {
        "audio_scale": 3.0, "keyframe_autoguidance_scale": 2.0, "keyframe_bad": "auto"}
    assert demo_guidance.sampling_options("keyframe_bad=fraction:0.5") == {"keyframe_bad": "fraction:0.5"}


def test_audio_cfg_needs_a_model_trained_with_audio_dropout(tmp_path):
    run = tmp_path / "runs" / "interpolation"
    run.mkdir(parents=True)
    assert not demo_guidance.trained_without_audio_dropout(str(run))   # no metrics: no verdict
    rows = [{"step": 10 * (i + 1), "loss": 1.0, "audio_keep_frac": 1.0} for i in range(12)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo_guidance.trained_without_audio_dropout(str(run))
    with pytest.raises(ValueError, match="without DEMO_INTERPOLATION_DROPOUT=0"):
        demo_guidance.variant_setup(str(tmp_path), "audio_cfg")
    rows[3]["audio_keep_frac"] = 0.75                     # KeyFace's dropout: some batches drop it
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not demo_guidance.trained_without_audio_dropout(str(run))
    # too few logs to tell (a short run with dropout may log 1.0 by chance)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert not demo_guidance.trained_without_audio_dropout(str(run))
