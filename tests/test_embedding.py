"""Embedding lookups whose backward adds into the fp32 gradient (speedrun/embedding.py)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from speedrun.embedding import Embedding

PROJECT = Path(__file__).resolve().parents[1]


def _pair(vocab=50, dim=24, seed=0):
    torch.manual_seed(seed)
    ours = Embedding(vocab, dim)
    ref = nn.Embedding(vocab, dim)
    ref.weight.data.copy_(ours.weight.data)
    return ours, ref


def test_gradients_accumulate_over_micro_batches_like_nn_embedding():
    ours, ref = _pair()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):   # three micro-batches with repeated ids, then one optimizer step's grad
        ids = torch.randint(0, 10, (2, 37), generator=g)   # few distinct ids: many repeats per row
        up = torch.randn(2, 37, 24, generator=g)
        (ours(ids) * up).sum().backward()
        (ref(ids) * up).sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.weight.grad[10:].abs().sum() == 0   # rows never looked up stay zero


def test_forward_matches_and_zero_grad_restarts_the_sum():
    ours, ref = _pair()
    ids = torch.tensor([[3, 3, 7, 0]])
    torch.testing.assert_close(ours(ids), ref(ids), rtol=0, atol=0)
    ours(ids).sum().backward()
    ours.zero_grad(set_to_none=True)
    ours(ids).sum().backward()
    expected = torch.zeros_like(ours.weight)
    expected[3], expected[7], expected[0] = 2.0, 1.0, 1.0
    torch.testing.assert_close(ours.weight.grad, expected)


def test_out_dtype_casts_rows_but_the_gradient_stays_in_the_table_dtype():
    ours, _ = _pair()
    ours.out_dtype = torch.float16
    ids = torch.tensor([1, 2, 1])
    rows = ours(ids)
    assert rows.dtype == torch.float16
    torch.testing.assert_close(rows, ours.weight.detach()[ids].half())
    rows.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and ours.weight.grad[1, 0] == 2.0


def test_no_grad_lookup_and_dense_mode():
    ours, ref = _pair()
    ids = torch.tensor([4, 5])
    with torch.no_grad():
        out = ours(ids)
    assert not out.requires_grad
    ours.accumulate = False   # nn.Embedding's own path (the GPU's "dense" comparison mode)
    ours(ids).sum().backward()
    ref(ids).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_build_model_keeps_fp32_tables_with_the_accumulating_lookup():
    from speedrun.model import GPTConfig, build_model
    model = build_model(GPTConfig(vocab_size=128, n_layer=2, model_dim=32, n_head=2, head_dim=16,
                                  value_embeds=1, no_attn_layer=-1), torch.device("cpu"))
    tables = [model.embed, *model.value_embeds]
    assert all(isinstance(t, Embedding) and t.accumulate and t.weight.dtype == torch.float32 for t in tables)
    assert set(model.state_dict()) >= {"embed.weight", "value_embeds.0.weight"}


_INTERPRETED = """
import torch
from speedrun import embedding
from speedrun.embedding import gather_rows, scatter_add_rows
assert embedding._use_kernels(torch.zeros(1))
g = torch.Generator().manual_seed(0)
table = torch.randn(40, 48, generator=g)
ids = torch.randint(0, 8, (2, 11), generator=g).to(torch.int32)   # 22 rows: a ragged last program
rows = gather_rows(table, ids, torch.float16)
assert rows.shape == (2, 11, 48) and rows.dtype == torch.float16
torch.testing.assert_close(rows, table[ids.long()].half(), rtol=0, atol=0)
grad = torch.zeros_like(table)
up = torch.randn(2, 11, 48, generator=g).half()
scatter_add_rows(grad, ids, up)
expected = torch.zeros_like(table).index_add_(0, ids.reshape(-1).long(), up.reshape(-1, 48).float())
torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's CPU interpreter")
def test_triton_kernels_in_the_interpreter():
    """The fused gather+cast and cast+scatter kernels against index_select / index_add_, run by
    Triton's interpreter (set before Triton loads, hence a subprocess). fp16 rows: the
    interpreter mis-reads bf16; a dim that is not a power of two masks each row's tail."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
