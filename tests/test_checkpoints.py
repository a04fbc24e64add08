"""Reference-format KeyFace checkpoints, SVD initialisation, exporters and the convert CLI.

Reference checkpoints are built the way the reference's files are laid out (spec §10): a diffusers
UNet with random weights renamed to sgm keys under `model.diffusion_model.`, the audio projection,
the learned mask, LPIPS extras and the temporal decoder under `first_stage_model.decoder.`.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flax import nnx  # noqa: E402

from configs import interpolation, keyframe  # noqa: E402
from keyface_jax import convert  # noqa: E402
from keyface_jax.conversion import io as ckio  # noqa: E402
from keyface_jax.conversion.diffusers_unet import (diffusers_config_from_unet,  # noqa: E402
                                                   diffusers_unet_state_dict_to_sgm)
from keyface_jax.conversion.diffusers_vae import diffusers_vae_state_dict_to_sgm  # noqa: E402
from keyface_jax.conversion.io import CheckpointError  # noqa: E402
from keyface_jax.conversion.keyface_ckpt import (export_reference_state_dict,  # noqa: E402
                                                 init_from_svd, load_reference_checkpoint)
from keyface_jax.config_lib import autoencoder_config, network_config  # noqa: E402
from keyface_jax.models.autoencoder import AutoencoderKL  # noqa: E402
from keyface_jax.models.keyface import build_network  # noqa: E402
from keyface_jax.testing.torch_reference import randomize_torch_parameters, torch_state_dict_numpy  # noqa: E402
from keyface_jax.testing.vae_parity import make_random_diffusers_vae  # noqa: E402

CONFIGS = {"keyframe": keyframe.get_config("tiny"), "interpolation": interpolation.get_config("tiny")}
LPIPS_KEYS = ("loss_fn.lpips.net.slice1.0.weight", "loss_fn.lpips.lin0.model.1.weight")


def _diffusers_unet(net_cfg, seed, **overrides):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    model = UNetSpatioTemporalConditionModel(**{**diffusers_config_from_unet(net_cfg.unet), **overrides})
    randomize_torch_parameters(model, seed)
    return model.eval()


def _diffusers_vae_config(ae_cfg) -> dict:
    return dict(block_out_channels=tuple(ae_cfg.block_out_channels),
                layers_per_block=ae_cfg.layers_per_block, latent_channels=ae_cfg.latent_channels)


def _abstract(kind, with_encoder=False):
    config = CONFIGS[kind]
    net = nnx.eval_shape(lambda: build_network(network_config(config.model), rngs=nnx.Rngs(0)))
    ae_cfg = autoencoder_config(config.autoencoder, use_encoder=with_encoder)
    return net, nnx.eval_shape(lambda: AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0)))


def reference_state_dict(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict laid out as the reference's `keyframe.pt` / `interpolation.pt` (spec §10)."""
    config = CONFIGS[kind]
    net_cfg = network_config(config.model)
    rng = np.random.default_rng(seed)
    unet = torch_state_dict_numpy(_diffusers_unet(net_cfg, seed))
    sd = {"model.diffusion_model." + k: v
          for k, v in diffusers_unet_state_dict_to_sgm(unet, net_cfg.unet).items()}
    audio = "conditioner.embedders.3.linear." if kind == "keyframe" else "conditioner.embedders.1.linear."
    sd[audio + "weight"] = rng.standard_normal((net_cfg.unet.context_dim, net_cfg.audio_dim), np.float32)
    sd[audio + "bias"] = rng.standard_normal(net_cfg.unet.context_dim, np.float32)
    if kind == "interpolation":
        s = net_cfg.latent_size
        sd["model.learned_mask"] = rng.standard_normal((4, s, s), np.float32)
    else:
        sd.update({k: rng.standard_normal((3, 3), np.float32) for k in LPIPS_KEYS})
    vae_cfg = _diffusers_vae_config(config.autoencoder)
    vae = diffusers_vae_state_dict_to_sgm(torch_state_dict_numpy(make_random_diffusers_vae(vae_cfg, seed)),
                                          vae_cfg)
    # The reference deletes the encoder (it trains on precomputed latents).
    sd.update({"first_stage_model." + k: v for k, v in vae.items() if k.startswith("decoder.")})
    return sd


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request):
    return request.param, reference_state_dict(request.param, seed=len(request.param))


def _write(sd, path, layout):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    if layout == "deepspeed":   # mp_rank_00_model_states.pt
        torch.save({"module": {"_forward_module." + k: v for k, v in tensors.items()},
                    "buffer_names": [], "global_steps": 7}, path)
    elif layout == "lightning":
        torch.save({"state_dict": tensors, "epoch": 3, "optimizer_states": [{"lr": 1e-5}]}, path)
    else:
        ckio.write_safetensors(sd, path)
    return path


