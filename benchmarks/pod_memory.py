"""Per-chip memory budget of the train and sampling steps, from the TPU compiler, without a TPU.

    python -m venv .venv-tpu && .venv-tpu/bin/pip install -r benchmarks/requirements-tpu.txt
    .venv-tpu/bin/python benchmarks/pod_memory.py --variant small \\
        --case keyframe_train:xla:none:fsdp:1 --case keyframe_train:chunked:block:fsdp:1
    .venv-tpu/bin/python benchmarks/pod_memory.py --variant small \\
        --largest_batch keyframe_train:chunked:block:fsdp --budget_gb 16,95,141
    .venv-tpu/bin/python benchmarks/pod_memory.py --variant small --table

libtpu's compiler runs ahead of time against an abstract TPU topology (`--topology`, default
v5p:2x2x1: 4 v5p chips); nothing executes. Each case builds the trainer's own step (the train
state from `jax.eval_shape`, its shardings from `training.state.state_shardings`, the step from
`training.step.make_train_step`, jitted as `training.loop.compile_step` does: explicit shardings,
the state donated, traced under the rules' activation-sharding context) or the generator's sampler
(`sampling.sampler`'s jitted keyframe / interpolation loop, weights placed as
`generation.placement` places them), then reads from the compiled program:

- `memory_analysis()`: argument, output, alias and temporary bytes per chip; total = arguments +
  outputs − aliased (donated state updated in place) + temporaries;
- `cost_analysis()`: FLOPs per chip (the partitioned program). XLA counts a loop body once, not
  once per trip, so cases whose attention runs in scans (`chunked`) or Pallas kernels (`splash`)
  under-report: compare FLOPs between `xla` cases only;
- the optimized HLO: collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute) counted and their result bytes summed, each op once as written in the
  program text (an op inside a loop body counts once, not once per iteration).

A case is `kind:attention:remat:mesh:batch`:
- kind: keyframe_train | interpolation_train | keyframe_sample | interpolation_sample (a sample
  case compiles the whole jitted sampler, the Euler loop with its guidance branches folded into
  the batch: 3 branches for keyframes, the main and the weaker network for interpolation);
- attention: auto | xla | chunked | cudnn | splash (`config.model.attention`);
- remat: none | block | block_save_attention | block_save_dots | block_ffn (`config.model.remat_policy`);
- mesh: fsdp (every chip on fsdp) | fsdp_tensor (tensor 2, fsdp the rest) | fsdp_context
  (context 2, fsdp the rest);
- batch: clips per data-parallel shard (per chip on the `fsdp` mesh; the global batch is this
  times the data × fsdp size), or `gN` for a global batch of N (it must divide over them).

Results merge per case into benchmarks/results/pod_memory_<variant>.json after every case. The
full keyframe train config's pixel losses (VAE decoder + LPIPS, which need weight files) are left
out, as in benchmarks/accelerator_train_step.py. A case that fails to compile (e.g. a backend
that cannot lower) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

KINDS = ("keyframe_train", "interpolation_train", "keyframe_sample", "interpolation_sample")
ATTENTIONS = ("auto", "xla", "chunked", "cudnn", "splash")
# models/remat.py REMAT_POLICIES, written out: keyface_jax is imported only after libtpu flags are set
REMATS = ("none", "block", "block_save_attention", "block_save_dots", "block_ffn")
# Mesh name → config.mesh axis sizes (-1: the chips left over).
MESHES = {
    "fsdp": {"fsdp": -1},
    "fsdp_tensor": {"fsdp": -1, "tensor": 2},
    "fsdp_context": {"fsdp": -1, "context": 2},
}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "CP"}
GIB = 2 ** 30
GB = 10 ** 9
HEADROOM = 0.05


class CaseError(ValueError):
    """A case string or layout that cannot be compiled (the message names the case)."""


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    attention: str
    remat: str
    mesh: str
    batch: int | None = None     # per data-parallel shard, or global when `global_batch`
    global_batch: bool = False

    @property
    def network(self) -> str:
        return self.kind.split("_")[0]

    @property
    def task(self) -> str:
        return self.kind.split("_")[1]

    @property
    def stem(self) -> str:
        return f"{self.kind}:{self.attention}:{self.remat}:{self.mesh}"

    @property
    def key(self) -> str:
        if self.batch is None:
            return self.stem
        return f"{self.stem}:{'g' if self.global_batch else ''}{self.batch}"

    def with_batch(self, batch: int) -> "Case":
        return dataclasses.replace(self, batch=int(batch), global_batch=False)


def _choice(text: str, field: str, value: str, choices) -> str:
    if value not in choices:
        raise CaseError(f"case {text!r}: unknown {field} {value!r}; choose one of {', '.join(choices)}")
    return value


def parse_case(text: str, *, with_batch: bool = True) -> Case:
    """'keyframe_train:chunked:block:fsdp:2' → Case; `with_batch=False` parses the four fields
    without the batch (the --largest_batch form). Raises CaseError naming the case and field."""
    parts = [p.strip() for p in text.strip().split(":")]
    want = 5 if with_batch else 4
    form = "kind:attention:remat:mesh" + (":batch" if with_batch else "")
    if len(parts) != want:
        raise CaseError(f"case {text!r}: expected {want} fields {form}, got {len(parts)}")
    kind = _choice(text, "kind", parts[0], KINDS)
    attention = _choice(text, "attention backend", parts[1], ATTENTIONS)
    remat = _choice(text, "remat policy", parts[2], REMATS)
    mesh = _choice(text, "mesh", parts[3], tuple(MESHES))
    if not with_batch:
        return Case(kind, attention, remat, mesh)
    raw = parts[4]
    is_global = raw.lower().startswith("g")
    digits = raw[1:] if is_global else raw
    if not digits.isdigit() or int(digits) < 1:
        raise CaseError(f"case {text!r}: batch {raw!r} must be a positive integer (per data-parallel "
                        "shard) or gN (a global batch of N)")
    return Case(kind, attention, remat, mesh, int(digits), is_global)


def parse_rule_overrides(items) -> dict[str, str]:
    """['heads=', 'embed=fsdp,context'] → {'heads': '', 'embed': 'fsdp,context'}: entries of the
    logical-axis rules table (configs/axis_rules.py) replaced for every case."""
    from configs.axis_rules import LOGICAL_AXIS_RULES

    out = {}
    for item in items or ():
        name, sep, axes = item.partition("=")
        name = name.strip()
        if not sep or name not in LOGICAL_AXIS_RULES:
            raise CaseError(f"--rule {item!r}: give name=axes with a name of the rules table "
                            f"({', '.join(LOGICAL_AXIS_RULES)}), e.g. heads= to replicate heads")
        out[name] = axes.strip()
    return out


def result_key(key: str, overrides: dict[str, str] | None, libtpu_flags=()) -> str:
    """A case's key in the results file; rule overrides and compiler flags are part of it
    ('...:1@heads=', '...:1+xla_tpu_scheduler_percent_shared_memory_limit=5')."""
    if overrides:
        key += "@" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    if libtpu_flags:
        key += "+" + ",".join(f.lstrip("-") for f in libtpu_flags)
    return key


def case_key(key: str, args) -> str:
    return result_key(key, args.overrides, getattr(args, "libtpu_flags", ()))


def mesh_sizes(mesh: str, num_devices: int) -> dict[str, int]:
    """Axis sizes of a named mesh on `num_devices` chips (the -1 axis resolved)."""
    sizes = {**dict(data=1, fsdp=1, context=1, tensor=1), **MESHES[mesh]}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % fixed:
        raise CaseError(f"mesh {mesh!r} {MESHES[mesh]} does not fit {num_devices} chips")
    return {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}


def batch_layout(case: Case, sizes: dict[str, int]) -> tuple[int, int]:
    """(global batch, batch per data-parallel shard) of a case on a mesh of `sizes`: the batch
    splits over data × fsdp (the "act_batch" rule). Raises CaseError naming the case when a
    global batch does not divide."""
    ways = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if case.batch is None:
        raise CaseError(f"case {case.key!r}: no batch given")
    if not case.global_batch:
        return case.batch * ways, case.batch
    if case.batch % ways:
        raise CaseError(f"case {case.key!r}: global batch {case.batch} does not divide over the mesh's "
                        f"data × fsdp = {ways} shards (mesh {case.mesh} {sizes})")
    return case.batch, case.batch // ways


# ----------------------------------------------------------------------------- estimates


def linear_fit(points) -> tuple[float, float]:
    """(intercept, slope) of bytes against batch through the first and last of `points`
    [(batch, bytes), ...] sorted by batch (two compiles: batch 1 and 2)."""
    points = sorted((float(b), float(v)) for b, v in points)
    if len(points) < 2 or points[0][0] == points[-1][0]:
        raise ValueError(f"a linear fit needs two different batches, got {points}")
    (b0, v0), (b1, v1) = points[0], points[-1]
    slope = (v1 - v0) / (b1 - b0)
    return v0 - slope * b0, slope


def usable_bytes(budget_gb: float, headroom: float = HEADROOM) -> float:
    """The bytes a program may use of a `budget_gb` (10⁹ bytes) chip, `headroom` left free."""
    return budget_gb * GB * (1.0 - headroom)


def predict_batch(intercept: float, slope: float, budget_bytes: float) -> int:
    """The largest batch b ≥ 0 with intercept + slope·b ≤ budget_bytes (0: not even one fits)."""
    if slope <= 0:
        raise ValueError(f"memory does not grow with the batch (slope {slope:.0f} bytes): "
                         "cannot extrapolate")
    return max(0, math.floor((budget_bytes - intercept) / slope + 1e-9))


# ----------------------------------------------------------------------------- HLO collectives

_ELEMENT_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1, "f4e2m1fn": 1, "f8e8m0fnu": 1, "token": 0,
}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_OPS = "|".join(map(re.escape, COLLECTIVES))
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s+(?P<op>" + _OPS + r")(?P<suffix>-start|-done)?\(")


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO result type: 'bf16[4,128]{1,0}' or a tuple '(f32[8], bf16[2,2])'."""
    total = 0
    for element, dims in _SHAPE.findall(type_text):
        if element not in _ELEMENT_BYTES:
            continue
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += count * _ELEMENT_BYTES[element]
    return total


