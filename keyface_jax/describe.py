"""Model card of the configured networks: parameter counts, FLOPs per call, and a smoke run.

    python -m keyface_jax.describe                       # both stages, tiny + full, JSON to outputs/
    python -m keyface_jax.describe --variants full --no-smoke --json out.json

The full-size networks are built abstractly (`nnx.eval_shape`): no weights are allocated, so this
runs on a laptop. FLOPs come from XLA's cost analysis of one jitted forward call. The smoke run
initialises the `tiny` networks for real, calls each once and checks the output is finite.
--json may be local or gs://. Exit status: 0 described; 1 an error (a tiny network's output not
finite, a bad variant name).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from configs import interpolation, keyframe
from keyface_jax import console
from keyface_jax.config_lib import autoencoder_config, network_config
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.build import abstract_network, count_params, example_inputs, forward_flops
from keyface_jax.models.keyface import build_network
from keyface_jax.paths import write_json

STAGES = {"keyframe": keyframe, "interpolation": interpolation}


def describe_network(kind: str, variant: str, frames: int, with_flops: bool) -> dict:
    config = STAGES[kind].get_config(variant)
    net_cfg = network_config(config.model)
    row = dict(stage=kind, variant=variant, params=count_params(abstract_network(net_cfg)),
               latent=f"{net_cfg.latent_size}x{net_cfg.latent_size}x{net_cfg.latent_channels}",
               frames=frames)
    if with_flops:
        row["forward_tflop"] = forward_flops(net_cfg, batch=1, frames=frames) / 1e12
    return row


def describe_autoencoder(variant: str) -> dict:
    ae_cfg = autoencoder_config(keyframe.get_config(variant).autoencoder)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0)))
    return dict(stage="autoencoder", variant=variant, params=count_params(abstract))


def smoke_run(kind: str, frames: int, seed: int = 0) -> dict:
    """Initialises the tiny network for real and calls it once under jit on random inputs."""
    net_cfg = network_config(STAGES[kind].get_config("tiny").model)
    net = build_network(net_cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(net)
    specs = example_inputs(net_cfg, batch=2, frames=frames)
    keys = jax.random.split(jax.random.key(seed), len(specs))
    inputs = {name: jax.random.normal(k, s.shape, s.dtype) for k, (name, s) in zip(keys, specs.items())}

    @jax.jit
    def forward(state, inputs):
        kwargs = dict(inputs)
        return nnx.merge(graphdef, state)(kwargs.pop("x"), kwargs.pop("c_noise"), **kwargs)

    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, inputs))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, inputs))
    run = time.perf_counter() - start
    if not bool(jnp.isfinite(out).all()):
        raise RuntimeError(f"{kind} tiny network produced non-finite outputs")
    return dict(stage=kind, output_shape=list(out.shape), first_call_s=round(compile_and_run, 3),
                call_s=round(run, 4), output_std=float(np.std(np.asarray(out))))


def _print_table(rows: list[dict]) -> None:
    print(f"{'stage':<14}{'variant':<9}{'parameters':>16}{'forward TFLOP':>15}  latent")
    for r in rows:
        flops = f"{r['forward_tflop']:.3f}" if "forward_tflop" in r else "-"
        print(f"{r['stage']:<14}{r['variant']:<9}{r['params']:>16,}{flops:>15}  {r.get('latent', '')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tiny,full", help="comma list of tiny, small, full")
    parser.add_argument("--frames", type=int, default=14, help="frames per call for the FLOP count")
    parser.add_argument("--no-flops", action="store_true", help="skip the XLA cost analysis")
    parser.add_argument("--no-smoke", action="store_true", help="skip the tiny forward calls")
    parser.add_argument("--json", default="outputs/describe.json")
    parser.add_argument("--verbose", action="store_true", help="the libraries' INFO logging too")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    variants = [v for v in args.variants.split(",") if v]

    jobs = [(kind, v) for v in variants for kind in STAGES]
    rows = []
    for kind, variant in tqdm(jobs, desc="networks", unit="net", disable=None):
        rows.append(describe_network(kind, variant, args.frames, not args.no_flops))
    rows += [describe_autoencoder(v) for v in variants]
    _print_table(rows)
    report = dict(jax_version=jax.__version__, backend=jax.default_backend(), models=rows)
    if not args.no_smoke:
        report["smoke"] = [smoke_run(kind, frames=3) for kind in STAGES]
        for s in report["smoke"]:
            print(f"smoke {s['stage']}: output {s['output_shape']}, first call {s['first_call_s']} s "
                  f"(with compile), then {s['call_s']} s")
    if args.json:
        write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
