"""Hashed bigram embedding (record #89): each position also looks up a row for the pair
(previous token, token), hashed into a table of `rows` rows, and multiplies it by a fixed random
sign vector picked by a second, cheaper hash of the pair (the "sign trick", modded-nanogpt PR
#299: two pairs that collide in the table add with independent signs, so they interfere less).

The row ids are computed by the loader on the host (int32 arithmetic, exactly as the record's
`get_bigram_hash`); the sign ids inside the model. Neither masks document borders: the first
token of a document hashes with the last token of the previous one, as in the record. The first
position of a micro-batch has no previous token and gets the reserved last row; the second pairs
with that row's index instead of the first token (the record's order of operations).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MULTS = (36313, 27191)   # int32 arithmetic: products may wrap, as in the record


def bigram_ids(tokens: np.ndarray, rows: int) -> np.ndarray:
    """int32 row ids [T] of the bigram table for a micro-batch's input tokens."""
    mod = rows - 1
    x = tokens.astype(np.int32)
    prev = x[:-1].copy()
    prev[0] = mod      # the record overwrites position 0 first, so position 1 pairs with `mod`
    out = np.empty_like(x)
    out[0] = mod
    with np.errstate(over="ignore"):   # int32 products wrap, as torch's do
        out[1:] = np.bitwise_xor(np.int32(MULTS[0]) * x[1:], np.int32(MULTS[1]) * prev) % mod
    return out


def sign_ids(tokens: Tensor, sign_rows: int) -> Tensor:
    """Row of the sign table per position: (previous token XOR token) mod sign_rows; 0 first."""
    ids = torch.zeros_like(tokens)
    ids[1:] = (tokens[:-1] ^ tokens[1:]) % sign_rows
    return ids


def sign_table(sign_rows: int, dim: int) -> Tensor:
    """Random +-1 vectors (bf16), drawn from the default generator: the record's draw order."""
    return torch.randn(sign_rows, dim).sign().to(torch.bfloat16)
