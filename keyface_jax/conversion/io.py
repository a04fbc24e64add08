"""Model-agnostic checkpoint files: read state dicts, write safetensors, orbax save/restore.

Everything here deals in ``dict[str, np.ndarray]`` with the checkpoint's own
key names and dtypes (bf16 stays ``ml_dtypes.bfloat16``); mapping keys onto a
Flax module tree is the converter's job. torch is never imported: ``torch.save``
files go through the restricted unpickler in :mod:`.torch_pickle`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy for safetensors)
import numpy as np
import safetensors
from safetensors import safe_open
from safetensors.numpy import save_file

from keyface_jax.paths import as_path, is_url, local_copy, staged_output

from .torch_pickle import CheckpointError, LazyTensor, Opaque, open_torch_checkpoint

__all__ = [
    "CheckpointError", "read_state_dict", "unwrap_state_dict", "read_diffusers_folder",
    "read_safetensors_metadata", "write_safetensors", "save_orbax", "restore_orbax",
]

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Entries that wrap the real state dict: Lightning, DeepSpeed model states, fairseq-style
# (WavLM / BEATs: {"cfg": ..., "model": ...}). Checked in this order.
_WRAPPER_KEYS = ("state_dict", "module", "model")
# Lightning's DeepSpeed wrapper name: never a real submodule, strip wherever it appears.
_LIGHTNING_PREFIX = "_forward_module."
# DataParallel / DeepSpeed engine prefix: stripped only when every key carries it.
_MODULE_PREFIX = "module."


def read_state_dict(path: str | os.PathLike, *,
                    stub_unknown_globals: bool = False) -> dict[str, np.ndarray]:
    """Read all tensors of a checkpoint file (or diffusers folder) as numpy arrays.

    ``.safetensors`` via safetensors; ``.pt/.pth/.ckpt/.bin`` torch.save files via the
    restricted unpickler (containers unwrapped by :func:`unwrap_state_dict`); a
    folder with ``config.json`` via :func:`read_diffusers_folder`. Dtypes are kept.
    ``stub_unknown_globals`` loads torch files whose non-tensor extras (e.g.
    hyper-parameter objects) use non-allow-listed classes, without calling them.
    """
    src = os.fspath(path)
    if is_url(src):   # gs://...: a file read through a local copy (folders are local only)
        if not as_path(src).is_file():
            raise CheckpointError(f"{src}: no such file (remote folders are not read: copy them)")
        with local_copy(src) as local:
            return read_state_dict(local, stub_unknown_globals=stub_unknown_globals)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise CheckpointError(f"{src}: is a directory without config.json "
                                  "(expected a checkpoint file or a diffusers model folder)")
        return read_diffusers_folder(src)[1]
    lower = src.lower()
    if lower.endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(src)
    if lower.endswith(TORCH_SUFFIXES):
        with open_torch_checkpoint(src, stub_unknown_globals=stub_unknown_globals) as obj:
            return unwrap_state_dict(obj, src)
    raise CheckpointError(
        f"{src}: unknown checkpoint extension {os.path.splitext(src)[1]!r} "
        f"(expected {SAFETENSORS_SUFFIX} or one of {', '.join(TORCH_SUFFIXES)})")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (np.ndarray, LazyTensor))


def unwrap_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    """Find the state dict inside a loaded checkpoint object and return its tensors.

    Accepts a flat ``{name: tensor}`` mapping, DeepSpeed ``{"module": sd, ...}``,
    Lightning ``{"state_dict": sd, ...}`` and ``{"model": sd, ...}``; other entries
    (optimizer states, epochs, hyper-parameters) are ignored, as are non-tensor
    values inside the state dict. Strips ``_forward_module.`` and a ``module.``
    prefix shared by all keys. Tensors may be numpy arrays or :class:`LazyTensor`.
    """
    sd = obj
    # A flat state dict never maps a bare "module"/"model"/"state_dict" to a dict.
    while isinstance(sd, Mapping):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping):
        what = sd.qualname if isinstance(sd, Opaque) else type(sd).__name__
        raise CheckpointError(f"{source}: no tensors found (the file holds a {what}, "
                              "not a state dict)")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and _is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: "
                              f"{sorted(map(str, sd))[:10]})")
    names = {k: k.replace(_LIGHTNING_PREFIX, "") for k in tensors}
    if all(n.startswith(_MODULE_PREFIX) for n in names.values()):
        names = {k: n[len(_MODULE_PREFIX):] for k, n in names.items()}
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{source}: key prefixes collide after stripping "
                              f"{_LIGHTNING_PREFIX!r}/{_MODULE_PREFIX!r}")
    return {names[k]: v.materialize() if isinstance(v, LazyTensor) else v
            for k, v in tensors.items()}


def _read_safetensors(src: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(src, framework="np") as f:
            for key in f.keys():
                try:
                    out[key] = f.get_tensor(key)
                except (TypeError, AttributeError) as e:  # dtype numpy cannot hold
                    dtype = f.get_slice(key).get_dtype()
                    raise CheckpointError(
                        f"{src}: tensor {key!r} has dtype {dtype} that numpy cannot "
                        f"represent ({e})") from e
    except CheckpointError:
        raise
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{src}: not a readable safetensors file "
                              f"(truncated or corrupt?): {e}") from e
    if not out:
        raise CheckpointError(f"{src}: no tensors found")
    return out


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The free-form ``__metadata__`` of a safetensors file ({} when absent)."""
    src = os.fspath(path)
    try:
        with local_copy(src) as local, safe_open(local, framework="np") as f:
            return dict(f.metadata() or {})
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{src}: not a readable safetensors file: {e}") from e


