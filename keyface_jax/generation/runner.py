"""Python API: build a Generator from configs + weights, and run requests (one clip or a manifest)
with per-clip errors, resume and a summary."""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from flax import nnx

from keyface_jax.audio import get_extractor
from keyface_jax.config_lib import autoencoder_config, dtypes, load_config, network_config
from keyface_jax.generation.inputs import ClipError, ClipRequest, load_clip
from keyface_jax.generation.manifest import Summary
from keyface_jax.generation.placement import generation_mesh
from keyface_jax.generation.pipeline import GenerationOptions, Generator, Network, partial_path
from keyface_jax.media.face_crop import make_detector
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.keyface import build_network
from keyface_jax.paths import as_path
from keyface_jax.sharding import rules_from_config
from keyface_jax.training.run_checkpoints import run_steps
from keyface_jax.training.weight_sources import WeightSource, autoencoder_state, network_state

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSources:
    keyframe_config: str = "configs/keyframe.py:tiny"
    interpolation_config: str = "configs/interpolation.py:tiny"
    keyframe: str = "random"              # a weight source: run folder[@step], Orbax export,
    #                                       reference checkpoint, random, or KIND:PATH
    interpolation: str = "random"
    interpolation_bad: str = "auto"       # auto | none | fraction:F | step:N | a weights source
    keyframe_bad: str = "none"            # the same for keyframe autoguidance (KeyFace: none)
    autoencoder: str = "random"           # Orbax export / autoencoder run | random
    audio_features: str = ""              # extractor spec; default logmel:<audio_dim>
    interpolation_audio_features: str = ""  # default: the keyframe stage's
    detector: str = "centre"              # centre | haar
    use_ema: bool = True
    weights_seed: int = 0                 # for "random" weights
    dtype: str = ""                       # networks' compute and weight dtype ("": the configs')
    mesh: str = ""                        # e.g. data=1,fsdp=-1 ("": clips over all devices)


# The weaker network of autoguidance (Karras et al. 2024): the same interpolation run, a third of
# the way through training. A later checkpoint differs too little from the main network to guide;
# the step-1 checkpoint the trainer always writes is untrained noise (see the demo figures in
# README "The demo run").
AUTOGUIDANCE_BAD_FRACTION = 1 / 3


def bad_checkpoint(steps: list[int], fraction: float) -> int | None:
    """The kept checkpoint nearest `fraction` of the last one, if within ±50 % of that target
    (and never the last itself); None when the run kept none near it."""
    if not steps or not 0 < fraction < 1:
        return None
    last = max(steps)
    target = fraction * last
    candidates = [s for s in steps if s < last]
    if not candidates:
        return None
    best = min(candidates, key=lambda s: (abs(s - target), s))
    return best if abs(best - target) <= 0.5 * target else None


def bad_source(spec: str, main_source: str) -> str | None:
    """The weaker network of `main_source` (a weights source) named by `spec`: `none`; `auto` (=
    `fraction:1/3`, see AUTOGUIDANCE_BAD_FRACTION); `fraction:F`: the main run's kept checkpoint
    nearest F × its last step; `step:N`: that step of the run; or any other weights source."""
    if spec == "none":
        return None
    if spec == "auto":
        spec = f"fraction:{AUTOGUIDANCE_BAD_FRACTION}"
    kind, _, value = spec.partition(":")
    main = WeightSource.parse(main_source)
    if kind == "step":
        return f"run:{main.path}@{int(value)}"
    if kind != "fraction":
        return spec
    steps = run_steps(main.path) if main.kind == "run" else []
    step = bad_checkpoint(steps, float(value))
    if step is None:
        log.warning("%s: no kept checkpoint near %s of training (have %s): its autoguidance is "
                    "off; pass a weaker network (--interpolation_bad / --keyframe_bad)",
                    main_source, value, steps)
        return None
    log.info("autoguidance: weaker network = %s step %d (%.2f of %d steps)", main.path,
             step, step / max(steps), max(steps))
    return f"run:{main.path}@{step}"


def load_network(config, spec: str, *, seed: int = 0, use_ema: bool = True, dtype=None) -> Network:
    """The network `config.model` describes, with the weights of source `spec` (float32 on the
    host; `dtype` is the compute dtype its graphdef carries)."""
    net_cfg = network_config(config.model)
    if spec == "random":
        return Network(*nnx.split(build_network(net_cfg, rngs=nnx.Rngs(seed), dtype=dtype)))
    abstract = nnx.eval_shape(lambda: build_network(net_cfg, rngs=nnx.Rngs(0), dtype=dtype))
    state = network_state(WeightSource.parse(spec), net_cfg, abstract, seed=seed, use_ema=use_ema)
    return Network(nnx.split(abstract)[0], state)


