"""The classic recipe's trainer (train.recipe: classic): this project's previous GPT (speedrun/model.py)
with Muon and Adam, its batch schedule and its warm-up, on the speedrun's training loop
(speedrun/loop.py: clock, validation, checkpoints, signals, metrics).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import time

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .errors import ParamError, SpeedrunError
from .evaluate import evaluate_loss
from .loader import BatchLoader, TokenStream
from .loop import Paths, TrainingLoop, shard_manifest
from .metrics import device_name
from .mlp import kernels_run_on
from .model import BLOCK_SIZE, EOT_ID, GPT, build_model, flops_per_token, matmul_params, param_groups
from .optimizer import build_optimizers, set_lr
from .resume import Interrupted, StopRequest
from .runtime import (compile_regions, compiled_graphs, finish_distributed, fp8_wanted, init_distributed,
                      training_device)
from .schedule import lr_multiplier, mtp_weights, muon_momentum, window_blocks
from .shards import shard_paths
from .train_params import CPU_TINY, TrainParams, batch_schedule, effective, model_config, tiny_run_sizes

# what stages, benchmarks and tests import from here, several of them defined below this module
__all__ = ["CPU_TINY", "LATER_RECIPE_KEYS", "RUN_CONTROL_KEYS", "Interrupted", "Paths", "Run", "StopRequest",
           "TrainParams", "batch_schedule", "compile_regions", "compiled_graphs", "effective", "enable_fp8",
           "finish_distributed", "fingerprint", "fp8_wanted", "init_distributed", "model_config",
           "tiny_run_sizes"]


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


class Run(TrainingLoop):
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
        self.manifest = shard_manifest(paths.shards)
        self.train_stream = TokenStream(shard_paths(paths.shards, "train"))
        self.val_stream = TokenStream(shard_paths(paths.shards, "val"))
        self.fingerprint = fingerprint(self.p, self.manifest)
        self.schedule = batch_schedule(self.p, self.world)

    def check_data(self) -> None:
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
        self._window = torch.tensor(1, dtype=torch.int32, device=self.device)   # filled per step

    def _new_optimizers(self):
        p = self.p
        self.adam, self.muon = build_optimizers(
            param_groups(self.model), muon_lr=p.muon_lr, muon_momentum=p.muon_momentum_start,
            ns_steps=p.muon_ns_steps, embed_lr=p.embed_lr, head_lr=p.head_lr, scalar_lr=p.scalar_lr,
            betas=(p.adam_beta1, p.adam_beta2), compile=p.compile,
            muon_coeffs=p.muon_coeffs, muon_normuon=p.muon_normuon, muon_weight_decay=p.muon_weight_decay)
        self.optimizers = (self.adam, self.muon)

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
        # compilation leaves millions of long-lived Python objects (graphs, guards, code), and a
        # generation-2 collection inside a timed step would walk them all: a long stall. Frozen,
        # they are never scanned again; new garbage is still collected
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    # -- the loop's hooks (speedrun/loop.py) ------------------------------------------------
    @property
    def n_steps(self) -> int:
        return self.p.steps

    def begin_steps(self, start_step: int) -> None:
        self._loader = BatchLoader(self.train_stream, self.schedule, self.p.micro_batch_tokens,
                                   self.rank, self.world, self.device)

    def step(self, step: int) -> torch.Tensor:
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
        return self.p.vocab_size

    def run_flags(self) -> dict:
        p = self.p
        return {"fp8": self.fp8, "fp8_head": self.fp8_head, "fused_ce": p.fused_ce,
                "fused_mlp": self.fused_mlp, "fp8_mlp": self.fp8_mlp, "fp8_attn": self.fp8_attn,
                "fast_tanh": p.fast_tanh}
