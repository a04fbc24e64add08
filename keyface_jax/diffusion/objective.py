"""The KeyFace training objective (spec §4; sgm `StandardDiffusionLoss` as the reference sets it).

Per clip: ln σ ~ N(p_mean, p_std), one σ shared by the clip's frames; x_σ = x0 + σ·ε on scaled
latents; D = the v-scaled denoiser (`scalings.denoise`); per frame, the mean over (h, w, c) of
λ(σ)·r(row, col)·(D − x0)², with λ(σ) = (σ²+1)/σ² and r = `lambda_lower` on latent rows h//2..h−1,
1 above, times `lambda_mouth` inside `mouth_box` (off by default: KeyFace weights the lower half
only; face-aligned crops put the mouth at a known place, where the audio's signal lies); then the
mean over all B·T frames. Both models put loss on every frame, including the
interpolation model's two given boundary frames and the keyframe model's frame 0 (which is also
its identity condition).

Keyframe model extras (`pixel_weight` > 0): the same random frame of every clip has its predicted
x0 decoded through the frozen temporal VAE decoder (one frame at a time, as the reference's
`decoding_t = 1`), clipped to [−1, 1] and compared with the original frame:
  pixel_l2    = mean_i mean_pixels λ(σ_i)·(decoded_i − frame_i)²
  pixel_lpips = mean_i λ(σ_i)·LPIPS(decoded_i, frame_i)
and loss = diffusion + pixel_weight·(pixel_l2 + pixel_lpips). The reference multiplies LPIPS's
(B,) output by a (B, 1) weight, which broadcasts to B×B and weights every sample by the batch-mean
λ (spec §9.10); here the weighting is per sample.

Classifier-free-guidance dropout, per sample and independent: the identity latent (keyframe) or
both boundary latents (interpolation) with `cond_drop_rate`, audio with `audio_drop_rate` (the
network zeroes the audio projection's output); emotions are never dropped.

Randomness: one key per step, split into named streams by `fold_in` (σ, noise, dropout, pixel
frame), so e.g. changing a dropout rate never changes the noise a run sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.diffusion.scalings import SIGMA_DATA, denoise
from keyface_jax.models.autoencoder import from_diffusion_space

# fold_in constants of the per-step key's streams.
STREAM_SIGMA, STREAM_NOISE, STREAM_DROPOUT, STREAM_PIXEL_FRAME = 0, 1, 2, 3
PIXEL_LOSSES = ("l2", "lpips")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Training-objective settings; defaults are the reference keyframe run (spec §4).

    Use `ObjectiveConfig.for_kind(kind)` for the reference values of either model, and
    `from_dict` to build one from an ml_collections section.

    Fields:
      kind: "keyframe" | "interpolation" (which conditions the batch carries).
      p_mean, p_std: ln σ ~ N(p_mean, p_std) per clip (1.0, 1.2; SVD used 0.7, 1.6).
      lambda_lower: weight of latent rows h//2..h−1 (the mouth half): 3 keyframe, 2 interpolation.
      mouth_box: () (off) or (top, bottom, left, right), fractions of the frame: latent cells whose
        centre lies inside get their weight multiplied by `lambda_mouth` (not in KeyFace).
      lambda_mouth: that multiplier (1.0).
      cond_drop_rate: CFG dropout of the identity latent (keyframe) or both boundary latents
        (interpolation), per sample (0.1).
      audio_drop_rate: CFG dropout of the audio projection output, per sample (0.2).
      pixel_weight: weight of the pixel losses; 0 disables them (keyframe 1, interpolation 0).
      pixel_losses: subset of ("l2", "lpips") (keyframe: both).
      pixel_frames: frames per clip decoded for the pixel losses (1).
      lpips_vgg_weights: torchvision VGG16 state-dict file (`vgg16-397923af.pth`); required when
        "lpips" is in pixel_losses and pixel_weight > 0.
      lpips_lin_weights: LPIPS v0.1 linear-layer file (`lpips/weights/v0.1/vgg.pth`); ditto.
    """

    kind: str = "keyframe"
    p_mean: float = 1.0
    p_std: float = 1.2
    lambda_lower: float = 3.0
    mouth_box: tuple[float, ...] = ()
    lambda_mouth: float = 1.0
    cond_drop_rate: float = 0.1
    audio_drop_rate: float = 0.2
    pixel_weight: float = 1.0
    pixel_losses: tuple[str, ...] = ("l2", "lpips")
    pixel_frames: int = 1
    lpips_vgg_weights: str = ""
    lpips_lin_weights: str = ""

    def __post_init__(self):
        object.__setattr__(self, "pixel_losses", tuple(self.pixel_losses))
        object.__setattr__(self, "mouth_box", tuple(float(v) for v in self.mouth_box))
        box = self.mouth_box
        if box and not (len(box) == 4 and 0.0 <= box[0] < box[1] <= 1.0
                        and 0.0 <= box[2] < box[3] <= 1.0):
            raise ValueError("ObjectiveConfig.mouth_box must be () or (top, bottom, left, right), "
                             "fractions of the frame with top < bottom and left < right, "
                             f"got {box}")
        if self.lambda_mouth <= 0:
            raise ValueError(f"ObjectiveConfig.lambda_mouth must be > 0, got {self.lambda_mouth}")
        if self.kind not in ("keyframe", "interpolation"):
            raise ValueError("ObjectiveConfig.kind must be 'keyframe' or 'interpolation', "
                             f"got {self.kind!r}")
        if self.p_std < 0:
            raise ValueError(f"ObjectiveConfig.p_std must be >= 0, got {self.p_std}")
        for name in ("cond_drop_rate", "audio_drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ObjectiveConfig.{name} must be in [0, 1], "
                                 f"got {getattr(self, name)}")
        unknown = [p for p in self.pixel_losses if p not in PIXEL_LOSSES]
        if unknown:
            raise ValueError(f"ObjectiveConfig.pixel_losses: unknown {unknown}; "
                             f"choose from {PIXEL_LOSSES}")
        if self.pixel_weight < 0 or self.pixel_frames < 1:
            raise ValueError("ObjectiveConfig: pixel_weight must be >= 0 and pixel_frames >= 1, "
                             f"got {self.pixel_weight}, {self.pixel_frames}")

    @classmethod
    def for_kind(cls, kind: str, **overrides) -> "ObjectiveConfig":
        """The reference settings of one model (spec §4), with `overrides` applied."""
        if kind == "interpolation":
            base = dict(kind=kind, lambda_lower=2.0, pixel_weight=0.0, pixel_losses=())
        else:
            base = dict(kind=kind)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides) -> "ObjectiveConfig":
        """From a mapping or ml_collections ConfigDict (e.g. `config.objective`, with
        `kind=config.model.kind`); unknown fields raise naming them."""
        values = {**dict(values), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"objective config: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**values)

    @property
    def pixel_enabled(self) -> bool:
        return self.pixel_weight > 0 and bool(self.pixel_losses)

    @property
    def needs_lpips(self) -> bool:
        return self.pixel_enabled and "lpips" in self.pixel_losses


# ----------------------------------------------------------------------------- closed forms


def sample_sigma(key: jax.Array, batch: int, p_mean: float, p_std: float) -> jax.Array:
    """σ [batch] with ln σ ~ N(p_mean, p_std) (sgm `EDMSampling`)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,), jnp.float32))


def loss_weight(sigma: jax.Array) -> jax.Array:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (sgm `VWeighting`/EDM weighting with σ_data = 1)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2


def add_noise(x0: jax.Array, sigma: jax.Array, noise: jax.Array) -> jax.Array:
    """x_σ = x0 + σ·ε; x0, ε [B, ...], σ [B] (one level per clip, shared by its frames)."""
    return x0 + sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1)) * noise


def row_weights(height: int, lambda_lower: float) -> jax.Array:
    """[height] weights: 1 on rows < height//2, `lambda_lower` on the rest (the lower half)."""
    return jnp.where(jnp.arange(height) >= height // 2, lambda_lower, 1.0).astype(jnp.float32)


def box_mask(height: int, width: int, box: tuple[float, ...]) -> jax.Array:
    """[height, width] booleans: cells whose centre lies in box = (top, bottom, left, right),
    fractions of the frame (top/left inclusive, bottom/right exclusive); all False for ()."""
    if not box:
        return jnp.zeros((height, width), bool)
    top, bottom, left, right = box
    rows = (jnp.arange(height) + 0.5) / height
    cols = (jnp.arange(width) + 0.5) / width
    return (((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :])


def spatial_weights(height: int, width: int, lambda_lower: float, mouth_box: tuple[float, ...] = (),
                    lambda_mouth: float = 1.0) -> jax.Array:
    """[height, width]: the row weights, times `lambda_mouth` inside `mouth_box`."""
    inside = box_mask(height, width, mouth_box)
    return row_weights(height, lambda_lower)[:, None] * jnp.where(inside, lambda_mouth, 1.0)


def diffusion_l2(pred: jax.Array, target: jax.Array, sigma: jax.Array,
                 lambda_lower: float, mouth_box: tuple[float, ...] = (),
                 lambda_mouth: float = 1.0) -> jax.Array:
    """Per-frame weighted L2: pred/target [B, T, h, w, c], σ [B] → [B, T], the mean over (h, w, c)
    of λ(σ)·spatial_weight·(pred − target)²."""
    sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    weights = spatial_weights(pred.shape[2], pred.shape[3], lambda_lower, mouth_box,
                              lambda_mouth)[:, :, None]
    return loss_weight(sigma)[:, None] * jnp.mean(sq * weights, axis=(2, 3, 4))


# ----------------------------------------------------------------------------- randomness


def draw_randomness(key: jax.Array, latent_shape: tuple[int, ...], config: ObjectiveConfig) -> dict:
    """Every random quantity of one training step, each from its own stream of `key`.

    Returns: sigma [B]; noise [B, T, h, w, c] (float32); cond_keep, audio_keep [B] float32 in
    {0, 1}; pixel_frame_index [pixel_frames] int32 (distinct frames, the same for every clip).
    """
    b, t = latent_shape[:2]
    k_drop = jax.random.fold_in(key, STREAM_DROPOUT)
    k_cond, k_audio = jax.random.split(k_drop)
    keep = lambda k, rate: (jax.random.uniform(k, (b,)) >= rate).astype(jnp.float32)
    n_pix = min(config.pixel_frames, t)
    return dict(
        sigma=sample_sigma(jax.random.fold_in(key, STREAM_SIGMA), b, config.p_mean, config.p_std),
        noise=jax.random.normal(jax.random.fold_in(key, STREAM_NOISE), latent_shape, jnp.float32),
        cond_keep=keep(k_cond, config.cond_drop_rate),
        audio_keep=keep(k_audio, config.audio_drop_rate),
        pixel_frame_index=jax.random.permutation(
            jax.random.fold_in(key, STREAM_PIXEL_FRAME), t)[:n_pix].astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- conditions


def _require(batch: Mapping, names, kind: str):
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(f"{kind} batch is missing {missing} (has {sorted(batch)})")


def network_conditions(batch: Mapping, config: ObjectiveConfig, draws: dict) -> dict:
    """The keyword conditions of the network call, built as the reference builds them (spec
    §1.1-1.2, §2.2): condition latents are *raw* VAE latents (scaled ÷ 0.18215); the keyframe
    identity defaults to the clip's own first latent, the interpolation boundaries to its first and
    last latents. A batch may override them with scaled `identity` / `first` / `last`
    [B, h, w, c]."""
    latents = batch["latents"]
    if config.kind == "keyframe":
        _require(batch, ("latents", "audio", "valence", "arousal"), "keyframe")
        identity = batch.get("identity", latents[:, 0])
        return dict(identity=from_diffusion_space(identity), audio=batch["audio"],
                    valence=batch["valence"], arousal=batch["arousal"],
                    audio_keep=draws["audio_keep"], identity_keep=draws["cond_keep"])
    _require(batch, ("latents", "audio"), "interpolation")
    return dict(first=from_diffusion_space(batch.get("first", latents[:, 0])),
                last=from_diffusion_space(batch.get("last", latents[:, -1])),
                audio=batch["audio"], audio_keep=draws["audio_keep"], cond_keep=draws["cond_keep"])


# ----------------------------------------------------------------------------- pixel losses


def frozen(module):
    """The module with its state behind `stop_gradient`: usable inside a differentiated function
    without ever receiving gradient. Plain callables pass through unchanged."""
    if not isinstance(module, nnx.Module):
        return module
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def decode_frames(decoder, z: jax.Array) -> jax.Array:
    """Scaled latents [N, h, w, c] → frames [N, H, W, 3] in [−1, 1] (float32), each decoded on
    its own (temporal decoder with T = 1, as the reference's `decoding_t = 1`). `decoder` is a
    VideoDecoder, an AutoencoderKL (its `.decoder` is used) or any callable(z, num_frames)."""
    dec = getattr(decoder, "decoder", decoder)
    return jnp.clip(dec(from_diffusion_space(z), num_frames=1).astype(jnp.float32), -1.0, 1.0)


def _pixel_targets(pred_x0: jax.Array, batch: Mapping, draws: dict):
    """(predicted latents [B, n, h, w, c], original frames [B, n, H, W, 3]) for the pixel losses.

    Either the batch holds all frames (`frames` [B, T, H, W, 3]) and the step's random frames are
    taken from it, or the data pipeline already chose them: `pixel_frames` [B, n, H, W, 3] with
    `pixel_frame_index` [B, n] (int) naming their positions in the clip."""
    if "pixel_frames" in batch:
        _require(batch, ("pixel_frame_index",), "pixel-loss")
        index = jnp.asarray(batch["pixel_frame_index"], jnp.int32)
        pred = jnp.take_along_axis(pred_x0, index[:, :, None, None, None], axis=1)
        return pred, batch["pixel_frames"]
    if "frames" not in batch:
        raise KeyError("pixel losses need the original frames: batch['frames'] [B, T, H, W, 3] or "
                       f"batch['pixel_frames'] + batch['pixel_frame_index'] (has {sorted(batch)})")
    index = draws["pixel_frame_index"]
    return pred_x0[:, index], batch["frames"][:, index]


def pixel_losses(pred_x0: jax.Array, batch: Mapping, draws: dict, config: ObjectiveConfig, *,
                 decoder, lpips) -> dict:
    """{"pixel_l2": scalar, "pixel_lpips": scalar} (those enabled), each already λ(σ)-weighted per
    sample and averaged; see the module docstring."""
    pred, target = _pixel_targets(pred_x0, batch, draws)
    b, n = pred.shape[:2]
    decoded = decode_frames(frozen(decoder), pred.reshape(b * n, *pred.shape[2:]))
    target = target.reshape(b * n, *target.shape[2:]).astype(jnp.float32)
    if decoded.shape != target.shape:
        raise ValueError(f"decoded frames {decoded.shape} do not match the original frames "
                         f"{target.shape}")
    lam = jnp.repeat(loss_weight(draws["sigma"]), n)  # [B*n], sample-major like the reshape
    out = {}
    if "l2" in config.pixel_losses:
        out["pixel_l2"] = jnp.mean(lam * jnp.mean(jnp.square(decoded - target), axis=(1, 2, 3)))
    if "lpips" in config.pixel_losses:
        # Per-sample weighting: [B*n] × [B*n] (the reference's [B] × [B, 1] is §9.10's bug).
        out["pixel_lpips"] = jnp.mean(lam * frozen(lpips)(decoded, target).reshape(b * n))
    return out


def check_objective_inputs(config: ObjectiveConfig, *, decoder=None, lpips=None) -> None:
    """Raises if the objective was asked for a term it has no module for (call at start-up)."""
    if config.pixel_enabled and decoder is None:
        raise ValueError(f"objective: pixel losses {config.pixel_losses} (pixel_weight="
                         f"{config.pixel_weight}) need the frozen VAE decoder; pass decoder=")
    if config.needs_lpips and lpips is None:
        raise ValueError("objective: the LPIPS pixel loss is enabled but no LPIPS network was "
                         "given (load it with lpips_for_objective(config)); set "
                         "pixel_losses=('l2',) or pixel_weight=0 to train without it")


def lpips_for_objective(config: ObjectiveConfig, dtype=None):
    """The LPIPS network the config asks for (None if it uses none), loaded from
    `lpips_vgg_weights` and `lpips_lin_weights`. A config that needs LPIPS but names no weight
    files fails here, at start-up: the term is never silently dropped."""
    if not config.needs_lpips:
        return None
    missing = [f for f in ("lpips_vgg_weights", "lpips_lin_weights") if not getattr(config, f)]
    if missing:
        raise ValueError(
            f"objective: pixel_losses includes 'lpips' (pixel_weight={config.pixel_weight}) but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. LPIPS-VGG "
            "needs the torchvision VGG16 file (vgg16-397923af.pth) and the LPIPS v0.1 vgg.pth "
            "file; nothing is downloaded. Set both paths, or drop 'lpips' from pixel_losses.")
    from keyface_jax.losses.lpips_import import load_lpips
    return load_lpips(config.lpips_vgg_weights, config.lpips_lin_weights, dtype=dtype,
                      vgg_field="objective.lpips_vgg_weights",
                      lin_field="objective.lpips_lin_weights")


# ----------------------------------------------------------------------------- the loss


def keyface_loss(network, batch: Mapping, key: jax.Array, config: ObjectiveConfig, *,
                 decoder=None, lpips=None) -> tuple[jax.Array, dict]:
    """The training loss of one batch: pure and jittable (config, batch structure static).

    Args:
      network: KeyframeNet / InterpolationNet (or any callable F(x_in, c_noise, **conditions)).
      batch: scaled latents `latents` [B, T, h, w, c] and `audio` [B, T, tokens, D]; keyframe
        batches also `valence`, `arousal` [B, T] and, for pixel losses, `frames` [B, T, H, W, 3]
        in [−1, 1] (or `pixel_frames` + `pixel_frame_index`, see `_pixel_targets`); optional
        condition overrides `identity` / `first` / `last` (scaled latents [B, h, w, c]).
      key: the step's PRNG key (e.g. `fold_in(rng, step)`).
      config: ObjectiveConfig.
      decoder: the frozen VAE decoder, needed when pixel losses are on (never receives gradient).
      lpips: the LPIPS network, needed when the LPIPS term is on (never receives gradient).
    Returns:
      (scalar loss, metrics): metrics has loss, loss_diffusion, loss_pixel_l2 / loss_pixel_lpips
      (unweighted by pixel_weight, when enabled), sigma_mean, cond_keep_frac, audio_keep_frac.
    """
    check_objective_inputs(config, decoder=decoder, lpips=lpips)
    latents = jnp.asarray(batch["latents"])
    if latents.ndim != 5:
        raise ValueError(f"batch['latents'] must be [B, T, h, w, c], got {latents.shape}")
    draws = draw_randomness(key, latents.shape, config)
    x0 = latents.astype(jnp.float32)
    x_noisy = add_noise(x0, draws["sigma"], draws["noise"])
    pred = denoise(network, x_noisy, draws["sigma"], **network_conditions(batch, config, draws))

    diffusion = jnp.mean(diffusion_l2(pred, x0, draws["sigma"], config.lambda_lower,
                                      config.mouth_box, config.lambda_mouth))
    loss = diffusion
    metrics = dict(loss_diffusion=diffusion, sigma_mean=jnp.mean(draws["sigma"]),
                   cond_keep_frac=jnp.mean(draws["cond_keep"]),
                   audio_keep_frac=jnp.mean(draws["audio_keep"]))
    if config.pixel_enabled:
        for name, value in pixel_losses(pred, batch, draws, config, decoder=decoder,
                                        lpips=lpips).items():
            loss = loss + config.pixel_weight * value
            metrics[f"loss_{name}"] = value
    metrics["loss"] = loss
    return loss, metrics
