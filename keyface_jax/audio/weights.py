"""Audio-encoder weights from the files users have, into the Flax modules (no torch needed).

Sources:
- a transformers folder (`config.json` + `model.safetensors` / `pytorch_model.bin`, sharded or
  not) of WavLM or wav2vec2, base model or one with a task head (`Wav2Vec2ForCTC` of
  wav2vec2-base-960h: the `wav2vec2.` sub-tree is used, the head ignored); a hub name already in
  the local cache also works;
- Microsoft's original checkpoints, `torch.save({"cfg": {...}, "model": state_dict})`: WavLM
  (WavLM-Base+.pt, WavLM-Large.pt) and BEATs (BEATs_iter3_plus_AS2M*.pt), read by the restricted
  unpickler of `keyface_jax.conversion.torch_pickle`.

Key accounting is strict, as in the UNet importers: every parameter must be filled and every
checkpoint tensor used, except the few that inference never reads (`IGNORED_*` below); shape
mismatches name the key and both shapes. The original checkpoints' names (fairseq) are mapped onto
the transformers names our modules mirror by `wavlm_renames(mode)` / `BEATS_RENAMES`, tables read
in both directions (tests build original-layout files from transformers weights with them). The positional convolution's
weight norm (g, v) is folded into one weight, w = g·v/‖v‖ (norm over all but the kernel axis).
`gs://` paths are copied to a local temporary folder first.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

from keyface_jax.audio.beats_model import abstract_beats
from keyface_jax.audio.configs import (beats_config_from_cfg, preprocessor_normalize,
                                       speech_config_from_hf, speech_config_from_wavlm_cfg)
from keyface_jax.audio.speech_model import SpeechConfig, abstract_speech_encoder

IGNORED_HF = ("masked_spec_embed",)        # SpecAugment mask vector (training only)
IGNORED_WAVLM_PT = ("mask_emb",)
IGNORED_BEATS_PT_PREFIX = "predictor."     # AudioSet classifier of the fine-tuned checkpoints

_SLOTS = {"i": r"\d+", "leaf": r"weight|bias|weight_g|weight_v", "proj": r"[qkv]_proj|out_proj"}
_ENCODER_RENAMES = (
    ("encoder.pos_conv.0.{leaf}", "encoder.pos_conv_embed.conv.{leaf}"),
    ("encoder.layer_norm.{leaf}", "encoder.layer_norm.{leaf}"),
    ("encoder.layers.{i}.self_attn.{proj}.{leaf}", "encoder.layers.{i}.attention.{proj}.{leaf}"),
    ("encoder.layers.{i}.self_attn.grep_linear.{leaf}",
     "encoder.layers.{i}.attention.gru_rel_pos_linear.{leaf}"),
    ("encoder.layers.{i}.self_attn.grep_a", "encoder.layers.{i}.attention.gru_rel_pos_const"),
    ("encoder.layers.{i}.self_attn.relative_attention_bias.weight",
     "encoder.layers.{i}.attention.rel_attn_embed.weight"),
    ("encoder.layers.{i}.self_attn_layer_norm.{leaf}", "encoder.layers.{i}.layer_norm.{leaf}"),
    ("encoder.layers.{i}.fc1.{leaf}", "encoder.layers.{i}.feed_forward.intermediate_dense.{leaf}"),
    ("encoder.layers.{i}.fc2.{leaf}", "encoder.layers.{i}.feed_forward.output_dense.{leaf}"),
    ("encoder.layers.{i}.final_layer_norm.{leaf}", "encoder.layers.{i}.final_layer_norm.{leaf}"),
)


def wavlm_renames(extractor_mode: str) -> tuple[tuple[str, str], ...]:
    """(original WavLM name, transformers name) templates; the conv norms sit at different
    indices of the fairseq `nn.Sequential` in the two extractor modes."""
    norm = {"default": "2", "layer_norm": "2.1"}[extractor_mode]
    return ((f"feature_extractor.conv_layers.{{i}}.0.{{leaf}}",
             "feature_extractor.conv_layers.{i}.conv.{leaf}"),
            (f"feature_extractor.conv_layers.{{i}}.{norm}.{{leaf}}",
             "feature_extractor.conv_layers.{i}.layer_norm.{leaf}"),
            ("layer_norm.{leaf}", "feature_projection.layer_norm.{leaf}"),
            ("post_extract_proj.{leaf}", "feature_projection.projection.{leaf}"),
            *_ENCODER_RENAMES)


BEATS_RENAMES = (("patch_embedding.{leaf}", "patch_embedding.{leaf}"),
                 ("layer_norm.{leaf}", "layer_norm.{leaf}"),
                 ("post_extract_proj.{leaf}", "post_extract_proj.{leaf}"),
                 *_ENCODER_RENAMES)


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_SLOTS[p]})"
                    for i, p in enumerate(parts))
    return re.compile(regex + "$")


def rename(state: Mapping[str, np.ndarray], table, reverse: bool = False) -> dict:
    """Renames keys by the first matching template pair (left → right, or right → left);
    keys that match none are kept as they are (the strict loader then reports them)."""
    rules = [(_pattern(b if reverse else a), a if reverse else b) for a, b in table]
    out = {}
    for key, value in state.items():
        new = key
        for pattern, target in rules:
            m = pattern.match(key)
            if m:
                new = target.format(**m.groupdict())
                break
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


def weight_norm_names(state: Mapping[str, np.ndarray]) -> dict:
    """torch's parametrization names of a weight norm (`X.parametrizations.weight.original0/1`,
    what transformers 5 saves) → the older `X.weight_g` / `X.weight_v` (fairseq's, and older
    transformers files')."""
    return {k.replace(".parametrizations.weight.original0", ".weight_g")
             .replace(".parametrizations.weight.original1", ".weight_v"): v
            for k, v in state.items()}


def fold_weight_norm(state: Mapping[str, np.ndarray]) -> dict:
    """`X.weight_g`, `X.weight_v` (torch weight_norm, either naming) → `X.weight`."""
    state = weight_norm_names(state)
    out = {k: v for k, v in state.items() if not k.endswith((".weight_g", ".weight_v"))}
    for key in [k for k in state if k.endswith(".weight_g")]:
        stem = key[:-len(".weight_g")]
        if stem + ".weight_v" not in state:
            raise ValueError(f"{key} has no matching {stem}.weight_v")
        g = np.asarray(state[key], np.float64)
        v = np.asarray(state[stem + ".weight_v"], np.float64)
        if g.ndim != v.ndim or any(a not in (1, b) for a, b in zip(g.shape, v.shape)):
            raise ValueError(f"{stem}: weight-norm shapes g {g.shape} and v {v.shape} disagree")
        axes = tuple(i for i, n in enumerate(g.shape) if n == 1)
        norm = np.sqrt(np.square(v).sum(axis=axes, keepdims=True))
        out[stem + ".weight"] = (v * (g / norm)).astype(np.float32)
    missing_g = [k for k in state if k.endswith(".weight_v") and k[:-2] + "_g" not in state]
    if missing_g:
        raise ValueError(f"{missing_g[0]} has no matching weight_g")
    return out


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def local_path(path: str):
    """Yields a local path for `path`; `gs://…` (any non-local etils path) is copied first."""
    if "://" not in path:
        yield os.path.expanduser(path)
        return
    from etils import epath
    src = epath.Path(path)
    tmp = tempfile.mkdtemp(prefix="keyface_audio_")
    try:
        dst = os.path.join(tmp, src.name)
        if src.is_dir():
            os.makedirs(dst)
            for f in src.iterdir():
                if f.is_file():
                    f.copy(os.path.join(dst, f.name))
        else:
            src.copy(dst)
        yield dst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_folder(name: str) -> str | None:
    """The cached snapshot folder of a hub name ("org/model"), or None."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:   # not cached: LocalEntryNotFoundError (an OSError); a bad name: HFValidationError
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def read_original_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(`cfg` dict, state dict) of a Microsoft `{"cfg", "model"}` torch file."""
    from keyface_jax.conversion.io import CheckpointError
    from keyface_jax.conversion.torch_pickle import LazyTensor, open_torch_checkpoint
    with open_torch_checkpoint(path, stub_unknown_globals=True) as obj:
        if not (isinstance(obj, Mapping) and isinstance(obj.get("cfg"), Mapping)
                and isinstance(obj.get("model"), Mapping)):
            top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: not an original Microsoft checkpoint (expected a "
                                  f"dict with 'cfg' and 'model' dicts, found {top})")
        cfg = dict(obj["cfg"])
        state = {k: v.materialize() if isinstance(v, LazyTensor) else v
                 for k, v in obj["model"].items()
                 if isinstance(k, str) and isinstance(v, (LazyTensor, np.ndarray))}
    if not state:
        raise CheckpointError(f"{path}: its 'model' entry holds no tensors")
    return cfg, state


def _load(module, state: dict, source: str):
    from keyface_jax.conversion.io import CheckpointError
    from keyface_jax.conversion.nnx_torch import load_torch_state_dict
    try:
        load_torch_state_dict(module, fold_weight_norm(state))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return module


def speech_encoder_from_hf(config: Mapping, state: Mapping[str, np.ndarray],
                           source: str = "transformers weights", dtype=None):
    """(SpeechEncoder, SpeechConfig) from a transformers config dict and state dict (of the base
    model or of a model with a task head, whose `<model_type>.` sub-tree is used)."""
    cfg = speech_config_from_hf(config, source)
    prefix = f"{cfg.kind}."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if k not in IGNORED_HF}
    return _load(abstract_speech_encoder(cfg, dtype), state, source), cfg


