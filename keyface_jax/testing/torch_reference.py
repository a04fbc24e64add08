"""Shared pieces of the parity checks against PyTorch modules (torch is imported inside)."""

from __future__ import annotations

import numpy as np


def randomize_torch_parameters(module, seed: int) -> None:
    """Seeded values for every parameter: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2²),
    biases ~ N(0, 0.2²), merge factors ~ N(0, 1) (so both branches of every blend matter)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("mix_factor"):
                value = noise
            elif p.ndim >= 2:
                value = noise / float(np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight"):
                value = 1.0 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(value.to(p.dtype))


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"output shapes differ: ours {ours.shape}, reference {ref.shape}")
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
