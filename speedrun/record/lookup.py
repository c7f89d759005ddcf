"""Table lookups whose backward adds one micro-batch's gradient rows into the table's `.grad` in place.

The record's tables (token embedding, value embeddings, bigram embedding: 522M bf16 entries)
are looked up with plain indexing. Its backward makes a dense gradient as large as the table for
every micro-batch (zeros, then the rows scattered in), and autograd then adds that dense tensor
into `.grad` (a bf16 add over the whole table), 12 times in a stage-3 step of 32k-token
micro-batches, for gradients that touch at most 32k rows of a table each time.

Here backward sorts the micro-batch's ids; one Triton program per 32 sorted positions sums each
run of equal ids in fp32 (a 0/1 matrix product over the tile; a run longer than the tile is
followed tile by tile), rounds the sum to the table's dtype and adds it to `.grad[row]` (the add
in fp32, rounded once): the numbers of a dense gradient rounded once and then added, which is
what the record computes for the token and bigram tables (PyTorch's embedding backward sums in
fp32, then rounds), and for the value-embedding tables on a GPU without bf16 atomics (an RTX
4090: PyTorch's index_put sums in fp32 per row); on Hopper the record's compiled value-embedding
backward adds in bf16 atomics instead, a rounding per token. The fp32 sums run in a fixed order,
so the result is reproducible. Rows no id touches keep their gradient bits. On an H200 the whole
step ran 1.5% faster than with plain indexing (benchmarks/results/README.md).

Gradients reach the table outside autograd's accumulation (backward returns None for the table and
writes `.grad` itself), so hooks on the table never fire; the trainer registers none.
MODE = "autograd" restores plain indexing (a benchmark switch, benchmarks/switches.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .loss import kernel_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below
    triton = None

MODE = "accumulate"      # accumulate | autograd
# (sorted positions per program, columns per program, warps): benchmarks.gpu_checks --only
# record_lookup times others
TILE = (32, 256, 4)


if triton is not None:
    @triton.jit
    def _add_rounded(dst, sums, mask):
        """dst += sums rounded to dst's dtype (the add in fp32, rounded once more)."""
        dtype = dst.dtype.element_ty
        old = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (old + sums.to(dtype).to(tl.float32)).to(dtype), mask=mask)

    @triton.jit
    def _add_segments_kernel(grad_table, grad_rows, sorted_ids, order, n, D,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (t, c): the ROWS sorted positions of tile t, columns block c. Every run of equal
        ids that starts in this tile is summed in fp32 (within the tile as one fp32 matrix product,
        which measured faster than a segmented scan; a run that goes on past the tile is followed
        tile by tile), rounded to grad_table's dtype and added to grad_table[id]. Runs that started
        in an earlier tile belong to that tile's program."""
        t = tl.program_id(0)
        k = tl.arange(0, ROWS)
        js = t * ROWS + k
        inside = js < n
        ids = tl.load(sorted_ids + js, mask=inside, other=-1)
        prev = tl.load(sorted_ids + js - 1, mask=inside & (js > 0), other=-2)
        nxt = tl.load(sorted_ids + js + 1, mask=js + 1 < n, other=-3)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        src = tl.load(order + js, mask=inside, other=0).to(tl.int64)
        vals = tl.load(grad_rows + src[:, None] * D + cols[None, :], mask=inside[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        # each position's run total so far: same_run[i, j] (j <= i) @ vals
        run = tl.cumsum((inside & (ids != prev)).to(tl.int32), 0)   # which run of the tile (0: one from before)
        upto = (run[:, None] == run[None, :]) & (k[None, :] <= k[:, None])
        sums = tl.dot(upto.to(tl.float32), vals, input_precision="ieee")
        started = inside & (run > 0)
        own = started & (ids != nxt)   # the run ends here and started in this tile
        _add_rounded(grad_table + ids.to(tl.int64)[:, None] * D + cols[None, :], sums, own[:, None] & col_ok[None, :])
        # the tile's last run, if it started here and goes on: follow it through the next tiles
        last = k == ROWS - 1
        if tl.sum(tl.where(last & started & (ids == nxt), 1, 0), axis=0) > 0:
            row = tl.sum(tl.where(last, ids, 0), axis=0)
            acc = tl.sum(tl.where(last[:, None], sums, 0.0), axis=0)
            start = (t + 1) * ROWS
            more = row >= 0
            while more:
                ks = start + k
                same = tl.load(sorted_ids + ks, mask=ks < n, other=-1) == row
                src = tl.load(order + ks, mask=same, other=0).to(tl.int64)
                v = tl.load(grad_rows + src[:, None] * D + cols[None, :], mask=same[:, None] & col_ok[None, :],
                            other=0.0)
                acc += tl.sum(v.to(tl.float32), axis=0)
                start += ROWS
                more = tl.sum(same.to(tl.int32), axis=0) == ROWS
            _add_rounded(grad_table + row.to(tl.int64) * D + cols, acc, col_ok)


def add_rows(grad_table: Tensor, ids: Tensor, grad_rows: Tensor, tile: tuple | None = None) -> None:
    """grad_table[r] += round(sum of grad_rows[k] for ids[k] == r), for every distinct r in ids:
    the sum in fp32, rounded to grad_table's dtype, then added in fp32 and rounded again."""
    flat = ids.reshape(-1)
    rows = grad_rows.reshape(flat.numel(), grad_table.size(1))
    if not kernel_available(grad_table):
        sums = torch.zeros(grad_table.shape, dtype=torch.float32, device=grad_table.device)
        sums.index_add_(0, flat, rows.float())
        touched = torch.unique(flat)
        new = grad_table[touched].float() + sums[touched].to(grad_table.dtype).float()
        grad_table[touched] = new.to(grad_table.dtype)
        return
    sorted_ids, order = torch.sort(flat)
    D = grad_table.size(1)
    n_rows, block_d, warps = tile or TILE
    _add_segments_kernel[(triton.cdiv(flat.numel(), n_rows), triton.cdiv(D, block_d))](
        grad_table, rows.contiguous(), sorted_ids, order, flat.numel(), D, ROWS=n_rows, BLOCK_D=block_d,
        num_warps=warps)


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.table = table
        return table.detach()[ids]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        table = ctx.table
        if table.grad is None:   # the first micro-batch since the optimizer took the gradient
            table.grad = torch.zeros_like(table)
        add_rows(table.grad, ids, grad)
        return None, None


def lookup(table: Tensor, ids: Tensor) -> Tensor:
    """table[ids] ([*ids.shape, dim]); in training the gradient is added into table.grad in place."""
    if MODE == "accumulate" and torch.is_grad_enabled() and table.requires_grad:
        return _Lookup.apply(table, ids)
    return table[ids]
