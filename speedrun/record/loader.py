"""The record's batches: micro-batches of whole documents for training, contiguous chunks for
validation.

Training (the record's `Shard.next_batch`): a micro-batch of T tokens is a run of documents, each
starting at its <|endoftext|> and cut to at most `seq_len` tokens, the last one cut to fill exactly
T + 1 tokens (inputs and the targets shifted by one). The next micro-batch starts at the next
document: what a cut left over is skipped. Shards are read one after another; when the documents
left in a shard cannot fill a micro-batch (for all ranks), the rest of the shard is skipped.
With several processes, the documents of one micro-batch for every rank are taken in rank order
and each rank keeps its own.

Validation: consecutive chunks of T tokens (and one target more) from the start of the split,
documents cut wherever a chunk ends; a chunk that would reach the last token of its shard moves
to the next shard.

Every micro-batch comes with `cu_seqlens` (document starts in the flat sequence, padded with T to
a fixed length, as the record pads it) and the hashed bigram ids of the inputs (bigram.py).
Shards are memory-mapped; the document starts of a shard are found once, when it is first read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..shards import open_shard
from .bigram import bigram_ids

BOS = 50256
# cu_seqlens lengths the record uses for its training micro-batch sizes; others: T // 300 rounded
# up to a multiple of 128 (and more where a micro-batch holds more documents)
MAX_DOCS = {16384: 64, 32768: 96, 49152: 128}


def max_docs(T: int) -> int:
    if T in MAX_DOCS:
        return MAX_DOCS[T]
    return -(-(T // 300) // 128) * 128


@dataclasses.dataclass
class MicroBatch:
    inputs: np.ndarray        # int32 [T]
    targets: np.ndarray       # int64 [T]
    cu_seqlens: np.ndarray    # int32 [n]: 0, document ends..., T, T, ...
    bigram: np.ndarray        # int32 [T]


def _pack(buf: np.ndarray, cum_lengths: np.ndarray, T: int, bigram_rows: int) -> MicroBatch:
    n = max_docs(T)
    if len(cum_lengths) + 1 > n:   # the record would stop here; a longer table changes nothing
        n = -(-(len(cum_lengths) + 1) // 128) * 128
    cu = np.full(n, T, dtype=np.int32)
    cu[0] = 0
    cu[1:len(cum_lengths) + 1] = cum_lengths
    inputs = buf[:-1].astype(np.int32)
    return MicroBatch(inputs, buf[1:].astype(np.int64), cu, bigram_ids(inputs, bigram_rows))


class DocumentBatches:
    """Training micro-batches of whole documents, in the record's order. `state()` /
    `load_state()` save and restore the position (shard, document), so a resumed run reads on
    where it stopped."""

    def __init__(self, paths: list[Path], bigram_rows: int, rank: int = 0, world: int = 1):
        if not paths:
            raise DataError("no training shards")
        self.paths = [Path(p) for p in paths]
        self.bigram_rows, self.rank, self.world = bigram_rows, rank, world
        self.shard = 0      # index into paths
        self.doc = 0        # index of the next document start in that shard
        self._tokens: np.ndarray | None = None
        self._bos: np.ndarray | None = None
        self._loaded = -1

    def state(self) -> dict:
        return {"shard": self.shard, "doc": self.doc}

    def load_state(self, state: dict) -> None:
        self.shard, self.doc = int(state["shard"]), int(state["doc"])

    def _open(self) -> None:
        if self._loaded != self.shard:
            if self.shard >= len(self.paths):
                raise DataError(f"the training shards ran out after {len(self.paths)} file(s): "
                                "download more (download.max_tokens) or train fewer steps")
            self._tokens = open_shard(self.paths[self.shard])
            self._bos = np.flatnonzero(np.asarray(self._tokens) == BOS)
            self._loaded = self.shard

    def _plan(self, T: int, seq_len: int) -> tuple[list[list[tuple[int, int]]], int] | None:
        """Every rank's document pieces for the next micro-batch, or None if the shard runs out."""
        bos, size = self._bos, len(self._tokens)
        n, idx = len(bos), self.doc
        pieces = []
        for _ in range(self.world):
            mine, cur_len = [], 0
            while cur_len <= T:
                if idx >= n:
                    return None
                cur = int(bos[idx])
                idx += 1
                end = min(int(bos[idx]) if idx < n else size, cur + seq_len, cur + T - cur_len + 1)
                mine.append((cur, end))
                cur_len += end - cur
            pieces.append(mine)
        return pieces, idx

    def next(self, T: int, seq_len: int) -> MicroBatch:
        while True:
            self._open()
            planned = self._plan(T, seq_len)
            if planned is not None:
                break
            self.shard, self.doc = self.shard + 1, 0   # the rest of this shard cannot fill a batch
        pieces, self.doc = planned
        mine = pieces[self.rank]
        buf = np.concatenate([self._tokens[a:b] for a, b in mine])
        lengths = np.array([b - a for a, b in mine], dtype=np.int64)
        lengths[-1] -= 1          # the last piece carries the extra target token
        return _pack(buf, np.cumsum(lengths), T, self.bigram_rows)


class ValidationChunks:
    """Validation micro-batches: chunk after chunk of the split, `rank`'s share of each step."""

    def __init__(self, paths: list[Path], bigram_rows: int, rank: int = 0, world: int = 1):
        if not paths:
            raise DataError("no validation shards")
        self.paths = [Path(p) for p in paths]
        self.bigram_rows, self.rank, self.world = bigram_rows, rank, world

    def __call__(self, n_tokens: int, T: int):
        """Yield this rank's micro-batches over the first `n_tokens` of the split."""
        per_step = T * self.world
        if n_tokens % per_step:
            raise DataError(f"validation tokens ({n_tokens:,}) must be a multiple of the chunk "
                            f"({T:,}) x processes ({self.world})")
        shard, pos, tokens = 0, 0, open_shard(self.paths[0])
        for _ in range(n_tokens // per_step):
            if pos + per_step + 1 >= len(tokens):
                shard, pos = shard + 1, 0
                if shard >= len(self.paths):
                    raise DataError(f"the validation split holds fewer than {n_tokens + 2:,} tokens "
                                    "(one chunk more than it evaluates): lower the validation tokens")
                tokens = open_shard(self.paths[shard])
            start = pos + self.rank * T
            buf = np.asarray(tokens[start:start + T + 1])
            pos += per_step
            yield _pack(buf, np.flatnonzero(buf[:-1] == BOS), T, self.bigram_rows)

    def available(self) -> int:
        return sum(len(open_shard(p)) for p in self.paths)
