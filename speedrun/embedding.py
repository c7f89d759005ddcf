"""Embedding tables whose backward adds each micro-batch's rows straight into the fp32 gradient.

nn.Embedding's backward builds a dense [vocab, dim] gradient for every micro-batch (sort, segment
sums, scatter), and autograd then adds that dense tensor into `.grad`. With 16 micro-batches per
step and four 50304 x 768 tables, those sorts, scatters and bf16 adds were a visible share of
the step in the profiles (benchmarks/results/README.md), for gradients that touch at most 32k
rows per table and micro-batch.

Here a table keeps fp32 master weights, like the linear layers; a lookup returns its rows in the
activation dtype (`out_dtype`), and backward adds the rows' gradients into `weight.grad` with
fp32 atomics: one pass over the touched rows, no dense temporary, and the micro-batches
accumulate in fp32 instead of bf16. On the GPU one Triton kernel per direction fuses the gather
with the cast and the cast with the scatter; elsewhere (CPU, tests) `index_select`/`index_add_`
compute the same.

Gradients reach the table outside autograd's accumulation (backward returns None for the weight
and writes `.grad` itself): hooks on the weight never fire. The trainer registers none; after
backward `.grad` holds the same sum that nn.Embedding would have produced.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the index_select / index_add_ path below
    triton = None

# "accumulate": this module's lookup (fp32 tables, gradients added in place); "dense": the tables
# are plain bf16 nn.Embedding lookups on the GPU, as the public one-4090 recipe trains them
# (benchmarks: the recipe_4090 baseline and embed_dense). Read by model.build_model.
GRAD_MODE = "accumulate"
# rows x columns per program: whole [ROWS, BLOCK_D] tiles, so every load of a tile is in flight
# at once (one row at a time left them serialised); the tile shapes measured all came out alike
_TILE = (64, 256)


if triton is not None:
    @triton.jit
    def _tile(ids, n_ids, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's tile: (offsets into the [n_ids, D] rows, offsets of the same entries in
        the table, mask)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        table_row = tl.load(ids + r, mask=r < n_ids, other=0).to(tl.int64)
        return (r.to(tl.int64)[:, None] * D + c[None, :], table_row[:, None] * D + c[None, :],
                (r[:, None] < n_ids) & (c[None, :] < D))

    @triton.jit
    def _gather_rows_kernel(table, ids, out, n_ids, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[i] = table[ids[i]] cast to out's dtype."""
        at_row, at_table, m = _tile(ids, n_ids, D, ROWS, BLOCK_D)
        tl.store(out + at_row, tl.load(table + at_table, mask=m).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _scatter_add_rows_kernel(grad_table, ids, rows, n_ids, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """grad_table[ids[i]] += rows[i] in grad_table's dtype (atomic: ids repeat)."""
        at_row, at_table, m = _tile(ids, n_ids, D, ROWS, BLOCK_D)
        g = tl.load(rows + at_row, mask=m).to(grad_table.dtype.element_ty)
        tl.atomic_add(grad_table + at_table, g, mask=m, sem="relaxed")


def _use_kernels(t: Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _launch(kernel, table: Tensor, ids: Tensor, rows: Tensor) -> None:
    rows_per, block_d = _TILE if table.is_cuda else (8, 32)   # interpreter: small tiles, ragged ones
    n, D = ids.numel(), table.size(1)
    kernel[(triton.cdiv(n, rows_per), triton.cdiv(D, block_d))](table, ids, rows, n, D, ROWS=rows_per,
                                                                BLOCK_D=block_d, num_warps=4)


def gather_rows(table: Tensor, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """table[ids] in `dtype`: [*ids.shape, dim]."""
    flat = ids.reshape(-1)
    if not _use_kernels(table):
        return table.index_select(0, flat).to(dtype).view(*ids.shape, table.size(1))
    out = table.new_empty((flat.numel(), table.size(1)), dtype=dtype)
    _launch(_gather_rows_kernel, table, flat.contiguous(), out)
    return out.view(*ids.shape, table.size(1))


def scatter_add_rows(grad_table: Tensor, ids: Tensor, rows: Tensor) -> None:
    """grad_table[ids[i]] += rows[i] (rows in any float dtype, summed in grad_table's dtype)."""
    flat = ids.reshape(-1)
    rows = rows.reshape(flat.numel(), grad_table.size(1))
    if not _use_kernels(grad_table):
        grad_table.index_add_(0, flat, rows.to(grad_table.dtype))
        return
    _launch(_scatter_add_rows_kernel, grad_table, flat.contiguous(), rows.contiguous())


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return gather_rows(weight.detach(), ids, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:   # first micro-batch of a step (zero_grad sets None)
            weight.grad = torch.zeros_like(weight)
        scatter_add_rows(weight.grad, ids, grad)
        return None, None, None


class Embedding(nn.Embedding):
    """nn.Embedding (same weight, same state_dict key, same init) whose lookup returns rows in
    `out_dtype` (None: the table's dtype) and whose backward adds into `weight.grad` in place."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.out_dtype: torch.dtype | None = None
        self.accumulate = True   # False: nn.Embedding's own lookup and dense backward

    def forward(self, ids: Tensor) -> Tensor:
        dtype = self.out_dtype or self.weight.dtype
        if not self.accumulate:
            return F.embedding(ids, self.weight).to(dtype)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _Lookup.apply(ids, self.weight, dtype)
        return gather_rows(self.weight, ids, dtype)
