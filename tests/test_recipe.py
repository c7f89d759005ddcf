"""Recipe schedules of the later speedrun records: batch-size stages, multi-token prediction,
the hashed bigram embedding; and a tiny CPU run with all of them on."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speedrun import train as train_mod
from speedrun.errors import ParamError
from speedrun.head import mtp_targets, reference_mtp_loss, softcap_mtp_loss
from speedrun.loader import BatchLoader, TokenStream
from speedrun.model import bigram_hash
from speedrun.params import parse_section
from speedrun.schedule import BatchSchedule, mtp_weights
from speedrun.shards import write_shard
from speedrun.train import TrainParams


def test_batch_schedule_stages_offsets_and_lr():
    s = BatchSchedule(10, 393216, [1 / 3, 2 / 3, 1.0], [1.0, 1.52, 1.73], unit=32768)
    assert s.tokens_per_stage == [131072, 262144, 393216]
    assert [s.tokens(i) for i in range(10)] == [131072] * 3 + [262144] * 3 + [393216] * 4
    assert [s.lr_mult(i) for i in (0, 2, 3, 5, 6, 9)] == [1.0, 1.0, 1.52, 1.52, 1.73, 1.73]
    # the offset of every step is the sum of all earlier steps' tokens, and the total is all steps'
    assert [s.offset(i) for i in range(11)] == [sum(s.tokens(j) for j in range(i)) for i in range(11)]
    assert s.total == s.offset(10) == 3 * 131072 + 3 * 262144 + 4 * 393216
    # a constant batch is the old layout: step s starts at s * B
    c = BatchSchedule(7, 1024, [1.0], [], unit=256)
    assert [c.offset(i) for i in range(8)] == [1024 * i for i in range(8)] and c.lr_mult(3) == 1.0


def test_batch_stages_round_to_whole_micro_batches_and_reject_empty_stages():
    p = TrainParams(steps=9, batch_tokens=524288, micro_batch_tokens=32768, batch_stages=[0.3, 1.0])
    s = train_mod.batch_schedule(p, world=1)
    assert s.tokens_per_stage == [163840, 524288]                 # 0.3 * 16 = 4.8 -> 5 micro-batches
    assert train_mod.batch_schedule(p, world=2).tokens_per_stage == [131072, 524288]  # 2 x 32768 units
    with pytest.raises(ParamError, match="batch_stages"):
        train_mod.batch_schedule(TrainParams(steps=9, batch_tokens=65536, micro_batch_tokens=32768,
                                             batch_stages=[0.1, 1.0]))
    with pytest.raises(ParamError, match="batch_stage_lr"):
        parse_section({"train": {"batch_stages": [0.5, 1.0], "batch_stage_lr": [1.0]}}, "train", TrainParams)
    with pytest.raises(ParamError, match=r"train.batch_stages"):
        parse_section({"train": {"batch_stages": [0.5, 1.5]}}, "train", TrainParams)


def test_loader_follows_the_batch_schedule(tmp_path):
    """Step s reads exactly stream[offset(s) : offset(s) + tokens(s) + 1], in any order."""
    write_shard(tmp_path / "train_000000.bin", np.arange(20000))
    stream = TokenStream([tmp_path / "train_000000.bin"])
    sched = BatchSchedule(9, 1024, [0.25, 0.5, 1.0], [], unit=256)
    loader = BatchLoader(stream, sched, 256, rank=0, world=1, device=torch.device("cpu"))
    assert loader.steps_available() == 9
    for step in [0, 1, 2, 3, 7, 4, 8]:
        batches = loader.get(step)
        assert len(batches) == sched.tokens(step) // 256
        xs = torch.cat([x for x, _ in batches]).numpy()
        ys = torch.cat([y for _, y in batches]).numpy()
        start = sched.offset(step)
        np.testing.assert_array_equal(xs, np.arange(start, start + sched.tokens(step)))
        np.testing.assert_array_equal(ys, xs + 1)


def test_mtp_weights_decay_one_target_per_part():
    def w(step):
        return [round(v, 6) for v in mtp_weights(step, 600, [0.5, 0.25])]

    assert w(0) == [1.0, 0.5, 0.25]
    assert w(100) == [1.0, 0.5, 0.125]       # the farthest target fades over the first third
    assert w(200) == [1.0, 0.5, 0.0]
    assert w(300) == [1.0, 0.25, 0.0]        # the token after next over the second third
    assert w(400) == w(600) == [1.0, 0.0, 0.0]
    assert mtp_weights(10, 100, []) == [1.0]


def test_mtp_targets_and_reference_loss_equal_shifted_cross_entropies():
    torch.manual_seed(0)
    N, D, V, cap = 12, 8, 50, 5.0
    x, w = torch.randn(N, D), torch.randn(V, D)
    t = torch.randint(0, V, (N,))
    tg = mtp_targets(t, 3)
    assert tg.shape == (N, 3) and torch.equal(tg[:, 0], t) and torch.equal(tg[:-1, 1], t[1:])
    assert tg[-1, 1] == -1 and (tg[-2:, 2] == -1).all() and torch.equal(tg[:-2, 2], t[2:])
    logits = cap * torch.tanh(x @ w.T / cap)
    by_hand = (F.cross_entropy(logits, t, reduction="sum") + 0.5 * F.cross_entropy(logits[:-1], t[1:], reduction="sum")
               + 0.25 * F.cross_entropy(logits[:-2], t[2:], reduction="sum")) / N
    xr = x.clone().requires_grad_()
    obj, ce = softcap_mtp_loss(xr, w, tg, torch.tensor([1.0, 0.5, 0.25]), cap, fused=False)
    assert abs(obj.item() - by_hand.item()) < 1e-5
    assert abs(ce.item() - F.cross_entropy(logits, t).item()) < 1e-5 and not ce.requires_grad
    obj.backward()
    assert torch.isfinite(xr.grad).all()
    # zero extra weights: the objective is the next-token CE
    obj0, ce0 = reference_mtp_loss(x, w, tg, torch.tensor([1.0, 0.0, 0.0]), cap)
    assert abs(obj0.item() - ce0.item()) < 1e-6


def test_bigram_hash_rows():
    t = torch.tensor([50256, 11, 0, 50303, 11], dtype=torch.int32)
    n = 5 * 50304
    h = bigram_hash(t, n)
    want = [n - 1] + [((36313 * int(a)) ^ (27191 * int(b))) % (n - 1) for a, b in zip(t[1:], t[:-1])]
    assert h.tolist() == want and h.dtype == torch.int32
    assert 0 <= int(h.min()) and int(h.max()) < n
    # int32 products never overflow for any GPT-2 id
    assert 36313 * 50303 < 2 ** 31 and 27191 * 50303 < 2 ** 31


def train_cpu_tiny(tmp_path, steps: int, **params):
    """A short cpu-tiny run on tiny English-like shards: (run, metrics, logged train losses)."""
    from test_evaluate import write_tiny_shards

    shards = tmp_path / "shards"
    write_tiny_shards(shards, train_tokens=steps * 1024 + 1, val_tokens=600)
    p = TrainParams(profile="cpu-tiny", steps=steps, val_tokens=512, ckpt_every=0, target_val_loss=20.0,
                    **params)
    p.validate()
    root = tmp_path / "run"
    paths = train_mod.Paths(shards=shards, checkpoints=root / "checkpoints", final=root / "final.pt",
                            metrics=root / "train.json", live=None)
    log: list[str] = []
    run = train_mod.Run(p, paths, log=lambda *a, **k: log.append(" ".join(map(str, a))))
    m = run.run()
    losses = [float(x) for x in re.findall(r"step\s+\d+/\d+ \| loss ([-\d.naif]+)", "\n".join(log))]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), log
    return run, m, losses


def test_cpu_tiny_trains_with_batch_stages_mtp_and_bigram(tmp_path):
    run, m, losses = train_cpu_tiny(tmp_path, 6, val_every=3, batch_stages=[0.5, 1.0],
                                    batch_stage_lr=[1.0, 1.2], mtp_weights=[0.5, 0.25], bigram_vocab=4099)
    assert run.model.bigram is not None and run.model.bigram.weight.abs().sum() > 0   # it learned
    assert m["tokens"] == 3 * 512 + 3 * 1024
    assert [h["tokens"] for h in run.val_history] == [3 * 512, 3 * 512 + 3 * 1024]   # steps 3 and 6
    assert losses[-1] < losses[0] - 0.5
    assert math.isfinite(m["final_val_loss"]) and m["final_val_loss"] < losses[0]


def test_cpu_tiny_trains_with_key_offset_backout_and_ve_gates(tmp_path):
    run, m, losses = train_cpu_tiny(tmp_path, 6, key_offset=True, backout_layer=0, ve_gates=True)
    model = run.model
    assert model.blocks[0].attn.key_offset and model.blocks[1].attn.key_offset   # both long-window
    assert model.backout_lambda.item() != 0.5                                    # it learned
    assert model.blocks[0].attn.ve_gate.weight.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.5 and math.isfinite(m["final_val_loss"])


def test_backout_layer_must_precede_the_last_block():
    with pytest.raises(ParamError, match="train.backout_layer"):
        TrainParams(n_layer=12, backout_layer=11).validate()
    with pytest.raises(ParamError, match="train.backout_layer"):
        parse_section({"train": {"backout_layer": -2}}, "train", TrainParams)
    TrainParams(n_layer=12, backout_layer=7).validate()
    # the 2-block tiny profile backs out its first block when a backout is on, and keeps it off
    assert train_mod.effective(TrainParams(profile="cpu-tiny", backout_layer=7)).backout_layer == 0
    assert train_mod.effective(TrainParams(profile="cpu-tiny", backout_layer=-1)).backout_layer == -1
    TrainParams(profile="cpu-tiny").validate()
