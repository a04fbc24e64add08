"""Logical axis names on every parameter, FSDP shardings on a forced 4-device CPU mesh, and errors
for meshes a model cannot shard on."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from configs import interpolation, keyframe
from keyface_jax.config_lib import network_config
from keyface_jax.models.build import abstract_network
from keyface_jax.sharding import make_mesh, param_shardings
from tests.helpers import call, network_inputs, tiny_network

FULL = {kind: network_config(module.get_config("full").model)
        for kind, module in (("keyframe", keyframe), ("interpolation", interpolation))}


def _param_state(config):
    return nnx.state(abstract_network(config), nnx.Param)


@pytest.mark.parametrize("kind", sorted(FULL))
def test_full_model_shards_over_fsdp(kind):
    assert len(jax.devices()) >= 4, "conftest forces 4 host devices"
    state = _param_state(FULL[kind])
    shardings = param_shardings(state, make_mesh({"fsdp": 4}))
    total = sharded = 0
    for (_, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        nbytes = int(np.prod(var.shape)) * 4
        total += nbytes
        if any(axis is not None for axis in sharding.get_value().spec):
            sharded += nbytes
    # FSDP: nearly every byte of the 1.5 B parameters is split over the 4 devices.
    assert sharded / total > 0.99, f"only {sharded / total:.1%} of parameter bytes are sharded"


def test_mesh_that_does_not_divide_names_the_parameter():
    mesh = make_mesh({"fsdp": 3}, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match=r"parameter diffusion_model\.\S+ \(.*\): dimension \d+ does "
                                         r"not divide over mesh axes \('fsdp',\) of size 3"):
        param_shardings(_param_state(FULL["keyframe"]), mesh)


def test_make_mesh_shapes_and_errors():
    assert dict(make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 8 devices, 4 are present"):
        make_mesh({"fsdp": 8})
    with pytest.raises(ValueError, match="do not divide by 3"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="only one axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})


def test_parameter_without_logical_names_is_an_error():
    state = nnx.State({"w": nnx.Param(jax.ShapeDtypeStruct((8, 8), np.float32))})
    with pytest.raises(ValueError, match=r"parameter w \(8, 8\) has no logical axis names"):
        param_shardings(state, make_mesh({"fsdp": 4}))


def test_sharded_forward_matches_single_device():
    net, config = tiny_network("keyframe", seed=4)
    inputs = network_inputs(config, batch=4, frames=3)
    expected = np.asarray(call(net, inputs))

    mesh = make_mesh({"data": 2, "fsdp": 2})
    graphdef, state = nnx.split(net)
    # min_bytes=0 shards even the tiny model's small weights, so the test exercises FSDP gathers.
    shardings = param_shardings(nnx.state(net, nnx.Param), mesh, min_bytes=0)
    state = jax.device_put(state, shardings)
    assert any(len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(state))
    batch_sharding = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    inputs = jax.device_put(inputs, batch_sharding)
    got = np.asarray(call(nnx.merge(graphdef, state), inputs))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
