"""The record recipe's per-step schedule (speedrun/record/schedule.py) and its batches
(speedrun/record/loader.py, bigram.py). benchmarks/reference.py compares both with the record's
own code on a GPU machine; these tests pin the rules themselves on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speedrun.errors import DataError
from speedrun.record import schedule as sch
from speedrun.record.bigram import bigram_ids, sign_ids
from speedrun.record.loader import BOS, DocumentBatches, ValidationChunks, max_docs
from speedrun.record.trainer import RecordParams, schedule
from speedrun.record.yarn import Yarn
from speedrun.shards import write_shard


@pytest.fixture(scope="module")
def sched():
    return schedule(RecordParams())


def test_stages_tokens_and_untie_step(sched):
    assert sched.boundaries == [(0, 423), (423, 847), (847, 1270), (1270, 1285)]
    assert sched.total == 1285 and sched.untie_step == 847
    assert sched.total_tokens == 423 * 131072 + 424 * 262144 + 438 * 393216 == 338_821_120
    assert [sched.plan(s).batch_tokens for s in (0, 422, 423, 846, 847, 1284)] == \
        [131072, 131072, 262144, 262144, 393216, 393216]
    assert [sched.plan(s).seq_len for s in (0, 422, 423)] == [896, 896, 2048]
    assert sched.tokens_before(424) == 423 * 131072 + 262144


def test_learning_rate_cooldown_from_the_stage_multiplier(sched):
    cd = int(1270 * (1 - 0.6))   # 508: the cooldown starts inside stage 2
    assert [sched.lr(s) for s in (0, 422, 423, cd - 1)] == [1.0, 1.0, 1.52, 1.52]
    for s in (cd, 700, 846, 847, 1100, 1269):
        t = (s - cd) / (1270 - cd)
        mult = 1.52 if s < 847 else 1.73
        assert sched.lr(s) == pytest.approx(mult * (1 - t) + 0.15 * t, rel=1e-12)
    assert sched.lr(1270) == sched.lr(1284) == pytest.approx(0.15)


def test_momentum_warmup_and_cooldown(sched):
    assert sched.muon_momentum(0) == 0.85
    assert sched.muon_momentum(150) == pytest.approx(0.90)
    assert sched.muon_momentum(300) == sched.muon_momentum(1235) == 0.95
    assert sched.muon_momentum(1260) == pytest.approx(0.90)
    assert sched.muon_momentum(1285) == pytest.approx(0.85)


def test_loss_weights_windows_and_parity(sched):
    p0, p200, p423, p847 = (sched.plan(s) for s in (0, 200, 423, 847))
    assert p0.mtp_weights == (1.0, 0.5, 0.25) and p0.prefix_weight == 0.25
    assert p200.mtp_weights[2] == pytest.approx(0.25 * (1 - 200 / 423))
    assert p423.mtp_weights == (1.0, 0.5, 0.0) and p423.prefix_weight == 0.25
    assert sched.plan(634).prefix_weight == pytest.approx(0.25 * (1 - 211 / 424))
    assert p847.mtp_weights == (1.0, 0.0, 0.0) and p847.prefix_weight == 0.0
    assert (p0.short_window, p0.long_window) == (128, 384)
    assert (sched.plan(1270).short_window, sched.plan(1270).long_window) == (768, 1664)
    assert sched.windows(1285, final_validation=True) == (768, 2560)
    assert [sched.plan(s).adam for s in range(4)] == [False, True, False, True]


def test_yarn_history_scale_and_tables():
    sched = schedule(RecordParams())
    assert sched.long_window_history(0) == [384]
    assert sched.long_window_history(1000) == [384, 896, 1408]
    assert sched.long_window_history(1285) == [384, 896, 1408, 1664]
    y = Yarn(8, 64, paired=False, device=torch.device("cpu"))
    y.replay([384, 896, 1408])
    assert y.attn_scale == pytest.approx(sch.yarn_attn_scale([384, 896, 1408]))
    assert y.attn_scale == pytest.approx(0.1 * (0.2 * np.log(896 / 384) + 1) * (0.2 * np.log(1408 / 896) + 1))
    # the position-free half never rotates; the rotating half turns slower after YaRN
    assert torch.all(y.cos[:, 4:] == 1) and torch.all(y.sin[:, 4:] == 0)
    fresh = Yarn(8, 64, paired=False, device=torch.device("cpu"))
    assert (y.freq[:4] <= fresh.freq[:4]).all() and (y.freq[:4] < fresh.freq[:4]).any()


def test_params_reject_inconsistent_stages():
    from speedrun.errors import ParamError
    from speedrun.params import parse_section

    with pytest.raises(ParamError, match="record.stage_lr"):
        parse_section({"record": {"stage_lr": [1.0, 1.5]}}, "record", RecordParams)
    with pytest.raises(ParamError, match="multiples of record.micro_batch_tokens"):
        parse_section({"record": {"micro_batch_tokens": 12288}}, "record", RecordParams)
    with pytest.raises(ParamError, match="model_dim"):
        parse_section({"record": {"model_dim": 512}}, "record", RecordParams)
    with pytest.raises(ParamError, match="record.mtp_start"):
        parse_section({"record": {"mtp_start": [[1.0, -1.0], [1.0], [1.0]]}}, "record", RecordParams)


# ----------------------------------------------------------------------------- batches

def _docs(lengths: list[int], start: int = 1) -> np.ndarray:
    """Documents of the given lengths (each starts with BOS, then counting tokens)."""
    out, t = [], start
    for n in lengths:
        out.append(BOS)
        out.extend(range(t, t + n - 1))
        t += n - 1
    return np.array(out, dtype=np.int64)


def test_document_batches_cut_pieces_fill_exactly_and_skip_the_rest(tmp_path):
    toks = _docs([5, 12, 3, 9, 7, 20, 4, 4])
    write_shard(tmp_path / "train_000000.bin", toks)
    write_shard(tmp_path / "train_000001.bin", _docs([30, 30], start=1000))
    loader = DocumentBatches([tmp_path / "train_000000.bin", tmp_path / "train_000001.bin"], 997)
    starts = np.flatnonzero(toks == BOS)
    b = loader.next(T=16, seq_len=8)
    # doc 0 (5), doc 1 cut to 8 (its rest skipped), doc 2 (3), then doc 3 cut to fill T + 1 = 17
    expect = np.concatenate([toks[0:5], toks[starts[1]:starts[1] + 8], toks[starts[2]:starts[2] + 3],
                             toks[starts[3]:starts[3] + 1]])
    assert np.array_equal(np.append(b.inputs, b.targets[-1]), expect)
    assert np.array_equal(b.targets, expect[1:])
    assert list(b.cu_seqlens[:5]) == [0, 5, 13, 16, 16]
    assert len(b.cu_seqlens) == 128 and max_docs(16384) == 64 and max_docs(262144) == 896   # the record's sizes
    assert loader.state() == {"shard": 0, "doc": 4}
    b2 = loader.next(T=16, seq_len=8)   # doc 3's remainder is skipped: doc 4, doc 5 cut to 8, doc 6 cut to 2
    assert b2.inputs[0] == BOS and b2.inputs[1] == toks[starts[4] + 1]
    assert list(b2.cu_seqlens[:4]) == [0, 7, 15, 16] and loader.state() == {"shard": 0, "doc": 7}
    # doc 7 cannot fill another micro-batch: the rest of shard 0 is skipped
    b3 = loader.next(T=16, seq_len=32)
    assert loader.state() == {"shard": 1, "doc": 1} and b3.inputs[1] == 1000
    loader.next(T=16, seq_len=32)
    with pytest.raises(DataError, match="ran out"):
        loader.next(T=16, seq_len=32)


def test_document_batches_resume_where_they_stopped(tmp_path):
    rng = np.random.default_rng(0)
    toks = _docs(list(rng.integers(3, 60, 400)))
    write_shard(tmp_path / "train_000000.bin", toks)
    a = DocumentBatches([tmp_path / "train_000000.bin"], 4096)
    first = [a.next(64, 32) for _ in range(5)]
    state = a.state()
    rest = [a.next(64, 32) for _ in range(5)]
    b = DocumentBatches([tmp_path / "train_000000.bin"], 4096)
    b.load_state(state)
    assert all(np.array_equal(x.inputs, y.inputs) for x, y in zip(rest, [b.next(64, 32) for _ in range(5)]))
    assert not np.array_equal(first[0].inputs, rest[0].inputs)


def test_ranks_take_their_own_pieces_of_one_plan(tmp_path):
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "train_000000.bin", _docs(list(rng.integers(3, 40, 300))))
    one = DocumentBatches([tmp_path / "train_000000.bin"], 4096)
    r0, r1 = (DocumentBatches([tmp_path / "train_000000.bin"], 4096, rank=r, world=2) for r in (0, 1))
    a0, a1 = one.next(32, 16), one.next(32, 16)
    assert np.array_equal(r0.next(32, 16).inputs, a0.inputs) and np.array_equal(r1.next(32, 16).inputs, a1.inputs)
    assert r0.state() == r1.state() == one.state()


def test_validation_chunks_are_contiguous_and_move_shards_early(tmp_path):
    write_shard(tmp_path / "val_000000.bin", np.arange(100) % 50000)
    write_shard(tmp_path / "val_000001.bin", np.arange(100, 200))
    chunks = list(ValidationChunks([tmp_path / "val_000000.bin", tmp_path / "val_000001.bin"], 997)(128, 32))
    # the 4th chunk would need tokens 96..128 of a 100-token shard: it starts the next shard
    assert [c.inputs[0] for c in chunks] == [0, 32, 64, 100]
    assert np.array_equal(chunks[1].targets, np.arange(33, 65))
    with pytest.raises(DataError, match="multiple"):
        list(ValidationChunks([tmp_path / "val_000000.bin"], 997)(100, 32))


def test_bigram_ids_follow_the_records_order_of_operations():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50257, 500).astype(np.int32)
    rows = 377280
    # the record's get_bigram_hash, as it writes it (position 0 first, then every position in one go)
    t = torch.from_numpy(x.copy())
    t[0] = rows - 1
    t[1:] = torch.bitwise_xor(36313 * t[1:], 27191 * t[:-1]) % (rows - 1)
    assert np.array_equal(bigram_ids(x, rows), t.numpy())
    ids = bigram_ids(x, rows)
    assert ids.min() >= 0 and ids.max() < rows and ids[0] == rows - 1
    s = sign_ids(torch.from_numpy(x), 8192)
    assert s[0] == 0 and s[1] == (x[0] ^ x[1]) % 8192


def test_warm_up_compiles_every_micro_batch_size_of_the_schedule():
    """With the record's own micro-batches (an eighth of each stage's batch) stages 2 and 3 have
    other shapes: warming up on stage 1 alone left recompiles on the clock."""
    from speedrun.record.trainer import RecordRun

    def plan(micro: int) -> list:
        run = object.__new__(RecordRun)
        run.T, run.sched = micro, schedule(RecordParams())
        return run.warmup_steps()

    assert plan(16384) == [(0, 16384), (1, 16384)]   # one shape: Muon then Adam only
    stage2, stage3 = (a for a, _ in schedule(RecordParams()).boundaries[1:3])
    assert plan(0) == [(0, 16384), (1, 16384), (stage2, 32768), (stage3, 49152)]
