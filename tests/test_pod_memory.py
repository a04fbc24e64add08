"""benchmarks/pod_memory.py's pure logic: case strings, layouts, the largest-batch estimate, the
results file, the Markdown table and collective counting (no libtpu, nothing compiled)."""

import json

import pytest

from benchmarks import pod_memory as pm

GIB = 2 ** 30


# ----------------------------------------------------------------------------- cases


def test_parse_case_fields():
    case = pm.parse_case("keyframe_train:chunked:block:fsdp:2")
    assert (case.kind, case.attention, case.remat, case.mesh, case.batch, case.global_batch) == \
        ("keyframe_train", "chunked", "block", "fsdp", 2, False)
    assert (case.network, case.task) == ("keyframe", "train")
    assert case.key == "keyframe_train:chunked:block:fsdp:2"
    sample = pm.parse_case("interpolation_sample:splash:none:fsdp_context:g8")
    assert (sample.network, sample.task, sample.batch, sample.global_batch) == ("interpolation", "sample", 8, True)
    assert sample.key.endswith(":g8")


def test_parse_case_without_batch():
    stem = pm.parse_case("keyframe_train:xla:block_save_dots:fsdp_tensor", with_batch=False)
    assert stem.batch is None and stem.stem == stem.key == "keyframe_train:xla:block_save_dots:fsdp_tensor"
    assert stem.with_batch(3).key == "keyframe_train:xla:block_save_dots:fsdp_tensor:3"


@pytest.mark.parametrize("text, words", [
    ("keyframe_train:xla:none:fsdp", ["expected 5 fields"]),
    ("video_train:xla:none:fsdp:1", ["unknown kind", "'video_train'"]),
    ("keyframe_train:flash:none:fsdp:1", ["attention backend", "'flash'"]),
    ("keyframe_train:xla:always:fsdp:1", ["remat policy", "'always'"]),
    ("keyframe_train:xla:none:ring:1", ["unknown mesh", "'ring'"]),
    ("keyframe_train:xla:none:fsdp:0", ["positive integer"]),
    ("keyframe_train:xla:none:fsdp:two", ["positive integer"]),
])
def test_parse_case_errors_name_the_case(text, words):
    with pytest.raises(pm.CaseError) as info:
        pm.parse_case(text)
    message = str(info.value)
    assert repr(text) in message
    for word in words:
        assert word in message


def test_mesh_sizes():
    assert pm.mesh_sizes("fsdp", 4) == dict(data=1, fsdp=4, context=1, tensor=1)
    assert pm.mesh_sizes("fsdp_tensor", 4) == dict(data=1, fsdp=2, context=1, tensor=2)
    assert pm.mesh_sizes("fsdp_context", 8) == dict(data=1, fsdp=4, context=2, tensor=1)
    with pytest.raises(pm.CaseError, match="does not fit 3 chips"):
        pm.mesh_sizes("fsdp_tensor", 3)


def test_batch_layout():
    four = pm.mesh_sizes("fsdp", 4)
    assert pm.batch_layout(pm.parse_case("keyframe_train:xla:none:fsdp:1"), four) == (4, 1)
    assert pm.batch_layout(pm.parse_case("keyframe_train:xla:none:fsdp:g8"), four) == (8, 2)
    tensor = pm.mesh_sizes("fsdp_tensor", 4)
    assert pm.batch_layout(pm.parse_case("keyframe_train:xla:none:fsdp_tensor:3"), tensor) == (6, 3)
    with pytest.raises(pm.CaseError) as info:
        pm.batch_layout(pm.parse_case("keyframe_sample:xla:none:fsdp:g2"), four)
    assert "keyframe_sample:xla:none:fsdp:g2" in str(info.value) and "does not divide" in str(info.value)


# ----------------------------------------------------------------------------- estimates


