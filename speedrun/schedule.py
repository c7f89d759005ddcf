"""Per-step schedules: learning rate, attention window and Muon momentum. Pure functions of the step,
so a resumed run reproduces them exactly from the step number alone."""
from __future__ import annotations

import math
from bisect import bisect_right

from .model import BLOCK_SIZE


def lr_multiplier(step: int, steps: int, cooldown_frac: float, final_frac: float) -> float:
    """Stable at 1.0, then linear decay to `final_frac` over the last `cooldown_frac` of training."""
    remaining = 1.0 - step / steps
    if cooldown_frac <= 0 or remaining >= cooldown_frac:
        return 1.0
    w = max(remaining, 0.0) / cooldown_frac  # 1 -> 0 across the cooldown
    return w + (1.0 - w) * final_frac


def window_blocks(step: int, steps: int, start_tokens: int, end_tokens: int) -> int:
    """Sliding-window size in 128-token blocks, growing linearly from start to end."""
    frac = min(max(step / max(steps, 1), 0.0), 1.0)
    tokens = start_tokens + (end_tokens - start_tokens) * frac
    return max(1, math.ceil(tokens / BLOCK_SIZE))


def muon_momentum(step: int, warmup: int, start: float, end: float) -> float:
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * start + frac * end


class BatchSchedule:
    """Tokens per optimizer step in stages: equal shares of the steps, each a fraction of the full
    batch with its own lr multiplier (modded-nanogpt: 1/3, 2/3, 1 of the batch at lr x1, x1.52,
    x1.73: small early batches buy more updates where the gradient noise is low anyway).

    The data order stays a pure function of the step: step s reads the tokens after all earlier
    steps' (`offset(s)`), so a resumed run sees exactly the tokens an uninterrupted one would.
    """

    def __init__(self, steps: int, batch_tokens: int, fractions: list[float], lr_mults: list[float],
                 unit: int):
        if not fractions:
            fractions = [1.0]
        self.steps, self.unit = steps, unit
        self.tokens_per_stage = [int(round(batch_tokens * f / unit)) * unit for f in fractions]
        self.lr_mults = list(lr_mults) if lr_mults else [1.0] * len(fractions)
        # first step of each stage, and tokens consumed before it
        n = len(fractions)
        self.starts = [steps * i // n for i in range(n)] + [steps]
        self.offsets = [0]
        for i in range(n):
            self.offsets.append(self.offsets[-1] + (self.starts[i + 1] - self.starts[i]) * self.tokens_per_stage[i])

    def stage(self, step: int) -> int:
        n = len(self.tokens_per_stage)
        return min(max(bisect_right(self.starts, step) - 1, 0), n - 1)

    def tokens(self, step: int) -> int:
        """Tokens trained on at `step` (all processes, all micro-batches)."""
        return self.tokens_per_stage[self.stage(step)]

    def lr_mult(self, step: int) -> float:
        return self.lr_mults[self.stage(step)]

    def offset(self, step: int) -> int:
        """Tokens consumed by steps 0 .. step-1 (= the stream position where `step` starts)."""
        i = self.stage(step)
        return self.offsets[i] + (min(step, self.steps) - self.starts[i]) * self.tokens_per_stage[i]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @property
    def max_tokens(self) -> int:
        return max(self.tokens_per_stage)


def mtp_weights(step: int, steps: int, extra: list[float]) -> list[float]:
    """Multi-token prediction weights [1, w_2, ..., w_K+1] (next token, the one after, ...).

    The run is cut into K+1 equal parts: the farthest target's weight decays linearly to 0
    over part 1, the next one's over part 2, and so on; the last part trains on the next token
    only (modded-nanogpt: [1, .5, .25] -> [1, .5, 0] -> [1, 0] -> [1]).
    """
    K = len(extra)
    x = min(max(step / max(steps, 1), 0.0), 1.0) * (K + 1)   # position in parts
    out = [1.0]
    for j, w in enumerate(extra, start=1):   # j = 1 is the token after next
        part = K - j                          # parts before this weight starts decaying
        out.append(w * min(max(1.0 - (x - part), 0.0), 1.0))
    return out