def _assert_same(exported: dict, expected: dict):
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), f"{key} differs"


def _without_lpips(sd):
    return {k: v for k, v in sd.items() if not k.startswith("loss_fn.lpips.")}


def _imported(report, net, ae):
    net = nnx.merge(nnx.split(net)[0], report.network)
    ae = nnx.merge(nnx.split(ae)[0], report.autoencoder)
    return net, ae


@pytest.mark.parametrize("layout,suffix", [("deepspeed", ".pt"), ("lightning", ".ckpt"),
                                           ("safetensors", ".safetensors")])
def test_reference_import_is_exact_for_every_layout(reference, tmp_path, layout, suffix):
    kind, sd = reference
    path = _write(sd, tmp_path / f"{kind}{suffix}", layout)
    net, ae = _abstract(kind)
    report = load_reference_checkpoint(path, net, ae)
    assert report.ignored == sorted(k for k in sd if k.startswith("loss_fn.lpips."))
    # Every parameter filled with the file's bits, and the export gives back the file minus extras.
    _assert_same(export_reference_state_dict(*_imported(report, net, ae)), _without_lpips(sd))


def test_reference_import_without_autoencoder_lists_skipped_keys(reference):
    kind, sd = reference
    net, _ = _abstract(kind)
    report = load_reference_checkpoint(sd, net)
    assert report.autoencoder is None
    assert any(k.startswith("first_stage_model.decoder.") for k in report.ignored)
    # The decoder also loads on its own (a VideoDecoder target).
    _, ae = _abstract(kind)
    decoder_only = load_reference_checkpoint(sd, net, ae.decoder)
    assert decoder_only.autoencoder is not None


