"""Prefix-token targets (record #89): for a target token T, the token whose bytes are the longest
proper prefix of T's bytes (" everything" -> " every"), or -1 where none exists. The training loss
scores it as an extra target with a scheduled weight (loss.py)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=4)
def prefix_table(vocab_size: int) -> Tensor:
    """int64 [vocab_size]: each token's longest proper byte prefix that is a token, else -1.

    Built from the GPT-2 vocabulary alone: sorted byte strings put every prefix before its
    extensions, so a stack of the current token's ancestors gives the longest one."""
    from ..tokenizer import get_encoding   # the GPT-2 vocabulary, offline

    ranks = get_encoding()._mergeable_ranks
    table = [-1] * vocab_size
    stack: list[bytes] = []
    ids: list[int] = []
    for b, tid in sorted(ranks.items()):
        while stack and not b.startswith(stack[-1]):
            stack.pop()
            ids.pop()
        if ids:
            table[tid] = ids[-1]
        stack.append(b)
        ids.append(tid)
    return torch.tensor(table, dtype=torch.int64)
