"""Per-step schedules: learning rate, attention window and Muon momentum. Pure functions of the step,
so a resumed run reproduces them exactly from the step number alone."""
from __future__ import annotations

import math

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
