"""Activation sharding: logical constraints at block boundaries, from the parameters' rules table.

A network traced inside `with activation_sharding(mesh, rules):` pins its activations at block
boundaries (UNet blocks, transformer blocks, attention inputs) to the shardings that the rules give
their logical names (`act_batch`, `act_tokens`, `act_heads`, ...). Outside such a context every
helper here is the identity, so single-device code (and its CPU speed) is unchanged.

The context is read at trace time: enter it around `jax.jit(...).lower(...)` (or the first call).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keyface_jax.sharding import DEFAULT_RULES, Rules, axes_size, parse_rules

# A dim the partitioner may lay out as it likes (PartitionSpec.UNCONSTRAINED).
ANY = "..."

# Logical names of the activations at block boundaries.
VIDEO = ("act_batch", "act_frames", "act_height", "act_width", "act_channels")   # [B, T, H, W, C]
FRAMES = ("act_batch", "act_height", "act_width", "act_channels")                # [B·T, H, W, C]
TOKENS = ("act_batch", "act_frames", "act_tokens", "act_channels")               # [B, T, L, C]
PIXEL_TOKENS = ("act_batch", "act_tokens", "act_frames", "act_channels")         # [B, L, T, C]


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    mesh: Mesh
    rules: Rules

    def axes(self, name: str | None) -> tuple[str, ...]:
        return dict(self.rules).get(name, ()) if name is not None and name != ANY else ()

    def size(self, name: str | None) -> int:
        return axes_size(self.mesh, self.axes(name))

    def spec(self, shape: Sequence[int], names: Sequence[str | None]) -> PartitionSpec:
        """The spec of logical `names` for an array of `shape`: a mesh axis shards one dim at most,
        and axes that do not divide their dim are dropped (that dim is then replicated over them)."""
        if len(names) != len(shape):
            raise ValueError(f"activation names {tuple(names)} do not match shape {tuple(shape)}")
        spec, used = [], set()
        for dim, name in zip(shape, names):
            if name == ANY:
                spec.append(PartitionSpec.UNCONSTRAINED)
                continue
            axes = tuple(a for a in self.axes(name) if a not in used)
            if dim % axes_size(self.mesh, axes):
                axes = ()
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else (axes or None))
        return PartitionSpec(*spec)


_CURRENT: contextvars.ContextVar[ActivationSharding | None] = contextvars.ContextVar(
    "keyface_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[ActivationSharding]:
    """Within the block, networks traced constrain their activations on `mesh` by `rules`."""
    token = _CURRENT.set(ActivationSharding(mesh, parse_rules(rules)))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def current() -> ActivationSharding | None:
    return _CURRENT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x laid out by the logical `names` of its dims (None = replicated, ANY = free); identity
    outside an `activation_sharding` context."""
    ctx = current()
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, ctx.spec(x.shape, names)))


def axis_size(name: str) -> int:
    """Devices a logical activation dim is split over (1 outside a context)."""
    ctx = current()
    return 1 if ctx is None else ctx.size(name)


def tokens_sharded() -> bool:
    """Whether a clip's spatial tokens are split over devices (the `context` axis is in use).

    Layers then keep token dims apart rather than folding them into batch or query dims: a fold of
    two differently sharded dims is not a tiling of the folded dim, and the partitioner would gather
    the whole activation to do it."""
    return axis_size("act_tokens") > 1


def platform() -> str:
    """The platform networks are being traced for: the context mesh's devices (which may be an
    abstract TPU topology during ahead-of-time compilation), else JAX's default backend."""
    ctx = current()
    if ctx is not None:
        return ctx.mesh.devices.flat[0].platform
    return jax.default_backend()
