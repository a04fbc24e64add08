"""One attention layer's forward + backward, compiled for a TPU chip per backend, without a TPU.

    /work/venv-tpu/bin/python benchmarks/attention_memory.py                 # full level 0, 3 backends
    /work/venv-tpu/bin/python benchmarks/attention_memory.py --tokens 1024 --heads 10

The `full` networks' largest attention is level 0's spatial self-attention: 64×64 latents = 4096
tokens, 5 heads of 64, for each of a clip's 14 frames. This compiles d(sum(o·g))/d(q, k, v) of that one
layer (bf16, one chip of the topology) with each backend through the model's own dispatch
(`models/attention_backends.dot_product_attention`), so `splash` lowers for real through Mosaic,
and records the compiler's argument and temporary bytes and FLOPs. It isolates what the backends
change from the rest of a train step (benchmarks/pod_memory.py), whose temporaries also hold
convolution activations, gathered FSDP weights and gradients. Results go to the
`attention_op` section of benchmarks/results/pod_memory_full.json (or --results).
FLOPs are XLA's count, which takes a loop body once: only the `xla` figure is the layer's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import pod_memory as pm  # noqa: E402

BACKENDS = ("xla", "chunked", "splash")


def compile_attention(backend: str, device, clips: int, tokens: int, heads: int, head_dim: int) -> dict:
    """The compiled forward + backward of one attention layer on `device`; returns its entry."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from keyface_jax.activation_sharding import activation_sharding
    from keyface_jax.models.attention_backends import AttentionConfig, dot_product_attention

    config = AttentionConfig(backend=backend)
    mesh = Mesh([device], ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())

    def loss(q, k, v, g):
        return jnp.sum(dot_product_attention(q, k, v, config).astype(jnp.float32) * g)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(replicated,) * 4,
                   out_shardings=(replicated,) * 3)
    shape = jax.ShapeDtypeStruct((clips, tokens, heads, head_dim), jnp.bfloat16)
    entry = dict(backend=backend, shape=[clips, tokens, heads, head_dim], dtype="bfloat16")
    start = time.perf_counter()
    try:
        # the dispatch reads the platform (tpu) from the activation-sharding context's mesh
        with activation_sharding(mesh):
            lowered = grad.lower(shape, shape, shape, shape)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - a backend that cannot lower is a result, not a crash
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        return entry
    cost = pm.cost_fields(compiled)
    entry.update(memory=pm.memory_fields(compiled.memory_analysis()),
                 flops=float(cost["flops"]) if cost.get("flops") else None,
                 compile_s=time.perf_counter() - start)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--clips", type=int, default=14, help="leading batch (frames × clips)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--backend", action="append", choices=BACKENDS, help="default: all three")
    p.add_argument("--results", default=None, help="default benchmarks/results/pod_memory_full.json")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu compiles; nothing runs
    path = pathlib.Path(args.results) if args.results else pm.results_path("full")
    device = pm.topology_devices(args.topology)[0]
    base = None
    for backend in args.backend or BACKENDS:
        entry = compile_attention(backend, device, args.clips, args.tokens, args.heads, args.head_dim)
        entry["topology"] = args.topology
        key = f"{backend}:{args.clips}x{args.tokens}x{args.heads}x{args.head_dim}"
        pm.merge_result(path, "attention_op", key, entry)
        if "error" in entry:
            print(f"{key}: ERROR {entry['error'].splitlines()[0][:300]}", flush=True)
            continue
        temp = entry["memory"]["temp_bytes"]
        base = temp if backend == "xla" else base
        ratio = f", {temp / base:.1%} of xla's" if base and backend != "xla" else ""
        print(f"{key}: temps {temp / pm.GIB:.3f} GiB{ratio}, {entry['flops'] / 1e9:.1f} GFLOP, "
              f"compile {entry['compile_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
