"""Checkpoint conversion CLI: reference KeyFace / SVD weights → our params → safetensors or Orbax.

    # a released KeyFace checkpoint (DeepSpeed .pt) → reference-named safetensors + Orbax
    python -m keyface_jax.convert --config configs/keyframe.py:full --source reference \\
        --input pretrained_models/checkpoints/keyframe.pt --output out/keyframe.safetensors
    python -m keyface_jax.convert --config configs/keyframe.py:full --source reference \\
        --input keyframe.pt --output out/keyframe_orbax --format orbax
    # initialise an interpolation network from SVD (sgm file or diffusers folder), as the reference does
    python -m keyface_jax.convert --config configs/interpolation.py:full --source svd \\
        --input stable-video-diffusion-img2vid --output out/interp_init --format orbax
    # back from Orbax to safetensors
    python -m keyface_jax.convert --config configs/keyframe.py:full --source orbax \\
        --input out/keyframe_orbax --output out/keyframe.safetensors

Orbax output holds {"network": params, "autoencoder": params (when present)} as plain nested dicts
whose paths are the NNX module paths; safetensors output uses the reference's key names. --output
(and a file --input) may be local or gs://.

Exit status: 0 converted; 2 a bad command line, or an input that cannot be read or does not fit
the config (the reason is printed).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from keyface_jax import console
from keyface_jax.conversion import io, keyface_ckpt
from keyface_jax.config_lib import autoencoder_config, load_config, network_config
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.keyface import build_network


def _modules(config, source: str, with_vae: bool):
    """Abstract modules for loading (no memory); SVD init needs concrete ones (fresh init values)."""
    net_cfg = network_config(config.model)
    # SVD files carry the encoder too; KeyFace checkpoints only the decoder.
    ae_cfg = autoencoder_config(config.autoencoder, use_encoder=(source == "svd"))
    if source == "svd":
        net = build_network(net_cfg, rngs=nnx.Rngs(config.seed))
        ae = AutoencoderKL(ae_cfg, rngs=nnx.Rngs(config.seed)) if with_vae else None
    else:
        net = nnx.eval_shape(lambda: build_network(net_cfg, rngs=nnx.Rngs(0)))
        ae = nnx.eval_shape(lambda: AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0))) if with_vae else None
    return net, ae


def _plain(state: nnx.State) -> dict:
    return jax.tree.map(lambda x: x, state.to_pure_dict())


def convert(config, source: str, input_path: str, output: str, fmt: str, with_vae: bool) -> dict:
    """Runs one conversion; returns a summary dict (also printed by the CLI)."""
    steps = tqdm(total=3, desc="convert", unit="step", disable=None)
    net, ae = _modules(config, source, with_vae)
    steps.set_postfix_str("reading " + os.path.basename(input_path.rstrip("/")))
    if source == "reference":
        report = keyface_ckpt.load_reference_checkpoint(input_path, net, ae)
    elif source == "svd":
        report = keyface_ckpt.init_from_svd(net, input_path, ae)
    elif source == "orbax":
        has_ae = ae is not None and "autoencoder" in io.restore_orbax(input_path)
        report = keyface_ckpt.load_orbax_export(input_path, net, ae if has_ae else None)
    else:
        raise ValueError(f"unknown source {source!r}")
    steps.update()
    steps.set_postfix_str("mapping")
    graphdef, _ = nnx.split(net)
    net = nnx.merge(graphdef, report.network)
    if report.autoencoder is not None:
        ae = nnx.merge(nnx.split(ae)[0], report.autoencoder)
    else:
        ae = None
    steps.update()
    steps.set_postfix_str("writing " + output)
    if fmt == "safetensors":
        sd = keyface_ckpt.export_reference_state_dict(net, ae)
        io.write_safetensors(sd, output, metadata={"format": "keyface-reference",
                                                   "kind": net.config.kind})
    else:
        tree = {"network": _plain(report.network)}
        if report.autoencoder is not None:
            tree["autoencoder"] = _plain(report.autoencoder)
        io.save_orbax(output, tree)
    steps.update()
    steps.close()
    count = lambda s: int(sum(x.size for x in jax.tree.leaves(s)))
    return dict(kind=net.config.kind, network_params=count(report.network),
                autoencoder_params=count(report.autoencoder) if report.autoencoder is not None else 0,
                ignored_keys=len(report.ignored), kept_initialisation=report.kept_initialisation,
                output=output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/keyframe.py:full (file:variant)")
    parser.add_argument("--source", required=True, choices=["reference", "svd", "orbax"])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--format", default=None, choices=["safetensors", "orbax"],
                        help="default: safetensors if --output ends in .safetensors, else orbax")
    parser.add_argument("--no-vae", action="store_true", help="skip the autoencoder weights")
    parser.add_argument("--verbose", action="store_true", help="the libraries' INFO logging too")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    fmt = args.format or ("safetensors" if args.output.endswith(".safetensors") else "orbax")
    config = load_config(args.config)
    try:
        summary = convert(config, args.source, args.input, args.output, fmt, not args.no_vae)
    except io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
