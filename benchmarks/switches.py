"""Benchmark variants' overrides that set module-level switches of the library rather than
params.yaml keys: execution choices (kernels, tiles, layouts) kept only for comparisons.

Each variant runs in a process of its own, so a switch set here lasts for that variant only.
"""
from __future__ import annotations

import importlib

# override key -> (module, attribute)
SWITCHES = {
    "flex": ("speedrun.model", "FLEX_KERNEL_OPTIONS"),         # FlexAttention kernel_options
    "fold_gates": ("speedrun.model", "FOLD_GATES"),            # gate logits as extra rows of the q/k/v matmul
    "mlp_tile": ("speedrun.mlp", "KERNEL_CONFIG"),             # fused MLP (BLOCK_M, N, K, stages, warps, ws)
    "mlp_save_pre": ("speedrun.mlp", "SAVE_PRE"),              # fused MLP keeps pre, not post, for backward
    "prefetch_masks": ("speedrun.train", "PREFETCH_MASKS"),    # masks built before the previous backward
    "compile_scope": ("speedrun.train", "COMPILE_SCOPE"),      # blocks | stack (one graph for all blocks)
    "freeze_gc": ("speedrun.train", "FREEZE_GC"),              # gc.freeze() after the warm-up
    "fp8_wgrad": ("speedrun.head", "FP8_WEIGHT_GRAD"),         # FP8 head's weight gradient: fp8 | bf16
    "head_cast_once": ("speedrun.head", "CAST_WEIGHT_ONCE"),   # FP8 head weight cast once per step
    "embed_grad": ("speedrun.embedding", "GRAD_MODE"),         # accumulate | dense (bf16 nn.Embedding)
    "embed_kernels": ("speedrun.embedding", "KERNELS"),        # triton | torch
}


def apply_switches(overrides: dict) -> dict:
    """Set the switches named in `overrides`; return the rest (params.yaml train keys)."""
    rest = {}
    for key, value in overrides.items():
        if key not in SWITCHES:
            rest[key] = value
            continue
        module, attr = SWITCHES[key]
        setattr(importlib.import_module(module), attr, tuple(value) if key == "mlp_tile" else value)
    return rest
