"""tcmalloc preload for XLA:CPU runs (keyface_jax/cpu_allocator.py, launch/setup_env.sh)."""

import json
import os
import subprocess
import sys

import pytest

from keyface_jax import cpu_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that runs a jitted call with large temporaries: three calls to settle, then reports the
# page faults of two more.
CHILD = r"""
import json, resource, sys
sys.path.insert(0, %r)
import jax, jax.numpy as jnp
from keyface_jax import cpu_allocator
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x).T).sum())
x = jnp.ones((2048, 4096), jnp.float32)
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    f(x).block_until_ready()
print(json.dumps(dict(active=cpu_allocator.is_active(),
                      faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)))
""" % ROOT


def _run_child(env: dict) -> dict:
    env = dict(env, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_switch_and_explicit_path(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_allocator.ENV_SWITCH, "0")
    assert cpu_allocator.find_tcmalloc() is None
    assert "LD_PRELOAD" not in cpu_allocator.with_tcmalloc({})
    monkeypatch.setenv(cpu_allocator.ENV_SWITCH, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="missing.so"):
        cpu_allocator.find_tcmalloc()
    fake = tmp_path / "libtcmalloc_custom.so"
    fake.write_bytes(b"")
    monkeypatch.setenv(cpu_allocator.ENV_SWITCH, str(fake))
    env = cpu_allocator.with_tcmalloc({"LD_PRELOAD": "/other.so"})
    assert env["LD_PRELOAD"] == f"{fake}:/other.so"
    assert cpu_allocator.with_tcmalloc(env)["LD_PRELOAD"] == env["LD_PRELOAD"]   # not twice
    assert cpu_allocator.without_preload(env)["LD_PRELOAD"] == "/other.so"
    assert "LD_PRELOAD" not in cpu_allocator.without_preload({"LD_PRELOAD": str(fake)})


def test_tcmalloc_stops_refaulting_xla_temporaries(monkeypatch):
    """The reason for the preload, measured: XLA's per-call temporary (64 MB here) is page-faulted
    afresh on every call under glibc malloc, and reused under tcmalloc."""
    monkeypatch.delenv(cpu_allocator.ENV_SWITCH, raising=False)
    if cpu_allocator.find_tcmalloc() is None:
        pytest.skip("tcmalloc is not installed (launch/setup_env.sh installs it where apt-get runs)")
    glibc = _run_child(cpu_allocator.without_preload())
    tcmalloc = _run_child(cpu_allocator.with_tcmalloc())
    assert not glibc["active"] and tcmalloc["active"]
    pages = 2 * 2048 * 4096 * 4 // 4096          # one call's two [2048, 4096] fp32 temporaries
    assert glibc["faults"] > pages, glibc        # two calls: every temporary page faulted again
    # tcmalloc may hand a little back to the kernel now and then (seen: 8,000 of ~560,000)
    assert tcmalloc["faults"] < glibc["faults"] / 10, (tcmalloc, glibc)
