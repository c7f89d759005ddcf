"""The speedrun training loop: train to the target validation loss, time it honestly, resume safely.

Timing rules (those of the public speedrun): the clock runs only while training steps run.
Compilation happens before it starts (warm-up on dummy tokens, after which weights and optimizer
state are reset, so nothing is learned untimed); validation and checkpoint writes stop it and are
reported separately.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .errors import ParamError, SpeedrunError
from .evaluate import evaluate_loss
from .loader import BatchLoader, TokenStream
from .mlp import kernels_run_on
from .metrics import (Stopwatch, device_name, fmt_duration, fmt_rate, git_commit,
                      measure_bf16_tflops, peak_host_memory_gib, peak_memory_gib)
from .model import BLOCK_SIZE, EOT_ID, GPT, build_model, flops_per_token, matmul_params, param_groups
from .optimizer import build_optimizers, set_lr
# the run's environment and its parameters live below this module (evaluation uses them too);
# re-exported here for the trainer's callers (stages, benchmarks, the record recipe, tests)
from .runtime import (compile_regions, compiled_graphs, finish_distributed, fp8_wanted,  # noqa: F401
                      init_distributed, training_device)
from .schedule import lr_multiplier, mtp_weights, muon_momentum, window_blocks
from .shards import MANIFEST, load_manifest, shard_paths, verify_shards
from .train_params import (CPU_TINY, TrainParams, batch_schedule, effective, model_config,  # noqa: F401
                           tiny_run_sizes)


# keys that do not change what a run computes: a checkpoint made under other values still resumes
RUN_CONTROL_KEYS = {"recipe", "nproc", "val_every", "ckpt_every", "target_val_loss", "compile", "warmup_steps", "fp8",
                    "fp8_head", "fused_ce", "fast_tanh", "fused_mlp", "fp8_mlp", "fp8_attn"}
# recipe keys added after checkpoints existed, with the behaviour runs had before each key: a
# key counts in the fingerprint only when it differs from that, so older checkpoints still
# resume, and a default that changes later can never pass for the old behaviour
LATER_RECIPE_KEYS = {"muon_coeffs": "newton-schulz", "muon_normuon": False, "muon_weight_decay": 0.0,
                     "attn_gate": False, "bigram_vocab": 0, "batch_stages": [1.0], "batch_stage_lr": [1.0],
                     "mtp_weights": [], "n_kv_head": 0, "key_offset": False, "backout_layer": -1, "ve_gates": False}


def fingerprint(p: TrainParams, manifest: dict) -> str:
    """Identity of a run: what it trains on and with which trajectory-relevant settings."""
    keys = {k: v for k, v in dataclasses.asdict(p).items() if k not in RUN_CONTROL_KEYS
            and not (k in LATER_RECIPE_KEYS and v == LATER_RECIPE_KEYS[k])}
    data = [s.get("sha256", s.get("file")) for s in manifest.get("train", [])]
    return hashlib.sha256(json.dumps([keys, data], sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- setup helpers

def dataset_name(manifest: dict) -> str:
    """'HuggingFaceFW/fineweb-edu', or 'local:train.jsonl.xz' for local files."""
    src = manifest.get("source")
    if isinstance(src, dict):
        if src.get("dataset"):
            return str(src["dataset"])
        globs = src.get("local_globs") or []
        return "local:" + ",".join(Path(g).name for g in globs) if globs else str(src.get("source"))
    return str(src or manifest.get("dataset") or "unknown")


def enable_fp8(model: GPT, mode: str, device: torch.device) -> bool:
    """torchao float8 training for the MLP matmuls (the head has its own FP8 path: fp8_head)."""
    if not fp8_wanted(mode, device, "fp8"):
        return False
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def wanted(mod, fqn: str) -> bool:
        return fqn.endswith("mlp.c_fc") or fqn.endswith("mlp.c_proj")

    convert_to_float8_training(model, module_filter_fn=wanted,
                               config=Float8LinearConfig.from_recipe_name("tensorwise"))
    return True


def truncate_live_logs(live_dir: Path, step: int) -> None:
    """Drop DVCLive rows past `step`: after a crash they were logged but not checkpointed, and the
    resumed run logs those steps again. Train rows carry the step just done (<= step is kept);
    a validation row at `step` itself was taken before the checkpoint, so it stays too."""
    for tsv in Path(live_dir).glob("plots/metrics/**/*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t", 1)[0]) <= step]
        if len(kept) != len(lines):
            from .atomic import write_text

            write_text(tsv, "".join(kept))


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    REPEAT_GRACE_S = 10.0

    def __init__(self):
        self.signum = None
        self._first = 0.0
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            # Ctrl-C under `dvc repro` reaches us as SIGINT from the terminal and SIGTERM from
            # torchrun at once: one request. Only a signal after the grace period aborts unsaved.
            if time.monotonic() - self._first > self.REPEAT_GRACE_S:
                raise KeyboardInterrupt
            return
        self.signum, self._first = signum, time.monotonic()
        print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint at the end of this step",
              flush=True)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(SpeedrunError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Paths:
    shards: Path
    checkpoints: Path       # resumable state (DVC persist output)
    final: Path             # final weights + config for evaluate_val / export_hf
    metrics: Path           # metrics/train.json
    live: Path | None       # DVCLive directory (None: no per-step files)

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest.pt"


class Run:
    def __init__(self, params: TrainParams, paths: Paths, log=print):
        self.p = effective(params)
        self.paths = paths
        replaced = [k for k, v in CPU_TINY.items() if params.profile == "cpu-tiny"
                    and getattr(params, k) != v and getattr(params, k) != getattr(TrainParams(), k)]
        self.rank, self.world, local = init_distributed()
        self.master = self.rank == 0
        self.log = log if self.master else (lambda *a, **k: None)
        self.device = training_device(self.p.profile, local)
        if replaced:
            self.log(f"profile cpu-tiny replaces train.{', train.'.join(replaced)} with its own values")
        if self.p.batch_tokens % (self.p.micro_batch_tokens * self.world):
            raise ParamError(f"train.batch_tokens ({self.p.batch_tokens}) must split evenly into "
                             f"micro-batches of {self.p.micro_batch_tokens} over {self.world} processes")
        # foreign shards (llm.c / modded-nanogpt downloads) come without our manifest
        self.manifest = load_manifest(paths.shards) if (paths.shards / MANIFEST).exists() else {
            "train": [{"file": q.name} for q in shard_paths(paths.shards, "train")]}
        self.train_stream = TokenStream(shard_paths(paths.shards, "train"))
        self.val_stream = TokenStream(shard_paths(paths.shards, "val"))
        self.fingerprint = fingerprint(self.p, self.manifest)
        self.schedule = batch_schedule(self.p, self.world)

    def check_data(self) -> None:
        """Enough tokens for every step and the validation, checked before anything compiles."""
        p = self.p
        need = self.schedule.total + 1
        if len(self.train_stream) < need:
            raise SpeedrunError(
                f"train shards hold {len(self.train_stream):,} tokens but {p.steps} steps of "
                f"{self.stages_text()} need {need:,}: lower train.steps or download more "
                f"(download.max_tokens)")
        if len(self.val_stream) < p.val_tokens + 1:
            raise SpeedrunError(f"validation shards hold {len(self.val_stream):,} tokens, fewer than "
                                f"train.val_tokens + 1 ({p.val_tokens + 1:,}): lower train.val_tokens "
                                f"or raise tokenize.val_tokens")

    def stages_text(self) -> str:
        toks = self.schedule.tokens_per_stage
        return f"{toks[0]:,} tokens" if len(toks) == 1 else "/".join(f"{t:,}" for t in toks) + " tokens"

    # -- model and optimizers ------------------------------------------------------------
    def _build(self):
        p = self.p
        torch.manual_seed(p.seed)
        self.cfg = model_config(p)
        self.model = build_model(self.cfg, self.device)
        self.fp8 = enable_fp8(self.model, p.fp8, self.device)
        self.model.fused_ce = p.fused_ce
        self.model.fast_tanh = p.fast_tanh
        # the fused MLP kernels need Hopper+ (TMA); torchao FP8 replaces the MLP linears: its own
        # matmuls. On CPU the fused path is plain PyTorch (the tiny profile tests its wiring).
        self.fused_mlp = p.fused_mlp and not self.fp8 and (self.device.type == "cpu"
                                                           or kernels_run_on(self.device))
        self.fp8_mlp = fp8_wanted(p.fp8_mlp, self.device, "fp8_mlp") and self.fused_mlp
        if p.fp8_mlp == "on" and not self.fp8_mlp:
            raise SpeedrunError("train.fp8_mlp=on runs inside the fused MLP kernels, which need train.fused_mlp=true, "
                                "train.fp8=off and a Hopper or newer GPU: set train.fp8_mlp=auto")
        self.fp8_attn = fp8_wanted(p.fp8_attn, self.device, "fp8_attn")
        for block in self.model.blocks:
            block.mlp.fused, block.mlp.fp8 = self.fused_mlp, self.fp8_mlp
            if block.attn is not None:
                block.attn.fp8 = self.fp8_attn
        self.model.fp8_head = self.fp8_head = fp8_wanted(p.fp8_head, self.device, "fp8_head")
        self.initial_state = copy.deepcopy(self.model.state_dict())
        self._mtp = torch.zeros(1 + len(p.mtp_weights), device=self.device)   # filled per step
        self._new_optimizers()
        if p.compile:
            compile_regions(self.model)
        self.fwd = self.model

    def _new_optimizers(self):
        p = self.p
        self.adam, self.muon = build_optimizers(
            param_groups(self.model), muon_lr=p.muon_lr, muon_momentum=p.muon_momentum_start,
            ns_steps=p.muon_ns_steps, embed_lr=p.embed_lr, head_lr=p.head_lr, scalar_lr=p.scalar_lr,
            betas=(p.adam_beta1, p.adam_beta2), compile=p.compile,
            muon_coeffs=p.muon_coeffs, muon_normuon=p.muon_normuon, muon_weight_decay=p.muon_weight_decay)
        self.optimizers = (self.adam, self.muon)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self, step: int, batches, window: torch.Tensor) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns the next-token CE (device)."""
        p = self.p
        n_micro = self.schedule.tokens(step) // p.micro_batch_tokens   # all ranks' micro-batches
        mtp = None
        if p.mtp_weights:
            for k, w in enumerate(mtp_weights(step, p.steps, p.mtp_weights)):
                self._mtp[k].fill_(w)   # in place, no host->device copy, no recompile
            mtp = self._mtp
        loss_sum = torch.zeros((), device=self.device)
        masks = self.model.attention_masks(batches[0][0], window)
        for i, (x, y) in enumerate(batches):
            objective, ce = self.model.train_loss(x, y, window, mtp, masks)
            if i + 1 < len(batches):
                # the next micro-batch's masks: ~30 small host-heavy ops, built here while the GPU
                # still has this forward queued; built after backward, the GPU would drain and wait
                masks = self.model.attention_masks(batches[i + 1][0], window)
            (objective / n_micro).backward()
            loss_sum += ce / n_micro
        if self.world > 1:
            grads = [q.grad for q in self.model.parameters() if q.grad is not None]
            handles = [dist.all_reduce(g, async_op=True) for g in grads]  # sum of 1/n_micro shares
            dist.all_reduce(loss_sum)
            for h in handles:
                h.wait()
        set_lr(self.optimizers, lr_multiplier(step, p.steps, p.cooldown_frac, p.final_lr_frac)
               * self.schedule.lr_mult(step))
        self.muon.param_groups[0]["momentum"] = muon_momentum(
            step, p.muon_momentum_warmup, p.muon_momentum_start, p.muon_momentum_end)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return loss_sum

    def window_tensor(self, step: int) -> torch.Tensor:
        p = self.p
        wb = window_blocks(step, p.steps, p.window_start, p.window_end)
        self._window.fill_(wb)  # in place: same tensor every step, a value change never recompiles
        return self._window

    # -- warm-up: compile everything on dummy tokens, then forget it ---------------------------
    def warmup(self) -> float:
        p = self.p
        t0 = time.perf_counter()
        if p.warmup_steps == 0:
            return 0.0
        g = torch.Generator().manual_seed(0)
        n_local = len(range(self.rank, self.schedule.max_tokens // p.micro_batch_tokens, self.world))
        for i in range(p.warmup_steps):
            self.log(f"warm-up step {i + 1}/{p.warmup_steps} ({time.perf_counter() - t0:.1f}s)", flush=True)
            batches = []
            for _ in range(n_local):
                toks = torch.randint(0, 50257, (p.micro_batch_tokens + 1,), generator=g)
                toks[torch.randint(0, p.micro_batch_tokens, (8,), generator=g)] = EOT_ID
                toks = toks.to(self.device, torch.int32)
                batches.append((toks[:-1], toks[1:].long()))
            # visit both ends of the window schedule: the compiled graph must not care
            self.train_step(0, batches, self.window_tensor(0 if i % 2 == 0 else p.steps))
        with torch.no_grad():  # the validation graph (no autograd) compiles separately
            x, y = batches[0]
            self.fwd(x, y, self.window_tensor(p.steps))
        self._sync()
        # reset: nothing learned during warm-up survives
        self.model.load_state_dict(self.initial_state)
        self._new_optimizers()
        self.model.zero_grad(set_to_none=True)
        # compilation leaves millions of long-lived Python objects (graphs, guards, code): a
        # generation-2 collection walks them all: a long stall inside a timed step.
        # Frozen, they are never scanned again; new garbage is still collected
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    # -- checkpoints ------------------------------------------------------------------------
    def _finite_or_raise(self, step: int, loss: float | None):
        bad = loss is not None and not math.isfinite(loss)
        if not bad:
            norms = torch._foreach_norm([q.detach() for q in self.model.parameters()])
            bad = not bool(torch.isfinite(torch.stack(norms)).all())
        if bad:
            kept = f"the last good checkpoint {self.paths.latest} is kept" if self.paths.latest.exists() \
                else "no checkpoint had been written yet"
            what = f"loss {loss}" if loss is not None and not math.isfinite(loss) else \
                f"non-finite weights (last loss {loss})"
            raise SpeedrunError(f"training diverged: {what} by step {step}; "
                                f"stopped, {kept}. Lower the learning rates (train.muon_lr, "
                                f"train.embed_lr, train.head_lr) or check the data")

    def save_checkpoint(self, step: int, progress: dict, last_loss: float | None):
        self._finite_or_raise(step, last_loss)
        if not self.master:
            return
        state = {"format": ckpt.FORMAT, "fingerprint": self.fingerprint, "step": step,
                 **self.train_state(), "rng": ckpt.rng_state(), "progress": progress}
        ckpt.save(self.paths.latest, state)

    def try_resume(self) -> tuple[int, dict] | None:
        path = self.paths.latest
        if not path.exists():
            return None
        state = ckpt.load(path)
        if state.get("fingerprint") != self.fingerprint:
            self.log(f"checkpoint {path} belongs to another configuration or dataset: starting fresh")
            return None
        self.load_train_state(state)
        ckpt.set_rng_state(state["rng"])
        return int(state["step"]), dict(state["progress"])

    # -- what the loop asks of a recipe (the record's: speedrun/record/trainer.py) -------------
    @property
    def n_steps(self) -> int:
        return self.p.steps

    def begin_steps(self, start_step: int) -> None:
        self._loader = BatchLoader(self.train_stream, self.schedule, self.p.micro_batch_tokens,
                                   self.rank, self.world, self.device)

    def step(self, step: int) -> torch.Tensor:
        """Train one step; returns its loss as a device tensor (read a step later: no stall)."""
        return self.train_step(step, self._loader.get(step), self.window_tensor(step))

    def tokens_before(self, step: int) -> int:
        return self.schedule.offset(step)

    def total_tokens(self) -> int:
        return self.schedule.total

    def flops_per_token(self) -> float:
        p = self.p
        mean_window = (p.window_start + p.window_end) / 2 * (sum(
            1.0 if lw else 0.5 for lw in self.model.long_window) / p.n_layer)
        return flops_per_token(self.cfg, matmul_params(self.model), mean_window)

    def describe(self, compile_s: float) -> str:
        p = self.p
        n_params = matmul_params(self.model)
        return (f"model: {sum(q.numel() for q in self.model.parameters()) / 1e6:.1f}M parameters "
                f"({n_params / 1e6:.1f}M in matmuls) | device {device_name(self.device)} x{self.world} "
                f"| fp8 mlp {'torchao' if self.fp8 else 'fused kernels' if self.fp8_mlp else 'off'}, "
                f"attn {'on' if self.fp8_attn else 'off'}, head {'on' if self.fp8_head else 'off'} | compile {p.compile} ({compile_s:.1f}s warm-up)")

    def oom_advice(self) -> str:
        p = self.p
        return (f"GPU out of memory on {device_name(self.device)}: lower train.micro_batch_tokens "
                f"(now {p.micro_batch_tokens}; batch_tokens stays, more accumulation steps) or set "
                f"train.fp8=auto/on")

    def step_report(self, step: int) -> tuple[int, float, int]:
        """(tokens of this step, lr multiplier, attention window in tokens) for the step log."""
        p = self.p
        lr = self.optimizers[1].param_groups[0]["lr"] / self.optimizers[1].param_groups[0]["base_lr"]
        wb = window_blocks(step, p.steps, p.window_start, p.window_end) * BLOCK_SIZE
        return self.schedule.tokens(step), lr, wb

    def val_loss(self, step: int) -> float:
        p = self.p
        wb = torch.tensor(window_blocks(step, p.steps, p.window_start, p.window_end),
                          dtype=torch.int32, device=self.device)
        self._window.copy_(wb)
        return evaluate_loss(self.fwd, self.val_stream, p.val_tokens, p.micro_batch_tokens,
                             self._window, self.device, self.rank, self.world)

    def train_state(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "model": ckpt.model_state(self.model),
                "adam": self.adam.state_dict(), "muon": self.muon.state_dict()}

    def load_train_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.adam.load_state_dict(state["adam"])
        self.muon.load_state_dict(state["muon"])

    def final_state(self, final_val: float | None) -> dict:
        p = self.p
        return ckpt.final_model_state(self.model, {
            "step": p.steps, "val_loss": final_val, "window_blocks": window_blocks(
                p.steps, p.steps, p.window_start, p.window_end),
            "val_tokens": p.val_tokens, "micro_batch_tokens": p.micro_batch_tokens,
            "fingerprint": self.fingerprint})

    def vocab_rows(self) -> int:
        """Rows of the token embedding: every id in the shards must index one."""
        return self.p.vocab_size

    def run_flags(self) -> dict:
        p = self.p
        return {"fp8": self.fp8, "fp8_head": self.fp8_head, "fused_ce": p.fused_ce,
                "fused_mlp": self.fused_mlp, "fp8_mlp": self.fp8_mlp, "fp8_attn": self.fp8_attn,
                "fast_tanh": p.fast_tanh}

    # -- main -------------------------------------------------------------------------------
    def run(self) -> dict:
        p = self.p
        wall0 = time.perf_counter()
        verify_shards(self.paths.shards, self.vocab_rows(), log=self.log if self.master else None)
        self.check_data()
        self._build()
        self._window = torch.tensor(1, dtype=torch.int32, device=self.device)
        peak_tflops = measure_bf16_tflops(self.device) if self.master else None
        compile_s = self.warmup()
        graphs_after_warmup = compiled_graphs()

        resumed = self.try_resume()
        start_step, progress = resumed if resumed else (0, {})
        self._resumed_step = start_step
        if resumed:
            self.log(f"resuming from step {start_step} ({self.paths.latest})")
        progress.setdefault("train_time_s", 0.0)
        progress.setdefault("val_time_s", 0.0)
        progress.setdefault("checkpoint_time_s", 0.0)
        progress.setdefault("val_history", [])
        progress.setdefault("target", None)
        progress.setdefault("peak_tokens_per_s", 0.0)
        progress.setdefault("compile_time_s", []).append(round(compile_s, 3))
        progress.setdefault("resumed_at", [])
        if resumed:
            progress["resumed_at"].append(start_step)
            # target_val_loss is a run-control key: judge the restored history by today's target
            hit = next((h for h in progress["val_history"] if h["val_loss"] <= p.target_val_loss), None)
            progress["target"] = ({"step": hit["step"], "tokens": hit["tokens"],
                                   "train_time_s": hit["train_time_s"]} if hit else None)

        live = self._open_live(resumed=resumed is not None)
        self.begin_steps(start_step)
        clock = Stopwatch(progress["train_time_s"], sync=self._sync)
        stop = StopRequest()
        flops_tok = self.flops_per_token()
        self.log(self.describe(compile_s))
        self._last_report, self._rate = None, None
        pending = None           # (step, loss tensor), logged one step late: no stall
        last_loss = None
        interval = (start_step, clock.peek())   # (step, training seconds) at the last validation
        try:
            clock.start()
            for step in range(start_step, self.n_steps + 1):
                last = step == self.n_steps
                if pending is not None:
                    last_loss = self._report(pending, clock, live)
                    pending = None
                history = progress["val_history"]
                already = bool(history) and history[-1]["step"] == step  # resumed at a validated step
                if not already and (last or (p.val_every and step % p.val_every == 0 and step > start_step)):
                    clock.stop()
                    # peak tokens/s over a whole validation interval (steady, includes no val time)
                    s0, c0 = interval
                    if step > s0 and clock.total > c0:
                        rate = (self.tokens_before(step) - self.tokens_before(s0)) / (clock.total - c0)
                        progress["peak_tokens_per_s"] = max(progress["peak_tokens_per_s"], rate)
                    self._validate(step, progress, clock, live)
                    interval = (step, clock.total)
                    clock.start()
                save_due = last or (p.ckpt_every and step % p.ckpt_every == 0 and step > start_step)
                if stop.signum is not None or self._peer_stop(stop):
                    clock.stop()
                    progress["train_time_s"] = clock.total
                    self.save_checkpoint(step, progress, last_loss)
                    raise Interrupted(f"stopped at step {step}, checkpoint saved to {self.paths.latest}; "
                                      f"run `dvc repro` again to resume", 130)
                if save_due:
                    clock.stop()
                    t = time.perf_counter()
                    progress["train_time_s"] = clock.total
                    self.save_checkpoint(step, progress, last_loss)
                    progress["checkpoint_time_s"] += time.perf_counter() - t
                    clock.start()
                if last:
                    break
                pending = (step, self.step(step))
            clock.stop()
        except torch.cuda.OutOfMemoryError:
            raise SpeedrunError(self.oom_advice()) from None
        finally:
            stop.restore()
        progress["train_time_s"] = clock.total
        self.val_history = progress["val_history"]
        recompiles = compiled_graphs() - graphs_after_warmup
        metrics = self._finish(progress, wall0, compile_s, recompiles, peak_tflops, flops_tok)
        if live is not None:
            live.end()
        if self.world > 1:
            dist.barrier()
        return metrics

    def _peer_stop(self, stop: StopRequest) -> bool:
        """With several processes, all must stop at the same step (else collectives hang)."""
        if self.world == 1:
            return False
        flag = torch.tensor([1 if stop.signum is not None else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _report(self, pending, clock, live) -> float:
        step, loss_t = pending
        loss = loss_t.item()   # the step before the one just queued: already done, no stall
        if not math.isfinite(loss):
            self._finite_or_raise(step, loss)
        now = time.perf_counter()
        dt = now - self._last_report if self._last_report is not None else None
        self._last_report = now
        done = step + 1
        elapsed = clock.peek()
        step_tokens, lr, wb = self.step_report(step)
        tok_s = step_tokens / dt if dt else float("nan")
        if dt:   # the ETA follows a smoothed rate over the tokens left: one slow step cannot swing it
            self._rate = tok_s if self._rate is None else 0.9 * self._rate + 0.1 * tok_s
        tokens = self.tokens_before(done)
        eta = (self.total_tokens() - tokens) / self._rate if dt else float("nan")
        self.log(f"step {done:5d}/{self.n_steps} | loss {loss:.4f} | "
                 f"{(dt or 0) * 1e3:7.1f} ms | {fmt_rate(tok_s) if dt else '   -  '} tok/s | "
                 f"window {wb:4d} | lr x{lr:.3f} | train {fmt_duration(elapsed)} | "
                 f"ETA {fmt_duration(eta) if dt else '-'}", flush=True)
        if live is not None:
            live.step = done
            live.log_metric("train/loss", loss)
            live.log_metric("train/lr_multiplier", lr)
            live.log_metric("train/tokens", tokens)
            live.log_metric("train/seconds", round(elapsed, 3))
            if dt:
                live.log_metric("train/tokens_per_s", round(tok_s, 1))
        return loss

    def _validate(self, step: int, progress: dict, clock: Stopwatch, live):
        p = self.p
        t = time.perf_counter()
        val = self.val_loss(step)
        took = time.perf_counter() - t
        progress["val_time_s"] += took
        tokens = self.tokens_before(step)
        entry = {"step": step, "tokens": tokens, "train_time_s": round(clock.total, 3),
                 "val_loss": round(val, 5)}
        progress["val_history"].append(entry)
        hit = ""
        if progress["target"] is None and val <= p.target_val_loss:
            progress["target"] = {"step": step, "tokens": tokens, "train_time_s": clock.total}
            hit = f"  <- target {p.target_val_loss} reached"
        self.log(f"step {step:5d}/{self.n_steps} | val_loss {val:.4f} | train_time {clock.total:.1f}s | "
                 f"tokens {tokens:,} | val took {took:.1f}s{hit}", flush=True)
        if live is not None:
            live.step = step
            live.log_metric("val/loss", val)
            live.log_metric("val/tokens", tokens)
            live.log_metric("val/seconds", round(clock.total, 3))

    def _open_live(self, resumed: bool):
        if not self.master or self.paths.live is None:
            return None
        try:
            from dvclive import Live
        except ImportError:  # e.g. a bare GPU box: train anyway, say what is missing
            self.log("dvclive is not installed: per-step curves are not written (pip install dvclive)")
            return None
        if resumed:
            truncate_live_logs(self.paths.live, self._resumed_step)
        return Live(dir=str(self.paths.live), dvcyaml=False, resume=resumed, save_dvc_exp=False,
                    report=None)

    def _finish(self, progress, wall0, compile_s, recompiles, peak_tflops, flops_tok) -> dict:
        p = self.p
        tokens = self.total_tokens()
        train_s = progress["train_time_s"]
        tok_s = tokens / train_s if train_s > 0 else 0.0
        mem_alloc, mem_reserved = peak_memory_gib(self.device)
        target = progress["target"]
        final_val = progress["val_history"][-1]["val_loss"] if progress["val_history"] else None
        dataset = dataset_name(self.manifest)
        metrics = {
            "dataset": dataset,
            "target": p.target_val_loss,
            "reached_target": target is not None,
            "time_to_target_s": round(target["train_time_s"], 3) if target else None,
            "tokens_to_target": target["tokens"] if target else None,
            "step_to_target": target["step"] if target else None,
            "final_val_loss": final_val,
            "steps": self.n_steps,
            "tokens": tokens,
            "train_time_s": round(train_s, 3),
            "compile_time_s": round(sum(progress["compile_time_s"]), 3),
            "val_time_s": round(progress["val_time_s"], 3),
            "checkpoint_time_s": round(progress["checkpoint_time_s"], 3),
            "wall_time_s": round(time.perf_counter() - wall0, 3),
            "tokens_per_s": round(tok_s, 1),
            "peak_tokens_per_s": round(max(progress["peak_tokens_per_s"], 0.0), 1),
            "tokens_per_s_per_gpu": round(tok_s / self.world, 1),
            "mfu": round(flops_tok * tok_s / self.world / (peak_tflops * 1e12), 4) if peak_tflops else None,
            "matmul_peak_tflops": round(peak_tflops, 1) if peak_tflops else None,
            "peak_memory_gib": round(mem_alloc, 3) if mem_alloc is not None else None,
            "peak_memory_reserved_gib": round(mem_reserved, 3) if mem_reserved is not None else None,
            "peak_host_memory_gib": round(peak_host_memory_gib(), 3),
            "gpu": device_name(self.device),
            "world_size": self.world,
            "profile": p.profile,
            "recipe": p.recipe,
            **self.run_flags(),
            "compile": p.compile,
            "recompiles_after_warmup": int(recompiles),
            "resumed_at_steps": progress["resumed_at"],
            "torch_version": torch.__version__,
            "seed": p.seed,
            "git_commit": git_commit(),
        }
        if self.master:
            from .atomic import write_json

            write_json(self.paths.metrics, metrics)
            ckpt.save(self.paths.final, self.final_state(final_val))
            verdict = (f"reached {p.target_val_loss} in {metrics['time_to_target_s']:.1f}s of training "
                       f"({metrics['tokens_to_target']:,} tokens)" if target else
                       f"did NOT reach {p.target_val_loss} (final val_loss {final_val})")
            self.log(f"done: {verdict} | {fmt_rate(tok_s)} tok/s | compile {metrics['compile_time_s']:.1f}s"
                     + (f" | peak GPU memory {metrics['peak_memory_gib']:.1f} GiB" if metrics["peak_memory_gib"]
                        else f" | peak memory {metrics['peak_host_memory_gib']:.1f} GiB (process)"))
        return metrics
