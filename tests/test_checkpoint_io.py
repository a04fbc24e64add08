"""Tests for the checkpoint file layer (keyface_jax.conversion.io).

torch is used only here, to write real ``torch.save`` files; the reader never imports it.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

from keyface_jax.conversion import io as ckio
from keyface_jax.conversion.io import CheckpointError

torch = pytest.importorskip("torch")

NP_DTYPE = {
    torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
    torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
    torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.uint16: np.uint16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
}


def torch_bytes(t: "torch.Tensor") -> bytes:
    """Raw little-endian bytes of a tensor's logical (C-order) contents."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(arrays: dict, tensors: dict) -> None:
    assert set(arrays) == set(tensors)
    for key, t in tensors.items():
        a = arrays[key]
        assert isinstance(a, np.ndarray), key
        assert a.shape == tuple(t.shape), key
        assert a.dtype == np.dtype(NP_DTYPE[t.dtype]), key
        assert a.flags.c_contiguous, key
        assert a.tobytes() == torch_bytes(t), key


def make_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(100, generator=g)  # one storage, two views at offsets
    mat = torch.randn(6, 4, generator=g)
    tagged = torch.randn(3, generator=g)
    tagged.note = "python attribute"  # torch pickles this via _rebuild_from_type_v2
    return {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(4, 2, generator=g).half(),
        "wbf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "w64": torch.randn(3, generator=g).double(),
        "steps": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "mask": torch.tensor([True, False, True]),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # saved through _rebuild_tensor_v3
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": mat.t(),  # non-contiguous view
        "view_a": base[10:30].view(4, 5),
        "view_b": base[50:60:2],  # offset and stride 2 into the same storage
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "tagged": tagged,
    }


def test_flat_state_dict_all_extensions(tmp_path):
    tensors = make_tensors()
    for ext in (".pt", ".pth", ".ckpt", ".bin"):
        path = tmp_path / f"flat{ext}"
        torch.save(tensors, path)
        assert_same(ckio.read_state_dict(path), tensors)
    torch.save(tensors, tmp_path / "proto5.pt", pickle_protocol=5)  # STACK_GLOBAL opcodes
    assert_same(ckio.read_state_dict(tmp_path / "proto5.pt"), tensors)


def test_shared_storage_views_are_independent_and_writable(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {"whole": base, "again": base, "part": base[4:8]}
    torch.save(tensors, tmp_path / "shared.pt")
    out = ckio.read_state_dict(tmp_path / "shared.pt")
    assert_same(out, tensors)
    out["whole"][:] = -1  # must not leak into the other entries
    np.testing.assert_array_equal(out["again"], np.arange(12, dtype=np.float32))
    np.testing.assert_array_equal(out["part"], np.arange(4, 8, dtype=np.float32))


def test_deepspeed_model_states(tmp_path):
    tensors = make_tensors()
    obj = {
        "module": OrderedDict((f"_forward_module.{k}", v) for k, v in tensors.items()),
        "param_shapes": [OrderedDict((k, v.shape) for k, v in tensors.items())],
        "buffer_names": [], "optimizer": None, "global_steps": 5,
        "sparse_tensor_module_names": set(), "ds_config": {"train_batch_size": 4},
        "ds_version": "0.14.0", "dtype": torch.float32, "device": torch.device("cuda", 0),
        "blob": b"\x00\xffraw", "np_scalar": np.float64(1.5), "np_dtype": np.dtype("f4"),
    }
    torch.save(obj, tmp_path / "mp_rank_00_model_states.pt")
    assert_same(ckio.read_state_dict(tmp_path / "mp_rank_00_model_states.pt"), tensors)


def test_lightning_checkpoint_ignores_optimizer_and_extras(tmp_path):
    tensors = make_tensors()
    obj = {
        "state_dict": tensors,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "epoch": 3, "global_step": 10, "hyper_parameters": {"lr": 1e-4, "name": "keyframe"},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.1)}},
    }
    torch.save(obj, tmp_path / "last.ckpt")
    assert_same(ckio.read_state_dict(tmp_path / "last.ckpt"), tensors)


