"""Training with the record's recipe: the speedrun's training loop (speedrun/loop.py: clock,
validation, checkpoints, signals, metrics) with this recipe's model, optimizer, schedule and batches.

One step (schedule.plan): set the windows (and the rotary state when the long window grew), take
the step's micro-batches of whole documents, accumulate the gradients of sum(losses) / 8 per
micro-batch (the record's scale, whatever the number of micro-batches), step NorMuon every step
and Adam on odd ones, untie the embedding at the untie step, re-quantize the FP8 MLP weights.

Memory: the record runs 8 micro-batches per step (16k / 32k / 48k tokens: more than a 24 GB card
holds).
Here a micro-batch holds at most `micro_batch_tokens` (32,768 by default: the record's second stage
exactly, 4 and 12 micro-batches where it runs 8 in the first and last stages, each built from
whole documents as the record builds its own). `micro_batch_tokens: 0` reproduces the record's
eighths.
Validation runs the record's 262,144-token chunks, its logits in slices (loss.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..errors import ParamError, SpeedrunError
from ..loop import Paths, TrainingLoop, shard_manifest
from ..metrics import device_name
from ..params import param
from ..runtime import fp8_wanted, init_distributed, training_device
from ..shards import shard_paths
from ..train_params import TrainParams, tiny_run_sizes
from . import schedule as sch
from .loader import DocumentBatches, ValidationChunks
from .model import GRAD_SCALE, RecordConfig, build, compile_hidden_states, flops_per_token, param_count
from .optimizer import Hyper, NorMuonAdam

FORMAT = "record-1"


def _stage_list(n: int):
    return lambda v: None if len(v) == n else f"needs {n} entries (one per stage)"


@dataclasses.dataclass
class RecordParams:
    micro_batch_tokens: int = param(32768, ge=0)
    val_chunk_tokens: int = param(262144, ge=128)
    scheduled_steps: int = param(1270, ge=3)
    extension_steps: int = param(15, ge=0)
    stage_batch_tokens: list[int] = param([131072, 262144, 393216], ge=128, check=_stage_list(3))
    stage_seq_len: list[int] = param([896, 2048, 2048], ge=16, check=_stage_list(3))
    stage_lr: list[float] = param([1.0, 1.52, 1.73], gt=0, check=_stage_list(3))
    short_windows: list[int] = param([1, 3, 5, 6], ge=1, check=_stage_list(4))
    long_windows: list[int] = param([3, 7, 11, 13], ge=1, check=_stage_list(4))
    final_long_window: int = param(20, ge=1)
    mtp_start: list[list[float]] = param([[1.0, 0.5, 0.25], [1.0, 0.5], [1.0]], ge=0, check=_stage_list(3))
    mtp_end: list[list[float]] = param([[1.0, 0.5, 0.0], [1.0, 0.0], [1.0]], ge=0, check=_stage_list(3))
    prefix_start: list[float] = param([0.25, 0.25, 0.0], ge=0, check=_stage_list(3))
    prefix_end: list[float] = param([0.25, 0.0, 0.0], ge=0, check=_stage_list(3))
    cooldown_frac: float = param(0.6, ge=0, lt=1)
    final_lr: float = param(0.15, ge=0)
    untie_stage: int = param(2, ge=0, le=3)
    muon_lr: float = param(0.023, gt=0)
    muon_momentum: list[float] = param([0.85, 0.95], ge=0, lt=1, check=_stage_list(2))
    muon_momentum_warmup: int = param(300, ge=1)
    muon_momentum_cooldown: int = param(50, ge=1)
    muon_beta2: float = param(0.9, ge=0, lt=1)
    muon_weight_decay: float = param(1.2, ge=0)
    adam_lr: float = param(0.008, gt=0)
    adam_weight_decay: float = param(0.005, ge=0)
    model_dim: int = param(768, ge=24)
    head_dim: int = param(128, ge=4, check=lambda v: None if v % 4 == 0 else "must be a multiple of 4")
    bigram_vocab: int = param(377280, ge=2)
    fp8: str = param("auto", choices=["auto", "on", "off"])

    def validate(self) -> None:
        if self.model_dim != 6 * self.head_dim:
            raise ParamError("params.yaml: record.model_dim must be 6 x record.head_dim (the record's six heads)")
        if any(len(a) != len(b) or len(a) > sch.MTP_SLOTS for a, b in zip(self.mtp_start, self.mtp_end)):
            raise ParamError("params.yaml: record.mtp_start and record.mtp_end need the same number of weights "
                             f"per stage (at most {sch.MTP_SLOTS})")
        if self.micro_batch_tokens % 128 or self.val_chunk_tokens % 128:
            raise ParamError("params.yaml: record.micro_batch_tokens and record.val_chunk_tokens must be multiples of 128")
        for b in self.stage_batch_tokens:
            if self.micro_batch_tokens and b % self.micro_batch_tokens:
                raise ParamError(f"params.yaml: record.stage_batch_tokens ({b:,}) must be multiples of "
                                 f"record.micro_batch_tokens ({self.micro_batch_tokens:,})")
            if not self.micro_batch_tokens and b % (8 * 128):
                raise ParamError("params.yaml: with record.micro_batch_tokens 0 (the record's eighths) every "
                                 "stage's batch must be a multiple of 1024 tokens")


# cpu-tiny: the record's code path at a size two CPU cores train in about a second per step
# (11 layers of 6 x 16, 512-token micro-batches, 12 + 2 steps); a key set away from its default in
# params.yaml keeps the value given there (a test can shorten the run further)
CPU_TINY = dict(model_dim=96, head_dim=16, bigram_vocab=4096, micro_batch_tokens=512, val_chunk_tokens=512,
                scheduled_steps=12, extension_steps=2, stage_batch_tokens=[512, 1024, 1024],
                stage_seq_len=[256, 512, 512], short_windows=[1, 1, 2, 2], long_windows=[2, 3, 4, 4],
                final_long_window=4, muon_momentum_warmup=4, muon_momentum_cooldown=2, fp8="off")


def effective(r: RecordParams, profile: str) -> RecordParams:
    if profile != "cpu-tiny":
        return r
    default = RecordParams()
    return dataclasses.replace(r, **{k: v for k, v in CPU_TINY.items() if getattr(r, k) == getattr(default, k)})


def schedule(r: RecordParams) -> sch.Schedule:
    stages = [sch.Stage(b, s, (ws, wl), lr, tuple(m0), tuple(m1), p0, p1) for b, s, ws, wl, lr, m0, m1, p0, p1 in zip(
        r.stage_batch_tokens, r.stage_seq_len, r.short_windows, r.long_windows, r.stage_lr, r.mtp_start, r.mtp_end,
        r.prefix_start, r.prefix_end)]
    last = stages[-1]
    stages.append(sch.Stage(last.batch_tokens, last.seq_len, (r.short_windows[3], r.long_windows[3]), 1.0,
                            (1.0,), (1.0,)))
    return sch.Schedule(stages, r.scheduled_steps, r.extension_steps, r.cooldown_frac, r.final_lr, r.untie_stage,
                        r.final_long_window, tuple(r.muon_momentum), r.muon_momentum_warmup, r.muon_momentum_cooldown)


def model_config(r: RecordParams) -> RecordConfig:
    return RecordConfig(model_dim=r.model_dim, head_dim=r.head_dim, bigram_vocab=r.bigram_vocab,
                        max_seq_len=max(r.val_chunk_tokens, max_micro(r)))


def max_micro(r: RecordParams) -> int:
    return r.micro_batch_tokens or max(r.stage_batch_tokens) // 8


def fingerprint(p: TrainParams, r: RecordParams, manifest: dict) -> str:
    """Identity of a run (what it trains on and with which settings that change the math)."""
    keys = {"seed": p.seed, **{k: v for k, v in dataclasses.asdict(r).items() if k not in ("val_chunk_tokens",)}}
    data = [s.get("sha256", s.get("file")) for s in manifest.get("train", [])]
    return hashlib.sha256(json.dumps([FORMAT, keys, data], sort_keys=True).encode()).hexdigest()[:16]


class Staging:
    """Pinned host buffers for micro-batches, so that the copies to the GPU never wait for the
    GPU to finish (a pageable copy would). A slot is reused only after its copy completed."""

    def __init__(self, T: int, device: torch.device, slots: int = 4):
        self.device, self.cuda = device, device.type == "cuda"
        pin = self.cuda
        self.slots = [{"x": torch.empty(T, dtype=torch.int32, pin_memory=pin),
                       "y": torch.empty(T, dtype=torch.int64, pin_memory=pin),
                       "b": torch.empty(T, dtype=torch.int32, pin_memory=pin),
                       "cu": torch.empty(max(T // 64, 128), dtype=torch.int32, pin_memory=pin),
                       "done": None} for _ in range(slots)]
        self.i = 0

    def put(self, mb) -> tuple[torch.Tensor, ...]:
        """(inputs, targets, bigram ids, cu_seqlens) of a host micro-batch, on the device."""
        if not self.cuda:
            return tuple(torch.from_numpy(a) for a in (mb.inputs, mb.targets, mb.bigram, mb.cu_seqlens))
        s = self.slots[self.i]
        self.i = (self.i + 1) % len(self.slots)
        if s["done"] is not None:
            s["done"].synchronize()   # issued len(slots) micro-batches ago: long finished
        if s["cu"].numel() < mb.cu_seqlens.size:
            s["cu"] = torch.empty(mb.cu_seqlens.size, dtype=torch.int32, pin_memory=True)
        out = []
        for key, arr in (("x", mb.inputs), ("y", mb.targets), ("b", mb.bigram), ("cu", mb.cu_seqlens)):
            buf = s[key][:arr.size]
            buf.numpy()[:] = arr
            out.append(buf.to(self.device, non_blocking=True))
        s["done"] = torch.cuda.Event()
        s["done"].record()
        return tuple(out)


class RecordRun(TrainingLoop):
    def __init__(self, params: TrainParams, record: RecordParams, paths: Paths, log=print,
                 init_state: dict | None = None, stop_at: int | None = None):
        self.p = params if params.profile != "cpu-tiny" else tiny_run_sizes(dataclasses.replace(params, compile=False))
        self.r = effective(record, params.profile)
        self.paths = paths
        self.rank, self.world, local = init_distributed()
        self.master = self.rank == 0
        self.log = log if self.master else (lambda *a, **k: None)
        self.device = training_device(params.profile, local)
        self.T = self.r.micro_batch_tokens
        self.sched = schedule(self.r)
        for b in self.r.stage_batch_tokens:
            unit = (self.T or b // 8) * self.world
            if b % unit:
                raise ParamError(f"record.stage_batch_tokens ({b:,}) must split into micro-batches of "
                                 f"{self.T or b // 8:,} tokens over {self.world} processes")
        self.manifest = shard_manifest(paths.shards)
        self.train_paths = shard_paths(paths.shards, "train")
        self.val_paths = shard_paths(paths.shards, "val")
        self.fingerprint = fingerprint(self.p, self.r, self.manifest)
        self.init_state, self.stop_at = init_state, stop_at

    # -- set-up ---------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return min(self.sched.total, self.stop_at) if self.stop_at is not None else self.sched.total

    def check_data(self) -> None:
        from ..shards import read_header

        have = sum(read_header(q) for q in self.train_paths)
        need = self.sched.tokens_before(self.n_steps) + 1
        if have < need:
            raise SpeedrunError(f"train shards hold {have:,} tokens but {self.n_steps} steps of the record's "
                                f"schedule train on {need - 1:,} (more: documents are cut to the batch): "
                                "download more (download.max_tokens)")
        unit = self.r.val_chunk_tokens * self.world
        if self.p.val_tokens % unit:
            raise ParamError(f"train.val_tokens ({self.p.val_tokens:,}) must be a multiple of "
                             f"record.val_chunk_tokens ({self.r.val_chunk_tokens:,}) x processes ({self.world})")
        val = sum(read_header(q) for q in self.val_paths)
        if val < self.p.val_tokens + 2:
            # a smaller validation split (a local corpus): all of it that fills whole chunks
            fit = (val - 2) // unit * unit
            if fit <= 0:
                raise SpeedrunError(f"validation shards hold {val:,} tokens, less than one validation chunk "
                                    f"({unit:,}): lower record.val_chunk_tokens or raise tokenize.val_tokens")
            self.log(f"validation: the split holds {val:,} tokens, so each validation reads {fit:,} of them "
                     f"(train.val_tokens asks for {self.p.val_tokens:,})")
            self.p = dataclasses.replace(self.p, val_tokens=fit)

    def _build(self):
        r = self.r
        self.cfg = model_config(r)
        self.fp8 = fp8_wanted(r.fp8, self.device, "record.fp8")
        self.model = build(self.cfg, self.device, self.fp8, seed=self.p.seed)
        if self.init_state is not None:   # benchmarks: start from given weights (e.g. the record's own init)
            self.model.load_state_dict(self.init_state)
            self.model.refresh_fp8(bootstrap=True)
        self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.hyper = Hyper(muon_lr=r.muon_lr, muon_beta2=r.muon_beta2, muon_weight_decay=r.muon_weight_decay,
                           adam_lr=r.adam_lr, adam_weight_decay=r.adam_weight_decay)
        self.opt = NorMuonAdam(self.model, self.hyper, compile=self.p.compile)
        self.hidden_states = self.model.hidden_states
        if self.p.compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.hidden_states = compile_hidden_states(self.model)
        d = self.device
        self._mtp = torch.zeros(sch.MTP_SLOTS, device=d)
        self._prefix = torch.zeros(1, device=d)
        self._history: list[int] | None = None
        self.staging = Staging(max_micro(r), d)
        self.fwd = self.model

    def hidden(self, x: torch.Tensor, bg: torch.Tensor, cu: torch.Tensor, fp8: bool) -> torch.Tensor:
        """The final normed state of one micro-batch (inputs, bigram ids, cu_seqlens on the device)."""
        m = self.model.masks(cu, x.numel())
        return self.hidden_states(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, fp8)

    def _micro(self, plan) -> int:
        return self.T or plan.batch_tokens // 8

    def _set_rotary(self, history: list[int]) -> None:
        if history != self._history:
            self.model.set_rotary(history)
            self._history = list(history)

    # -- one step -------------------------------------------------------------------------
    def begin_steps(self, start_step: int) -> None:
        if not hasattr(self, "loader"):
            self.loader = DocumentBatches(self.train_paths, self.cfg.bigram_vocab, self.rank, self.world)
        self._prefix_ready = False

    def train_step(self, plan, batches) -> torch.Tensor:
        """One optimizer step over `batches` (host micro-batches); returns the mean objective."""
        model = self.model
        self._set_rotary(self.sched.long_window_history(plan.step))
        model.set_windows(plan.short_window, plan.long_window)
        for k, w in enumerate(plan.mtp_weights):
            self._mtp[k].fill_(w)
        self._prefix.fill_(plan.prefix_weight)
        total = torch.zeros((), device=self.device)
        for mb in batches:
            x, y, bg, cu = self.staging.put(mb)
            h = self.hidden(x, bg, cu, self.fp8)
            losses = model.train_losses(h, y, self._mtp, self._prefix, self.fp8)
            (losses.sum() * GRAD_SCALE).backward()
            total += losses.detach().mean() / len(batches)
        if self.world > 1:
            handles = [dist.all_reduce(q.grad, async_op=True) for q in model.parameters() if q.grad is not None]
            dist.all_reduce(total)
            total /= self.world
            for h in handles:
                h.wait()
        self.opt.step(plan.lr, plan.momentum, plan.adam)
        if plan.step == self.sched.untie_step:
            self.opt.untie()
        model.refresh_fp8(bootstrap=plan.step < 16)
        return total

    def step(self, step: int) -> torch.Tensor:
        if not self._prefix_ready:   # built inside the clock, as the record charges it to training
            self.model.fill_prefix_table()
            self._prefix_ready = True
        plan = self.sched.plan(step)
        T = self._micro(plan)
        n = plan.batch_tokens // (T * self.world)
        return self.train_step(plan, [self.loader.next(T, plan.seq_len) for _ in range(n)])

    # -- warm-up: compile on dummy tokens, then forget ----------------------------------------
    def warmup_steps(self) -> list[tuple[int, int]]:
        """(schedule step, micro-batch tokens) to compile on: Muon, then Adam (every compiled
        update), then the first step of each later stage whose micro-batch has another size (the
        record's own eighths: 32k and 48k tokens), so that no stage compiles on the clock."""
        first = self._micro(self.sched.plan(0))
        warm = [(0, first), (1, first)]
        for start, _ in self.sched.boundaries:
            size = self._micro(self.sched.plan(start))
            if size not in {t for _, t in warm}:
                warm.append((start, size))
        return warm

    def warmup(self) -> float:
        t0 = time.perf_counter()
        if self.p.warmup_steps == 0 or not self.p.compile:
            return 0.0
        g = np.random.default_rng(0)

        def dummy(n):
            toks = g.integers(0, 50257, n + 1).astype(np.int64)
            toks[g.integers(0, n, max(n // 600, 2))] = 50256
            toks[0] = 50256
            from .loader import _pack
            bos = np.flatnonzero(toks[:-1] == 50256)
            return _pack(toks, np.append(bos[1:], n), n, self.cfg.bigram_vocab)

        warm = self.warmup_steps()
        for k, (step, size) in enumerate(warm):
            self.log(f"warm-up step {k + 1}/{len(warm)} ({time.perf_counter() - t0:.1f}s)", flush=True)
            self.train_step(self.sched.plan(step), [dummy(size)])
        self._validate_chunks(0, [dummy(self.r.val_chunk_tokens)])
        self._sync()
        self.model.load_state_dict(self.initial_state)
        self.model.refresh_fp8(bootstrap=True)
        self.opt = NorMuonAdam(self.model, self.hyper, compile=self.p.compile)
        self.model.zero_grad(set_to_none=True)
        self._history = None
        import gc
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    # -- validation -----------------------------------------------------------------------
    def _validate_chunks(self, step: int, chunks) -> float:
        model = self.model
        final = step == self.sched.total
        self._set_rotary(self.sched.long_window_history(step))
        model.set_windows(*self.sched.windows(step, final_validation=final))
        model.eval()
        total, n = torch.zeros((), device=self.device, dtype=torch.float64), 0
        with torch.no_grad():
            for mb in chunks:
                x, y, bg, cu = (torch.from_numpy(a).to(self.device) for a in (mb.inputs, mb.targets, mb.bigram, mb.cu_seqlens))
                h = self.hidden(x, bg, cu, False)
                total += model.eval_losses(h, y).double().mean()
                n += 1
        model.train()
        count = torch.tensor(float(n), device=self.device, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        return (total / count).item()

    def val_loss(self, step: int) -> float:
        chunks = ValidationChunks(self.val_paths, self.cfg.bigram_vocab, self.rank, self.world)
        return self._validate_chunks(step, chunks(self.p.val_tokens, self.r.val_chunk_tokens))

    # -- reporting and state --------------------------------------------------------------
    def tokens_before(self, step: int) -> int:
        return self.sched.tokens_before(step)

    def total_tokens(self) -> int:
        return self.sched.tokens_before(self.n_steps)

    def step_report(self, step: int) -> tuple[int, float, int]:
        plan = self.sched.plan(step)
        return plan.batch_tokens, plan.lr, plan.long_window

    def flops_per_token(self) -> float:
        windows = [p.long_window for p in map(self.sched.plan, range(0, self.sched.total, 50))]
        return flops_per_token(self.model, float(np.mean(windows)) / 2)

    def describe(self, compile_s: float) -> str:
        total, matmul = param_count(self.model)
        T = self.T or "1/8 of each batch"
        return (f"recipe: record #89 | model: {total / 1e6:.1f}M parameters ({matmul / 1e6:.1f}M in matmuls) "
                f"| device {device_name(self.device)} x{self.world} | fp8 {'on' if self.fp8 else 'off'} "
                f"| micro-batch {T} tokens | {self.n_steps} steps, {self.total_tokens():,} tokens "
                f"| compile {self.p.compile} ({compile_s:.1f}s warm-up)")

    def oom_advice(self) -> str:
        return (f"GPU out of memory on {device_name(self.device)}: lower record.micro_batch_tokens "
                f"(now {self.T or 'the record eighths'}; the batch stays, more micro-batches)")

    def train_state(self) -> dict:
        return {"recipe": "record", "config": dataclasses.asdict(self.cfg), "model": ckpt.model_state(self.model),
                "optimizer": self.opt.state_dict(), "loader": self.loader.state(),
                "pending_grads": self.opt.pending_grads()}

    def load_train_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.opt.load_pending_grads(state.get("pending_grads", {}))
        if not hasattr(self, "loader"):
            self.loader = DocumentBatches(self.train_paths, self.cfg.bigram_vocab, self.rank, self.world)
        self.loader.load_state(state["loader"])
        self.model.restore_fp8()
        self._history = None

    def final_state(self, final_val: float | None) -> dict:
        short, long = self.sched.windows(self.n_steps, final_validation=self.n_steps == self.sched.total)
        return {"format": ckpt.FORMAT, "recipe": "record", "config": dataclasses.asdict(self.cfg),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "step": self.n_steps, "val_loss": final_val, "windows": [short, long],
                "rotary_history": self.sched.long_window_history(self.n_steps),
                "val_tokens": self.p.val_tokens, "val_chunk_tokens": self.r.val_chunk_tokens,
                "fingerprint": self.fingerprint}

    def vocab_rows(self) -> int:
        return RecordConfig.vocab_size

    def run_flags(self) -> dict:
        return {"fp8": self.fp8, "micro_batch_tokens": self.T or "record eighths"}
