"""Token stream over memory-mapped shards, and the per-step batch loader.

Data order is a pure function of the step: step s trains on the global batch
stream[offset(s) : offset(s) + B(s) + 1] (inputs and shifted targets; B(s) from the batch
schedule, offset(s) = s * B for a constant batch), cut into micro-batches of T tokens.
Micro-batch c goes to rank c % world_size. So a resumed run, or one with another number of GPUs,
sees exactly the same tokens per step. Shards are read through numpy.memmap: only the slices a
step needs are touched, never a full-shard copy.
"""
from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .schedule import BatchSchedule
from .shards import open_shard


class TokenStream:
    """Several shards viewed as one long token array."""

    def __init__(self, paths: list[Path]):
        if not paths:
            raise DataError("no shards found")
        self.paths = [Path(p) for p in paths]
        self.shards = [open_shard(p) for p in self.paths]
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + len(s))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy tokens [start, start+n) into `out` (int32), crossing shard borders if needed."""
        if start < 0 or start + n > len(self):
            raise DataError(f"token range [{start}, {start + n}) is past the end of the shards "
                            f"({len(self)} tokens in {len(self.paths)} file(s))")
        out = np.empty(n, dtype=np.int32) if out is None else out
        i = bisect.bisect_right(self.starts, start) - 1
        done = 0
        while done < n:
            lo = start + done - self.starts[i]
            take = min(n - done, len(self.shards[i]) - lo)
            out[done:done + take] = self.shards[i][lo:lo + take]
            done += take
            i += 1
        return out


class BatchLoader:
    """Yields one step's micro-batches (inputs int32, targets int64) on the device.

    Step s reads the global batch stream[offset(s) : offset(s) + tokens(s) + 1] of the batch
    schedule (a constant batch: offset = s * batch_tokens). The next step's tokens are staged in
    pinned memory and copied on a side stream while the current step computes, so the GPU
    never waits for input and the step has no host sync.
    """

    def __init__(self, stream: TokenStream, schedule: BatchSchedule | int, micro_tokens: int,
                 rank: int, world: int, device: torch.device):
        if isinstance(schedule, int):   # a constant batch, for as many steps as the stream holds
            schedule = BatchSchedule(max((len(stream) - 1) // schedule, 1), schedule, [1.0], [1.0], 1)
        self.stream, self.schedule, self.T = stream, schedule, micro_tokens
        self.rank, self.world, self.device = rank, world, device
        self.cuda = device.type == "cuda"
        pin = self.cuda
        most = len(self.chunks(max(range(schedule.steps + 1), key=schedule.tokens)))
        # two host buffers: one being copied to the GPU while the other is refilled
        self.host = [torch.empty(most, micro_tokens + 1, dtype=torch.int32, pin_memory=pin)
                     for _ in range(2)]
        self.copy_done = [None, None]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: tuple[int, int, list] | None = None   # (step, slot, device micro-batches)
        self._slot = 0

    def steps_available(self) -> int:
        return sum(1 for s in range(self.schedule.steps) if self._fits(s))

    def chunks(self, step: int) -> range:
        """This rank's micro-batch indices within `step`'s global batch."""
        return range(self.rank, self.schedule.tokens(step) // self.T, self.world)

    def _fits(self, step: int) -> bool:
        return self.schedule.offset(step) + self.schedule.tokens(step) + 1 <= len(self.stream)

    def _stage(self, step: int):
        slot = self._slot
        self._slot ^= 1
        if self.copy_done[slot] is not None:
            self.copy_done[slot].synchronize()  # copy issued a step ago: long finished, no stall
        chunks = self.chunks(step)
        host = self.host[slot][:len(chunks)]
        base = self.schedule.offset(step)
        for j, c in enumerate(chunks):
            self.stream.read(base + c * self.T, self.T + 1, out=host[j].numpy())
        if not self.cuda:
            return step, slot, [(h[:-1], h[1:].long()) for h in host.clone()]
        with torch.cuda.stream(self.copy_stream):
            dev = host.to(self.device, non_blocking=True)
            batches = [(d[:-1], d[1:].long()) for d in dev]
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.copy_done[slot] = ev
        return step, slot, batches

    def get(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of `step`; starts staging `step + 1`."""
        if self.pending is None or self.pending[0] != step:
            self.pending = self._stage(step)
        _, slot, batches = self.pending
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copy_done[slot])
            for x, y in batches:  # tell the caching allocator these live on the compute stream now
                x.record_stream(torch.cuda.current_stream(self.device))
                y.record_stream(torch.cuda.current_stream(self.device))
        nxt = step + 1
        self.pending = self._stage(nxt) if nxt < self.schedule.steps and self._fits(nxt) else None
        return batches


def validation_chunks(n_tokens: int, micro_tokens: int, rank: int, world: int) -> list[int]:
    """Start offsets of this rank's validation micro-batches over the first n_tokens."""
    return list(range(rank * micro_tokens, n_tokens, world * micro_tokens))
