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
from tests.helpers import call, network_inputs, tiny_config, tiny_network

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
    assert dict(make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 2, "context": 1,
                                                       "tensor": 1}
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


# ----------------------------------------------------------------------------- mesh and rules


def test_make_mesh_axes_context_and_dcn():
    mesh = make_mesh({"fsdp": -1, "context": 2})
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 2, "tensor": 1}
    # Device order of a CPU mesh is jax.devices() order (processes stay contiguous).
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    # Two "slices" need devices from two slices (or processes): one CPU process has one.
    with pytest.raises(ValueError, match=r"dcn .*'data': 2.*the devices' processes do not form"):
        make_mesh({"fsdp": -1, "dcn": {"data": 2}})
    with pytest.raises(ValueError, match="do not split into 3 slices"):
        make_mesh({"fsdp": -1, "dcn": {"data": 3}})


def test_rules_come_from_the_config_and_override_per_entry():
    from configs import common
    from keyface_jax.sharding import DEFAULT_RULES, logical_to_spec, parse_rules, rules_from_config

    config = keyframe.get_config("tiny")
    assert dict(rules_from_config(config.mesh)) == dict(DEFAULT_RULES) == \
        dict(parse_rules(common.LOGICAL_AXIS_RULES))
    config.mesh.rules.embed = "fsdp,context"
    config.mesh.rules.mlp = ""
    rules = rules_from_config(config.mesh)
    assert logical_to_spec(("embed", "mlp"), rules) == PartitionSpec(("fsdp", "context"), None)
    assert logical_to_spec(("act_batch", "act_tokens", "act_heads"), rules) == \
        PartitionSpec(("data", "fsdp"), "context", "tensor")
    config.mesh.rules.heads = "model"
    with pytest.raises(ValueError, match=r"config.mesh.rules: .*'heads' → 'model': unknown mesh axes"):
        rules_from_config(config.mesh)


def test_heads_that_do_not_split_over_tensor_name_the_layer():
    # The tiny keyframe network has 1 head at level 0: 32 channels would split over tensor=2,
    # the head would not.
    mesh = make_mesh({"tensor": 2, "fsdp": 2})
    state = nnx.state(abstract_network(tiny_config("keyframe")), nnx.Param)
    with pytest.raises(ValueError, match=r"parameter diffusion_model\.input_blocks\.1\.1\.\S+\."
                                         r"attn\d\.to_\w+\.kernel \(32, 32\): its "
                                         r"layer's 1 attention heads do not split over mesh axes "
                                         r"\('tensor',\) of size 2"):
        param_shardings(state, mesh)
    from keyface_jax.activation_sharding import activation_sharding
    from keyface_jax.models.attention import CrossAttention
    layer = CrossAttention(8, 1, 8, rngs=nnx.Rngs(0))
    with activation_sharding(mesh), pytest.raises(ValueError, match=r"CrossAttention \(1 heads × 8\)"):
        jax.eval_shape(layer, jax.ShapeDtypeStruct((2, 4, 8), np.float32))


# ----------------------------------------------------------------------------- tensor / context
# parallelism: the sharded forward pass and train step equal the single-device ones.

# tiny with even head counts, transformers at level 1 and in the middle only (half the compile
# time; level 0 still has row-split convolutions, the resamplers sit between the levels)
PARALLEL_UNET = dict(num_heads=(2, 2), mid_num_heads=2, down_attention=(False, True),
                     up_attention=(False, True))


@pytest.fixture(scope="module")
def parallel_setup():
    from configs import keyframe as kf
    from keyface_jax.config_lib import network_config
    model = kf.get_config("tiny").model
    model.unet.update(PARALLEL_UNET)
    config = network_config(model)
    net, _ = tiny_network("keyframe", seed=4, config=config)
    inputs = network_inputs(config, batch=2, frames=3)
    return config, net, inputs, np.asarray(call(net, inputs))


def _sharded(mesh, tree, shardings=None):
    batch = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return jax.device_put(tree, shardings if shardings is not None else batch)


@pytest.mark.parametrize("shape", [{"tensor": 2, "fsdp": 2}, {"context": 2, "fsdp": 2}])
def test_tensor_and_context_parallel_forward_matches_single_device(parallel_setup, shape):
    from keyface_jax.activation_sharding import activation_sharding
    _, net, inputs, expected = parallel_setup
    mesh = make_mesh(shape)
    graphdef, state = nnx.split(net)
    state = _sharded(mesh, state, param_shardings(nnx.state(net, nnx.Param), mesh, min_bytes=0))
    with activation_sharding(mesh):
        got = np.asarray(call(nnx.merge(graphdef, state), _sharded(mesh, inputs)))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_tensor_and_context_parallel_train_step_matches_single_device(parallel_setup):
    """One train step (the trainer's step function; SGD with lr 1, so the new parameters are the
    old ones minus the gradients: AdamW's first step would amplify rounding into ±lr) on a
    tensor=2 × context=2 mesh, activations constrained, equals the single-device step."""
    import optax

    from configs import keyframe as kf
    from keyface_jax.activation_sharding import activation_sharding
    from keyface_jax.train import objective_config
    from keyface_jax.data.synthetic_batches import SyntheticBatches
    from keyface_jax.training.state import init_train_state, state_shardings
    from keyface_jax.training.trainable import split_network
    from keyface_jax.training.step import make_train_step

    config, net, _, _ = parallel_setup
    run_cfg = kf.get_config("tiny")
    graphdef, trainable, frozen = split_network(net, run_cfg.trainable)
    tx = optax.sgd(1.0)
    state = init_train_state(trainable, frozen, tx, seed=0, ema=False)
    batch = {k: jax.numpy.asarray(v) for k, v in SyntheticBatches(config, 2, 3, 0).global_batch_at(0).items()}
    step = make_train_step(graphdef, objective_config(run_cfg), tx, lambda s: 1.0)
    expected_state, expected = jax.jit(step)(state, batch, {})

    mesh = make_mesh({"context": 2, "tensor": 2})
    shardings = state_shardings(jax.eval_shape(lambda: state), tx, mesh, min_bytes=0)
    with activation_sharding(mesh):
        new_state, metrics = jax.jit(step)(_sharded(mesh, state, shardings), _sharded(mesh, batch), {})
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(new_state.params))
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected_state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))
