"""A run's resumable state: checkpoints at step boundaries, the stop on a signal, divergence.

`models/checkpoints/latest.pt` holds the recipe's training state (its `train_state()`), the RNG
states and the progress, under the run's fingerprint: a checkpoint of another configuration or
dataset is never resumed. A non-finite loss or weight stops the run before it could overwrite the
last good checkpoint.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .errors import SpeedrunError


def save(path: Path, fingerprint: str, step: int, train_state: dict, progress: dict) -> None:
    ckpt.save(path, {"format": ckpt.FORMAT, "fingerprint": fingerprint, "step": step, **train_state,
                     "rng": ckpt.rng_state(), "progress": progress})


def load(path: Path, fingerprint: str, log) -> dict | None:
    """The checkpoint at `path` if it belongs to this run (same fingerprint), else None."""
    if not path.exists():
        return None
    state = ckpt.load(path)
    if state.get("fingerprint") != fingerprint:
        log(f"checkpoint {path} belongs to another configuration or dataset: starting fresh")
        return None
    return state


def check_finite(model: torch.nn.Module, step: int, loss: float | None, latest: Path) -> None:
    """Raise if the loss or any weight is not finite: the run diverged (the last good checkpoint stays)."""
    bad = loss is not None and not math.isfinite(loss)
    if not bad:
        norms = torch._foreach_norm([q.detach() for q in model.parameters()])
        bad = not bool(torch.isfinite(torch.stack(norms)).all())
    if bad:
        kept = f"the last good checkpoint {latest} is kept" if latest.exists() \
            else "no checkpoint had been written yet"
        what = f"loss {loss}" if loss is not None and not math.isfinite(loss) else \
            f"non-finite weights (last loss {loss})"
        raise SpeedrunError(f"training diverged: {what} by step {step}; "
                            f"stopped, {kept}. Lower the learning rates (train.muon_lr, "
                            f"train.embed_lr, train.head_lr) or check the data")


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

    def requested(self, world: int, device: torch.device) -> bool:
        """Whether to stop here. With several processes all must stop at the same step (else
        collectives hang): a request on any one counts for all, and every rank enters the
        all-reduce, also one that already has its signal (a rank signalled just before this check
        and one signalled just after it would otherwise part ways here)."""
        if world == 1:
            return self.signum is not None
        flag = torch.tensor([int(self.signum is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(SpeedrunError):
    """The run stopped on a signal after saving a checkpoint: exit code 130."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
