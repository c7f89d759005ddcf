"""Throughput benchmark: tokens/s of the training step across the attention-window schedule.

    python -m benchmarks.throughput [--variants default,bf16] [--steps 20] [--out FILE]

Each variant runs in its own process (clean memory peak and compile timing) through the real
trainer (`speedrun.train.Run`: model, FP8, compiled model and Muon, loader over memory-mapped
shards) on synthetic shards (random ids with a document break every ~600 tokens). Per variant:
compile + warm-up seconds (untimed in a real run), tokens/s at the first, middle and last window
of the schedule, their schedule-weighted mean (Simpson's rule over the linear window ramp),
MFU against the bf16 matmul rate measured in the same process, peak memory, and the number of
graphs compiled after warm-up (must be 0). A variant whose training loss turns non-finite is
reported INVALID, without a speed: NaN data runs faster than real data.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.switches import apply_switches

# name -> overrides of params.yaml's train section, or of a library switch (switches.SWITCHES)
VARIANTS = {
    # the default recipe (record #89's math, speedrun/record/): overrides of params.yaml's record section
    "record": {"recipe": "record"},
    "record_eighths": {"recipe": "record", "micro_batch_tokens": 0},   # the record's own micro-batches (memory!)
    # the previous default: twice as many micro-batches (8 / 16 / 24 per stage), twice the
    # per-micro-batch fixed work (table-gradient adds, weight casts, launches): 0.92x, 15.6 GiB
    "record_micro16k": {"recipe": "record", "micro_batch_tokens": 16384},
    "record_bf16": {"recipe": "record", "fp8": "off"},
    # the default on the code paths a compute-capability-8.9 card (RTX 4090) takes, under its 24 GB
    "record_sm89": {"recipe": "record", "emulate": "sm89"},
    # the MLP backward's d(pre) as a cuBLAS matmul + a pointwise kernel, the default's fused
    # epilogue undone (record/mlp.py BACKWARD): predicted -2%, measured -0.8% on an H200
    "record_pointwise_mlp_bwd": {"recipe": "record", "mlp_backward": "pointwise"},
    # the DC correction's products as fp32 GEMMs on CUDA cores (record/dc.py MATMUL), the default's
    # bf16 tensor-core GEMMs undone: -2% on an H200
    "record_dc_fp32": {"recipe": "record", "dc_matmul": "fp32"},
    # the DC head mix as one einsum (record/dc.py MIX): cuBLAS's fp32 gemv + GEMM, the default's sum undone
    "record_dc_einsum": {"recipe": "record", "dc_mix": "einsum"},
    # the tables' gradients through autograd (record/lookup.py MODE): a dense table-sized gradient
    # per micro-batch and a bf16 add of it into .grad, the default's in-place rows undone
    "record_autograd_tables": {"recipe": "record", "table_grads": "autograd"},
    # the MLP's ReLU^2, e4m3 cast and amax in the up projection's matmul kernel (record/mlp.py
    # FORWARD) instead of cuBLAS's matmul + Inductor's pointwise kernel and reduction: -1.4% on an H200
    "record_fused_mlp_fwd": {"recipe": "record", "mlp_forward": "fused"},
    # the head's loss kernel in Triton (record/loss.py LOSS_KERNEL): two reads of each row of logits
    # and four special-function operations a logit, the default CUDA kernel's one read and three undone
    "record_triton_loss": {"recipe": "record", "loss_kernel": "triton"},
    # the head's logits 16,384 rows at a time (record/loss.py HEAD_CHUNK_ROWS), twice the default's
    # chunk: fewer fp32 adds of the head's weight gradient, 1.5 GB more memory
    "record_head_chunk16k": {"recipe": "record", "head_chunk_rows": 16384},
    # the record's own code (.reference/, fetched by benchmarks.reference) on the same synthetic tokens
    "reference": {"recipe": "reference"},
    # the previous recipe (train.recipe: classic): overrides of params.yaml's train section
    "classic": {},
    "default": {},
    "fp8": {"fp8": "on"},                         # torchao float8 on the MLP
    "fp8_mlp": {"fp8_mlp": "on"},                 # FP8 operands inside the fused MLP kernels
    "bf16_mlp": {"fp8_mlp": "off"},               # the fused MLP kernels in bf16
    "fp8_attn": {"fp8_attn": "on"},               # FP8 forward of the attention's q/k/v and output projections
    "fp8_head": {"fp8_head": "on"},               # FP8 head matmuls (head.py)
    "unfused_ce": {"fused_ce": False},            # torch.compile'd head + soft-cap + CE
    "exact_tanh": {"fast_tanh": False},           # fused CE with the exact (exp + divide) tanh
    "unfused_mlp": {"fused_mlp": False},          # ReLU^2 as compiled pointwise kernels (mlp.py)
    "embed_dense": {"embed_grad": "dense"},       # bf16 nn.Embedding tables: dense backward + bf16 adds
    # the later records' architecture switches, spelt out in full so a name means the same
    # whatever the defaults (see learning.VARIANTS); the default is key_offset_only
    "before_arch3": {"key_offset": False, "backout_layer": -1, "ve_gates": False},
    "arch3": {"key_offset": True, "backout_layer": 7, "ve_gates": True},
    "key_offset_only": {"key_offset": True, "backout_layer": -1, "ve_gates": False},
    "no_backout": {"key_offset": True, "backout_layer": -1, "ve_gates": True},
    "no_ve_gates": {"key_offset": True, "backout_layer": 7, "ve_gates": False},
    "ve_gates": {"ve_gates": True},
    "attn_gate": {"attn_gate": True},
    # grouped-query attention: k/v projections (and value embeddings) n_head / n_kv_head times
    # narrower. Predicted from the matmul work per token (11 attention layers x 4 768^2 units, 12
    # MLPs x 8, head 65.5): gqa3 -5.4%, gqa2 -7.1%, mqa -8.9% of the matmul FLOPs, i.e. about
    # +3%, +4% and +5% tok/s with matmuls ~55% of the step
    "gqa3": {"n_kv_head": 3},
    "gqa2": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "mha": {"n_kv_head": 0},
    # the public one-4090 recipe (Deveraux-Parker/nanoGPT_1GPU_SPEEDRUN, 0.92B tokens in ~115 min)
    # run through this trainer: same batch (16 x 32k), window ramp 256 -> 1792 and optimizers
    # (Newton-Schulz Muon, no NorMuon), multi-query attention (one k/v head), torchao float8
    # training on the MLP and an FP8 forward of the attention projections (it converts every
    # block linear), bf16 embedding tables, a compiled (not fused) soft-capped head in bf16,
    # attention gate, backout after block 8, no key offset. NOT reproduced: its first block has
    # neither attention nor MLP, so this variant does ~6% more matmul work per token than the
    # recipe: a ratio against it overstates our lead by up to that
    "recipe_4090": {"n_kv_head": 1, "fp8": "on", "fp8_attn": "on", "fp8_head": "off", "fused_ce": False,
                    "fast_tanh": False, "fused_mlp": False, "fp8_mlp": "off", "embed_grad": "dense",
                    "key_offset": False, "backout_layer": 8, "ve_gates": False, "attn_gate": True,
                    "muon_normuon": False, "muon_coeffs": "newton-schulz"},
    "mtp": {"mtp_weights": [0.5, 0.25]},          # 3 targets per row in the fused CE kernel
    "bigram": {"bigram_vocab": 5 * 50304},        # hashed bigram embedding (5 x vocab rows)
    "bigram2x": {"bigram_vocab": 2 * 50304},
    "micro64k": {"micro_batch_tokens": 65536},   # half the launches per token: bounds host overhead (H100 memory only)
    "micro16k": {"micro_batch_tokens": 16384},
    "micro8k": {"micro_batch_tokens": 8192},
}


def invalid_reason(losses: dict[str, float]) -> str | None:
    """Why a variant's speed must not be reported: a non-finite training loss. Besides being
    wrong, NaN data runs FASTER on a GPU (tensor cores fed constant bits draw less power, so the
    clock throttles less): an invalid FlexAttention option once looked like a 10% gain that way."""
    bad = {phase: loss for phase, loss in losses.items() if not math.isfinite(loss)}
    return f"non-finite training loss {bad}" if bad else None


def schedule_rate(batch_tokens: int, ms_start: float, ms_middle: float, ms_end: float) -> float:
    """Tokens/s over the whole run: the window grows linearly with the step, so average the step
    TIME over the ramp (Simpson's rule on its start, middle and end), not the rates."""
    return batch_tokens / ((ms_start + 4 * ms_middle + ms_end) / 6e3)


def synthetic_shards(root: Path, train_tokens: int, val_tokens: int, train_shards: int = 1) -> Path:
    from speedrun.atomic import write_json
    from speedrun.shards import write_shard

    rng = np.random.default_rng(0)
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, n, parts in (("train", train_tokens, train_shards), ("val", val_tokens, 1)):
        toks = rng.integers(0, 50257, n, dtype=np.uint16)
        toks[rng.random(n) < 1 / 600] = 50256
        entries[split] = []
        for i, piece in enumerate(np.array_split(toks, parts)):
            write_shard(out / f"{split}_{i:06d}.bin", piece)
            entries[split].append({"file": f"{split}_{i:06d}.bin", "tokens": int(piece.size)})
    write_json(out / "manifest.json", {**entries, "source": "synthetic"})
    return out


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure_variant(name: str, overrides: dict, steps_per_window: int, params_path: str) -> dict:
    import torch

    from speedrun.metrics import measure_bf16_tflops
    from speedrun.model import flops_per_token, matmul_params
    from speedrun.params import load_section
    from speedrun.schedule import window_blocks
    from speedrun.train import Paths, Run, TrainParams, compiled_graphs, effective

    base = load_section("train", TrainParams, params_path)
    p = dataclasses.replace(base, **apply_switches(overrides))
    settle = 3
    n_steps = 3 * (settle + steps_per_window)
    tmp = Path(tempfile.mkdtemp())
    shards = synthetic_shards(tmp, (n_steps + 2) * p.batch_tokens + 1, p.val_tokens + 1)
    run = Run(p, Paths(shards, tmp / "ckpt", tmp / "final.pt", tmp / "train.json", None),
              log=lambda msg, **_: progress(msg))
    device = run.device
    peak_tflops = measure_bf16_tflops(device)
    t0 = time.perf_counter()
    run._build()
    run._window = torch.tensor(1, dtype=torch.int32, device=device)
    progress(f"{name}: built in {time.perf_counter() - t0:.1f}s, compiling (warm-up)")
    warmup_s = run.warmup()
    progress(f"{name}: warm-up {warmup_s:.1f}s")
    graphs = compiled_graphs()
    from speedrun.loader import BatchLoader

    loader = BatchLoader(run.train_stream, p.batch_tokens, p.micro_batch_tokens, 0, 1, device)
    ep = effective(p)
    phases = {"start": 0, "middle": ep.steps // 2, "end": ep.steps}
    data_step = 0
    result = {"variant": name, "overrides": overrides, "compile_warmup_s": round(warmup_s, 2),
              "build_s": round(time.perf_counter() - t0 - warmup_s, 2)}
    mean_ms, losses = {}, {}
    collections = []   # (generation, ms) of each garbage collection, via gc.callbacks
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append((info["generation"], (time.perf_counter() - started[0]) * 1e3))

    gc.callbacks.append(on_gc)
    for phase, sched_step in phases.items():
        window = run.window_tensor(sched_step)
        for _ in range(settle):
            run.train_step(sched_step, loader.get(data_step), window)
            data_step += 1
        torch.cuda.synchronize(device)
        collections.clear()
        t = time.perf_counter()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps_per_window + 1)]
        marks[0].record()
        for k in range(steps_per_window):
            loss = run.train_step(sched_step, loader.get(data_step), window)
            marks[k + 1].record()   # per-step times without a host sync in between
            data_step += 1
        torch.cuda.synchronize(device)
        dt = (time.perf_counter() - t) / steps_per_window
        losses[phase] = loss.item()   # after the clock stopped
        step_ms = [round(a.elapsed_time(b), 1) for a, b in zip(marks, marks[1:])]
        result[f"step_ms_each_{phase}"] = step_ms
        # Python garbage collections during the window: {generation: [count, ms]}
        result[f"gc_{phase}"] = {g: [sum(1 for c in collections if c[0] == g),
                                     round(sum(c[1] for c in collections if c[0] == g), 1)]
                                 for g in sorted({c[0] for c in collections})}
        progress(f"{name}: {phase} window: {dt * 1e3:.1f} ms/step (each: {step_ms}; gc {result[f'gc_{phase}']})")
        mean_ms[phase] = dt * 1e3
        result[f"window_{phase}"] = window_blocks(sched_step, ep.steps, ep.window_start, ep.window_end) * 128
        result[f"step_ms_{phase}"] = round(dt * 1e3, 2)
        result[f"tokens_per_s_{phase}"] = round(p.batch_tokens / dt, 1)
    mean_rate = schedule_rate(p.batch_tokens, *(mean_ms[ph] for ph in phases))
    # the same from each window's median step: one stalled step (a garbage collection, say)
    # moves the mean but not this
    median_rate = schedule_rate(p.batch_tokens, *(float(np.median(result[f"step_ms_each_{ph}"])) for ph in phases))
    mean_window = (ep.window_start + ep.window_end) / 2 * (
        sum(1.0 if lw else 0.5 for lw in run.model.long_window) / ep.n_layer)
    fpt = flops_per_token(run.cfg, matmul_params(run.model), mean_window)
    result.update({
        "tokens_per_s_schedule_mean": round(mean_rate, 1),
        "tokens_per_s_schedule_median_steps": round(median_rate, 1),
        "train_loss": {k: round(v, 4) for k, v in losses.items()},
        "invalid": invalid_reason(losses),
        "flops_per_token": fpt,
        "bf16_matmul_tflops_measured": round(peak_tflops, 1),
        "mfu": round(fpt * mean_rate / (peak_tflops * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        "recompiles_after_warmup": int(compiled_graphs() - graphs),
        "fp8": run.fp8,
        "fp8_mlp": run.fp8_mlp,
        "batch_tokens": p.batch_tokens,
        "micro_batch_tokens": p.micro_batch_tokens,
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    })
    return result


# RTX 4090: compute capability 8.9, 24,564 MiB of which the CUDA context and the driver keep ~0.5 GiB
SM89 = {"capability": (8, 9), "memory_cap_gib": 23.5}
_TRITON_SHARED: dict[str, int] = {}     # every Triton kernel loaded in this process -> its shared memory


def note_kernel(name: str, shared: list[int]) -> None:
    """A kernel with the shared memory of each config it can launch with: what counts is its
    smallest (an 8.9 card's autotuner would drop the configs that do not fit, not the kernel)."""
    if shared:
        _TRITON_SHARED[name] = max(_TRITON_SHARED.get(name, 0), min(shared))


def record_triton_shared_memory() -> None:
    """Note each Triton kernel's shared memory as it is loaded, so an emulated 8.9 run can name the
    kernels a real 8.9 card could not launch (the one limit the emulation cannot impose). Two ways
    in: this project's @triton.jit kernels load through Triton's CompiledKernel; Inductor's (its
    fused ops and FlexAttention) through its own launchers, which carry `shared`."""
    try:
        from triton.compiler.compiler import CompiledKernel
    except ImportError:
        return
    init = CompiledKernel.__init__

    def wrapped(self, *a, **k):
        init(self, *a, **k)
        try:
            note_kernel(self.name, [int(self.metadata.shared)])
        except (AttributeError, TypeError, ValueError):
            pass
    CompiledKernel.__init__ = wrapped
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return
    make = getattr(CachingAutotuner, "_make_launchers", None)
    if make is None:   # another torch: its kernels go uncounted, and the report says how many it saw
        return

    def make_launchers(self, *a, **k):
        out = make(self, *a, **k)
        note_autotuner(self)
        return out
    CachingAutotuner._make_launchers = make_launchers


def note_autotuner(autotuner) -> None:
    """Inductor's kernel: its name and each launcher's shared memory."""
    name = (getattr(autotuner, "inductor_meta", None) or {}).get("kernel_name") \
        or getattr(getattr(autotuner, "fn", None), "__name__", "inductor kernel")
    note_kernel(name, [int(l.shared) for l in getattr(autotuner, "launchers", []) if hasattr(l, "shared")])


def shared_memory_report(limit: int) -> dict:
    over = {n: b for n, b in sorted(_TRITON_SHARED.items(), key=lambda kv: -kv[1]) if b > limit}
    return {"triton_kernels_seen": len(_TRITON_SHARED),
            "max_shared_memory_bytes": max(_TRITON_SHARED.values(), default=0),
            "kernels_over_sm89_shared_memory": over}


def emulate_capability(capability: tuple[int, int], memory_cap_gib: float) -> dict:
    """Make this process take the code paths a card of `capability` would, under its memory.

    Every capability check of this project and Inductor's tile choices (FlexAttention's included)
    go through torch.cuda.get_device_capability, so answering `capability` there picks that card's
    kernels and tiles; only the compile target keeps the real answer. Not emulated: the card's smaller
    shared memory per block (99 KiB on 8.9 against 227 KiB here) and its bandwidth; the kernels
    still compile for this GPU's architecture."""
    import torch

    real_fn = torch.cuda.get_device_capability
    real = real_fn()
    torch.cuda.get_device_capability = capability_answer(real_fn, capability)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * 2**30 / total))
    record_triton_shared_memory()
    return {"emulated_capability": list(capability), "real_capability": list(real),
            "memory_cap_gib": memory_cap_gib, "paths": selected_paths(torch.device("cuda"))}