def test_reference_import_errors_name_the_problem(reference, tmp_path):
    kind, sd = reference
    net, ae = _abstract(kind)
    unet_key = "model.diffusion_model.out.2.weight"

    missing = {k: v for k, v in sd.items() if k != unet_key}
    with pytest.raises(CheckpointError, match=r"(?s)<state dict>: network weights.*missing.*out\.2\.weight"):
        load_reference_checkpoint(missing, net, ae)

    extra = dict(sd, **{"model.diffusion_model.extra_block.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"(?s)unexpected.*extra_block\.weight"):
        load_reference_checkpoint(extra, net, ae)

    stray = dict(sd, **{"cond_stage_model.proj": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"(?s)1 keys belong to no part.*cond_stage_model\.proj"):
        load_reference_checkpoint(stray, net, ae)

    wrong = dict(sd)
    wrong[unet_key] = np.zeros((4, 16, 3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"(?s)out\.2\.weight.*\(4, 16, 3, 3\)"):
        load_reference_checkpoint(wrong, net, ae)

    # The other stage's network: its condition widths and input channels differ.
    other = "interpolation" if kind == "keyframe" else "keyframe"
    other_net, _ = _abstract(other)
    with pytest.raises(CheckpointError, match=r"do not fit the configured model|belong to no part"):
        load_reference_checkpoint(sd, other_net, ae)

    with pytest.raises(CheckpointError, match=r"nowhere\.pt: no such file"):
        load_reference_checkpoint(tmp_path / "nowhere.pt", net, ae)
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt"):
        load_reference_checkpoint(text, net, ae)
    truncated = tmp_path / "truncated.pt"
    _write(sd, truncated, "deepspeed")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        load_reference_checkpoint(truncated, net, ae)


def test_safetensors_and_orbax_round_trips_are_bit_exact(reference, tmp_path):
    kind, sd = reference
    net, ae = _abstract(kind)
    net, ae = _imported(load_reference_checkpoint(sd, net, ae), net, ae)
    exported = export_reference_state_dict(net, ae)

    ckio.write_safetensors(exported, tmp_path / "out.safetensors")
    fresh_net, fresh_ae = _abstract(kind)
    again = load_reference_checkpoint(tmp_path / "out.safetensors", fresh_net, fresh_ae)
    _assert_same(export_reference_state_dict(*_imported(again, fresh_net, fresh_ae)), exported)

    tree = {"network": nnx.state(net, nnx.Param).to_pure_dict(),
            "autoencoder": nnx.state(ae, nnx.Param).to_pure_dict()}
    ckio.save_orbax(tmp_path / "orbax", tree)
    restored = ckio.restore_orbax(tmp_path / "orbax")
    fresh_net, fresh_ae = _abstract(kind)
    for module, part in ((fresh_net, "network"), (fresh_ae, "autoencoder")):
        state = nnx.state(module, nnx.Param)
        state.replace_by_pure_dict(restored[part])
        nnx.update(module, state)
    _assert_same(export_reference_state_dict(fresh_net, fresh_ae), exported)


def _save_svd_folder(root, kind, seed):
    """A diffusers SVD pipeline folder (unet/ and vae/) for the tiny sizes: 8 input channels and the
    3 × addition_time_embed_dim label input of SVD's fps / motion-bucket / noise-aug ids."""
    config = CONFIGS[kind]
    net_cfg = network_config(config.model)
    unet = _diffusers_unet(net_cfg, seed, in_channels=8, addition_time_embed_dim=16,
                           projection_class_embeddings_input_dim=48)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae = make_random_diffusers_vae(_diffusers_vae_config(config.autoencoder), seed)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return unet, vae


@pytest.mark.parametrize("kind", ["interpolation", "keyframe"])
def test_init_from_svd_diffusers_folder(tmp_path, kind):
    config = CONFIGS[kind]
    net_cfg = network_config(config.model)
    unet, vae = _save_svd_folder(tmp_path / "svd", kind, seed=5)
    net = build_network(net_cfg, rngs=nnx.Rngs(0))
    ae = AutoencoderKL(autoencoder_config(config.autoencoder), rngs=nnx.Rngs(0))
    before = export_reference_state_dict(net)

    report = init_from_svd(net, tmp_path / "svd", ae)

    fresh = ["audio_proj.bias", "audio_proj.weight", "diffusion_model.label_emb.0.0.weight"]
    if kind == "interpolation":  # 9 input channels: the SVD first conv does not fit
        fresh += ["diffusion_model.input_blocks.0.0.weight", "learned_mask"]
    assert report.kept_initialisation == sorted(fresh)
    after = export_reference_state_dict(net, ae)
    svd = {"model.diffusion_model." + k: v for k, v in
           diffusers_unet_state_dict_to_sgm(torch_state_dict_numpy(unet), net_cfg.unet).items()}
    vae_cfg = _diffusers_vae_config(config.autoencoder)
    svd.update({"first_stage_model." + k: v for k, v in
                diffusers_vae_state_dict_to_sgm(torch_state_dict_numpy(vae), vae_cfg).items()})
    kept_reference_names = {k for k in before if not k.startswith("model.diffusion_model.")}
    kept_reference_names.add("model.diffusion_model.label_emb.0.0.weight")
    if kind == "interpolation":
        kept_reference_names.add("model.diffusion_model.input_blocks.0.0.weight")
    for key, value in after.items():
        expected = before[key] if key in kept_reference_names else svd[key]
        assert value.tobytes() == expected.tobytes(), key

    # A folder without unet/ is not an SVD checkpoint.
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        init_from_svd(net, tmp_path / "empty", ae)


def test_convert_cli_reference_to_safetensors_orbax_and_back(reference, tmp_path, capsys):
    kind, sd = reference
    cfg = f"configs/{kind}.py:tiny"
    source = _write(sd, tmp_path / "ref.pt", "deepspeed")
    assert convert.main(["--config", cfg, "--source", "reference", "--input", str(source),
                         "--output", str(tmp_path / "a.safetensors")]) == 0
    assert ckio.read_safetensors_metadata(tmp_path / "a.safetensors")["kind"] == kind
    _assert_same(ckio.read_state_dict(tmp_path / "a.safetensors"), _without_lpips(sd))

    assert convert.main(["--config", cfg, "--source", "reference", "--input",
                         str(tmp_path / "a.safetensors"), "--output", str(tmp_path / "orbax")]) == 0
    assert convert.main(["--config", cfg, "--source", "orbax", "--input", str(tmp_path / "orbax"),
                         "--output", str(tmp_path / "b.safetensors")]) == 0
    _assert_same(ckio.read_state_dict(tmp_path / "b.safetensors"), _without_lpips(sd))
    out = capsys.readouterr().out
    assert f"kind: {kind}" in out and "network_params:" in out
    other = "interpolation" if kind == "keyframe" else "keyframe"
    assert convert.main(["--config", f"configs/{other}.py:tiny", "--source", "orbax", "--input",
                         str(tmp_path / "orbax"), "--output", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the 'network' item does not fit the configured model" in err and "shape mismatches" in err

    assert convert.main(["--config", cfg, "--source", "reference", "--input",
                         str(tmp_path / "missing.pt"), "--output", str(tmp_path / "c.safetensors")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c.safetensors")


def test_convert_cli_from_svd_folder(tmp_path, capsys):
    _save_svd_folder(tmp_path / "svd", "interpolation", seed=2)
    assert convert.main(["--config", "configs/interpolation.py:tiny", "--source", "svd",
                         "--input", str(tmp_path / "svd"), "--output", str(tmp_path / "init")]) == 0
    restored = ckio.restore_orbax(tmp_path / "init")
    assert set(restored) == {"network", "autoencoder"}
    assert "encoder" in restored["autoencoder"]
    assert "kept_initialisation" in capsys.readouterr().out
    json.dumps(ckio.read_diffusers_folder(tmp_path / "svd", "unet")[0])  # the folder stays readable
