"""benchmarks/demo_guidance.py's variant grammar: `VARIANT@field=value,...` sets sampling options."""

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
