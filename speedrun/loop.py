"""The speedrun training loop: train to the target validation loss, time it honestly, resume safely.

Timing rules (those of the public speedrun): the clock runs only while training steps run.
Compilation happens before it starts (warm-up on dummy tokens, after which weights and optimizer
state are reset, so nothing is learned untimed); validation and checkpoint writes stop it and are
reported separately.

The loop is the same for every recipe; a recipe subclasses TrainingLoop and provides the hooks
below (the classic recipe: speedrun/train.py, the record's: speedrun/record/trainer.py). Beside
the loop: progress.py (clock and validations), resume.py (checkpoints, signals, divergence) and
report.py (console, DVCLive, metrics/train.json).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import resume
from .errors import SpeedrunError
from .metrics import TRAIN_HEADLINE, Stopwatch, measure_bf16_tflops, write_metrics
from .progress import Progress
from .report import Report
from .resume import Interrupted, StopRequest
from .runtime import compiled_graphs
from .shards import MANIFEST, load_manifest, shard_paths, verify_shards


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


def shard_manifest(shards: Path) -> dict:
    """The shards' manifest; foreign shards (llm.c / modded-nanogpt downloads) come without one."""
    if (shards / MANIFEST).exists():
        return load_manifest(shards)
    return {"train": [{"file": q.name} for q in shard_paths(shards, "train")]}