def _weight_files(folder: str, variant: str | None) -> tuple[list[str], set[str] | None]:
    """Weight file names of a diffusers/transformers folder, and the keys a shard index
    promises (None for a single file)."""
    v = f".{variant}" if variant else ""
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for suffix in (".safetensors", ".bin"):
            single = f"{stem}{v}{suffix}"
            if os.path.isfile(os.path.join(folder, single)):
                return [single], None
            index = os.path.join(folder, f"{stem}{v}{suffix}.index.json")
            if os.path.isfile(index):
                return _read_shard_index(index)
    return [], None


def _read_shard_index(index: str) -> tuple[list[str], set[str]]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
    for shard in shards:  # shard names must stay inside the folder
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: bad shard file name {shard!r}")
    return shards, set(weight_map)


def read_diffusers_folder(path: str | os.PathLike, subfolder: str | None = None, *,
                          variant: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``config.json`` and the weights of a diffusers model folder.

    Weights are ``diffusion_pytorch_model[.variant].safetensors`` or ``.bin``, single or
    sharded (``*.index.json``); transformers-style ``model.safetensors`` /
    ``pytorch_model.bin`` are accepted too. ``subfolder`` picks e.g. ``unet`` or ``vae``.
    """
    folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such directory")
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: is a directory without config.json") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: unreadable config ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: config is not a JSON object")
    files, promised = _weight_files(folder, variant)
    if not files:
        raise CheckpointError(
            f"{folder}: no weights (expected diffusion_pytorch_model"
            f"{'.' + variant if variant else ''}.safetensors/.bin or a shard index)")
    state: dict[str, np.ndarray] = {}
    for name in files:
        part = read_state_dict(os.path.join(folder, name))
        if state.keys() & part.keys():
            raise CheckpointError(f"{folder}: shard {name} repeats keys already loaded")
        state.update(part)
    if promised is not None and promised - state.keys():
        missing = sorted(promised - state.keys())
        raise CheckpointError(f"{folder}: {len(missing)} tensors listed in the shard index "
                              f"are in no shard, e.g. {missing[:3]}")
    return config, state


def write_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write arrays to a safetensors file in one piece (a temporary file renamed, or uploaded
    whole to gs://). Values may be numpy or jax arrays; dtypes (bf16 included) and shapes are kept.
    """
    dst = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{dst}: key {key!r} is not a string")
        arrays[key] = np.asarray(value, order="C")
    if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{dst}: safetensors metadata must map str to str")
    try:
        with staged_output(dst) as tmp:
            save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except (safetensors.SafetensorError, ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"{dst}: cannot write safetensors ({e})") from e


def save_orbax(path: str | os.PathLike, pytree: Any, *, only_this_process: bool = False) -> None:
    """Save a pytree of arrays (nested dict, ``nnx.State``) as an orbax checkpoint at a local
    path or a gs:// URL, waiting for completion; an existing checkpoint at ``path`` is replaced
    only by a complete one (locally: written beside it and swapped in; on GCS Orbax commits the
    new one with its commit_success.txt marker, after removing the old one).
    ``only_this_process``: in a multi-process job, one process writes host (numpy) arrays
    alone, without the cross-process barriers orbax otherwise waits on.
    """
    import jax
    import orbax.checkpoint as ocp

    dst = as_path(path)
    options = {}
    if only_this_process:
        me = jax.process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me})
    if is_url(dst):
        try:
            with ocp.StandardCheckpointer(**options) as ckptr:
                ckptr.save(dst, pytree, force=True)
                ckptr.wait_until_finished()
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{dst}: cannot save orbax checkpoint ({e})") from e
        return
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex}"
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ocp.StandardCheckpointer(**options) as ckptr:
            ckptr.save(tmp, pytree)
            ckptr.wait_until_finished()
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{dst}: cannot save orbax checkpoint ({e})") from e
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()


def restore_orbax(path: str | os.PathLike, abstract_pytree: Any = None) -> Any:
    """Restore a checkpoint written by :func:`save_orbax` (local path or gs:// URL).

    With ``abstract_pytree`` (leaves ``jax.ShapeDtypeStruct``, optionally with
    ``sharding``) the result has that structure, dtypes and shardings; without it,
    leaves come back as saved (numpy stays numpy, jax arrays on the default device).
    """
    import orbax.checkpoint as ocp

    src = as_path(path)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such orbax checkpoint directory")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if abstract_pytree is None:
                return ckptr.restore(src)
            return ckptr.restore(src, abstract_pytree)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{src}: cannot restore orbax checkpoint ({e})") from e
