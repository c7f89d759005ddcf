"""Benchmark variants' overrides that set a module-level switch of the library rather than a
params.yaml key: the embedding tables' kind, because the public one-4090 recipe (throughput's
`recipe_4090` baseline) trains bf16 nn.Embedding tables; for the record recipe, its MLP's up
projection (fused into the matmul, against the pointwise default) and backward (the pointwise
kernel, against the fused default); its DC products (the fp32 GEMMs, against the bf16 default)
and head mix (one einsum, against the sum); its tables' gradients (autograd's dense ones, against
the in-place default); its head's chunk of logits rows and its loss kernel.
Every other execution choice is either a params.yaml key or fixed once measured
(benchmarks/results/README.md).

Each variant runs in a process of its own, so a switch set here lasts for that variant only.
"""
from __future__ import annotations

import importlib

# override key -> (module, attribute)
SWITCHES = {
    "embed_grad": ("speedrun.embedding", "GRAD_MODE"),         # accumulate | dense (bf16 nn.Embedding)
    "mlp_backward": ("speedrun.record.mlp", "BACKWARD"),       # fused | pointwise (record recipe)
    "mlp_forward": ("speedrun.record.mlp", "FORWARD"),         # pointwise | fused (record recipe)
    "dc_matmul": ("speedrun.record.dc", "MATMUL"),             # fp32 | bf16 (record recipe's DC products)
    "dc_mix": ("speedrun.record.dc", "MIX"),                   # sum | einsum (record recipe's DC head mix)
    "table_grads": ("speedrun.record.lookup", "MODE"),         # accumulate | autograd (record recipe's tables)
    "head_chunk_rows": ("speedrun.record.loss", "HEAD_CHUNK_ROWS"),   # rows of logits at a time (record head)
    "loss_kernel": ("speedrun.record.loss", "LOSS_KERNEL"),    # cuda | triton (record head's loss kernel)
}


def apply_switches(overrides: dict) -> dict:
    """Set the switches named in `overrides`; return the rest (params.yaml train keys)."""
    rest = {}
    for key, value in overrides.items():
        if key not in SWITCHES:
            rest[key] = value
            continue
        module, attr = SWITCHES[key]
        setattr(importlib.import_module(module), attr, value)
    return rest
