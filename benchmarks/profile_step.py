"""Where a training step's GPU time goes: torch.profiler over a few steps of the default recipe.

    python -m benchmarks.profile_step [--steps 2] [--variant default]

Prints the CUDA kernels grouped by family (matmul, attention, elementwise/fused, optimizer, ...) and
the top kernels, so throughput work can aim at the largest share instead of guessing.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections import defaultdict
from pathlib import Path

FAMILIES = [  # first match wins; substrings of kernel names
    ("attention (flex)", ("flex", "attention", "triton_tem")),  # flex runs as inductor templates
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "_mm_", "ampere", "cublas")),
    ("cross-entropy/softcap", ("log_softmax", "nll", "cross_entropy", "tanh")),
    ("optimizer", ("adam", "foreach", "lerp")),
    ("copies", ("copy", "memcpy", "memset", "cat")),
    ("triton fused (norms, rotary, relu^2, ...)", ("triton",)),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variant", default="default")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.throughput import VARIANTS, progress, synthetic_shards
    from speedrun.loader import BatchLoader
    from speedrun.params import load_section
    from speedrun.train import Paths, Run, TrainParams

    p = dataclasses.replace(load_section("train", TrainParams, args.params), **VARIANTS[args.variant])
    tmp = Path(tempfile.mkdtemp())
    shards = synthetic_shards(tmp, (args.steps + 4) * p.batch_tokens + 1, p.val_tokens + 1)
    run = Run(p, Paths(shards, tmp / "c", tmp / "f.pt", tmp / "t.json", None), log=lambda m, **_: progress(m))
    run._build()
    run._window = torch.tensor(1, dtype=torch.int32, device=run.device)
    run.warmup()
    loader = BatchLoader(run.train_stream, p.batch_tokens, p.micro_batch_tokens, 0, 1, run.device)
    window = run.window_tensor(p.steps // 2)
    run.train_step(0, loader.get(0), window)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for s in range(1, args.steps + 1):
            run.train_step(s, loader.get(s), window)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.steps
    per_fam, per_kernel = defaultdict(float), defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        per_kernel[evt.key] += us
        per_fam[family(evt.key)] += us
    total = sum(per_fam.values())
    print(f"step wall {wall * 1e3:.1f} ms, GPU kernel time {total / 1e3 / args.steps:.1f} ms per step")
    print("| family | ms/step | share |\n|---|---|---|")
    for fam, us in sorted(per_fam.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {us / 1e3 / args.steps:.1f} | {us / total:.1%} |")
    print("\ntop kernels:")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{us / 1e3 / args.steps:8.2f} ms  {family(name):28s} {name[:110]}")
    if args.out:
        from speedrun.atomic import write_json

        write_json(args.out, {"variant": args.variant, "step_wall_ms": wall * 1e3,
                              "families_ms_per_step": {k: v / 1e3 / args.steps for k, v in per_fam.items()},
                              "top_kernels_ms_per_step": {k: v / 1e3 / args.steps for k, v in
                                                          sorted(per_kernel.items(), key=lambda kv: -kv[1])[:40]},
                              "gpu": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
