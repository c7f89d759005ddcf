"""Everything the record changes from step to step, as pure functions of the step.

The run is `scheduled` steps cut into equal stages, then `extension` steps more:

    stage        steps      batch tokens  doc pieces  windows (short, long)  lr x   MTP weights          prefix
    1            0-422      131,072       <= 896      1, 3 blocks            1.00   [1, .5, .25 -> 0]    .25
    2            423-846    262,144       <= 2048     3, 7                   1.52   [1, .5 -> 0]         .25 -> 0
    3            847-1269   393,216       <= 2048     5, 11                  1.73   [1]                  0
    extension    1270-1284  393,216       <= 2048     6, 13                  -      [1]                  0

(windows in blocks of 128 tokens). The learning rate is the stage's multiplier until
`1 - cooldown_frac` of the scheduled steps, then moves linearly to `final_lr` at the last
scheduled step, and stays there through the extension. Muon's momentum rises from 0.85 to 0.95
over the first 300 steps and falls back over the last 50. Adam steps on odd steps only. The
embedding is tied to the head until the first odd step of the `untie_stage`. When the long
window grows, YaRN rescales the rotary frequencies (yarn.py). The last validation widens the
long window to `final_long_window` blocks (no YaRN step for that one).

Each value is computed with the record's own float expressions (KellerJordan/modded-nanogpt
train_gpt.py: TrainingSchedule, get_muon_momentum, TrainingManager), so they match it bit for bit;
benchmarks/reference.py checks all 1286 steps.
"""
from __future__ import annotations

import dataclasses
import math
from itertools import accumulate

BLOCK = 128   # the windows' unit (tokens)


