"""The record recipe's table lookups (speedrun/record/lookup.py): forward equal to indexing, and the
backward's in-place gradient rows equal to a dense per-micro-batch gradient rounded once and
added, on CPU and in the Triton kernel (run by Triton's interpreter where Triton is installed)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedrun.record import lookup as lk

PROJECT = Path(__file__).resolve().parents[1]


def dense_reference(grad: torch.Tensor | None, table: torch.Tensor, micro_batches) -> torch.Tensor:
    """What the record's autograd path computes: per micro-batch the fp32 sum of each row's
    gradients, rounded to the table's dtype, then added to .grad (in fp32, rounded)."""
    for ids, rows in micro_batches:
        dense = torch.zeros(table.shape, dtype=torch.float32).index_add_(0, ids.reshape(-1).long(),
                                                                         rows.reshape(-1, table.size(1)).float())
        dense = dense.to(table.dtype)
        grad = dense if grad is None else (grad.float() + dense.float()).to(table.dtype)
    return grad


def in_order_reference(grad: torch.Tensor | None, table: torch.Tensor, micro_batches) -> torch.Tensor:
    """What the backward of the record's value-embedding indexing computes (index_put with
    accumulate): per micro-batch each row's gradients added one position at a time, in position
    order, rounded to the table's dtype after each add; then added to .grad (fp32, rounded)."""
    for ids, rows in micro_batches:
        dense = torch.zeros(table.shape, dtype=table.dtype)
        for i, r in zip(ids.reshape(-1).tolist(), rows.reshape(-1, table.size(1))):
            dense[i] = (dense[i].float() + r.float()).to(table.dtype)
        grad = dense if grad is None else (grad.float() + dense.float()).to(table.dtype)
    return grad


