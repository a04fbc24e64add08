"""tcmalloc for XLA:CPU runs: finding it, checking it is in use, and handing it to child processes.

Why: XLA:CPU allocates every call's temporary buffer afresh (≈ 1.4 GB for the tiny train step).
glibc serves blocks that large with mmap and unmaps them on free, so every step touches fresh pages:
≈ 340,000 page faults and ≈ 0.65 s of kernel time per tiny step on the 2-core CI machine, a quarter
of the CPU time. tcmalloc keeps freed spans mapped and hands the same pages back next step (≈ 100
faults per step). `launch/setup_env.sh` preloads it for every launch script; Python entry points
call `warn_if_missing` so a CPU run started another way says what it is losing.

KEYFACE_TCMALLOC=0 turns the preload off; KEYFACE_TCMALLOC=/path/lib.so names the library.
Accelerator runs are unaffected (device memory has its own allocator).
"""

from __future__ import annotations

import glob
import logging
import os

ENV_SWITCH = "KEYFACE_TCMALLOC"
# Library names in the order preferred: the minimal build has no heap profiler (smaller, no hooks).
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", "/opt/homebrew/lib")


def find_tcmalloc() -> str | None:
    """Path of a tcmalloc shared library on this machine, or None (also None when switched off)."""
    choice = os.environ.get(ENV_SWITCH, "1")
    if choice == "0":
        return None
    if choice not in ("", "1"):
        if not os.path.isfile(choice):
            raise FileNotFoundError(f"{ENV_SWITCH}={choice}: no such library file")
        return choice
    for name in NAMES:
        for folder in SEARCH_DIRS:
            hits = sorted(glob.glob(os.path.join(folder, name)))
            if hits:
                return hits[0]
    return None


def is_active() -> bool:
    """Whether tcmalloc is mapped into this process (preloaded or linked)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("tcmalloc" in line for line in maps)
    except OSError:          # not Linux: nothing to say
        return False


def with_tcmalloc(env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) that preloads tcmalloc in a child process, if found."""
    env = dict(os.environ if env is None else env)
    library = find_tcmalloc()
    if library and library not in env.get("LD_PRELOAD", "").split(":"):
        env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return env


def without_preload(env: dict | None = None) -> dict:
    """A copy of `env` with tcmalloc taken out of LD_PRELOAD (for a child that runs faster on glibc)."""
    env = dict(os.environ if env is None else env)
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "tcmalloc" not in p]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def warn_if_missing(logger: logging.Logger | None = None) -> bool:
    """Logs one warning when this is a CPU JAX run without tcmalloc; returns whether it is active."""
    import jax

    if jax.default_backend() != "cpu" or is_active() or os.environ.get(ENV_SWITCH) == "0":
        return is_active()
    hint = ("install it (apt-get install libtcmalloc-minimal4) and start through launch/*.sh, or set "
            f"LD_PRELOAD={find_tcmalloc()}" if find_tcmalloc() else
            "apt-get install libtcmalloc-minimal4, then start through launch/*.sh")
    (logger or logging.getLogger(__name__)).warning(
        "CPU run without tcmalloc: XLA re-faults its temporary buffers every step (~25%% slower); %s",
        hint)
    return False