_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*(?P<result>.*?)\s*\{\s*$")


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in (per-device, optimized) HLO text.

    Synchronous ops count with their result; async pairs count once, at `-done` (whose result is
    the collective's output; a `-start` result also holds the operands). The TPU compiler writes a
    reduce-scatter as an all-reduce inside an `all-reduce-scatter` fusion computation (that then
    keeps this device's slice): such an all-reduce counts as a reduce-scatter, with the fusion's
    (scattered) result."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    scatter_result = None      # the result type of the reduce-scatter fusion being read, if any
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and " = " not in line.split("(", 1)[0]:
            name = header.group("name")
            scatter_result = header.group("result") if "reduce-scatter" in name else None
            continue
        match = _INSTRUCTION.match(line)
        if not match or match.group("suffix") == "-start":
            continue
        op, result = match.group("op"), match.group("type")
        if op == "all-reduce" and scatter_result is not None:
            op, result = "reduce-scatter", scatter_result
        out[op]["count"] += 1
        out[op]["bytes"] += shape_bytes(result)
    return out


# ----------------------------------------------------------------------------- results file


def results_path(variant: str, directory: pathlib.Path = RESULTS) -> pathlib.Path:
    return pathlib.Path(directory) / f"pod_memory_{variant}.json"


def load_results(path: pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.exists():
        return {"cases": {}, "largest_batch": {}}
    data = json.loads(path.read_text())
    data.setdefault("cases", {})
    data.setdefault("largest_batch", {})
    return data


def merge_result(path: pathlib.Path, section: str, key: str, entry: dict, meta: dict | None = None) -> dict:
    """Reads the results file, sets data[section][key] = entry (and the top-level `meta` fields),
    writes it back atomically; returns the merged data."""
    path = pathlib.Path(path)
    data = load_results(path)
    data.update(meta or {})
    data.setdefault(section, {})[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return data


# ----------------------------------------------------------------------------- reporting


def _gib(value) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def collectives_summary(collectives: dict | None) -> str:
    if not collectives:
        return "–"
    order = [k for k in COLLECTIVES if k in collectives] + [k for k in collectives if k not in COLLECTIVES]
    parts = [f"{SHORT.get(k, k)} {collectives[k]['count']}×{collectives[k]['bytes'] / GIB:.2f}G"
             for k in order if collectives[k].get("count")]
    return ", ".join(parts) or "none"


def case_line(key: str, entry: dict) -> str:
    """One progress line per finished case."""
    if "error" in entry:
        return f"{key}: ERROR {entry['error'].splitlines()[0][:300]}"
    m = entry["memory"]
    flops = entry.get("flops_per_chip")
    return (f"{key}: args {_gib(m['argument_bytes'])} out {_gib(m['output_bytes'])} alias "
            f"{_gib(m['alias_bytes'])} temp {_gib(m['temp_bytes'])} total {_gib(m['total_bytes'])} GiB/chip, "
            f"{(flops or 0) / 1e12:.3f} TFLOP/chip, {collectives_summary(entry.get('collectives'))}, "
            f"compile {entry.get('compile_s', 0):.1f} s")


def render_table(data: dict) -> str:
    """Markdown tables of a results file: one row per case, then the largest-batch estimates."""
    lines = ["| case | global batch | args GiB | out GiB | alias GiB | temps GiB | total GiB | "
             "TFLOP/chip | collectives (count×result GiB) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(data.get("cases", {})):
        e = data["cases"][key]
        if "error" in e:
            lines.append(f"| `{key}` | {e.get('global_batch', '–')} | error: "
                         f"{e['error'].splitlines()[0][:80]} | | | | | | | |")
            continue
        m = e["memory"]
        flops = e.get("flops_per_chip")
        lines.append(
            f"| `{key}` | {e.get('global_batch', '–')} | {_gib(m['argument_bytes'])} | "
            f"{_gib(m['output_bytes'])} | {_gib(m['alias_bytes'])} | {_gib(m['temp_bytes'])} | "
            f"**{_gib(m['total_bytes'])}** | {'–' if flops is None else f'{flops / 1e12:.2f}'} | "
            f"{collectives_summary(e.get('collectives'))} | {e.get('compile_s', 0):.0f} |")
    largest = data.get("largest_batch") or {}
    if largest:
        lines += ["", "| case (batch per shard) | total at b=1 GiB | growth per batch GiB | "
                  "budget → predicted / verified batch (total GiB) |", "|---|---|---|---|"]
        for key in sorted(largest):
            e = largest[key]
            if "error" in e:
                lines.append(f"| `{key}` | error: {e['error'].splitlines()[0][:80]} | | |")
                continue
            cells = []
            for budget, b in sorted(e.get("budgets", {}).items(), key=lambda kv: float(kv[0])):
                total = b.get("verified_total_bytes")
                cells.append(f"{budget} GB → {b.get('predicted')} / {b.get('verified')}"
                             + (f" ({total / GIB:.1f})" if total else ""))
            lines.append(f"| `{key}` | {_gib(e.get('intercept_bytes', 0) + e.get('slope_bytes', 0))} | "
                         f"{_gib(e.get('slope_bytes'))} | {'; '.join(cells)} |")
        lines.append("")
        lines.append(f"Budgets in GB (10⁹ bytes) per chip with {int(HEADROOM * 100)} % left free; "
                     "total = arguments + outputs − aliased + temporaries.")
    ops = data.get("attention_op") or {}
    if ops:   # benchmarks/attention_memory.py: one layer's forward + backward per backend
        lines += ["", "| attention layer fwd+bwd (backend:clips×tokens×heads×dim) | temps GiB | "
                  "of xla's |", "|---|---|---|"]
        for key in sorted(ops, key=lambda k: (k.split(":")[1], k)):
            e, shape = ops[key], key.split(":")[1]
            if "error" in e:
                lines.append(f"| `{key}` | error: {e['error'].splitlines()[0][:80]} | |")
                continue
            temp = e["memory"]["temp_bytes"]
            base = ops.get(f"xla:{shape}", {}).get("memory", {}).get("temp_bytes")
            lines.append(f"| `{key}` | {_gib(temp)} | {f'{temp / base:.0%}' if base else '–'} |")
    return "\n".join(lines)


def memory_fields(analysis) -> dict[str, int]:
    """The byte counts of a `compiled.memory_analysis()` object, with the total."""
    get = lambda name: int(getattr(analysis, name, 0) or 0)
    out = dict(argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
               alias_bytes=get("alias_size_in_bytes"), temp_bytes=get("temp_size_in_bytes"),
               code_bytes=get("generated_code_size_in_bytes"))
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def cost_fields(compiled) -> dict:
    """`compiled.cost_analysis()` as one dict (jax versions return a dict or a one-item list)."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- TPU side


def topology_devices(name: str):
    """The devices of an abstract TPU topology ('v5p:2x2x1'); libtpu compiles for them."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # noqa: BLE001 - names the topology in the message
        raise SystemExit(f"--topology {name!r}: libtpu cannot describe it ({e}); install "
                         "benchmarks/requirements-tpu.txt") from None
    return list(topology.devices)


def _objective_config(config):
    try:   # the trainer's own (it imports the data loaders: grain, which the TPU venv may lack)
        from keyface_jax.train import objective_config
    except ImportError:
        from keyface_jax.diffusion.objective import ObjectiveConfig

        def objective_config(config):
            values = dict(config.objective)
            values["pixel_losses"] = tuple(values.get("pixel_losses", ()))
            return ObjectiveConfig.from_dict(dict(values, kind=config.model.kind))
    return objective_config(config)


def case_config(case: Case, variant: str, dtype: str, global_batch: int, overrides=None):
    """The run config of a case: the network's config file with the case's attention backend,
    remat policy, compute dtype, mesh and batch; pixel losses off."""
    from configs import common, interpolation, keyframe

    module = keyframe if case.network == "keyframe" else interpolation
    config = module.get_config(variant)
    config.model.attention = case.attention
    config.model.remat = case.remat != "none"
    config.model.remat_policy = case.remat
    config.model.dtype = DTYPES[dtype]
    config.mesh = common.mesh_section(**MESHES[case.mesh])
    for name, axes in (overrides or {}).items():
        config.mesh.rules[name] = axes
    config.train.batch_size = global_batch
    config.objective.pixel_weight = 0.0
    return config


def _batch_args(net_cfg, global_batch: int, frames: int, sharding):
    """Abstract training batch: the synthetic batches' fields and dtypes, global leading size."""
    import jax

    from keyface_jax.data.synthetic_batches import SyntheticBatches

    one = SyntheticBatches(net_cfg, 1, frames, 0).global_batch_at(0)
    return {k: jax.ShapeDtypeStruct((global_batch,) + v.shape[1:], v.dtype, sharding=sharding)
            for k, v in one.items()}


def lower_train(config, mesh):
    """The trainer's step lowered on abstract inputs: (lowered, trainable parameter count)."""
    import functools

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from keyface_jax.activation_sharding import activation_sharding
    from keyface_jax.config_lib import dtypes, network_config
    from keyface_jax.data.batch_layout import batch_sharding
    from keyface_jax.models.build import abstract_network, count_params
    from keyface_jax.sharding import rules_from_config
    from keyface_jax.training.optimizer import make_optimizer
    from keyface_jax.training.state import abstract_like, init_train_state, state_shardings
    from keyface_jax.training.step import make_train_step
    from keyface_jax.training.trainable import split_network

    net_cfg = network_config(config.model)
    dtype, param_dtype = dtypes(config.model)
    rules = rules_from_config(config.mesh)
    tx, schedule = make_optimizer(config.optim)
    abstract = abstract_network(net_cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, abs_trainable, abs_frozen = split_network(abstract, config.trainable)
    init_state = functools.partial(init_train_state, tx=tx, seed=config.seed,
                                   ema=config.optim.ema_decay > 0)
    abstract_state = jax.eval_shape(init_state, abs_trainable, abs_frozen)
    shardings = state_shardings(abstract_state, tx, mesh, rules=rules)
    state = abstract_like(abstract_state, shardings)
    batch_shard = batch_sharding(mesh)
    batch = _batch_args(net_cfg, int(config.train.batch_size), int(config.num_frames), batch_shard)
    step_fn = make_train_step(graphdef, _objective_config(config), tx, schedule,
                              accum_steps=config.optim.accum_steps, ema_decay=config.optim.ema_decay,
                              nan_policy=config.train.nan_policy)
    replicated = NamedSharding(mesh, PartitionSpec())
    # as training.loop.compile_step: explicit shardings, the state donated, no aux (pixel losses off)
    jitted = jax.jit(step_fn, in_shardings=(shardings, jax.tree.map(lambda _: batch_shard, batch),
                                            replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    with activation_sharding(mesh, rules):
        lowered = jitted.lower(state, batch, {})
    return lowered, count_params(abs_trainable)


def lower_sample(config, mesh, num_steps: int = 10):
    """The generator's jitted sampler (keyframes: 3-branch guidance; interpolation: autoguidance by
    a weaker network of the same shape, boundaries pinned) on abstract inputs, the weights in the
    compute dtype and FSDP-placed as `generation.placement.place_weights` does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from keyface_jax.activation_sharding import activation_sharding
    from keyface_jax.config_lib import dtypes, network_config
    from keyface_jax.data.batch_layout import batch_sharding
    from keyface_jax.models.build import abstract_network, count_params, input_shapes
    from keyface_jax.sampling import sampler
    from keyface_jax.sampling.schedules import ays_sigmas
    from keyface_jax.sharding import param_shardings, rules_from_config

    net_cfg = network_config(config.model)
    dtype, param_dtype = dtypes(config.model)
    rules = rules_from_config(config.mesh)
    graphdef, state = nnx.split(abstract_network(net_cfg, dtype=dtype, param_dtype=param_dtype))
    shardings = param_shardings(state, mesh, rules)
    store = lambda d: dtype if dtype is not None and jnp.issubdtype(d, jnp.floating) else d
    weights = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, store(x.dtype), sharding=s),
                           state, shardings)
    batched, replicated = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    batch = int(config.train.batch_size)
    shapes = input_shapes(net_cfg, batch, int(config.num_frames))
    conditions = {k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=batched)
                  for k, v in shapes.items() if k not in ("x", "c_noise")}
    keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype, sharding=batched)
    sigmas = jax.ShapeDtypeStruct(ays_sigmas(num_steps).shape, jnp.float32, sharding=replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    with activation_sharding(mesh, rules):
        if net_cfg.kind == "keyframe":
            lowered = sampler._keyframes.lower(graphdef, weights, conditions, keys, sigmas, scalar, scalar)
        else:
            lowered = sampler._interpolation.lower(graphdef, weights, weights, conditions, keys, sigmas,
                                                   scalar, pin=True, audio_cfg=False)
    return lowered, count_params(state)


def run_case(case: Case, args, devices) -> dict:
    """Compiles one case and returns its result entry (or {"error": ...} when it cannot)."""
    from keyface_jax.sharding import make_mesh

    sizes = mesh_sizes(case.mesh, len(devices))
    global_batch, per_shard = batch_layout(case, sizes)
    entry = dict(kind=case.kind, attention=case.attention, remat=case.remat, mesh=case.mesh,
                 mesh_shape={k: v for k, v in sizes.items() if v > 1}, global_batch=global_batch,
                 batch_per_shard=per_shard, variant=args.variant, dtype=DTYPES[args.dtype],
                 topology=args.topology, pixel_losses=False, rule_overrides=dict(args.overrides),
                 libtpu_flags=list(getattr(args, "libtpu_flags", ())))
    start = time.perf_counter()
    try:
        config = case_config(case, args.variant, args.dtype, global_batch, args.overrides)
        mesh = make_mesh(dict(config.mesh), devices)
        lower = lower_train if case.task == "train" else lower_sample
        lowered, params = lower(config, mesh)
        entry["params"] = params
        if case.task == "train":
            entry["trainable_preset"] = config.trainable.preset
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - recorded per case; the run goes on
        entry.update(error=f"{type(e).__name__}: {e}"[:4000], seconds=time.perf_counter() - start)
        return entry
    cost = cost_fields(compiled)
    hlo = compiled.as_text()
    if getattr(args, "dump_hlo", None):
        folder = pathlib.Path(args.dump_hlo)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.variant}_{case.key.replace(':', '_')}.hlo.txt").write_text(hlo)
    entry.update(memory=memory_fields(compiled.memory_analysis()),
                 flops_per_chip=float(cost["flops"]) if cost.get("flops") else None,
                 bytes_accessed_per_chip=float(cost["bytes accessed"]) if cost.get("bytes accessed") else None,
                 collectives=count_collectives(hlo), lower_s=lowered_at - start,
                 compile_s=compiled_at - lowered_at)
    return entry


def _meta(args) -> dict:
    import jax

    return dict(variant=args.variant, topology=args.topology, jax=jax.__version__)


def record_case(case: Case, args, devices, path) -> dict:
    key = case_key(case.key, args)
    progress(f"compiling {key} ({args.variant}, {args.topology}) ...")
    entry = run_case(case, args, devices)
    merge_result(path, "cases", key, entry, _meta(args))
    print(case_line(key, entry), flush=True)
    return entry


def reusable_entry(path, key: str, args) -> dict | None:
    """The results file's entry for `key` when it was compiled for the same variant, topology and
    jax (and did not fail); None otherwise. A full-size compile costs 10-15 min on 2 cores."""
    data = load_results(path)
    entry = data["cases"].get(key)
    same = all(data.get(k) == v for k, v in _meta(args).items())
    return entry if same and entry and "error" not in entry and entry.get("memory") else None


def largest_batch(stem: Case, args, devices, path, budgets, max_tries: int = 4) -> dict:
    """Batch 1 and 2 compiled, growth per batch element fitted, the largest batch predicted per
    budget and then compiled to verify (stepping down while it does not fit). With `args.reuse`,
    cases already in the results file (same variant, topology, jax) are taken from it."""
    compiled: dict[int, dict] = {}

    def measure(batch: int) -> dict:
        if batch not in compiled:
            case = stem.with_batch(batch)
            old = reusable_entry(path, case_key(case.key, args), args) if getattr(args, "reuse", False) else None
            if old is not None:
                progress(f"reusing {case_key(case.key, args)} from {path}")
            compiled[batch] = old or record_case(case, args, devices, path)
        return compiled[batch]

    result = dict(headroom=HEADROOM, budget_unit="GB (1e9 bytes) per chip", variant=args.variant,
                  topology=args.topology, dtype=DTYPES[args.dtype], budgets={})
    for b in (1, 2):
        e = measure(b)
        if "error" in e:
            result["error"] = f"batch {b}: {e['error']}"
            merge_result(path, "largest_batch", case_key(stem.stem, args), result, _meta(args))
            return result
    points = [(b, compiled[b]["memory"]["total_bytes"]) for b in (1, 2)]
    intercept, slope = linear_fit(points)
    result.update(points=points, intercept_bytes=intercept, slope_bytes=slope)
    for budget in budgets:
        limit = usable_bytes(budget)
        predicted = predict_batch(intercept, slope, limit)
        entry = dict(usable_bytes=limit, predicted=predicted, tried={})
        batch, verified = predicted, None
        for _ in range(max_tries):
            if batch < 1:
                break
            e = measure(batch)
            total = e.get("memory", {}).get("total_bytes")
            entry["tried"][str(batch)] = total if total is not None else e.get("error", "")[:300]
            if total is not None and total <= limit:
                verified = batch
                entry["verified_total_bytes"] = total
                break
            # over budget (or the compiler refused it): step down by the estimated overshoot
            over = (total - limit) if total is not None else slope
            batch -= max(1, math.ceil(over / slope))
        entry["verified"] = verified
        result["budgets"][f"{budget:g}"] = entry
        merge_result(path, "largest_batch", case_key(stem.stem, args), result, _meta(args))
        progress(f"{case_key(stem.stem, args)}: {budget:g} GB → predicted batch {predicted}, verified {verified}")
    return result


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--budget_gb {text!r}: give comma-separated numbers, e.g. 16,95,141") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"--budget_gb {text!r}: budgets must be positive")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", default=[], help="kind:attention:remat:mesh:batch (repeatable)")
    p.add_argument("--variant", default="full", choices=("tiny", "small", "full"))
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--largest_batch", action="append", default=[],
                   help="kind:attention:remat:mesh (repeatable): largest batch per budget")
    p.add_argument("--budget_gb", default="16,95,141", help="per-chip budgets in GB for --largest_batch")
    p.add_argument("--libtpu_flag", action="append", default=[], dest="libtpu_flags",
                   help="a libtpu compiler flag for every case (repeatable; part of the result "
                        "key), e.g. --xla_tpu_scheduler_percent_shared_memory_limit=5: the "
                        "scheduler then plans for that share of HBM instead of overlapping "
                        "FSDP gathers up to the whole chip")
    p.add_argument("--reuse", action="store_true",
                   help="--largest_batch takes cases already in the results file (same variant, "
                        "topology and jax) instead of recompiling; it cannot tell whether the "
                        "code changed since, so use it only when the step is unchanged")
    p.add_argument("--table", action="store_true", help="print the results file as Markdown tables")
    p.add_argument("--results", default=None, help="results file (default benchmarks/results/"
                                                   "pod_memory_<variant>.json)")
    p.add_argument("--dump_hlo", default=None, help="folder for each case's optimized HLO text")
    p.add_argument("--rule", action="append", default=[],
                   help="NAME=AXES: override a logical-axis rule for every case (repeatable), e.g. "
                        "heads= (replicated heads: the mesh's tensor axis then splits only MLPs)")
    args = p.parse_args(argv)
    # JAX's own backend stays the CPU (no TPU attached); libtpu compiles for the topology only
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.libtpu_flags:   # read once, when libtpu initialises (topology_devices)
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(
            [os.environ.get("LIBTPU_INIT_ARGS", "")] + [f if f.startswith("-") else "--" + f
                                                         for f in args.libtpu_flags]).strip()
    path = pathlib.Path(args.results) if args.results else results_path(args.variant)
    try:
        cases = [parse_case(c) for c in args.case]
        stems = [parse_case(c, with_batch=False) for c in args.largest_batch]
        args.overrides = parse_rule_overrides(args.rule)
    except CaseError as e:
        p.error(str(e))
    budgets = _budgets(args.budget_gb)
    if not (cases or stems or args.table):
        p.error("nothing to do: give --case, --largest_batch or --table")
    if cases or stems:
        devices = topology_devices(args.topology)
        progress(f"{len(devices)} {devices[0].device_kind} chips of topology {args.topology}")
        for case in cases:   # layouts checked up front: a bad case fails before any compile
            try:
                batch_layout(case, mesh_sizes(case.mesh, len(devices)))
            except CaseError as e:
                p.error(str(e))
        for case in cases:
            record_case(case, args, devices, path)
        for stem in stems:
            largest_batch(stem, args, devices, path, budgets)
        progress(f"results in {path}")
    if args.table:
        if not path.exists():
            raise SystemExit(f"no results file {path}")
        print(render_table(load_results(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