def load_speech_encoder(source: str, dtype=None):
    """(SpeechEncoder with weights, SpeechConfig, normalize) from a transformers folder, a cached
    hub name or an original WavLM `.pt`. `normalize` is the input normalisation the checkpoint
    asks for: WavLM's cfg `normalize` / wav2vec2's (feature-extractor) `do_normalize`."""
    from keyface_jax.conversion.io import CheckpointError, read_diffusers_folder
    with local_path(source) as path:
        if not os.path.exists(path):
            hub = _hub_folder(source)
            if hub is None:
                raise FileNotFoundError(f"audio encoder weights: {source!r} does not exist (give a "
                                        "transformers folder, a WavLM .pt, or a cached hub name)")
            path = hub
        if os.path.isdir(path):
            config, state = read_diffusers_folder(path)
            model, cfg = speech_encoder_from_hf(config, state, source, dtype)
            return model, cfg, _normalize_or(preprocessor_normalize(path), cfg.kind == "wav2vec2")
        if not path.lower().endswith((".pt", ".pth", ".ckpt")):
            raise CheckpointError(f"{source}: expected a transformers model folder or an original "
                                  "WavLM .pt checkpoint")
        raw_cfg, state = read_original_checkpoint(path)
    cfg = speech_config_from_wavlm_cfg(raw_cfg, source)
    state = {k: v for k, v in rename(state, wavlm_renames(
        raw_cfg.get("extractor_mode", "default"))).items() if k not in IGNORED_WAVLM_PT}
    model = _load(abstract_speech_encoder(cfg, dtype), _identity_projection(state, cfg), source)
    return model, cfg, bool(raw_cfg.get("normalize", False))


