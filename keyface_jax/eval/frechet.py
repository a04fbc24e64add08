"""Fréchet distances between feature sets (FID, FVD) and the feature-extractor interface.

For Gaussians N(μ1, Σ1) and N(μ2, Σ2):

    d² = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½

`frechet_distance` computes the last trace from the eigenvalues of the symmetric PSD matrix
Σ1^½ Σ2 Σ1^½ (Σ1^½ from an eigendecomposition of Σ1; tiny negative eigenvalues from rounding are
clipped to 0). That equals tr (Σ1 Σ2)^½ exactly, and unlike `scipy.linalg.sqrtm(Σ1 Σ2)` (what
pytorch-fid does) it needs no complex arithmetic or ε-regularisation for singular covariances,
e.g. fewer samples than feature dimensions. Statistics are the sample mean and the unbiased
covariance (ddof = 1), as in pytorch-fid and StyleGAN-V.

FID uses `keyface_jax.eval.inception` (2048-d pool features of the TF-ported InceptionV3), FVD
uses `TorchScriptI3D` (400-d logits-layer features of StyleGAN-V's I3D). Both need weights the
user supplies as local files; see those classes for where to get them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np


class FeatureExtractor(Protocol):
    """Batch → features: images [B, H, W, 3] (FID) or videos [B, T, H, W, 3] (FVD), uint8 RGB,
    to float [B, D]."""

    dim: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class WeightsMissing(FileNotFoundError):
    """A metric's network weights were not supplied (message says where to get them)."""


def require_file(path: str | os.PathLike | None, what: str, where: str) -> str:
    """The path if it is an existing file, else WeightsMissing naming the weights and source."""
    if path is None or not os.path.isfile(os.fspath(path)):
        given = "no path given" if path is None else f"{os.fspath(path)!r} does not exist"
        raise WeightsMissing(f"{what}: {given}. These weights are not bundled and cannot be "
                             f"downloaded here; {where}")
    return os.fspath(path)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D], unbiased (N ≥ 2)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of at least 2 images/clips [N >= 2, D], got shape "
                         f"{x.shape}")
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / (x.shape[0] - 1)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^½ for symmetric PSD Σ1, Σ2."""
    s1 = _sqrt_psd(np.asarray(sigma1, np.float64))
    m = s1 @ np.asarray(sigma2, np.float64) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The squared Fréchet distance between two Gaussians (what FID/FVD report)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or \
            sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, "
                         f"sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) \
        - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def extract(extractor: FeatureExtractor, items: Iterable[np.ndarray], batch_size: int = 16
            ) -> np.ndarray:
    """Features [N, D] of single images/videos from an iterable, batched."""
    out, batch = [], []
    for item in items:
        batch.append(np.asarray(item))
        if len(batch) == batch_size:
            out.append(np.asarray(extractor(np.stack(batch)), np.float64))
            batch = []
    if batch:
        out.append(np.asarray(extractor(np.stack(batch)), np.float64))
    if not out:
        raise ValueError("no inputs")
    return np.concatenate(out)


def fid(extractor: FeatureExtractor, generated: Iterable[np.ndarray],
        reference: Iterable[np.ndarray], batch_size: int = 16) -> float:
    """FID between two sets of frames [H, W, 3] uint8 (any sizes; the extractor resizes)."""
    return frechet_from_features(extract(extractor, generated, batch_size),
                                 extract(extractor, reference, batch_size))


def fvd(extractor: FeatureExtractor, generated: Iterable[np.ndarray],
        reference: Iterable[np.ndarray], batch_size: int = 4) -> float:
    """FVD between two sets of clips [T, H, W, 3] uint8 (StyleGAN-V uses 16-frame clips)."""
    return frechet_from_features(extract(extractor, generated, batch_size),
                                 extract(extractor, reference, batch_size))


def video_clips(frames: np.ndarray, length: int = 16, stride: int | None = None
                ) -> list[np.ndarray]:
    """Consecutive clips [length, H, W, 3] cut from frames [N, H, W, 3] every `stride` frames
    (default: non-overlapping)."""
    stride = stride or length
    return [frames[s:s + length] for s in range(0, len(frames) - length + 1, stride)]


class TorchScriptI3D:
    """FVD features from StyleGAN-V's TorchScript I3D (Kinetics-400; reproduces the TF-Hub I3D of
    the original FVD code). Needs torch at evaluation time (any CPU build).

    Weights: `i3d_torchscript.pt`, published with StyleGAN-V (universome/stylegan-v, file
    `src/metrics/frechet_video_distance.py` names its download link) and redistributed e.g. in
    ByteDance/LatentSync-1.6 on Hugging Face (`auxiliary/i3d_torchscript.pt`). Called as in
    StyleGAN-V: videos [B, 3, T, H, W] uint8, rescale=True (to −1…1), resize=True (to 224),
    return_features=True → [B, 400].
    """

    dim = 400
    WHERE = ("download i3d_torchscript.pt (StyleGAN-V's FVD detector; also in "
             "ByteDance/LatentSync-1.6: auxiliary/i3d_torchscript.pt) and pass its path.")

    def __init__(self, path: str | os.PathLike | None, device: str = "cpu"):
        path = require_file(path, "FVD I3D detector (i3d_torchscript.pt)", self.WHERE)
        try:
            import torch
        except ImportError as e:
            raise ImportError("FVD's I3D is a TorchScript file: install torch (CPU is fine)") \
                from e
        self._torch = torch
        self.device = device
        self.model = torch.jit.load(path, map_location=device).eval()

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        torch = self._torch
        videos = np.asarray(videos)
        if videos.dtype != np.uint8:
            raise ValueError(f"videos must be uint8 [B, T, H, W, 3], got {videos.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(videos)).to(self.device)
        x = x.permute(0, 4, 1, 2, 3).contiguous()     # [B, T, H, W, C] → [B, C, T, H, W]
        with torch.no_grad():
            feats = self.model(x, rescale=True, resize=True, return_features=True)
        return feats.cpu().numpy().astype(np.float64)