def test_linear_fit_and_prediction():
    intercept, slope = pm.linear_fit([(2, 14 * GIB), (1, 10 * GIB)])
    assert intercept == pytest.approx(6 * GIB) and slope == pytest.approx(4 * GIB)
    assert pm.predict_batch(intercept, slope, 30 * GIB) == 6          # 6 + 4·6 = 30: fits exactly
    assert pm.predict_batch(intercept, slope, 29.9 * GIB) == 5
    assert pm.predict_batch(intercept, slope, 5 * GIB) == 0           # not even the fixed part fits
    assert pm.usable_bytes(100, headroom=0.05) == pytest.approx(95e9)
    with pytest.raises(ValueError, match="two different batches"):
        pm.linear_fit([(1, 5.0)])
    with pytest.raises(ValueError, match="does not grow"):
        pm.predict_batch(10.0, 0.0, 100.0)


# ----------------------------------------------------------------------------- results file


def _entry(temp_gib, flops=2e12):
    memory = dict(argument_bytes=GIB, output_bytes=GIB, alias_bytes=GIB, temp_bytes=int(temp_gib * GIB),
                  code_bytes=0)
    memory["total_bytes"] = GIB + int(temp_gib * GIB)
    return dict(memory=memory, flops_per_chip=flops, global_batch=4, compile_s=12.0,
                collectives={"all-gather": {"count": 3, "bytes": GIB}, "reduce-scatter": {"count": 0, "bytes": 0}})


def test_merge_result_keeps_earlier_cases(tmp_path):
    path = tmp_path / "sub" / "pod_memory_small.json"
    pm.merge_result(path, "cases", "a:xla:none:fsdp:1", _entry(4.0), dict(variant="small"))
    pm.merge_result(path, "cases", "b:xla:none:fsdp:1", _entry(1.0), dict(jax="0.10.2"))
    pm.merge_result(path, "cases", "a:xla:none:fsdp:1", _entry(3.0))          # re-run replaces
    pm.merge_result(path, "largest_batch", "a:xla:none:fsdp", dict(budgets={}))
    data = json.loads(path.read_text())
    assert sorted(data["cases"]) == ["a:xla:none:fsdp:1", "b:xla:none:fsdp:1"]
    assert data["cases"]["a:xla:none:fsdp:1"]["memory"]["temp_bytes"] == 3 * GIB
    assert data["variant"] == "small" and data["jax"] == "0.10.2"
    assert "a:xla:none:fsdp" in data["largest_batch"]
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    assert pm.load_results(tmp_path / "missing.json") == {"cases": {}, "largest_batch": {}}


def test_reusable_entry_only_for_same_compile_target(tmp_path):
    import types
    import jax

    path = tmp_path / "pod_memory_full.json"
    meta = dict(variant="full", topology="v5p:2x2x1", jax=jax.__version__)
    pm.merge_result(path, "cases", "k:xla:none:fsdp:1", _entry(4.0), meta)
    pm.merge_result(path, "cases", "k:xla:none:fsdp:2", dict(error="OOM"), meta)
    args = types.SimpleNamespace(variant="full", topology="v5p:2x2x1")
    assert pm.reusable_entry(path, "k:xla:none:fsdp:1", args)["memory"]["temp_bytes"] == 4 * GIB
    assert pm.reusable_entry(path, "k:xla:none:fsdp:2", args) is None        # failed: compile again
    assert pm.reusable_entry(path, "k:xla:none:fsdp:3", args) is None        # never compiled
    other = types.SimpleNamespace(variant="full", topology="v5p:4x4x4")
    assert pm.reusable_entry(path, "k:xla:none:fsdp:1", other) is None       # another target


def test_memory_fields_total():
    class Analysis:
        argument_size_in_bytes, output_size_in_bytes = 10, 8
        alias_size_in_bytes, temp_size_in_bytes = 6, 100
        generated_code_size_in_bytes = None
    m = pm.memory_fields(Analysis())
    assert m["total_bytes"] == 10 + 8 - 6 + 100 and m["code_bytes"] == 0