def load_autoencoder(ae_section, spec: str, *, seed: int = 0) -> AutoencoderKL:
    """The autoencoder (encoder for the identity frame, temporal decoder for the output)."""
    cfg = autoencoder_config(ae_section)
    if spec == "random":
        return AutoencoderKL(cfg, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.split(abstract)[0], autoencoder_state(WeightSource.parse(spec), abstract))


class Setup:
    """Configs, networks, autoencoder and audio extractors, loaded once."""

    def __init__(self, sources: ModelSources, options: GenerationOptions = GenerationOptions()):
        self.sources = sources
        self.kf_config = load_config(sources.keyframe_config)
        self.ip_config = load_config(sources.interpolation_config)
        kf_model, ip_model = self.kf_config.model, self.ip_config.model
        if kf_model.latent_size != ip_model.latent_size or kf_model.audio_dim != ip_model.audio_dim:
            raise ValueError(f"{sources.keyframe_config} and {sources.interpolation_config} disagree on "
                             "latent_size / audio_dim")
        self.image_size = 8 * kf_model.latent_size
        self.audio_dim = kf_model.audio_dim
        # Sampling keeps no fp32 master copy: the weights are stored in the compute dtype.
        self.dtype = dtypes(dict(dtype=sources.dtype) if sources.dtype else kf_model)[0]
        load = lambda cfg, src, seed: load_network(cfg, src, seed=seed, use_ema=sources.use_ema,
                                                   dtype=self.dtype)
        keyframe = load(self.kf_config, sources.keyframe, sources.weights_seed)
        interpolation = load(self.ip_config, sources.interpolation, sources.weights_seed + 1)
        bad = bad_source(sources.interpolation_bad, sources.interpolation)
        self.bad_description = bad
        bad_net = load(self.ip_config, bad, sources.weights_seed + 2) if bad else None
        kf_bad = bad_source(sources.keyframe_bad, sources.keyframe)
        self.keyframe_bad_description = kf_bad
        kf_bad_net = load(self.kf_config, kf_bad, sources.weights_seed + 3) if kf_bad else None
        autoencoder = load_autoencoder(self.kf_config.autoencoder, sources.autoencoder,
                                       seed=sources.weights_seed)
        self.generator = Generator(keyframe, interpolation, autoencoder, bad_net, options,
                                   generation_mesh(sources.mesh), dtype=self.dtype,
                                   rules=rules_from_config(self.kf_config.mesh), keyframe_bad=kf_bad_net)
        spec = sources.audio_features or f"logmel:{self.audio_dim}"
        self.keyframe_features = get_extractor(spec)
        ip_spec = sources.interpolation_audio_features or spec
        self.interpolation_features = self.keyframe_features if ip_spec == spec else get_extractor(ip_spec)
        self.detector = make_detector(sources.detector)

    def load(self, request: ClipRequest):
        return load_clip(request, image_size=self.image_size, audio_dim=self.audio_dim,
                         keyframe_features=self.keyframe_features,
                         interpolation_features=self.interpolation_features, detector=self.detector)


def run(setup: Setup, requests: Sequence[ClipRequest], summary_path: str, *,
        clips_per_group: int = 16, progress: bool = True) -> Summary:
    """Generates every request whose output does not exist yet, `clips_per_group` clips per
    batched pass (bounds the memory held by decoded inputs). Bad clips are recorded and skipped."""
    summary = Summary(summary_path)
    todo = []
    for request in requests:
        if as_path(request.output).is_file():
            summary.record(request.name, status="done", output=request.output, note="existing output kept")
            continue
        if as_path(partial_path(request.output)).exists():
            as_path(partial_path(request.output)).unlink()   # an interrupted earlier run
        todo.append(request)
    for start in range(0, len(todo), clips_per_group):
        group, clips = todo[start:start + clips_per_group], []
        for request in group:
            try:
                clips.append(setup.load(request))
            except ClipError as e:
                log.error("%s: %s", request.name, e)
                summary.record(request.name, status="error", error=str(e))
        if not clips:
            continue
        done = lambda c, result: summary.record(result["name"], status="done", **{
            k: v for k, v in result.items() if k != "name"})
        setup.generator.generate(clips, [c.request.output for c in clips], on_done=done,
                                 progress=progress)
    return summary