def capability_answer(real_fn, capability: tuple[int, int]):
    """A torch.cuda.get_device_capability that answers `capability` to everyone but the compile
    target, which stays this GPU's (kernels built for 8.9 do not load on it): Inductor reads it
    through Dynamo's device interface, Triton's launcher through its CUDA driver."""
    import torch

    def answer(device=None):
        # code that Dynamo traces (the record MLP's backward asks inside its autograd.Function)
        # gets the card's answer before anything Dynamo cannot trace (sys._getframe)
        if torch.compiler.is_dynamo_compiling():
            return capability
        caller = sys._getframe(1).f_globals.get("__name__", "")
        target = caller == "torch._dynamo.device_interface" or caller.startswith("triton.")
        return real_fn(device) if target else capability
    return answer


def selected_paths(device) -> dict:
    """Which implementation each capability-dependent part of the trainer picks on `device`."""
    import torch

    from speedrun.mlp import tma_capable
    from speedrun.record import loss_cuda
    from speedrun.record.attention import SMALL_SHARED_MEMORY, flex_kernel_options
    from speedrun.train import fp8_wanted

    cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if cuda else None
    # an H100's opt-in shared memory per block where no GPU answers (tests that fake a capability)
    optin = (torch.cuda.get_device_properties(device).shared_memory_per_block_optin
             if cuda and torch.cuda.is_available() else 232448)
    return {"fp8_matmuls": fp8_wanted("auto", device, "fp8"),   # record: MLP + head; classic: head + MLP
            "tma_mlp_kernels": tma_capable(device),             # classic recipe's fused MLP kernels
            # record recipe: FlexAttention's tiles (None: Inductor's choice for the card)
            "flex_kernel_options": flex_kernel_options(capability),
            # record recipe: the head's loss kernel in CUDA with its row in shared memory (else Triton)
            "cuda_loss_kernel": cuda and loss_cuda.fits(capability, SMALL_SHARED_MEMORY.get(capability, optin), 50304)}


