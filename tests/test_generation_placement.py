"""Generation's weight layout (issue 13, point 3): FSDP-sharded network weights on a mesh sample what
replicated ones do; bfloat16 weights (the compute dtype of `full`) halve their bytes and stay close."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keyface_jax.generation.inputs import ClipRequest
from keyface_jax.generation.pipeline import GenerationOptions
from keyface_jax.generation.placement import parse_mesh
from keyface_jax.generation.runner import ModelSources, Setup
from keyface_jax.testing.media import write_face, write_speech

OPTIONS = GenerationOptions(keyframe_batch=4, interpolation_batch=4, decode_batch=4)


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory):
    """{layout: (setup, keyframe latents of one 1.2-s clip)} for three weight layouts."""
    root = tmp_path_factory.mktemp("placement")
    request = ClipRequest(name="a", face=write_face(root / "face.png"),
                          audio=write_speech(root / "a.wav", 1.2), output=str(root / "a.mp4"))
    out = {}
    for name, extra in (("replicated", {}), ("fsdp", dict(mesh="data=1,fsdp=4")),
                        ("fsdp_bf16", dict(mesh="data=1,fsdp=4", dtype="bfloat16"))):
        setup = Setup(ModelSources(interpolation_bad="none", **extra), OPTIONS)
        clip = setup.load(request)
        gen = setup.generator
        out[name] = setup, gen.sample_keyframes([clip], gen.encode_identities([clip]), progress=False)[0]
    return out


def test_fsdp_sharded_weights_sample_like_replicated(keyframes):
    (rep_setup, rep), (fsdp_setup, fsdp) = keyframes["replicated"], keyframes["fsdp"]
    np.testing.assert_allclose(fsdp, rep, rtol=1e-4, atol=1e-4 * float(np.abs(rep).max()))
    sharded = fsdp_setup.generator.weight_bytes_per_device()
    replicated = rep_setup.generator.weight_bytes_per_device()
    # tiny: arrays under sharding.MIN_SHARDED_BYTES stay whole; full: > 99 % of the bytes shard
    assert sharded["keyframe"] < 0.6 * replicated["keyframe"], (sharded, replicated)
    assert sharded["autoencoder"] == replicated["autoencoder"]      # the decoder stays replicated
    largest = max(jax.tree.leaves(fsdp_setup.generator.keyframe.state), key=lambda leaf: leaf.size)
    assert not largest.sharding.is_fully_replicated, largest.sharding


def test_bfloat16_weights_halve_the_bytes_and_stay_close(keyframes):
    (setup, ours), (_, ref) = keyframes["fsdp_bf16"], keyframes["fsdp"]
    leaves = jax.tree.leaves(setup.generator.keyframe.state)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating))
    assert setup.generator.weight_bytes_per_device()["keyframe"] <= \
        0.51 * keyframes["fsdp"][0].generator.weight_bytes_per_device()["keyframe"]
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.1


def test_mesh_flag_errors():
    assert parse_mesh("") == {"data": -1}
    assert parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("fsdp")
    with pytest.raises(ValueError, match="--mesh"):
        Setup(ModelSources(interpolation_bad="none", mesh="data=3"), OPTIONS)
