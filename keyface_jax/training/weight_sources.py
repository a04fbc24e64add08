"""Where a model's weights come from: the one resolver that training init and generation use.

A source is a kind and a path:

  random     seeded fresh weights (`seed`)
  svd        SVD weights (a diffusers pipeline folder with unet/ + vae/, or an sgm file), reused as
             the reference does for a KeyFace network (network only)
  reference  a reference KeyFace checkpoint (.pt / .ckpt / .safetensors, sgm key names)
  orbax      an Orbax export of `keyface_jax.convert` or of the autoencoder trainer ({"network",
             "autoencoder"} parameter trees)
  run        a training run folder (`--workdir` of keyface_jax.train): its newest checkpoint, EMA
             weights when kept (or step N: DIR@N); for an autoencoder run, its export

Training names the kind explicitly (`config.init.source`, `config.init.path`); a command line
may name it (`run:DIR`, `orbax:DIR`, ...) or give a bare path, whose kind is then read off what
the path is (`WeightSource.parse`).
"""

from __future__ import annotations

import dataclasses
import os
from flax import nnx

from keyface_jax.config_lib import autoencoder_config
from keyface_jax.conversion import io, keyface_ckpt
from keyface_jax.conversion.io import CheckpointError
from keyface_jax.conversion.nnx_torch import load_torch_state_dict
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.keyface import build_network
from keyface_jax.paths import as_path
from keyface_jax.training import run_checkpoints

KINDS = ("random", "svd", "reference", "orbax", "run")
AUTOENCODER_EXPORT = "export"   # the autoencoder trainer's export folder in its workdir


@dataclasses.dataclass(frozen=True)
class WeightSource:
    kind: str
    path: str = ""
    step: int | None = None      # run sources: this checkpoint instead of the newest

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"weight source kind {self.kind!r}; choose one of {KINDS}")
        if self.kind != "random" and not self.path:
            raise ValueError(f"a {self.kind!r} weight source needs a path")

    @classmethod
    def parse(cls, spec: str) -> "WeightSource":
        """'random', 'KIND:PATH', 'DIR@STEP' (a run's checkpoint) or a bare path: a folder with
        checkpoints/ is a run, another folder an Orbax export, a file a reference checkpoint."""
        if spec == "random":
            return cls("random")
        kind, sep, rest = spec.partition(":")
        if sep and kind in KINDS:
            path, step = _split_step(rest)
            return cls(kind, path, step)
        path, step = _split_step(spec)
        if step is not None or is_run(path):
            return cls("run", path, step)
        if not as_path(path).exists():
            raise CheckpointError(f"{path}: no such file or folder (weights)")
        return cls("orbax" if as_path(path).is_dir() else "reference", path)

    @classmethod
    def from_init_config(cls, init_cfg) -> "WeightSource":
        """`config.init.source` ("" = random) and `config.init.path`."""
        return cls(init_cfg.source or "random", init_cfg.path)

    def describe(self) -> str:
        return self.kind + (f" {self.path}" if self.path else "") + (
            f" step {self.step}" if self.step is not None else "")


def _split_step(spec: str) -> tuple[str, int | None]:
    path, sep, step = spec.rpartition("@")
    if sep and step.isdigit():
        return path, int(step)
    return spec, None


def is_run(path: str) -> bool:
    """Whether `path` is a training run folder (it has a checkpoints/ folder)."""
    return (as_path(path) / run_checkpoints.CHECKPOINTS).is_dir()


def network_state(source: WeightSource, net_cfg, abstract, *, seed: int = 0, dtype=None,
                  use_ema: bool = True) -> nnx.State | None:
    """The network's Param State from `source`, checked strictly against `abstract` (the network
    built with nnx.eval_shape); None for "random" (the caller initialises: sharded on the devices
    when training, on the host for generation)."""
    if source.kind == "random":
        return None
    if source.kind == "reference":
        return keyface_ckpt.load_reference_checkpoint(source.path, abstract).network
    if source.kind == "orbax":
        return keyface_ckpt.load_orbax_export(source.path, abstract).network
    if source.kind == "run":
        params, _ = run_checkpoints.read_run_params(source.path, source.step, use_ema)
        return keyface_ckpt.fill_from_pure_dict(abstract, params, source.path, "network")
    network = build_network(net_cfg, rngs=nnx.Rngs(seed), dtype=dtype)  # svd keeps some fresh values
    return keyface_ckpt.init_from_svd(network, source.path).network


def autoencoder_state(source: WeightSource, abstract: AutoencoderKL) -> nnx.State | None:
    """The autoencoder's Param State: an Orbax export's "autoencoder" item, an autoencoder
    training run (its export, or with a step its checkpoint); None for "random"."""
    if source.kind == "random":
        return None
    if source.kind == "run" and source.step is None:
        source = WeightSource("orbax", os.fspath(as_path(source.path) / AUTOENCODER_EXPORT))
    if source.kind == "run":
        params, _ = run_checkpoints.read_run_params(source.path, source.step)
        return keyface_ckpt.fill_from_pure_dict(abstract, params.get("autoencoder", params),
                                                source.path, "autoencoder")
    if source.kind != "orbax":
        raise CheckpointError(f"{source.path}: an autoencoder comes from an Orbax export or an "
                              f"autoencoder run, not a {source.kind!r} source")
    return keyface_ckpt.load_orbax_export(source.path, None, abstract).autoencoder


def frozen_decoder(init_cfg, ae_cfg, dtype=None):
    """The temporal VAE decoder for the pixel losses and previews, from `config.init.autoencoder`:
    an Orbax export (its "autoencoder" item), an autoencoder run, or a state-dict file of the
    autoencoder (sgm names, with or without the reference's `first_stage_model.` prefix)."""
    path = init_cfg.autoencoder
    if not path:
        raise ValueError("the pixel losses need the frozen VAE decoder: set config.init.autoencoder "
                         "to its weights, or objective.pixel_weight=0")
    vae_cfg = autoencoder_config(ae_cfg, use_encoder=False, dtype=dtype)
    decoder = nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0))).decoder
    folder = as_path(path)
    if folder.is_dir() and not (folder / "config.json").exists():
        source = WeightSource.parse(path)
        if source.kind == "run" and source.step is None:
            source = WeightSource("orbax", os.fspath(folder / AUTOENCODER_EXPORT))
        tree = (run_checkpoints.read_run_params(source.path, source.step)[0]
                if source.kind == "run" else io.restore_orbax(source.path).get("autoencoder", {}))
        if "decoder" not in tree:
            raise CheckpointError(f"{path}: no autoencoder decoder weights in it")
        state = keyface_ckpt.fill_from_pure_dict(decoder, tree["decoder"], path,
                                                 "autoencoder.decoder")
        return nnx.merge(nnx.split(decoder)[0], state)
    sd = io.read_state_dict(path)
    prefix = "first_stage_model.decoder." if any(k.startswith("first_stage_model.") for k in sd) \
        else "decoder."
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{path}: no decoder weights (no keys under {prefix!r})")
    try:
        state = load_torch_state_dict(decoder, sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: decoder weights do not fit config.autoencoder: {e}") from None
    return nnx.merge(nnx.split(decoder)[0], state)