def test_render_table():
    data = dict(cases={"keyframe_train:xla:none:fsdp:1": _entry(4.5),
                       "keyframe_train:splash:none:fsdp:1": dict(error="ValueError: no Mosaic\nmore")},
                largest_batch={"keyframe_train:xla:none:fsdp": dict(
                    intercept_bytes=2 * GIB, slope_bytes=3 * GIB,
                    budgets={"95": dict(predicted=28, verified=27, verified_total_bytes=83 * GIB),
                             "16": dict(predicted=4, verified=4, verified_total_bytes=14 * GIB)})})
    table = pm.render_table(data)
    lines = table.splitlines()
    assert lines[0].startswith("| case |") and lines[1].startswith("|---")
    row = next(l for l in lines if "keyframe_train:xla:none:fsdp:1" in l)
    assert "4.50" in row and "**5.50**" in row and "2.00" in row and "AG 3×1.00G" in row
    assert "RS" not in row
    assert any("splash" in l and "error: ValueError: no Mosaic" in l and "more" not in l for l in lines)
    big = next(l for l in lines if "`keyframe_train:xla:none:fsdp`" in l)
    assert big.index("16 GB → 4 / 4") < big.index("95 GB → 28 / 27 (83.0)")
    assert "5.00" in big and "3.00" in big


def test_render_attention_op_table():
    op = lambda temp: dict(memory=dict(temp_bytes=int(temp * GIB)))
    data = dict(attention_op={"xla:14x4096x5x64": op(6.0), "chunked:14x4096x5x64": op(0.6),
                              "splash:14x4096x5x64": dict(error="LoweringError: no\nmore")})
    lines = pm.render_table(data).splitlines()
    assert next(l for l in lines if "`chunked:14x4096x5x64`" in l).endswith("| 0.60 | 10% |")
    assert next(l for l in lines if "`xla:14x4096x5x64`" in l).endswith("| 6.00 | 100% |")
    assert any("splash" in l and "error: LoweringError: no" in l for l in lines)


def test_case_line():
    assert pm.case_line("k", dict(error="RuntimeError: boom\nstack")) == "k: ERROR RuntimeError: boom"
    line = pm.case_line("k", _entry(2.0))
    assert "temp 2.00" in line and "total 3.00 GiB/chip" in line and "2.000 TFLOP/chip" in line


# ----------------------------------------------------------------------------- HLO collectives

HLO = """\
HloModule jit_step, entry_computation_layout={(bf16[64,320]{1,0})->bf16[256,320]{1,0}}

%region_0.1 (Arg_0.2: f32[], Arg_1.3: f32[]) -> f32[] {
  ROOT %add.4 = f32[] add(f32[] %Arg_0.2, f32[] %Arg_1.3)
}

%all-reduce-scatter.3 (input: bf16[64,320]) -> bf16[16,320] {
  %input = bf16[64,320]{1,0:T(8,128)(2,1)} parameter(0)
  %all-reduce.7 = bf16[64,320]{1,0:T(8,128)(2,1)} all-reduce(%input), channel_id=5, replica_groups={{0,1,2,3}}, to_apply=%region_0.1
  %partition-id.1 = u32[] partition-id()
  ROOT %dynamic-slice.2 = bf16[16,320]{1,0} dynamic-slice(%all-reduce.7, %partition-id.1), dynamic_slice_sizes={16,320}
}

ENTRY %main.9 (p0: bf16[64,320], p1: f32[128]) -> bf16[256,320] {
  %p0 = bf16[64,320]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = f32[128]{0} parameter(1)
  %all-gather.1 = bf16[256,320]{1,0:T(8,128)(2,1)} all-gather(bf16[64,320]{1,0} %p0), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %all-gather-start.2 = (bf16[64,320]{1,0}, bf16[256,320]{1,0}) all-gather-start(bf16[64,320]{1,0} %p0), dimensions={0}
  %all-gather-done.2 = bf16[256,320]{1,0} all-gather-done((bf16[64,320]{1,0}, bf16[256,320]{1,0}) %all-gather-start.2)
  %all-reduce-start = f32[128]{0} all-reduce-start(f32[128]{0} %p1), to_apply=%region_0.1
  %all-reduce-done = f32[128]{0} all-reduce-done(f32[128]{0} %all-reduce-start)
  %reduce-scatter.5 = (f32[32]{0}, bf16[16,320]{1,0}) reduce-scatter(f32[128]{0} %p1, bf16[64,320]{1,0} %p0), dimensions={0}, to_apply=%region_0.1
  %all-to-all.6 = s32[4,2]{1,0} all-to-all(s32[4,2]{1,0} %x), dimensions={0}
  %collective-permute-start.7 = (f32[128]{0}, f32[128]{0}, u32[], u32[]) collective-permute-start(f32[128]{0} %p1), source_target_pairs={{0,1},{1,0}}
  %collective-permute-done.7 = f32[128]{0} collective-permute-done((f32[128]{0}, f32[128]{0}, u32[], u32[]) %collective-permute-start.7)
  %all-reduce-scatter-fusion = bf16[16,320]{1,0} fusion(bf16[64,320]{1,0} %p0), kind=kOutput, calls=%all-reduce-scatter.3
  %fusion.8 = bf16[256,320]{1,0} fusion(bf16[256,320]{1,0} %all-gather.1, bf16[256,320]{1,0} %all-gather-done.2), kind=kLoop, calls=%fused
  ROOT %all-reduce.9 = bf16[256,320]{1,0} all-reduce(bf16[256,320]{1,0} %fusion.8), to_apply=%region_0.1
}
"""