class TrainingLoop:
    """A recipe's __init__ sets p (TrainParams), paths, rank, world, master, log, device, manifest
    and fingerprint; `_build` sets model; the hooks below do the rest."""

    def run(self) -> dict:
        """Train from the last checkpoint of this configuration (or from scratch) to the end;
        returns the metrics written to metrics/train.json."""
        wall0 = time.perf_counter()
        verify_shards(self.paths.shards, self.vocab_rows(), log=self.log if self.master else None)
        self.check_data()
        self._build()
        peak_tflops = measure_bf16_tflops(self.device) if self.master else None
        compile_s = self.warmup()
        graphs_after_warmup = compiled_graphs()
        start_step, progress = self._resume(compile_s)
        report = Report(self, resumed_at=start_step if progress.resumed else None)
        self.begin_steps(start_step)
        clock = Stopwatch(progress.state["train_time_s"], sync=self._sync)
        flops_tok = self.flops_per_token()
        self.log(self.describe(compile_s))
        stop, pending, last_loss = StopRequest(), None, None
        try:
            clock.start()
            for step in range(start_step, self.n_steps + 1):
                last = step == self.n_steps
                if pending is not None:   # the step queued last time is done: reading it costs no stall
                    last_loss = self._loss_of(*pending)
                    report.step(pending[0], last_loss, clock)
                    pending = None
                if progress.validation_due(step, last, self.p.val_every):
                    self._validate(step, progress, clock, report)
                if stop.requested(self.world, self.device):
                    self._checkpoint(step, progress, clock, last_loss)
                    raise Interrupted(f"stopped at step {step}, checkpoint saved to {self.paths.latest}; "
                                      f"run `dvc repro` again to resume", 130)
                if last or (self.p.ckpt_every and step % self.p.ckpt_every == 0 and step > start_step):
                    self._checkpoint(step, progress, clock, last_loss)
                    clock.start()
                if last:
                    break
                pending = (step, self.step(step))
            clock.stop()
        except torch.cuda.OutOfMemoryError:
            raise SpeedrunError(self.oom_advice()) from None
        finally:
            stop.restore()
        progress.state["train_time_s"] = clock.total
        self.val_history = progress.history
        metrics = report.metrics(progress.state, wall0, compiled_graphs() - graphs_after_warmup,
                                 peak_tflops, flops_tok)
        if self.master:
            write_metrics(self.paths.metrics, metrics, TRAIN_HEADLINE)
            ckpt.save(self.paths.final, self.final_state(metrics["final_val_loss"]))
            report.done(metrics)
        report.close()
        if self.world > 1:
            dist.barrier()
        return metrics

    def _resume(self, compile_s: float) -> tuple[int, Progress]:
        resumed = self.try_resume()
        if resumed:
            self.log(f"resuming from step {resumed[0]} ({self.paths.latest})")
        start_step, state = resumed or (0, None)
        return start_step, Progress(state, start_step, compile_s, resumed is not None, self.p.target_val_loss)

    def _loss_of(self, step: int, loss: torch.Tensor) -> float:
        value = loss.item()
        if not math.isfinite(value):
            resume.check_finite(self.model, step, value, self.paths.latest)
        return value

    def _validate(self, step: int, progress: Progress, clock: Stopwatch, report: Report) -> None:
        clock.stop()
        val, took, reached = progress.validate(step, clock.total, self.val_loss, self.tokens_before,
                                               self.p.target_val_loss)
        report.validation(step, val, took, self.tokens_before(step), clock.total, reached)
        clock.start()

    def _checkpoint(self, step: int, progress: Progress, clock: Stopwatch, last_loss: float | None) -> None:
        """Save at a step boundary, off the clock (the caller restarts it)."""
        clock.stop()
        t = time.perf_counter()
        progress.state["train_time_s"] = clock.total
        self.save_checkpoint(step, progress.state, last_loss)
        progress.state["checkpoint_time_s"] += time.perf_counter() - t

    def save_checkpoint(self, step: int, progress: dict, last_loss: float | None) -> None:
        resume.check_finite(self.model, step, last_loss, self.paths.latest)
        if self.master:
            resume.save(self.paths.latest, self.fingerprint, step, self.train_state(), progress)

    def try_resume(self) -> tuple[int, dict] | None:
        """(step, progress) of this configuration's checkpoint, its training state loaded; None if none."""
        state = resume.load(self.paths.latest, self.fingerprint, self.log)
        if state is None:
            return None
        self.load_train_state(state)
        ckpt.set_rng_state(state["rng"])
        return int(state["step"]), dict(state["progress"])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- what the loop asks of a recipe -----------------------------------------------------
    @property
    def n_steps(self) -> int:
        raise NotImplementedError

    def check_data(self) -> None:
        """Enough tokens for every step and the validation, checked before anything compiles."""
        raise NotImplementedError

    def _build(self) -> None:
        """Model (self.model) and optimizers, compiled where params say so."""
        raise NotImplementedError

    def warmup(self) -> float:
        """Compile on dummy tokens, then reset weights and optimizers; returns its seconds."""
        raise NotImplementedError

    def begin_steps(self, start_step: int) -> None:
        """Ready the batches from `start_step` on (after a resume: where the checkpoint left off)."""
        raise NotImplementedError

    def step(self, step: int) -> torch.Tensor:
        """Train one step; returns its loss as a device tensor (read a step later: no stall)."""
        raise NotImplementedError

    def val_loss(self, step: int) -> float:
        raise NotImplementedError

    def tokens_before(self, step: int) -> int:
        raise NotImplementedError

    def total_tokens(self) -> int:
        raise NotImplementedError

    def step_report(self, step: int) -> tuple[int, float, int]:
        """(tokens of this step, lr multiplier, attention window in tokens) for the step log."""
        raise NotImplementedError

    def flops_per_token(self) -> float:
        raise NotImplementedError

    def describe(self, compile_s: float) -> str:
        """The line that opens the run's log: model, device, precision, compile."""
        raise NotImplementedError

    def oom_advice(self) -> str:
        raise NotImplementedError

    def train_state(self) -> dict:
        """What a checkpoint holds besides the step, RNG and progress."""
        raise NotImplementedError

    def load_train_state(self, state: dict) -> None:
        raise NotImplementedError

    def final_state(self, final_val: float | None) -> dict:
        """models/final.pt: the weights and what evaluate_val and export_hf need to rebuild them."""
        raise NotImplementedError

    def vocab_rows(self) -> int:
        """Rows of the token embedding: every id in the shards must index one."""
        raise NotImplementedError

    def run_flags(self) -> dict:
        """The execution choices taken (FP8, kernels, ...) for metrics/train.json."""
        raise NotImplementedError
