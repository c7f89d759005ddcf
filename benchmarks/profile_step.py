"""Where a training step's GPU time goes: torch.profiler over a few steps of the default recipe.

    python -m benchmarks.profile_step [--steps 2] [--variant record] [--stage 3] [--gaps FILE]
    python -m benchmarks.profile_step --variant classic              # the previous recipe, middle window
    python -m benchmarks.profile_step --variant reference --stage 3  # the record's own code, same tokens

Prints the CUDA kernels grouped by family (matmul, attention, elementwise/fused, optimizer, ...) and
the top kernels, so throughput work can aim at the largest share instead of guessing.
`--gaps FILE` also records the host side and writes where the GPU sat idle between kernels: each
gap with the kernel that ended it, how long before its start the host launched it (about 0: the
GPU was waiting for the host), the host ops running at that launch, and every synchronising
CUDA call, so a stall can be traced to its line.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

FAMILIES = [  # first match wins; substrings of kernel names
    ("dynamically composable attention", ("dc_attention", "_dc_")),
    # flex runs as inductor templates; the record's own code runs flash (varlen) kernels
    ("attention (flex, flash)", ("flex", "attention", "triton_tem", "flash", "fmha")),
    # the record's fused FP8 MLP (matmul with relu^2 in its epilogue) counts as matmul
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "_mm_", "ampere", "cublas",
                "linear_relu_square")),
    ("cross-entropy/softcap", ("log_softmax", "nll", "cross_entropy", "tanh", "_loss_kernel", "ce_fwd")),
    # Polar Express's symmetric products (XXT, XTX, b*A + c*A@A) are the record's optimizer kernels
    ("optimizer", ("adam", "foreach", "lerp", "xxt_kernel", "xtx_kernel", "ba_plus_caa", "polar")),
    ("copies", ("copy", "memcpy", "memset", "cat")),
    ("triton fused (norms, rotary, relu^2, ...)", ("triton",)),
]


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMalloc", "cudaFree")


def idle_gaps(trace: dict, min_gap_us: float = 10.0) -> dict:
    """GPU idle intervals of a Chrome trace (torch.profiler with CPU and CUDA) and their host context."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in ev if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    runtime = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")]   # Triton launches: driver API
    launch = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    host_ops = sorted((e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function")),
                      key=lambda e: e["ts"])
    starts = [e["ts"] for e in host_ops]

    def host_at(t: float) -> list[str]:
        # ops whose interval contains t, outermost first (ops start before t: bisect the sorted starts)
        i = bisect.bisect_right(starts, t)
        inside = [e for e in host_ops[max(0, i - 4000):i] if e["ts"] + e["dur"] >= t]
        return [e["name"][:70] for e in sorted(inside, key=lambda e: -e["dur"])]

    gaps, busy_end, prev = [], gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for k in gpu[1:]:
        gap = k["ts"] - busy_end
        if gap > min_gap_us:
            ln = launch.get(k.get("args", {}).get("correlation"))
            ctx = host_at(ln["ts"]) if ln else []
            gaps.append({"gap_us": round(gap, 1), "prev_kernel": prev["name"][:60], "next_kernel": k["name"][:80],
                         "launched_us_before_start": round(k["ts"] - ln["ts"], 1) if ln else None,
                         "host_outer": ctx[:2], "host_inner": ctx[-2:]})
        if k["ts"] + k["dur"] > busy_end:
            busy_end, prev = k["ts"] + k["dur"], k
    span = busy_end - gpu[0]["ts"]
    by_inner = defaultdict(float)
    for g in gaps:
        by_inner[" < ".join(g["host_inner"][::-1]) or "?"] += g["gap_us"]
    syncs = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if e["name"] in SYNC_CALLS:
            syncs[e["name"]][0] += 1
            syncs[e["name"]][1] += e["dur"]
    return {"span_ms": round(span / 1e3, 2), "idle_ms": round(sum(g["gap_us"] for g in gaps) / 1e3, 2),
            "gaps_over_min": len(gaps), "min_gap_us": min_gap_us,
            "idle_by_host_op_ms": {k: round(v / 1e3, 2) for k, v in sorted(by_inner.items(), key=lambda kv: -kv[1])[:25]},
            "sync_calls": {k: {"count": c, "ms": round(t / 1e3, 2)} for k, (c, t) in syncs.items()},
            "idle_by_next_kernel_ms": _top_sums(gaps, lambda g: g["next_kernel"][:60]),
            "idle_by_prev_kernel_ms": _top_sums(gaps, lambda g: g["prev_kernel"]),
            "largest_gaps": sorted(gaps, key=lambda g: -g["gap_us"])[:40]}


def gpu_times(trace: dict):
    """(kernel name, microseconds) of every GPU row of a Chrome trace."""
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in GPU_CATS:
            yield e["name"], e["dur"]


def _top_sums(gaps: list[dict], key) -> dict:
    sums = defaultdict(float)
    for g in gaps:
        sums[key(g)] += g["gap_us"]
    return {k: round(v / 1e3, 2) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])[:15]}


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def classic_stepper(overrides: dict, params: str, steps: int):
    """step(k): the classic recipe's k-th step at the middle window of its schedule."""
    import torch

    from benchmarks.throughput import progress, synthetic_shards
    from speedrun.loader import BatchLoader
    from speedrun.params import load_section
    from speedrun.train import Paths, Run, TrainParams

    p = dataclasses.replace(load_section("train", TrainParams, params), **overrides)
    tmp = Path(tempfile.mkdtemp())
    shards = synthetic_shards(tmp, (steps + 4) * p.batch_tokens + 1, p.val_tokens + 1)
    run = Run(p, Paths(shards, tmp / "c", tmp / "f.pt", tmp / "t.json", None), log=lambda m, **_: progress(m))
    run._build()
    run._window = torch.tensor(1, dtype=torch.int32, device=run.device)
    run.warmup()
    loader = BatchLoader(run.train_stream, p.batch_tokens, p.micro_batch_tokens, 0, 1, run.device)
    window = run.window_tensor(p.steps // 2)
    return lambda k: run.train_step(k, loader.get(k), window)


def record_stepper(overrides: dict, params: str, stage: int, steps: int):
    """step(k): the record recipe's step k after the start of batch stage `stage` (its micro-batch
    count, windows and loss weights), on the synthetic tokens of the throughput benchmark."""
    from benchmarks.throughput import record_run

    run, _ = record_run(overrides, params, 2 * steps, settle=2)   # untimed steps, then profiled ones
    run._build()
    run.warmup()
    run.begin_steps(0)
    start = run.sched.boundaries[stage - 1][0]
    return lambda k: run.step(start + 2 + k)   # +2: clear of the stage's first (untie) step


def profile_reference(stage: int, steps: int, params: str) -> tuple[float, dict]:
    """The record's own train_gpt.py (benchmarks.throughput's reference run, same synthetic tokens)
    with torch.profiler over `steps` steps of batch stage `stage`. Returns (mean step wall ms from
    its CUDA events, the Chrome trace)."""
    from benchmarks.throughput import run_reference

    trace_path = Path(tempfile.mkdtemp()) / "reference-trace.json"
    _, step_ms = run_reference(steps, params, profile_stage=stage, trace=trace_path)
    timed = list(step_ms.values())[-steps:]   # the profiled steps (its settling steps come first)
    return sum(timed) / len(timed), json.loads(trace_path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variant", default="record", help="a benchmarks.throughput variant")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gaps", default=None, help="JSON file: GPU idle gaps and their host context")
    ap.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="record recipe: which batch stage")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.throughput import VARIANTS

    overrides = VARIANTS[args.variant]
    trace, prof, plain_wall = None, None, None
    if overrides.get("recipe") == "reference":   # its own process; the kernels come back as a trace
        if args.gaps:
            raise SystemExit("--gaps needs the host side, which the reference's profile does not record")
        wall_ms, trace = profile_reference(args.stage, args.steps, args.params)
        wall = wall_ms / 1e3
    else:
        step = (record_stepper(overrides, args.params, args.stage, args.steps) if overrides.get("recipe") == "record"
                else classic_stepper(overrides, args.params, 2 * args.steps))
        step(0)   # settles: the first step after the warm-up's state reset
        torch.cuda.synchronize()
        t = time.perf_counter()   # the same steps' wall without the profiler's host overhead
        for s in range(1, args.steps + 1):
            step(s)
        torch.cuda.synchronize()
        plain_wall = (time.perf_counter() - t) / args.steps
        acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.gaps else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for s in range(args.steps + 1, 2 * args.steps + 1):
                step(s)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / args.steps
    if args.gaps:   # host ops are in the profile too: take kernel times from the trace's GPU rows only
        path = Path(tempfile.mkdtemp()) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    per_fam, per_kernel, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, us, n in (((name, us, 1) for name, us in gpu_times(trace)) if trace else
                        ((e.key, getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0), e.count)
                         for e in prof.key_averages())):
        if us <= 0:
            continue
        per_kernel[name] += us
        calls[name] += n
        per_fam[family(name)] += us
    total = sum(per_fam.values())
    plain = f" ({plain_wall * 1e3:.1f} ms without the profiler)" if plain_wall else ""
    print(f"step wall {wall * 1e3:.1f} ms{plain}, GPU kernel time {total / 1e3 / args.steps:.1f} ms per step")
    print("| family | ms/step | share |\n|---|---|---|")
    for fam, us in sorted(per_fam.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {us / 1e3 / args.steps:.1f} | {us / total:.1%} |")
    print("\ntop kernels:")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{us / 1e3 / args.steps:8.2f} ms  {family(name):28s} {name[:110]}")
    if args.gaps:
        from speedrun.atomic import write_json

        gaps = idle_gaps(trace)
        write_json(args.gaps, gaps)
        print(f"GPU idle {gaps['idle_ms']:.1f} ms of {gaps['span_ms']:.1f} ms ({args.steps} steps) in "
              f"{gaps['gaps_over_min']} gaps over {gaps['min_gap_us']:.0f} us; sync calls {dict(gaps['sync_calls'])}")
        for op, ms in list(gaps["idle_by_host_op_ms"].items())[:12]:
            print(f"{ms:8.2f} ms idle  while host in: {op}")
    if args.out:
        from speedrun.atomic import write_json

        write_json(args.out, {"variant": args.variant, "stage": args.stage, "step_wall_ms": wall * 1e3,
                              "step_wall_ms_without_profiler": plain_wall and plain_wall * 1e3,
                              # every kernel: [ms per step, launches per step], to diff two profiles
                              "kernels": {k: [v / 1e3 / args.steps, calls[k] / args.steps] for k, v in
                                          sorted(per_kernel.items(), key=lambda kv: -kv[1])},
                              "families_ms_per_step": {k: v / 1e3 / args.steps for k, v in per_fam.items()},
                              "top_kernels_ms_per_step": {k: v / 1e3 / args.steps for k, v in
                                                          sorted(per_kernel.items(), key=lambda kv: -kv[1])[:40]},
                              "gpu": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