def _micro_batches(V, D, n, T, seed, scale=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # few distinct ids: long runs of the same row (the while loop's several tiles)
        ids = torch.randint(0, V, (T,), generator=g, dtype=torch.int32)
        ids[: T // 2] = torch.randint(0, 3, (T // 2,), generator=g, dtype=torch.int32)
        rows = torch.randn(T, D, generator=g) if scale is None else torch.randint(-2000, 2001, (T, D), generator=g) * scale
        out.append((ids, rows.bfloat16() if scale is None else rows))
    return out


def test_lookup_forward_is_indexing_and_backward_fills_grad_in_place():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(40, 24).bfloat16())
    mbs = _micro_batches(40, 24, 3, 100, seed=1)
    for ids, rows in mbs:
        out = lk.lookup(table, ids)
        assert torch.equal(out, table.detach()[ids])
        (out.float() * rows.float()).sum().backward()
    assert torch.equal(table.grad, dense_reference(None, table.detach(), mbs))


def test_lookup_accumulates_onto_an_existing_gradient_and_keeps_untouched_rows():
    table = torch.nn.Parameter(torch.zeros(64, 8, dtype=torch.bfloat16))
    start = torch.randn(64, 8).bfloat16()
    start[-1] = -0.0
    table.grad = start.clone()
    ids = torch.tensor([3, 3, 5, 3, 7], dtype=torch.int32)
    rows = torch.randn(5, 8).bfloat16()
    (lk.lookup(table, ids).float() * rows.float()).sum().backward()
    assert torch.equal(table.grad, dense_reference(start, table.detach(), [(ids, rows)]))
    keep = [r for r in range(64) if r not in (3, 5, 7)]
    assert torch.equal(table.grad[keep].view(torch.int16), start[keep].view(torch.int16))


def test_rounding_once_per_micro_batch_is_what_is_checked():
    """The reference rounds each micro-batch's row sums before adding them: summing all rows in
    fp32 first gives other bits on this data, so the equality above can fail."""
    table = torch.zeros(4, 16, dtype=torch.bfloat16)
    mbs = _micro_batches(4, 16, 3, 300, seed=2)
    once = dense_reference(None, table, mbs)
    ids = torch.cat([i for i, _ in mbs])
    rows = torch.cat([r for _, r in mbs])
    unrounded = torch.zeros(4, 16).index_add_(0, ids.long(), rows.float()).bfloat16()
    assert not torch.equal(once, unrounded)


def test_in_order_lookup_adds_position_by_position_as_indexing_does():
    """in_order: each add rounded, in position order (the CPU path is PyTorch's index_put, whose
    accumulation is this loop); the fp32 sum of the other tables gives other bits on this data."""
    table = torch.nn.Parameter(torch.zeros(40, 24, dtype=torch.bfloat16))
    table.grad = torch.randn(40, 24).bfloat16()
    start = table.grad.clone()
    mbs = _micro_batches(40, 24, 2, 300, seed=5)
    for ids, rows in mbs:
        (lk.lookup(table, ids, in_order=True).float() * rows.float()).sum().backward()
    expected = in_order_reference(start, table.detach(), mbs)
    assert torch.equal(table.grad, expected)
    assert not torch.equal(expected, dense_reference(start, table.detach(), mbs))
    plain = torch.nn.Parameter(table.detach().clone())   # indexing's own backward, twice
    plain.grad = start.clone()
    for ids, rows in mbs:
        (plain[ids].float() * rows.float()).sum().backward()
    assert torch.equal(plain.grad, expected)


def test_autograd_mode_is_plain_indexing(monkeypatch):
    monkeypatch.setattr(lk, "MODE", "autograd")
    table = torch.nn.Parameter(torch.randn(10, 4))
    ids = torch.tensor([1, 1, 2])
    lk.lookup(table, ids).sum().backward()
    expected = torch.zeros(10, 4)
    expected[1], expected[2] = 2, 1
    assert torch.equal(table.grad, expected)


_INTERPRETED = r"""
import itertools
import torch
from speedrun.record import lookup as lk
from tests.test_record_lookup import _micro_batches, dense_reference, in_order_reference

assert lk.kernel_available(torch.zeros(1))
# the default tile, and one of 16 columns (several column blocks, the last one ragged)
for (dtype, D), tile in itertools.product(((torch.float16, 40), (torch.float32, 32)), (None, (16, 16, 1), (16, 64, 2))):
    V = 50
    # rows of 11-bit integers times 2^-10 (exact in fp16): every fp32 sum is exact in any order,
    # and rounding the sums to fp16 loses bits, so the kernel must round where the reference does
    mbs = [(i, r.to(dtype)) for i, r in _micro_batches(V, D, 3, 150, seed=3, scale=2.0 ** -10)]
    start = (torch.randn(V, D, generator=torch.Generator().manual_seed(4)) * 8).to(dtype)
    grad = start.clone()
    for ids, rows in mbs:
        lk.add_rows(grad, ids, rows, tile)
    ref = dense_reference(start, torch.zeros(V, D, dtype=dtype), mbs)
    assert torch.equal(grad, ref), (dtype, tile, (grad.float() - ref.float()).abs().max())
    # in order: random rows, so that each add rounds (the interpreter rounds fp16 as the GPU does)
    mbs = [(i, r.to(dtype)) for i, r in _micro_batches(V, D, 2, 150, seed=5)]
    grad = start.clone()
    for ids, rows in mbs:
        lk.add_rows(grad, ids, rows, tile, in_order=True)
    ref = in_order_reference(start, torch.zeros(V, D, dtype=dtype), mbs)
    assert torch.equal(grad, ref), ("in order", dtype, tile, (grad.float() - ref.float()).abs().max())
    if dtype == torch.float16:   # the test can fail: the fp32 sums are other bits here
        assert not torch.equal(ref, dense_reference(start, torch.zeros(V, D, dtype=dtype), mbs))
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's CPU interpreter")
def test_segment_kernel_in_the_triton_interpreter():
    """The sorted-segment kernel against the dense reference, and the in-order kernel against the
    position-by-position one, bit for bit, through Triton's interpreter (set before Triton loads,
    hence a subprocess): runs of one id longer than a tile (the kernels' loops), a dim that is not
    a power of two (masked columns). fp16 and fp32: the interpreter mis-reads bf16."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                          text=True, timeout=300, cwd=PROJECT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_model_table_gradients_are_the_records_sums_and_the_rest_is_unchanged(monkeypatch):
    """Two micro-batches through the tiny record model with the in-place lookups and with plain
    indexing: every other parameter's gradient is the same bits; the token and bigram tables'
    gradients are exactly dense_reference of the gradients that reached their rows (recorded in
    the indexing run: nn.Embedding's fp32 sums, as the record looks them up), and the value
    embeddings' are in_order_reference of theirs, which is the indexing run's own gradient bit
    for bit (the record indexes that table)."""
    from speedrun.record import model as record_model
    from speedrun.record.model import GRAD_SCALE, build
    from tests.test_record_model import TINY, _batch, _tensors

    reached = {}   # table -> [(ids, gradient of its rows)] in the indexing run

    def recording_lookup(table, ids, in_order=False):
        out = table[ids]
        out.register_hook(lambda g: reached.setdefault(id(table), []).append((ids.clone(), g.clone())))
        return out

    grads, tables = {}, {}
    for mode in ("accumulate", "autograd"):
        monkeypatch.setattr(lk, "MODE", mode)
        if mode == "autograd":
            monkeypatch.setattr(record_model, "lookup", recording_lookup)
        model = build(TINY, torch.device("cpu"), fp8=False, seed=0)
        for seed in (0, 1):
            x, y, bg, cu = _tensors(_batch(seed=seed))
            m = model.masks(cu, x.numel())
            h = model.hidden_states(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, False)
            losses = model.train_losses(h, y, torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.25]), False)
            (losses.sum() * GRAD_SCALE).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        tables[mode] = {n: p for n, p in model.named_parameters()
                        if n in ("embed.weight", "value_embeds", "bigram_embed.weight")}
    assert grads["accumulate"].keys() == grads["autograd"].keys() and tables["autograd"].keys() <= grads["autograd"].keys()
    for name, g in grads["autograd"].items():
        if name in tables["autograd"]:
            table = tables["autograd"][name].detach()
            if name == "value_embeds":
                expected = in_order_reference(None, table, reached[id(tables["autograd"][name])])
                assert torch.equal(g, expected), name
            else:
                expected = dense_reference(None, table, reached[id(tables["autograd"][name])])
                torch.testing.assert_close(g.float(), expected.float(), rtol=0.2, atol=4e-3)
            assert torch.equal(grads["accumulate"][name], expected), name
        else:
            assert torch.equal(grads["accumulate"][name], g), name


def test_compiled_hidden_states_compile_only_what_follows_the_lookups(monkeypatch):
    """The trainer's and the forward check's compiled model: torch.compile gets hidden_from_rows
    (the lookups, whose backward writes .grad, stay eager) and the composition computes what
    hidden_states computes (torch.compile stubbed: the CPU path's dense masks do not compile)."""
    from speedrun.record.model import build, compile_hidden_states
    from tests.test_record_model import TINY, _batch, _tensors

    model = build(TINY, torch.device("cpu"), fp8=False, seed=0)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(fn) or fn)
    hidden = compile_hidden_states(model)
    assert compiled == [model.hidden_from_rows]
    x, y, bg, cu = _tensors(_batch(seed=0))
    m = model.masks(cu, x.numel())
    args = (m[("short", False)], m[("long", False)], m[("short", True)], m.doc, False)
    assert torch.equal(hidden(x, bg, *args), model.hidden_states(x, bg, *args))
