"""Network and autoencoder weights for generation, from whatever a user has:

  - a training run folder (`--workdir` of keyface_jax.train): its newest restorable checkpoint,
    EMA weights when the run kept them (or a given step: DIR@STEP);
  - an Orbax export of keyface_jax.convert (a folder with a "network" / "autoencoder" item);
  - a reference KeyFace checkpoint (.pt / .ckpt / .safetensors, sgm key names);
  - "random": seeded fresh weights (tests, benchmarks, smoke runs).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from keyface_jax.checkpoints import io, keyface_ckpt
from keyface_jax.checkpoints.io import CheckpointError
from keyface_jax.config_lib import autoencoder_config, network_config
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.keyface import build_network

log = logging.getLogger(__name__)


def _split_step(spec: str) -> tuple[str, int | None]:
    path, sep, step = spec.rpartition("@")
    if sep and step.isdigit() and os.path.isdir(path):
        return path, int(step)
    return spec, None


def _merge(*trees: Mapping) -> dict:
    """Deep union of nested dicts (trainable and frozen parameters of a run)."""
    out: dict = {}
    for tree in trees:
        for key, value in (tree or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _unwrap_values(tree):
    """Trainer checkpoints store NNX variables as {"value": array}; the networks' pure dicts do not."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree


def _abstract(metadata):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def run_parameters(run_dir: str, step: int | None = None, use_ema: bool = True) -> tuple[dict, int]:
    """(nested parameter dict, step) from a trainer's checkpoints: trainable (EMA when present and
    use_ema) merged with frozen. The newest checkpoint that restores is used unless step is given."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{run_dir}: not a training run (no checkpoints/ folder)")
    manager = ocp.CheckpointManager(folder, item_handlers={"state": ocp.StandardCheckpointHandler()})
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{run_dir}: no checkpoint at step {step} (have {sorted(steps)})")
        steps = [step]
    for candidate in steps:
        try:
            meta = manager.item_metadata(candidate)["state"]
            state = manager.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(meta))))["state"]
        except Exception as e:  # noqa: BLE001 - a broken checkpoint: fall back to the previous
            log.warning("%s step %d does not restore (%s); trying the previous one", folder,
                        candidate, str(e)[:200])
            continue
        trainable = state["ema"] if use_ema and state.get("ema") else state["params"]
        params = jax.tree.map(np.asarray, _unwrap_values(_merge(trainable, state.get("frozen") or {})))
        return params, int(candidate)
    raise CheckpointError(f"{run_dir}: no checkpoint restores (tried steps {steps})")


def run_steps(run_dir: str) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _is_orbax_export(path: str) -> bool:
    return os.path.isdir(path) and not os.path.isdir(os.path.join(path, "checkpoints"))


def load_network(config, source: str, *, seed: int = 0, use_ema: bool = True
                 ) -> tuple[nnx.GraphDef, nnx.State, str]:
    """(graphdef, parameter State, description) of the network `config.model` describes."""
    net_cfg = network_config(config.model)
    if source == "random":
        graphdef, state = nnx.split(build_network(net_cfg, rngs=nnx.Rngs(seed)))
        return graphdef, state, f"random (seed {seed})"
    abstract = nnx.eval_shape(lambda: build_network(net_cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract)[0]
    path, step = _split_step(source)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder ({net_cfg.kind} weights)")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        params, step = run_parameters(path, step, use_ema)
        state = keyface_ckpt.fill_from_pure_dict(abstract, params, path, "network")
        return graphdef, state, f"run {path} step {step}"
    if _is_orbax_export(path):
        return graphdef, keyface_ckpt.load_orbax_export(path, abstract).network, f"export {path}"
    report = keyface_ckpt.load_reference_checkpoint(path, abstract)
    return graphdef, report.network, f"reference checkpoint {path}"


def load_autoencoder(ae_section, source: str, *, seed: int = 0) -> AutoencoderKL:
    """The autoencoder (encoder for the identity frame, temporal decoder for the output) from an
    Orbax export with an "autoencoder" item (keyface_jax.convert, or the autoencoder trainer's
    export), a training run of the autoencoder trainer, or "random"."""
    cfg = autoencoder_config(ae_section)
    if source == "random":
        return AutoencoderKL(cfg, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    path, step = _split_step(source)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such autoencoder file or folder")
    if os.path.isdir(os.path.join(path, "export")):
        path = os.path.join(path, "export")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        params, _ = run_parameters(path, step)
        params = params.get("autoencoder", params)
        state = keyface_ckpt.fill_from_pure_dict(abstract, params, path, "autoencoder")
    else:
        state = keyface_ckpt.load_orbax_export(path, None, abstract).autoencoder
    return nnx.merge(nnx.split(abstract)[0], state)