def record_shards(root: Path, batches: list[int], steps: int, settle: int) -> Path:
    """The same synthetic tokens for our record run and the reference's: every timed and settling
    step of the three stages, a margin for document-aligned batches, the reference's warm-up
    (14 steps of up to 393k tokens, each with a 262,144-token validation forward from one loader:
    3.67M validation tokens). Several train shards: the reference's loader opens the next at once."""
    return synthetic_shards(root, int(1.5 * (settle + steps) * sum(batches)) + 6 * 10**6, 4_000_000, train_shards=4)


def record_run(overrides: dict, params_path: str, steps: int, settle: int):
    """A RecordRun of params.yaml's record section with `overrides`, over the synthetic tokens of
    record_shards; the 4090 emulation first where asked. Returns (run, emulation info)."""
    from speedrun.params import load_yaml, parse_section
    from speedrun.record.trainer import RecordParams, RecordRun
    from speedrun.train import Paths, TrainParams

    emulated = emulate_capability(**SM89) if overrides.get("emulate") == "sm89" else {}
    overrides = apply_switches(overrides)
    raw = load_yaml(params_path)
    p = dataclasses.replace(parse_section(raw, "train", TrainParams), recipe="record")
    r = dataclasses.replace(parse_section(raw, "record", RecordParams),
                            **{k: v for k, v in overrides.items() if k not in ("recipe", "emulate")})
    tmp = Path(tempfile.mkdtemp())
    shards = record_shards(tmp, r.stage_batch_tokens, steps, settle)
    p = dataclasses.replace(p, val_tokens=r.val_chunk_tokens)
    run = RecordRun(p, r, Paths(shards, tmp / "ckpt", tmp / "final.pt", tmp / "train.json", None),
                    log=lambda msg, **_: progress(msg))
    return run, emulated


