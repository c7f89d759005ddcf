"""Embedding-table gradients from the looked-up rows, without a dense [vocab, dim] temporary.

The record's three tables (token embedding, 5 value embeddings, the hashed-bigram table: 522M
bf16 weights in all) get their gradients the way autograd gives them: each micro-batch's
backward builds a dense gradient for the whole table (zero-filled, rows summed in, cast to
bf16) and autograd adds it to `.grad` in bf16. That is about 5 GB of memory traffic per
micro-batch, whatever its size; the record's code pays it 8 times a step, ours (micro-batches of
16,384 tokens, to fit a 24 GB card) up to 24 times in stage 3.

Here (MODE = "rows") the trainer looks the rows up itself (`lookup`), hands them to the compiled
model as leaves, and after backward adds their gradients into the tables' `.grad`
(`add_row_grads`): the rows of one id summed in fp32, rounded once to bf16, added once to that
row. That is what the dense path computes for every touched row (untouched rows add zero), up to
the fp32 summation order, in a few small kernels and without a host sync. (speedrun/embedding.py,
the classic recipe's, adds each row atomically into fp32 master tables; into these bf16 tables
that would round at every repeat of an id.) A benchmark switch
(benchmarks/switches.py) until measured: predicted about -1.5 ms per micro-batch on an H200.
"""
from __future__ import annotations

import torch
from torch import Tensor

MODE = "dense"   # "dense": nn.Embedding lookups inside the model; "rows": this module


def lookup(model, inputs: Tensor, bigram_inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(token rows [T, D], bigram rows [T, D], value-embedding rows [5, T, D]) of the model's
    tables, as leaves that collect their gradients."""
    V = model.cfg.vocab_size
    with torch.no_grad():
        rows = (model.embed.weight[inputs], model.bigram_embed.weight[bigram_inputs],
                model.value_embeds.view(5, V, -1)[:, inputs])
    return tuple(r.requires_grad_() for r in rows)


def add_rows_to_tables(model, inputs: Tensor, bigram_inputs: Tensor, rows: tuple[Tensor, Tensor, Tensor]) -> None:
    """After backward: the rows' gradients into the three tables' `.grad`."""
    V = model.cfg.vocab_size
    tok, big, ve = rows
    add_row_grads(model.embed.weight, inputs, tok.grad)
    add_row_grads(model.bigram_embed.weight, bigram_inputs, big.grad)
    ve_ids = (torch.arange(5, device=inputs.device)[:, None] * V + inputs.long()[None]).flatten()
    add_row_grads(model.value_embeds, ve_ids, ve.grad.flatten(0, 1))


def add_row_grads(table: Tensor, ids: Tensor, grads: Tensor) -> None:
    """table.grad[ids[i]] += grads[i] as a dense backward plus autograd's accumulation would:
    per id, the fp32 sum of its rows, rounded to the table's dtype and added once."""
    ids = ids.reshape(-1).long()
    grads = grads.reshape(ids.numel(), -1)
    n = ids.numel()
    sorted_ids, order = ids.sort()
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = starts.cumsum(0) - 1                                     # [n]: which id each row is
    sums = grads.new_zeros(n, grads.size(1), dtype=torch.float32).index_add_(0, segment, grads[order].float())
    # each id's sum at its first sorted position, zeros at its others: every row gets one real
    # addition (adding zero changes nothing), so the result is deterministic
    at_starts = torch.where(starts[:, None], sums[segment], 0.0).to(table.dtype)
    if table.grad is None:   # the first micro-batch after the optimizer cleared the gradients
        table.grad = torch.zeros_like(table)
    table.grad.index_add_(0, sorted_ids, at_starts)