def test_prefix_and_model_wrappers(tmp_path):
    tensors = {"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(2)}
    torch.save({f"module.{k}": v for k, v in tensors.items()}, tmp_path / "dp.pt")
    assert_same(ckio.read_state_dict(tmp_path / "dp.pt"), tensors)
    torch.save({"cfg": {"encoder_layers": 2}, "model": tensors}, tmp_path / "wavlm.pt")
    assert_same(ckio.read_state_dict(tmp_path / "wavlm.pt"), tensors)
    # "module." kept when only some keys carry it: it is then a real submodule name.
    mixed = {"module.x": torch.ones(1), "y": torch.ones(1)}
    torch.save(mixed, tmp_path / "mixed.pt")
    assert set(ckio.read_state_dict(tmp_path / "mixed.pt")) == {"module.x", "y"}


def test_unwrap_state_dict_on_numpy_objects():
    sd = {"_forward_module.model.w": np.ones(3, np.float32), "note": "text"}
    out = ckio.unwrap_state_dict({"module": sd, "epoch": 1}, "mem")
    assert list(out) == ["model.w"]
    with pytest.raises(CheckpointError, match="mem: no tensors found"):
        ckio.unwrap_state_dict({"epoch": 1}, "mem")


def test_legacy_non_zip_format(tmp_path):
    base = torch.arange(20, dtype=torch.float32)
    tensors = {"a": base[2:8].view(2, 3), "b": base, "c": torch.randn(3, 2).bfloat16().t(),
               "d": torch.arange(4, dtype=torch.int64)}
    torch.save({"state_dict": tensors, "epoch": 1}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    assert_same(ckio.read_state_dict(tmp_path / "old.pt"), tensors)
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "old_cut.pt").write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match="old_cut.pt.*truncated"):
        ckio.read_state_dict(tmp_path / "old_cut.pt")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "hacked"
    torch.save({"w": torch.ones(2), "payload": Evil(marker)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt needs arbitrary code to load "
                                              r"\(global '(posix|os|nt)\.system'\); refusing"):
        ckio.read_state_dict(tmp_path / "model.pt")
    assert not marker.exists()
    # Stub mode loads the tensors and still never calls the global.
    out = ckio.read_state_dict(tmp_path / "model.pt", stub_unknown_globals=True)
    assert list(out) == ["w"] and not marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="module.pt needs arbitrary code"):
        ckio.read_state_dict(tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="no tensors found.*torch.nn.modules"):
        ckio.read_state_dict(tmp_path / "module.pt", stub_unknown_globals=True)


# --- hand-built archives: pickles torch would never write -----------------------------