def test_shape_bytes():
    assert pm.shape_bytes("bf16[4,128]{1,0:T(8,128)(2,1)}") == 4 * 128 * 2
    assert pm.shape_bytes("(f32[8]{0}, s8[3,3], pred[])") == 32 + 9 + 1
    assert pm.shape_bytes("f32[]") == 4


def test_count_collectives():
    out = pm.count_collectives(HLO)
    ag = 256 * 320 * 2
    assert out["all-gather"] == {"count": 2, "bytes": 2 * ag}       # sync + one async pair (at -done)
    assert out["all-reduce"] == {"count": 2, "bytes": 128 * 4 + ag}
    # the explicit one, and the TPU form: an all-reduce in an all-reduce-scatter fusion (its slice)
    assert out["reduce-scatter"] == {"count": 2, "bytes": 32 * 4 + 16 * 320 * 2 + 16 * 320 * 2}
    assert out["all-to-all"] == {"count": 1, "bytes": 4 * 2 * 4}
    assert out["collective-permute"] == {"count": 1, "bytes": 128 * 4}
    assert pm.collectives_summary(out).startswith("AG 2×")
    assert pm.count_collectives("%add = f32[] add(%all-gather.1, %b)") == \
        {k: {"count": 0, "bytes": 0} for k in pm.COLLECTIVES}


def test_rule_overrides_and_keys():
    overrides = pm.parse_rule_overrides(["heads=", "embed = fsdp,context"])
    assert overrides == {"heads": "", "embed": "fsdp,context"}
    assert pm.result_key("k:xla:none:fsdp:1", overrides) == "k:xla:none:fsdp:1@embed=fsdp,context,heads="
    assert pm.result_key("k:xla:none:fsdp:1", {}) == "k:xla:none:fsdp:1"
    assert (pm.result_key("k:xla:none:fsdp:1", {}, ["--xla_tpu_x=5"])
            == "k:xla:none:fsdp:1+xla_tpu_x=5")
    with pytest.raises(pm.CaseError, match="'nope=fsdp'"):
        pm.parse_rule_overrides(["nope=fsdp"])
    with pytest.raises(pm.CaseError, match="name=axes"):
        pm.parse_rule_overrides(["heads"])


def test_remat_choices_are_the_models_policies():
    """The case parser's remat list is written out (the benchmark imports nothing of keyface_jax
    before libtpu's flags are set); it must name exactly the models' policies."""
    from keyface_jax.models.remat import REMAT_POLICIES
    assert set(pm.REMATS) == set(REMAT_POLICIES)