@dataclasses.dataclass(frozen=True)
class Stage:
    batch_tokens: int
    seq_len: int                     # the longest document piece in a training micro-batch
    windows: tuple[int, int]         # (short, long) attention windows, in blocks of BLOCK tokens
    lr_mul: float
    mtp_start: tuple[float, ...]     # weights of the next token and the ones after, at the stage start
    mtp_end: tuple[float, ...]       # ... and at its end (linear in between)
    prefix_start: float = 0.0        # weight of the prefix-token target, start and end of the stage
    prefix_end: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step trains with."""
    step: int
    stage: int
    batch_tokens: int
    seq_len: int
    short_window: int                # tokens
    long_window: int                 # tokens
    lr: float                        # multiplier of every group's base learning rate
    momentum: float                  # Muon momentum
    mtp_weights: tuple[float, ...]   # always MTP_SLOTS long (missing targets weigh 0)
    prefix_weight: float
    adam: bool                       # Adam steps this step (odd steps)


MTP_SLOTS = 3   # the loss kernel always scores 3 targets; a 0 weight is exactly no target


class Schedule:
    def __init__(self, stages: list[Stage], scheduled: int, extension: int, cooldown_frac: float,
                 final_lr: float, untie_stage: int, final_long_window: int,
                 momentum: tuple[float, float] = (0.85, 0.95), momentum_warmup: int = 300,
                 momentum_cooldown: int = 50):
        if len(stages) < 2:
            raise ValueError("the schedule needs at least one stage and the extension stage")
        self.stages, self.scheduled, self.extension = list(stages), scheduled, extension
        self.cooldown_frac, self.final_lr = cooldown_frac, final_lr
        self.final_long_window = final_long_window
        self.momentum, self.momentum_warmup, self.momentum_cooldown = momentum, momentum_warmup, momentum_cooldown
        self.total = scheduled + extension
        n = len(stages) - 1
        # equal shares, summed as the record sums its 1/3 durations (then rounded)
        ends = [0, *[round(c * scheduled) for c in accumulate([1 / n] * (n - 1))], scheduled, self.total]
        self.boundaries = list(zip(ends[:-1], ends[1:]))
        if any(b <= a for a, b in self.boundaries[:-1]) or (extension and self.boundaries[-1][1] <= self.boundaries[-1][0]):
            raise ValueError(f"{scheduled} scheduled steps are too few for {n} stages")
        if not 0 <= untie_stage < len(stages):
            raise ValueError(f"untie_stage must name one of the {len(stages)} stages")
        self.untie_step = self.boundaries[untie_stage][0] | 1   # an odd step: Adam moves then

    def lookup(self, step: int) -> tuple[int, float]:
        """(stage index, fraction of the way through it)."""
        for i, (start, end) in enumerate(self.boundaries):
            if step < end:
                return i, (step - start) / (end - start)
        return len(self.stages) - 1, 1.0

    def lr(self, step: int) -> float:
        i, _ = self.lookup(step)
        lr = self.stages[i].lr_mul
        cd_start = int(self.scheduled * (1 - self.cooldown_frac))
        if step >= cd_start:
            t = min(1.0, (step - cd_start) / (self.scheduled - cd_start))
            lr = lr * (1 - t) + self.final_lr * t
        return lr

    def muon_momentum(self, step: int) -> float:
        lo, hi = self.momentum
        cd_start = self.total - self.momentum_cooldown
        if step < self.momentum_warmup:
            return lo + step / self.momentum_warmup * (hi - lo)
        if step > cd_start:
            return hi - (step - cd_start) / self.momentum_cooldown * (hi - lo)
        return hi

    def windows(self, step: int, final_validation: bool = False) -> tuple[int, int]:
        """(short, long) windows in tokens."""
        short, long = self.stages[self.lookup(step)[0]].windows
        if final_validation:
            long = self.final_long_window
        return short * BLOCK, long * BLOCK

    def long_window_history(self, step: int) -> list[int]:
        """The long windows (tokens) seen from step 0 to `step`, each once, in order: the YaRN
        steps to replay (yarn.py) to reach the rotary state of `step`."""
        seen = []
        for s in sorted({0, *(a for a, _ in self.boundaries)}):
            if s > step:
                break
            w = self.stages[self.lookup(s)[0]].windows[1] * BLOCK
            if not seen or seen[-1] != w:
                seen.append(w)
        return seen

    def plan(self, step: int) -> StepPlan:
        i, t = self.lookup(step)
        st = self.stages[i]
        mtp = [a + (b - a) * t for a, b in zip(st.mtp_start, st.mtp_end)]
        if len(mtp) > MTP_SLOTS:
            raise ValueError(f"at most {MTP_SLOTS} multi-token targets")
        short, long = self.windows(step)
        return StepPlan(step=step, stage=i, batch_tokens=st.batch_tokens, seq_len=st.seq_len,
                        short_window=short, long_window=long, lr=self.lr(step),
                        momentum=self.muon_momentum(step),
                        mtp_weights=tuple(mtp) + (0.0,) * (MTP_SLOTS - len(mtp)),
                        prefix_weight=st.prefix_start + (st.prefix_end - st.prefix_start) * t,
                        adam=step % 2 == 1)

    def tokens_before(self, step: int) -> int:
        """Training tokens of steps 0 .. step-1."""
        total = 0
        for i, (a, b) in enumerate(self.boundaries):
            n = min(step, b) - a
            if n <= 0:
                break
            total += n * self.stages[i].batch_tokens
        return total

    @property
    def total_tokens(self) -> int:
        return self.tokens_before(self.total)

    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.stages)


def record_stages() -> list[Stage]:
    """Record #89's stages (the table in this module's docstring)."""
    return [
        Stage(131072, 896, (1, 3), 1.0, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0), 0.25, 0.25),
        Stage(262144, 2048, (3, 7), 1.52, (1.0, 0.5), (1.0, 0.0), 0.25, 0.0),
        Stage(393216, 2048, (5, 11), 1.73, (1.0,), (1.0,)),
        Stage(393216, 2048, (6, 13), 1.0, (1.0,), (1.0,)),   # extension (its lr_mul is never used)
    ]


def yarn_attn_scale(history: list[int], base: float = 0.1) -> float:
    """The attention scale after the YaRN steps between successive long windows of `history`."""
    s = base
    for old, new in zip(history, history[1:]):
        s *= 0.2 * math.log(new / old) + 1
    return s