def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _ints(values) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def _tensor_pickle(numel: int, offset: int, size, stride) -> bytes:
    """Protocol-2 opcodes for {'w': _rebuild_tensor_v2(<FloatStorage 0>, offset, size, stride)}."""
    storage = (b"(" + _str("storage") + b"ctorch\nFloatStorage\n" + _str("0") + _str("cpu")
               + b"J" + struct.pack("<i", numel) + b"tQ")
    args = (b"(" + storage + b"J" + struct.pack("<i", offset) + _ints(size) + _ints(stride)
            + b"\x89ccollections\nOrderedDict\n)Rt")
    return b"\x80\x02}" + _str("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


def _write_zip(path, pickle_bytes: bytes, storage: bytes | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        if storage is not None:
            zf.writestr("archive/data/0", storage)


def test_hand_built_pickles(tmp_path):
    data = np.arange(8, dtype=np.float32)
    ok = tmp_path / "ok.pt"
    _write_zip(ok, _tensor_pickle(8, 2, [2, 3], [1, 2]), data.tobytes())
    np.testing.assert_array_equal(ckio.read_state_dict(ok)["w"], data[2:].reshape(3, 2).T)

    oob = tmp_path / "oob.pt"  # last element would be index 2 + 1*1 + 2*4 = 11 > 7
    _write_zip(oob, _tensor_pickle(8, 2, [2, 3], [1, 4]), data.tobytes())
    with pytest.raises(CheckpointError, match="oob.pt: tensor view .* reaches outside"):
        ckio.read_state_dict(oob)

    short = tmp_path / "short.pt"
    _write_zip(short, _tensor_pickle(8, 0, [8], [1]), data[:4].tobytes())
    with pytest.raises(CheckpointError, match="short.pt: storage '0' holds 16 bytes"):
        ckio.read_state_dict(short)

    missing = tmp_path / "missing.pt"
    _write_zip(missing, _tensor_pickle(8, 0, [8], [1]))
    with pytest.raises(CheckpointError, match="missing.pt: storage record 'archive/data/0'"):
        ckio.read_state_dict(missing)

    marker = tmp_path / "hacked"
    evil = tmp_path / "evil.pt"
    _write_zip(evil, b"\x80\x02cos\nsystem\n" + _str(f"touch {marker}") + b"\x85R.")
    with pytest.raises(CheckpointError, match=r"evil.pt needs .*global 'os.system'"):
        ckio.read_state_dict(evil)
    assert not marker.exists()
    evil_builtin = tmp_path / "eval.pt"
    _write_zip(evil_builtin, b"\x80\x02cbuiltins\neval\n" + _str("1+1") + b"\x85R.")
    with pytest.raises(CheckpointError, match="global 'builtins.eval'"):
        ckio.read_state_dict(evil_builtin)

    script = tmp_path / "script.pt"
    with warnings.catch_warnings():  # torch.jit.save is deprecated; we only need a sample
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(CheckpointError, match="script.pt: a TorchScript archive"):
        ckio.read_state_dict(script)

    not_torch = tmp_path / "plain.pt"
    with zipfile.ZipFile(not_torch, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="plain.pt: zip archive without"):
        ckio.read_state_dict(not_torch)


def test_corrupted_storage_crc_is_detected(tmp_path):
    path = tmp_path / "crc.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    raw = bytearray(path.read_bytes())
    pos = raw.find(np.arange(64, dtype=np.float32).tobytes())
    raw[pos + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="crc.pt: truncated or corrupt zip"):
        ckio.read_state_dict(path)


def test_bad_inputs_name_file_and_problem(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such file"):
        ckio.read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="folder: is a directory without config.json"):
        ckio.read_state_dict(tmp_path / "folder")
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match="weights.h5: unknown checkpoint extension '.h5'"):
        ckio.read_state_dict(tmp_path / "weights.h5")

    rng = np.random.default_rng(0)
    (tmp_path / "noise.pt").write_bytes(b"\x13" + rng.bytes(999))
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    (tmp_path / "pickly.bin").write_bytes(b"\x80\x02" + rng.bytes(500))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name, problem in [("noise.pt", "not a PyTorch checkpoint"),
                          ("notes.pt", "not a PyTorch checkpoint"),
                          ("pickly.bin", "corrupt or unsupported torch checkpoint"),
                          ("empty.ckpt", "file is empty")]:
        with pytest.raises(CheckpointError, match=f"{name}: {problem}"):
            ckio.read_state_dict(tmp_path / name)

    torch.save(make_tensors(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.pt: truncated or corrupt zip"):
        ckio.read_state_dict(tmp_path / "half.pt")

    ckio.write_safetensors({"w": np.ones((64, 64), np.float32)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(rng.bytes(300))
    for name in ("half.safetensors", "noise.safetensors"):
        with pytest.raises(CheckpointError, match=f"{name}: not a readable safetensors"):
            ckio.read_state_dict(tmp_path / name)

    torch.save({"epoch": 3, "optimizer_states": []}, tmp_path / "nothing.ckpt")
    with pytest.raises(CheckpointError, match="nothing.ckpt: no tensors found"):
        ckio.read_state_dict(tmp_path / "nothing.ckpt")
    ckio.write_safetensors({}, tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="nothing.safetensors: no tensors found"):
        ckio.read_state_dict(tmp_path / "nothing.safetensors")


def test_safetensors_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    sd = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "flag": np.array([True, False]),
        "scalar": np.array(1.25, np.float32),
        "empty": np.zeros((0, 2), np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2],
    }
    path = tmp_path / "out" / "weights.safetensors"
    ckio.write_safetensors(sd, path, metadata={"format": "keyface-jax", "step": "7"})
    back = ckio.read_state_dict(path)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == np.ascontiguousarray(v).tobytes(), k
    assert ckio.read_safetensors_metadata(path) == {"format": "keyface-jax", "step": "7"}
    # Readable by the reference stack too (bf16 included).
    from safetensors.torch import load_file
    assert torch.equal(load_file(path)["bf16"].view(torch.int16),
                       torch.from_numpy(sd["bf16"].view(np.int16)))

    # Overwrite in place; a failed write leaves the old file and no temp files behind.
    ckio.write_safetensors({"x": np.ones(2, np.float32)}, path)
    with pytest.raises(CheckpointError, match="metadata must map str to str"):
        ckio.write_safetensors({"y": np.zeros(1)}, path, metadata={"step": 7})
    assert list(ckio.read_state_dict(path)) == ["x"]
    assert os.listdir(path.parent) == ["weights.safetensors"]


def test_diffusers_folder(tmp_path):
    cfg = {"_class_name": "UNetSpatioTemporalConditionModel", "in_channels": 8}
    rng = np.random.default_rng(2)
    sd = {f"block{i}.weight": rng.standard_normal((3, 3)).astype(np.float32) for i in range(4)}
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(cfg))
    ckio.write_safetensors(sd, unet / "diffusion_pytorch_model.safetensors")
    config, back = ckio.read_diffusers_folder(tmp_path / "model", subfolder="unet")
    assert config == cfg and all(back[k].tobytes() == v.tobytes() for k, v in sd.items())
    assert set(ckio.read_state_dict(unet)) == set(sd)

    # Sharded, written by hand with an index.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(cfg))
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        ckio.write_safetensors({k: sd[k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert set(ckio.read_diffusers_folder(sharded)[1]) == set(sd)
    weight_map["lost.weight"] = name
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"sharded: 1 tensors listed .* \['lost.weight'\]"):
        ckio.read_diffusers_folder(sharded)
    weight_map["lost.weight"] = "../outside.safetensors"
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="bad shard file name '../outside.safetensors'"):
        ckio.read_diffusers_folder(sharded)

    # .bin weights, fp16 variant.
    binned = tmp_path / "binned"
    binned.mkdir()
    (binned / "config.json").write_text(json.dumps(cfg))
    torch.save({k: torch.from_numpy(v).half() for k, v in sd.items()},
               binned / "diffusion_pytorch_model.fp16.bin")
    _, half = ckio.read_diffusers_folder(binned, variant="fp16")
    assert half["block0.weight"].dtype == np.float16
    with pytest.raises(CheckpointError, match="binned: no weights"):
        ckio.read_diffusers_folder(binned)
    with pytest.raises(CheckpointError, match="vae: no such directory"):
        ckio.read_diffusers_folder(tmp_path / "model", subfolder="vae")


def test_real_diffusers_save_pretrained(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=2, norm_num_groups=4,
        layers_per_block=1)
    model.save_pretrained(tmp_path / "vae", max_shard_size="5KB")  # forces sharding
    config, sd = ckio.read_diffusers_folder(tmp_path, subfolder="vae")
    assert config["latent_channels"] == 2
    assert_same(sd, dict(model.state_dict()))


def test_orbax_round_trip_and_shardings(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(3)
    tree = {
        "dense": {"kernel": rng.standard_normal((4, 8)).astype(np.float32),
                  "bias": jnp.asarray(rng.standard_normal(8), jnp.bfloat16)},
        "mask": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "count": np.arange(3, dtype=np.int32),
    }
    path = tmp_path / "ckpt"
    ckio.save_orbax(path, {"dense": {"kernel": np.zeros((1,), np.float32)}})  # overwritten
    ckio.save_orbax(path, tree)
    assert os.listdir(tmp_path) == ["ckpt"]
    back = ckio.restore_orbax(path)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    specs = {"dense": {"kernel": P(None, "x"), "bias": P("x")}, "mask": P(), "count": P()}
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                          sharding=NamedSharding(mesh, s)), tree, specs)
    sharded = ckio.restore_orbax(path, abstract)
    for a, b, want in zip(jax.tree.leaves(tree), jax.tree.leaves(sharded),
                          jax.tree.leaves(abstract)):
        assert b.sharding == want.sharding
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    with pytest.raises(CheckpointError, match="no such orbax checkpoint"):
        ckio.restore_orbax(tmp_path / "absent")


def test_orbax_nnx_state(tmp_path):
    import jax
    from flax import nnx

    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0), param_dtype=jax.numpy.bfloat16)
    state = nnx.state(model)
    ckio.save_orbax(tmp_path / "nnx", state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    back = ckio.restore_orbax(tmp_path / "nnx", abstract)
    assert isinstance(back, nnx.State)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
