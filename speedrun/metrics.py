"""Run metadata and speed figures: GPU name, git commit, measured matmul peak, MFU, console lines;
the metrics files the stages write (headline figures for `dvc metrics show`, details beside them)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

# What `dvc metrics show` / `dvc exp show` list, one column each: a run's result at a glance. Every
# other figure (timings, flags, versions, ...) goes to the `*_details.json` file beside it.
TRAIN_HEADLINE = ("reached_target", "time_to_target_s", "tokens_to_target", "final_val_loss", "tokens_per_s",
                  "train_time_s", "compile_time_s", "mfu", "peak_memory_gib", "gpu", "world_size")
EVAL_HEADLINE = ("val_loss", "bits_per_byte", "meets_target")
HELLASWAG_HEADLINE = ("acc", "acc_norm", "items", "malformed_lines")


def details_path(path: Path) -> Path:
    """metrics/train.json -> metrics/train_details.json"""
    path = Path(path)
    return path.with_name(f"{path.stem}_details.json")


def write_metrics(path: Path, metrics: dict, headline: tuple[str, ...]) -> None:
    """Everything to the details file, then the headline figures to `path` (each atomically): a
    reader that finds `path` finds its details too."""
    from .atomic import write_json

    write_json(details_path(path), metrics)
    write_json(path, {k: metrics[k] for k in headline if k in metrics})


def read_metrics(path: Path) -> dict:
    """A metrics file with its details (where written): every figure the stage recorded."""
    path = Path(path)
    data = json.loads(path.read_text())
    details = details_path(path)
    return {**json.loads(details.read_text()), **data} if details.exists() else data


def git_commit() -> str:
    """HEAD's sha, with "-dirty" when tracked files differ from it (the code that ran is not HEAD's)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or len(sha) != 40:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return sha + "-dirty" if status.returncode == 0 and status.stdout.strip() else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def measure_bf16_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """Dense bf16 matmul rate this GPU actually delivers (the MFU denominator); None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 * iters / seconds / 1e12


def peak_host_memory_gib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB): on CPU, the figure
    that matters; on a GPU, the host side (pinned batches, the data's page cache excluded)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_memory_gib(device: torch.device) -> tuple[float | None, float | None]:
    """Peak GPU memory, allocated and reserved; (None, None) off CUDA (see peak_host_memory_gib)."""
    if device.type != "cuda":
        return None, None
    return (torch.cuda.max_memory_allocated(device) / 2 ** 30,
            torch.cuda.max_memory_reserved(device) / 2 ** 30)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e6:.3f}M" if tokens_per_s >= 1e6 else f"{tokens_per_s / 1e3:.1f}k"


class Stopwatch:
    """Accumulates seconds across start/stop pairs (the speedrun's training clock)."""

    def __init__(self, total: float = 0.0, sync=None):
        self.total, self._t0, self._sync = total, None, sync or (lambda: None)

    def start(self):
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        if self._t0 is not None:
            self.total += time.perf_counter() - self._t0
            self._t0 = None
        return self.total

    def peek(self) -> float:
        return self.total + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
