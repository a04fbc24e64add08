"""The logical-axis rules table, in plain Python (no ml_collections), so the model code that reads
its defaults imports nothing heavy."""

# Logical axis name → mesh axes ("a,b" for several, "" replicated): the one rules table, read by
# parameter shardings and activation constraints alike (keyface_jax/sharding.py). Copied into
# `config.mesh.rules`, so single entries can be overridden: --config.mesh.rules.embed=fsdp,context.
LOGICAL_AXIS_RULES = {
    # parameters: the input/"embed" side and conv outputs FSDP-sharded, MLP and attention-head
    # widths tensor-parallel; norms and small vectors replicated
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "conv_in": "",
    "conv_out": "fsdp",
    "norm": "",
    # activations (block boundaries and attention inputs): clips over the data-parallel axes, a
    # clip's spatial tokens (rows of its latent) over `context`, heads and MLP widths over `tensor`
    "act_batch": "data,fsdp",
    "act_frames": "",
    "act_height": "context",
    "act_width": "",
    "act_tokens": "context",
    "act_channels": "",
    "act_heads": "tensor",
    "act_mlp": "tensor",
}
