"""What a run has done so far, by the training clock: training seconds, validations, the target.

The clock (metrics.Stopwatch) runs only while training steps run; the loop stops it for each
validation and checkpoint write. The progress is checkpointed with the run as a plain dict
(`state`), so a resumed run continues its clock, its validation history and its time to target.
"""
from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(self, state: dict | None, start_step: int, compile_s: float, resumed: bool,
                 target: float):
        self.state = state = dict(state or {})
        for key, empty in (("train_time_s", 0.0), ("val_time_s", 0.0), ("checkpoint_time_s", 0.0),
                           ("val_history", []), ("target", None), ("peak_tokens_per_s", 0.0),
                           ("compile_time_s", []), ("resumed_at", [])):
            state.setdefault(key, empty)
        state["compile_time_s"].append(round(compile_s, 3))
        if resumed:
            state["resumed_at"].append(start_step)
            # target_val_loss is a run-control key: judge the restored history by today's target
            hit = next((h for h in state["val_history"] if h["val_loss"] <= target), None)
            state["target"] = ({"step": hit["step"], "tokens": hit["tokens"],
                                "train_time_s": hit["train_time_s"]} if hit else None)
        self.start_step, self.resumed = start_step, resumed
        self._since = (start_step, state["train_time_s"])   # (step, training seconds) of the last validation

    @property
    def history(self) -> list[dict]:
        return self.state["val_history"]

    def validation_due(self, step: int, last: bool, every: int) -> bool:
        """At the last step and every `every` steps (not again at a step a resumed run validated)."""
        if self.history and self.history[-1]["step"] == step:
            return False
        return last or bool(every and step % every == 0 and step > self.start_step)

    def validate(self, step: int, train_s: float, val_loss: Callable[[int], float],
                 tokens_before: Callable[[int], int], target: float) -> tuple[float, float, bool]:
        """Validate at `step` (clock stopped at `train_s`) and record it; returns (loss, seconds it
        took, whether it is the first to reach `target`). Also keeps the peak tokens/s over whole
        intervals between validations: steady, and free of validation time."""
        s0, c0 = self._since
        if step > s0 and train_s > c0:
            rate = (tokens_before(step) - tokens_before(s0)) / (train_s - c0)
            self.state["peak_tokens_per_s"] = max(self.state["peak_tokens_per_s"], rate)
        t = time.perf_counter()
        val = val_loss(step)
        took = time.perf_counter() - t
        self.state["val_time_s"] += took
        tokens = tokens_before(step)
        self.history.append({"step": step, "tokens": tokens, "train_time_s": round(train_s, 3),
                             "val_loss": round(val, 5)})
        reached = self.state["target"] is None and val <= target
        if reached:
            self.state["target"] = {"step": step, "tokens": tokens, "train_time_s": train_s}
        self._since = (step, train_s)
        return val, took, reached
