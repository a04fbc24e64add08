"""jax.export of the generation pipeline's jitted pieces, for serving without the model code.

Each artifact is a serialized `jax.export.Exported` (StableHLO + calling convention) of a pure
function of plain arrays: weights as a nested dict (the NNX module paths), conditions, raw uint32
PRNG key data [B, 2] (one key per item), the σ schedule and the guidance scales. A server loads it
with `jax.export.deserialize(bytes).call(...)` and needs only jax. Batch sizes are those of the
generator (fixed shapes, as the pipeline uses them); shapes are listed in manifest.json.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keyface_jax.generation.decoding import decode_segments
from keyface_jax.generation.plan import SLOTS
from keyface_jax.sampling import guided
from keyface_jax.sampling.euler import initial_noise, sample
from keyface_jax.sampling.sampler import latent_shape, pin_endpoints, share_audio_projection
from keyface_jax.sampling.schedules import ays_sigmas
from keyface_jax.models.autoencoder import to_diffusion_space
from keyface_jax.paths import as_path, write_bytes, write_json


def _string_keys(tree):
    """jax.export serializes dicts with string keys only: list indices of NNX paths become "0"."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _module_keys(tree):
    if isinstance(tree, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _module_keys(v)
                for k, v in tree.items()}
    return tree


def _state_from(graphdef, template: nnx.State, params: dict) -> nnx.Module:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, _module_keys(params))
    return nnx.merge(graphdef, state)


def keyframe_sampler_fn(graphdef, template):
    def fn(params, conditions, key_data, sigmas, audio_scale, ref_scale):
        net = _state_from(graphdef, template, params)
        keys = jax.random.wrap_key_data(key_data)
        denoise_fn = guided.keyframe_cfg_denoiser(net, conditions, audio_scale, ref_scale)
        return sample(denoise_fn, initial_noise(keys, latent_shape(conditions)), sigmas)
    return fn


def interpolation_sampler_fn(graphdef, template, pin: bool):
    def fn(good_params, bad_params, conditions, key_data, sigmas, scale):
        good = _state_from(graphdef, template, good_params)
        bad = _state_from(graphdef, template, bad_params)
        keys = jax.random.wrap_key_data(key_data)
        denoise_fn = guided.autoguidance_denoiser(good, bad, conditions, scale)
        if pin:
            denoise_fn = pin_endpoints(denoise_fn, to_diffusion_space(conditions["first"]),
                                       to_diffusion_space(conditions["last"]))
        return sample(denoise_fn, initial_noise(keys, latent_shape(conditions)), sigmas)
    return fn


def decoder_fn(graphdef, template, decode_frames: int):
    def fn(params, z):
        return decode_segments(_state_from(graphdef, template, params), z, decode_frames)
    return fn


def _spec(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _write(folder, name: str, fn, *example_args) -> dict:
    exported = jax.export.export(jax.jit(fn))(*[_spec(a) for a in example_args])
    path = as_path(folder) / f"{name}.jax_exported"
    write_bytes(path, bytes(exported.serialize()))
    shapes = lambda avals: [list(a.shape) for a in avals]
    return dict(file=path.name, inputs=shapes(exported.in_avals),
                outputs=shapes(exported.out_avals))


def _pure(state: nnx.State) -> dict:
    return _string_keys(jax.tree.map(np.asarray, state.to_pure_dict()))


def export_pipeline(generator, folder) -> dict:
    """Writes keyframe_sampler / interpolation_sampler / decoder .jax_exported files and their
    weights (weights.npz per network, flattened paths) plus manifest.json; returns the manifest."""
    if generator.keyframe_bad is not None:   # before writing anything
        raise ValueError("export: the exported keyframe sampler has no keyframe autoguidance; "
                         "export with --keyframe_bad none")
    as_path(folder).mkdir(parents=True, exist_ok=True)
    g = generator
    h, w, c = g.latent_shape
    steps = len(ays_sigmas(g.options.num_steps))
    kf_batch, ip_batch, dec_batch = g.sizes["keyframe"], g.sizes["interpolation"], g.sizes["decode"]
    audio_dim = g.keyframe.state["audio_proj"]["kernel"].shape[0]
    key_data = np.zeros((kf_batch, 2), np.uint32)
    kf_conditions = dict(identity=np.zeros((kf_batch, h, w, c), np.float32),
                         audio=np.zeros((kf_batch, SLOTS, 2, audio_dim), np.float32),
                         valence=np.zeros((kf_batch, SLOTS), np.float32),
                         arousal=np.zeros((kf_batch, SLOTS), np.float32))
    ip_conditions = dict(first=np.zeros((ip_batch, h, w, c), np.float32),
                         last=np.zeros((ip_batch, h, w, c), np.float32),
                         audio=np.zeros((ip_batch, SLOTS, 2, audio_dim), np.float32))
    sigmas, scalar = np.zeros((steps,), np.float32), np.float32(1)
    good = _pure(g.good.state)
    bad = _pure(share_audio_projection(g.bad.state, g.good.state)) if g.bad is not None else good
    manifest = dict(
        latent_shape=[h, w, c], num_steps=g.options.num_steps, sigmas=np.asarray(
            ays_sigmas(g.options.num_steps)).tolist(),
        keyframe_sampler=_write(folder, "keyframe_sampler",
                                keyframe_sampler_fn(g.keyframe.graphdef, g.keyframe.state),
                                _pure(g.keyframe.state), kf_conditions, key_data, sigmas, scalar, scalar),
        interpolation_sampler=_write(folder, "interpolation_sampler",
                                     interpolation_sampler_fn(g.good.graphdef, g.good.state,
                                                              g.options.pin_boundaries),
                                     good, bad, ip_conditions, np.zeros((ip_batch, 2), np.uint32),
                                     sigmas, scalar),
        decoder=_write(folder, "decoder", decoder_fn(g.autoencoder.graphdef, g.autoencoder.state,
                                                     g.options.decode_frames),
                       _pure(g.autoencoder.state), np.zeros((dec_batch, SLOTS, h, w, c), np.float32)))
    weights = dict(keyframe=_pure(g.keyframe.state), interpolation=good, interpolation_bad=bad,
                   autoencoder=_pure(g.autoencoder.state))
    for name, tree in weights.items():
        flat = {"/".join(str(k.key) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        write_bytes(as_path(folder) / f"{name}_weights.npz", buffer.getvalue())
    write_json(as_path(folder) / "manifest.json", manifest, indent=1)
    return manifest


def load_weights(path: str) -> dict:
    """A *_weights.npz back to the nested dict the exported functions take."""
    out: dict = {}
    with np.load(io.BytesIO(as_path(path).read_bytes())) as data:
        for name in data.files:
            node = out
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = data[name]
    return out