def run_mean_rate(sched, rates: list[float]) -> tuple[float, float]:
    """(tokens/s over the whole run, its seconds): every stage's tokens at its own rate, the
    extension steps at stage 3's."""
    tokens = [sched.stages[i].batch_tokens * (b - a) for i, (a, b) in enumerate(sched.boundaries)]
    seconds = sum(n / rates[min(i, 2)] for i, n in enumerate(tokens))
    return sum(tokens) / seconds, seconds


def median_step_rate(sched, result: dict) -> float:
    """run_mean_rate from each stage's median timed step: the reference's first stage-3 step has
    taken 1.1-1.4 s against 0.65 s for the rest, and one such step moves the mean, not this."""
    return run_mean_rate(sched, [sched.stages[i].batch_tokens / (float(np.median(result[f"step_ms_each_stage{i + 1}"])) / 1e3)
                                 for i in range(3)])[0]


def measure_record(name: str, overrides: dict, steps: int, params_path: str) -> dict:
    """Tokens/s of the record recipe per batch stage (its micro-batch counts and windows), their
    mean weighted by each stage's share of the run's tokens, a validation pass (the record's
    262,144-token chunks), peak memory, compile time and recompiles after the warm-up."""
    import torch

    from speedrun.metrics import measure_bf16_tflops
    from speedrun.record.model import flops_per_token
    from speedrun.train import compiled_graphs

    settle = 2
    run, emulated = record_run(overrides, params_path, steps, settle)
    r = run.r
    device = run.device
    peak_tflops = measure_bf16_tflops(device)
    run._build()
    warmup_s = run.warmup()
    progress(f"{name}: warm-up {warmup_s:.1f}s")
    graphs = compiled_graphs()
    run.begin_steps(0)
    result = {"variant": name, "recipe": "record", "overrides": overrides, "compile_warmup_s": round(warmup_s, 2),
              **emulated}
    sched, rates, losses = run.sched, [], {}
    for i, (start, end) in enumerate(sched.boundaries[:3]):
        for k in range(settle):
            run.step(start + k)
        torch.cuda.synchronize(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        t = time.perf_counter()
        for k in range(steps):
            loss = run.step(start + settle + k)
            marks[k + 1].record()
        torch.cuda.synchronize(device)
        dt = (time.perf_counter() - t) / steps
        losses[f"stage{i + 1}"] = loss.item()
        rate = sched.stages[i].batch_tokens / dt
        rates.append(rate)
        result[f"step_ms_each_stage{i + 1}"] = [round(a.elapsed_time(b), 1) for a, b in zip(marks, marks[1:])]
        result[f"tokens_per_s_stage{i + 1}"] = round(rate, 1)
        progress(f"{name}: stage {i + 1}: {dt * 1e3:.1f} ms/step, {rate / 1e3:.0f}k tok/s")
    mean_rate, seconds = run_mean_rate(sched, rates)
    t = time.perf_counter()
    val = run.val_loss(0)
    val_s = time.perf_counter() - t
    windows = [sched.plan(s).long_window for s in range(0, sched.total, 10)]
    fpt = flops_per_token(run.model, float(np.mean(windows)) / 2)
    result.update({
        "tokens_per_s_schedule_mean": round(mean_rate, 1),
        "tokens_per_s_schedule_median_steps": round(median_step_rate(sched, result), 1),
        "projected_train_s": round(seconds, 1),
        "train_loss": {k: round(v, 4) for k, v in losses.items()},
        "invalid": invalid_reason(losses) or (None if math.isfinite(val) else f"validation loss {val}"),
        "val_chunk_tokens": r.val_chunk_tokens, "val_chunk_s": round(val_s, 2),
        "flops_per_token": fpt,
        "bf16_matmul_tflops_measured": round(peak_tflops, 1),
        "mfu": round(fpt * mean_rate / (peak_tflops * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        "recompiles_after_warmup": int(compiled_graphs() - graphs),
        "fp8": run.fp8, "micro_batch_tokens": r.micro_batch_tokens,
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
    })
    if emulated:
        from speedrun.record.attention import SMALL_SHARED_MEMORY

        result.update(shared_memory_report(SMALL_SHARED_MEMORY[SM89["capability"]]))
    # the table's columns for the classic recipe's three windows hold the three stages here
    result.update({"tokens_per_s_start": rates[0], "tokens_per_s_middle": rates[1], "tokens_per_s_end": rates[2]})
    return result


REFERENCE_SETTLE = 2   # untimed steps at each stage's start, before the timed ones


def run_reference(steps: int, params_path: str, **patches) -> tuple[str, dict[int, float]]:
    """The record's own train_gpt.py, patched by benchmarks.reference.throughput_patches(`steps`,
    REFERENCE_SETTLE, **patches), on record_shards' synthetic tokens. Returns its log and each
    timed step's milliseconds by step number."""
    import re

    from benchmarks.reference import launch_reference_script, throughput_patches
    from speedrun.params import load_yaml, parse_section
    from speedrun.record.trainer import RecordParams

    ref_dir = Path(os.environ.get("REFERENCE_DIR", ".reference/modded-nanogpt"))
    if not (ref_dir / "train_gpt.py").exists():
        raise SystemExit(f"no reference at {ref_dir}: fetch it first "
                         "(python -m benchmarks.reference --fetch URL_OR_GIT_DIR --checks init)")
    r = parse_section(load_yaml(params_path), "record", RecordParams)
    tmp = Path(tempfile.mkdtemp())
    shards = record_shards(tmp, r.stage_batch_tokens, steps, REFERENCE_SETTLE)
    proc, log = launch_reference_script(ref_dir, tmp / "reference", shards,
                                        throughput_patches(steps, REFERENCE_SETTLE, **patches))
    rc = proc.wait()
    text = log.read_text()
    if rc != 0 or "REF_STEP_MS" not in text:
        progress(f"reference exited {rc}; log tail:\n{text[-3000:]}")
        raise SystemExit(f"reference run failed (exit {rc})")
    return text, dict(json.loads(re.search(r"REF_STEP_MS (.*)", text).group(1)))


def measure_reference(name: str, overrides: dict, steps: int, params_path: str) -> dict:
    """Tokens/s of the record's own train_gpt.py per batch stage, on the tokens measure_record uses,
    its stage mean weighted as ours, its own warm-up time and peak memory (its closing line)."""
    import re

    import torch

    from speedrun.record.trainer import RecordParams, schedule

    settle = REFERENCE_SETTLE
    t = time.perf_counter()
    text, step_ms = run_reference(steps, params_path)
    result = {"variant": name, "recipe": "reference", "overrides": overrides,
              "compile_warmup_s": float(re.search(r"REF_WARMUP_S ([0-9.]+)", text).group(1)),
              "process_start_to_end_s": round(time.perf_counter() - t, 1)}
    rates = []
    sched = schedule(RecordParams())   # the record's own schedule (checked equal: benchmarks.reference schedule)
    for i, (start, _) in enumerate(sched.boundaries[:3]):
        batch = sched.stages[i].batch_tokens
        ms = [step_ms[s] for s in range(start + settle, start + settle + steps)]
        rate = batch / (sum(ms) / len(ms) / 1e3)
        rates.append(rate)
        result[f"step_ms_each_stage{i + 1}"] = [round(m, 1) for m in ms]
        result[f"tokens_per_s_stage{i + 1}"] = round(rate, 1)
        progress(f"{name}: stage {i + 1}: {sum(ms) / len(ms):.1f} ms/step, {rate / 1e3:.0f}k tok/s")
    mean_rate, seconds = run_mean_rate(sched, rates)
    peak = re.search(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB", text)
    result.update({
        "tokens_per_s_schedule_mean": round(mean_rate, 1), "projected_train_s": round(seconds, 1),
        "tokens_per_s_schedule_median_steps": round(median_step_rate(sched, result), 1),
        "mfu": float("nan"), "recompiles_after_warmup": "—",
        "peak_memory_gib": round(int(peak.group(1)) / 1024, 2) if peak else float("nan"),
        "peak_memory_reserved_gib": round(int(peak.group(2)) / 1024, 2) if peak else float("nan"),
        "tokens_per_s_start": rates[0], "tokens_per_s_middle": rates[1], "tokens_per_s_end": rates[2],
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "substitutions": "FA3 -> torch varlen_attn; FP8 scale slices copied by .abs() (cuBLAS alignment); "
                         "warm-up cut to the timed stages' first two steps and one validation forward; "
                         "loop cut to the timed steps; no validation",
    })
    return result


BASELINE = "recipe_4090"   # a row of this name adds each row's ratio to it (same call only)


def table(rows: list[dict], baseline: str = BASELINE) -> str:
    """Classic rows: the window schedule's start/middle/end; record rows: its stages 1/2/3."""
    base = next((r for r in rows if r["variant"] == baseline and "error" not in r and not r.get("invalid")), None)
    head = ("| variant | tok/s start (stage 1) | tok/s mid (stage 2) | tok/s end (stage 3) | schedule mean "
            "| from median steps | MFU | peak GiB | compile s | recompiles |") + (
                f" x {baseline} | x {baseline}, median steps |" if base else "")
    cols = 10 + 2 * (base is not None)
    lines = [head, "|" + "---|" * cols]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:60]} |" + "|" * (cols - 2) + " ")
            continue
        if r.get("invalid"):   # its speed is not a result: say why instead
            lines.append(f"| {r['variant']} | INVALID: {r['invalid'][:70]} |" + "|" * (cols - 2) + " ")
            continue
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s_start'] / 1e3:.0f}k | {r['tokens_per_s_middle'] / 1e3:.0f}k "
            f"| {r['tokens_per_s_end'] / 1e3:.0f}k | **{r['tokens_per_s_schedule_mean'] / 1e3:.0f}k** "
            f"| {_k(r.get('tokens_per_s_schedule_median_steps'))} "
            f"| {r['mfu']:.1%} | {r['peak_memory_gib']:.1f} | {r['compile_warmup_s']:.0f} "
            f"| {r['recompiles_after_warmup']} |"
            + (f" {_ratio(r, base, 'tokens_per_s_schedule_mean')} "
               f"| {_ratio(r, base, 'tokens_per_s_schedule_median_steps')} |" if base else ""))
    return "\n".join(lines)


def _ratio(row: dict, base: dict, key: str) -> str:
    a, b = row.get(key), base.get(key)
    return "—" if a is None or b is None else f"{a / b:.2f}"


def _k(rate: float | None) -> str:
    """Thousands of tokens/s, or a dash where the variant has no such figure."""
    return "—" if rate is None else f"{rate / 1e3:.0f}k"


def require_vocabulary() -> None:
    """The record recipe builds its prefix-token table from the GPT-2 vocabulary at its first timed
    step, after minutes of compiling: check that the vocabulary loads before anything runs."""
    from speedrun.tokenizer import get_encoding

    try:
        get_encoding()
    except Exception as e:   # tiktoken downloads what its cache lacks: offline, any network error
        raise SystemExit(f"the GPT-2 vocabulary does not load ({type(e).__name__}): point "
                         "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's gpt2 files") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,recipe_4090")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per window phase")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--baseline", default=BASELINE, help="variant the ratio column divides by")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one variant
    args = ap.parse_args()
    if args.one:
        recipe = VARIANTS[args.one].get("recipe")
        measure = {"record": measure_record, "reference": measure_reference}.get(recipe, measure_variant)
        print(json.dumps(measure(args.one, VARIANTS[args.one], args.steps, args.params)))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:   # before anything runs: a typo must not cost the variants ahead of it
        raise SystemExit(f"unknown variant(s) {', '.join(map(repr, unknown))}; known: {', '.join(VARIANTS)}")
    if any(VARIANTS[n].get("recipe") in ("record", "reference") for n in names):
        require_vocabulary()
    rows = []
    for name in names:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--one", name,
                               "--steps", str(args.steps), "--params", args.params],
                              stdout=subprocess.PIPE, text=True, env=os.environ)  # stderr streams through
        if proc.returncode != 0:
            rows.append({"variant": name, "error": f"exit code {proc.returncode} (see the log above)"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["process_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(rows[-1]), flush=True)
        if args.out:   # after every variant: a call cut by its time limit keeps what finished
            from speedrun.atomic import write_json

            write_json(args.out, {"benchmark": "throughput", "results": rows})
    print(table(rows, args.baseline))


if __name__ == "__main__":
    main()
