"""TokenStream / BatchLoader: step s trains on exactly stream[s*B : s*B + B + 1], across shards."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speedrun.errors import DataError
from speedrun.loader import BatchLoader, TokenStream, validation_chunks
from speedrun.shards import write_shard

SIZES = (1000, 10, 1490)  # a tiny middle shard: one read can span all three


@pytest.fixture
def stream(tmp_path) -> TokenStream:
    """Token i of the concatenated stream has value i (so every slice is recognisable)."""
    paths, start = [], 0
    for i, n in enumerate(SIZES):
        paths.append(tmp_path / f"train_{i:06d}.bin")
        write_shard(paths[-1], np.arange(start, start + n))
        start += n
    return TokenStream(paths)


def test_stream_reads_across_shard_borders(stream):
    assert len(stream) == sum(SIZES)
    for start, n in [(0, 5), (995, 10), (999, 12), (1005, 10), (990, 40), (0, 2500), (2499, 1)]:
        got = stream.read(start, n)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.arange(start, start + n))
    with pytest.raises(DataError, match="past the end"):
        stream.read(2490, 11)
    with pytest.raises(DataError):
        stream.read(-1, 2)


def _expected(step: int, B: int, T: int, chunks) -> list[tuple[np.ndarray, np.ndarray]]:
    base = step * B
    return [(np.arange(base + c * T, base + c * T + T), np.arange(base + c * T + 1, base + c * T + T + 1))
            for c in chunks]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 1, 0, 2]])
def test_batch_loader_step_reads_exactly_its_slice(stream, order):
    B, T = 512, 128
    loader = BatchLoader(stream, B, T, rank=0, world=1, device=torch.device("cpu"))
    assert loader.steps_available() == (sum(SIZES) - 1) // B == 4
    for step in order:  # in order (prefetch path) and out of order (re-staging), step 1 crosses shards
        batches = loader.get(step)
        assert len(batches) == B // T
        for (x, y), (ex, ey) in zip(batches, _expected(step, B, T, range(B // T))):
            assert x.dtype == torch.int32 and y.dtype == torch.int64
            assert x.shape == y.shape == (T,)
            np.testing.assert_array_equal(x.numpy(), ex)
            np.testing.assert_array_equal(y.numpy(), ey)
        # together: the step's B + 1 tokens, inputs and targets shifted by one
        xs = torch.cat([x for x, _ in batches]).numpy()
        ys = torch.cat([y for _, y in batches]).numpy()
        np.testing.assert_array_equal(xs, np.arange(step * B, step * B + B))
        np.testing.assert_array_equal(ys, np.arange(step * B + 1, step * B + B + 1))


def test_returned_batches_survive_the_next_step(stream):
    """The double buffer must not overwrite micro-batches a caller still holds."""
    loader = BatchLoader(stream, 512, 128, rank=0, world=1, device=torch.device("cpu"))
    first = loader.get(0)
    kept = [(x.clone(), y.clone()) for x, y in first]
    loader.get(1)
    loader.get(2)
    for (x, y), (kx, ky) in zip(first, kept):
        assert torch.equal(x, kx) and torch.equal(y, ky)


def test_ranks_take_every_world_th_micro_batch(stream):
    B, T, world = 1024, 128, 3   # 8 micro-batches: rank 0 gets 0,3,6; rank 1 gets 1,4,7; rank 2 gets 2,5
    for rank in range(world):
        loader = BatchLoader(stream, B, T, rank=rank, world=world, device=torch.device("cpu"))
        got = loader.get(1)
        chunks = list(range(rank, B // T, world))
        assert len(got) == len(chunks)
        for (x, y), (ex, ey) in zip(got, _expected(1, B, T, chunks)):
            np.testing.assert_array_equal(x.numpy(), ex)
            np.testing.assert_array_equal(y.numpy(), ey)


def test_validation_chunks_cover_the_prefix_once():
    for world in (1, 2, 3):
        starts = sorted(s for r in range(world) for s in validation_chunks(1024, 128, r, world))
        assert starts == list(range(0, 1024, 128))
