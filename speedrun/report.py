"""What a run tells: a console line per step and per validation, DVCLive's curves (metrics/dvclive,
the rank-0 process only) and the final metrics of metrics/train.json.

A Report reads the run's recipe hooks (step_report, tokens_before, total_tokens, run_flags) for
what each line says; the loop decides when to call it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .metrics import Stopwatch, device_name, fmt_duration, fmt_rate, git_commit, peak_host_memory_gib, peak_memory_gib


def dataset_name(manifest: dict) -> str:
    """'HuggingFaceFW/fineweb-edu', or 'local:train.jsonl.xz' for local files."""
    src = manifest.get("source")
    if isinstance(src, dict):
        if src.get("dataset"):
            return str(src["dataset"])
        globs = src.get("local_globs") or []
        return "local:" + ",".join(Path(g).name for g in globs) if globs else str(src.get("source"))
    return str(src or manifest.get("dataset") or "unknown")


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


class Report:
    def __init__(self, run, resumed_at: int | None):
        self.run, self.log = run, run.log
        self.live = self._open_live(resumed_at)
        self._last_step_at, self._rate = None, None   # for the step time and the smoothed ETA

    def _open_live(self, resumed_at: int | None):
        run = self.run
        if not run.master or run.paths.live is None:
            return None
        try:
            from dvclive import Live
        except ImportError:  # e.g. a bare GPU box: train anyway, say what is missing
            self.log("dvclive is not installed: per-step curves are not written (pip install dvclive)")
            return None
        if resumed_at is not None:
            truncate_live_logs(run.paths.live, resumed_at)
        return Live(dir=str(run.paths.live), dvcyaml=False, resume=resumed_at is not None,
                    save_dvc_exp=False, report=None)

    def step(self, step: int, loss: float, clock: Stopwatch) -> None:
        """The line of the step just done: its loss, time, rate, window, lr, and the ETA."""
        run = self.run
        now = time.perf_counter()
        dt = now - self._last_step_at if self._last_step_at is not None else None
        self._last_step_at = now
        done = step + 1
        elapsed = clock.peek()
        step_tokens, lr, wb = run.step_report(step)
        tok_s = step_tokens / dt if dt else float("nan")
        if dt:   # the ETA follows a smoothed rate over the tokens left: one slow step cannot swing it
            self._rate = tok_s if self._rate is None else 0.9 * self._rate + 0.1 * tok_s
        tokens = run.tokens_before(done)
        eta = (run.total_tokens() - tokens) / self._rate if dt else float("nan")
        self.log(f"step {done:5d}/{run.n_steps} | loss {loss:.4f} | "
                 f"{(dt or 0) * 1e3:7.1f} ms | {fmt_rate(tok_s) if dt else '   -  '} tok/s | "
                 f"window {wb:4d} | lr x{lr:.3f} | train {fmt_duration(elapsed)} | "
                 f"ETA {fmt_duration(eta) if dt else '-'}", flush=True)
        if self.live is not None:
            self.live.step = done
            self.live.log_metric("train/loss", loss)
            self.live.log_metric("train/lr_multiplier", lr)
            self.live.log_metric("train/tokens", tokens)
            self.live.log_metric("train/seconds", round(elapsed, 3))
            if dt:
                self.live.log_metric("train/tokens_per_s", round(tok_s, 1))

    def validation(self, step: int, val: float, took: float, tokens: int, train_s: float, reached: bool) -> None:
        target = self.run.p.target_val_loss
        hit = f"  <- target {target} reached" if reached else ""
        self.log(f"step {step:5d}/{self.run.n_steps} | val_loss {val:.4f} | train_time {train_s:.1f}s | "
                 f"tokens {tokens:,} | val took {took:.1f}s{hit}", flush=True)
        if self.live is not None:
            self.live.step = step
            self.live.log_metric("val/loss", val)
            self.live.log_metric("val/tokens", tokens)
            self.live.log_metric("val/seconds", round(train_s, 3))

    def metrics(self, progress: dict, wall0: float, recompiles: int, peak_tflops: float | None,
                flops_tok: float) -> dict:
        """metrics/train.json: time to target, speed, memory, and what ran where."""
        run, p = self.run, self.run.p
        tokens = run.total_tokens()
        train_s = progress["train_time_s"]
        tok_s = tokens / train_s if train_s > 0 else 0.0
        mem_alloc, mem_reserved = peak_memory_gib(run.device)
        target = progress["target"]
        return {
            "dataset": dataset_name(run.manifest),
            "target": p.target_val_loss,
            "reached_target": target is not None,
            "time_to_target_s": round(target["train_time_s"], 3) if target else None,
            "tokens_to_target": target["tokens"] if target else None,
            "step_to_target": target["step"] if target else None,
            "final_val_loss": progress["val_history"][-1]["val_loss"] if progress["val_history"] else None,
            "steps": run.n_steps,
            "tokens": tokens,
            "train_time_s": round(train_s, 3),
            "compile_time_s": round(sum(progress["compile_time_s"]), 3),
            "val_time_s": round(progress["val_time_s"], 3),
            "checkpoint_time_s": round(progress["checkpoint_time_s"], 3),
            "wall_time_s": round(time.perf_counter() - wall0, 3),
            "tokens_per_s": round(tok_s, 1),
            "peak_tokens_per_s": round(max(progress["peak_tokens_per_s"], 0.0), 1),
            "tokens_per_s_per_gpu": round(tok_s / run.world, 1),
            "mfu": round(flops_tok * tok_s / run.world / (peak_tflops * 1e12), 4) if peak_tflops else None,
            "matmul_peak_tflops": round(peak_tflops, 1) if peak_tflops else None,
            "peak_memory_gib": round(mem_alloc, 3) if mem_alloc is not None else None,
            "peak_memory_reserved_gib": round(mem_reserved, 3) if mem_reserved is not None else None,
            "peak_host_memory_gib": round(peak_host_memory_gib(), 3),
            "gpu": device_name(run.device),
            "world_size": run.world,
            "profile": p.profile,
            "recipe": p.recipe,
            **run.run_flags(),
            "compile": p.compile,
            "recompiles_after_warmup": int(recompiles),
            "resumed_at_steps": progress["resumed_at"],
            "torch_version": torch.__version__,
            "seed": p.seed,
            "git_commit": git_commit(),
        }

    def done(self, m: dict) -> None:
        """The closing line: reached the target or not, speed, compile time, peak memory."""
        target = self.run.p.target_val_loss
        verdict = (f"reached {target} in {m['time_to_target_s']:.1f}s of training "
                   f"({m['tokens_to_target']:,} tokens)" if m["reached_target"] else
                   f"did NOT reach {target} (final val_loss {m['final_val_loss']})")
        self.log(f"done: {verdict} | {fmt_rate(m['tokens_per_s'])} tok/s | compile {m['compile_time_s']:.1f}s"
                 + (f" | peak GPU memory {m['peak_memory_gib']:.1f} GiB" if m["peak_memory_gib"]
                    else f" | peak memory {m['peak_host_memory_gib']:.1f} GiB (process)"))

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
