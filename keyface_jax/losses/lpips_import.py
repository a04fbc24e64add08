"""Loads the published LPIPS-VGG weights into the Flax `LPIPS` module, with strict key accounting.

Two files make up LPIPS-VGG v0.1 (what `lpips.LPIPS(net="vgg")` loads):
- the torchvision VGG16 ImageNet state dict (`vgg16-397923af.pth`): `features.N.weight` (out, in,
  3, 3) and `features.N.bias` for the 13 convs; its `classifier.*` head is not part of LPIPS and
  is skipped;
- the LPIPS linear layers (`lpips/weights/v0.1/vgg.pth`): `lin0.model.1.weight` …
  `lin4.model.1.weight`, each (1, C, 1, 1) with C = 64, 128, 256, 512, 512.

Any missing key, unknown key or wrong shape raises `CheckpointError` naming the file and listing
every offending key. An LPIPS module's own state dict (as the reference keyframe checkpoint stores
under `loss_fn.lpips.`) is split into those two with `split_lpips_module_state_dict`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from keyface_jax.conversion.io import read_state_dict
from keyface_jax.conversion.nnx_torch import load_torch_state_dict
from keyface_jax.conversion.torch_pickle import CheckpointError
from keyface_jax.losses.lpips import (LPIPS, LPIPS_CHANNELS, LPIPS_SCALE, LPIPS_SHIFT, VGG16_CONVS)

VGG_IGNORED_PREFIXES = ("classifier.",)  # torchvision's ImageNet head; LPIPS stops at relu5_3
_MAX_LISTED = 20


def vgg16_expected_shapes() -> dict[str, tuple[int, ...]]:
    """torch key → torch shape for the VGG16 convs LPIPS uses."""
    out = {}
    for i, (cin, cout) in VGG16_CONVS.items():
        out[f"features.{i}.weight"] = (cout, cin, 3, 3)
        out[f"features.{i}.bias"] = (cout,)
    return out


def lin_expected_shapes() -> dict[str, tuple[int, ...]]:
    """torch key → torch shape for the five LPIPS v0.1 linear layers."""
    return {f"lin{k}.model.1.weight": (1, ch, 1, 1) for k, ch in enumerate(LPIPS_CHANNELS)}


def _listing(title: str, items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *,
                     source: str, what: str, ignore_prefixes: tuple[str, ...] = ()) -> dict:
    """The entries of `state_dict` named in `expected`, as numpy arrays; raises `CheckpointError`
    naming `what` and `source` if a key is missing, unknown (and not under `ignore_prefixes`) or
    has the wrong shape."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict
                        if k not in expected and not k.startswith(ignore_prefixes))
    bad = [f"{k}: file has {tuple(np.shape(state_dict[k]))}, expected {expected[k]}"
           for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
    if missing or unexpected or bad:
        parts = [_listing(t, items) for t, items in (("missing keys", missing),
                                                      ("unexpected keys", unexpected),
                                                      ("shape mismatches", bad)) if items]
        raise CheckpointError(f"{what} ({source}) does not match LPIPS-VGG v0.1:\n"
                              + "\n".join(parts))
    return {k: np.asarray(state_dict[k]) for k in expected}


def lpips_from_state_dicts(vgg_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any], *,
                           vgg_source: str = "<VGG16 state dict>",
                           lin_source: str = "<LPIPS lin state dict>", dtype=None) -> LPIPS:
    """An `LPIPS` module filled from torch-named (numpy) state dicts; strict (see module doc)."""
    vgg = check_state_dict(vgg_state_dict, vgg16_expected_shapes(), source=vgg_source,
                           what="LPIPS VGG16 weights", ignore_prefixes=VGG_IGNORED_PREFIXES)
    lin = check_state_dict(lin_state_dict, lin_expected_shapes(), source=lin_source,
                           what="LPIPS linear-layer weights")
    for source, sd in ((vgg_source, vgg), (lin_source, lin)):
        bad = [k for k, v in sd.items() if not np.all(np.isfinite(v.astype(np.float32)))]
        if bad:
            raise CheckpointError(f"{source}: non-finite values in {bad[:_MAX_LISTED]}")
    module = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), dtype=dtype))
    load_torch_state_dict(module, {**vgg, **lin})
    return module


def _read(path: str | os.PathLike, what: str, config_field: str) -> dict:
    src = os.fspath(path) if path else ""
    if not src:
        raise CheckpointError(f"{what}: no file given (set {config_field})")
    if not os.path.isfile(src):
        raise CheckpointError(f"{what}: {src}: no such file (check {config_field})")
    return read_state_dict(src)


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike, *, dtype=None,
               vgg_field: str = "the VGG16 weights path",
               lin_field: str = "the LPIPS lin weights path") -> LPIPS:
    """LPIPS-VGG from the torchvision VGG16 file and the LPIPS v0.1 `vgg.pth` file (.pth/.pt or
    .safetensors). `*_field` name the config fields in error messages."""
    vgg_sd = _read(vgg_path, "LPIPS VGG16 weights", vgg_field)
    lin_sd = _read(lin_path, "LPIPS linear-layer weights", lin_field)
    return lpips_from_state_dicts(vgg_sd, lin_sd, vgg_source=os.fspath(vgg_path),
                                  lin_source=os.fspath(lin_path), dtype=dtype)


_SLICE_KEY = re.compile(r"^net\.slice[1-5]\.(\d+)\.(weight|bias)$")


def split_lpips_module_state_dict(state_dict: Mapping[str, Any], *, prefix: str = "",
                                  source: str = "<LPIPS state dict>") -> tuple[dict, dict]:
    """An `lpips.LPIPS` module's state dict (keys `net.sliceK.N.*`, `linK.*`, their `lins.K.*`
    duplicates, `scaling_layer.shift/scale`), optionally under `prefix` (e.g. the reference
    keyframe checkpoint's "loss_fn.lpips."), → (VGG16 dict, lin dict) in the published files'
    naming. Keys outside `prefix` are ignored; unknown keys inside it raise."""
    vgg, lin, unknown = {}, {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        m = _SLICE_KEY.match(name)
        if m:  # lpips' slices keep torchvision's feature indices as their child names
            vgg[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif re.fullmatch(r"lin[0-4]\.model\.1\.weight", name):
            lin[name] = value
        elif re.fullmatch(r"lins\.[0-4]\.model\.1\.weight", name):
            continue  # the same tensors as linK (an nn.ModuleList over them)
        elif name in ("scaling_layer.shift", "scaling_layer.scale"):
            const = LPIPS_SHIFT if name.endswith("shift") else LPIPS_SCALE
            if not np.allclose(np.asarray(value, np.float32).reshape(-1), const, atol=1e-6):
                raise CheckpointError(f"{source}: {key} is {np.asarray(value).reshape(-1)}, "
                                      f"LPIPS v0.1 uses {const}")
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: " + _listing("unexpected LPIPS keys", sorted(unknown)))
    return vgg, lin