def _normalize_or(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _identity_projection(state: dict, cfg: SpeechConfig) -> dict:
    """fairseq has no post_extract_proj when the conv width equals the model width."""
    if "feature_projection.projection.weight" in state or cfg.conv_dim[-1] != cfg.dim:
        return state
    return {**state, "feature_projection.projection.weight": np.eye(cfg.dim, dtype=np.float32),
            "feature_projection.projection.bias": np.zeros(cfg.dim, np.float32)}


def load_beats(source: str, dtype=None):
    """(BEATs with weights, BEATsConfig) from an original BEATs `.pt` ({"cfg", "model"})."""
    from keyface_jax.conversion.io import CheckpointError
    with local_path(source) as path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BEATs checkpoint {source!r} does not exist")
        raw_cfg, state = read_original_checkpoint(path)
    cfg = beats_config_from_cfg(raw_cfg, source)
    state = rename({k: v for k, v in state.items() if not k.startswith(IGNORED_BEATS_PT_PREFIX)},
                   BEATS_RENAMES)
    table = "encoder.layers.{}.attention.rel_attn_embed.weight"
    for i in range(1, cfg.encoder.num_layers):   # BEATs shares layer 0's table with every layer
        extra = state.pop(table.format(i), None)
        if extra is not None and not np.array_equal(extra, state.get(table.format(0))):
            raise CheckpointError(f"{source}: layer {i}'s relative_attention_bias differs from "
                                  "layer 0's (BEATs shares one table)")
    return _load(abstract_beats(cfg, dtype), state, source), cfg


def random_state(module, seed: int = 0, scale: float = 0.05):
    """Fills an abstract module with seeded random weights (benchmarks, smoke runs): kernels
    N(0, 1/fan_in), norm scales ~1, everything else small."""
    from flax import nnx
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape, leaf = var.shape, str(path[-1])
        if leaf == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif leaf == "scale":
            value = 1.0 + scale * rng.standard_normal(shape)
        else:
            value = scale * rng.standard_normal(shape)
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    nnx.update(module, nnx.from_flat_state(flat))
    return module
