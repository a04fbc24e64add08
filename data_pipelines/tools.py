"""Builds the processing tools (VAE encoder, audio extractor, emotion source, face detector)
from PrepareOptions: once in the main process, or once per worker process."""

from __future__ import annotations

from data_pipelines.emotions import make_emotion_source
from data_pipelines.latents import LatentEncoder, load_encoder, random_encoder
from data_pipelines.video_arrays import PrepareOptions, Tools
from keyface_jax.media.face_crop import make_detector
from keyface_jax.models.autoencoder import VAEConfig


def audio_extractor(spec_or_objects):
    """A `keyface_jax.audio.get_extractor` spec ('a+b' concatenates), one extractor object, or a
    list of them (concatenated on the feature axis, in order)."""
    if isinstance(spec_or_objects, str):
        from keyface_jax.audio import get_extractor
        return get_extractor(spec_or_objects)
    if isinstance(spec_or_objects, (list, tuple)):
        if len(spec_or_objects) == 1:
            return spec_or_objects[0]
        from keyface_jax.audio import ConcatExtractor
        return ConcatExtractor(*spec_or_objects)
    return spec_or_objects


def build_tools(opts: PrepareOptions, vae_config: VAEConfig, batch_size: int, audio=None) -> Tools:
    """`audio`: an extractor (object or spec) overriding opts.audio_features."""
    if opts.vae == "random":
        model = random_encoder(vae_config, opts.seed)
    else:
        model = load_encoder(opts.vae, vae_config)
    encoder = LatentEncoder(model, batch_size=batch_size, mode=opts.latent == "mode",
                            seed=opts.seed)
    return Tools(encoder=encoder,
                 audio=audio_extractor(audio if audio is not None else opts.audio_features),
                 emotions=make_emotion_source(opts.emotions, opts.emotion_length_tolerance),
                 detector=make_detector(opts.crop))
