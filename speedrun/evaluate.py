"""Validation cross-entropy over a fixed number of held-out tokens.

The trainer and the evaluate_val stage both call `evaluate_loss`, so their numbers agree when the
model, the tokens and the window are the same.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .loader import TokenStream, validation_chunks


@torch.no_grad()
def evaluate_loss(model, stream: TokenStream, n_tokens: int, micro_tokens: int,
                  window_blocks: torch.Tensor, device: torch.device,
                  rank: int = 0, world: int = 1) -> float:
    """Mean next-token cross-entropy over stream[0 : n_tokens] (targets up to n_tokens + 1).

    Every micro-batch holds micro_tokens predictions, so the mean of micro-batch means is the
    token mean. Losses accumulate on the device: one host sync at the end.
    """
    if n_tokens % micro_tokens:
        raise ValueError(f"val_tokens ({n_tokens}) must be a multiple of the micro-batch ({micro_tokens})")
    starts = validation_chunks(n_tokens, micro_tokens, rank, world)
    total = torch.zeros((), device=device, dtype=torch.float64)
    buf = np.empty(micro_tokens + 1, dtype=np.int32)
    for s in starts:
        toks = torch.from_numpy(stream.read(s, micro_tokens + 1, out=buf)).to(device, non_blocking=False)
        total += model(toks[:-1], toks[1:].long(), window_blocks).double()
    count = torch.tensor(float(len(starts)), device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count).item()
