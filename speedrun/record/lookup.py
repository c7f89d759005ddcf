"""Table lookups whose backward adds one micro-batch's gradient rows into the table's `.grad` in place.

The record's tables (token embedding, value embeddings, bigram embedding: 522M bf16 entries)
are looked up with plain indexing. Its backward makes a dense gradient as large as the table for
every micro-batch (zeros, then the rows scattered in), and autograd then adds that dense tensor
into `.grad` (a bf16 add over the whole table), 12 times in a stage-3 step of 32k-token
micro-batches, for gradients that touch at most 32k rows of a table each time.

Here backward sorts the micro-batch's ids and adds each run of equal ids into `.grad[row]` in the
way the record's own backward sums that table, rounding where it rounds:

* token and bigram tables (nn.Embedding in the record: PyTorch's embedding backward sums a row's
  gradients in fp32, then rounds): one Triton program per 32 sorted positions sums each run in
  fp32 (a 0/1 matrix product over the tile; a run longer than the tile is followed tile by tile),
  rounds the sum to the table's dtype and adds it to `.grad[row]` (the add in fp32, rounded once);
* value embeddings (`value_embeds.view(5, V, D)[:, ids]` in the record: the backward of indexing
  is index_put with accumulate, which adds a row's gradients one position at a time in position
  order, rounding to bf16 after each add): `in_order=True`, the same adds in the same order (a
  stable sort keeps equal ids in position order): the record's eager bits. The record compiled on
  Hopper adds them with bf16 atomics instead, in no fixed order: the same roundings, other bits.

Either way the result is reproducible, and rows no id touches keep their gradient bits. Summing
the value embeddings in fp32 as well (more exact) moved their gradient 7% from the record's own
on an H200, against the 2.2% its compiled and eager runs differ by (benchmarks/results/README.md).
With the value embeddings summed in fp32 the whole step ran 1.5% faster than with plain indexing
on an H200; there the in-order kernel takes 0.87 ms a 32k-token micro-batch of value embeddings,
the fp32 one 0.67, plain indexing's backward and bf16 add 3.5.

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
IN_ORDER_CHUNK = 8       # positions of a run read at once by the in-order kernel (unrolled)


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


    @triton.jit
    def _add_runs_in_order_kernel(grad_table, grad_rows, sorted_ids, order, n, D, ROWS: tl.constexpr,
                                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (t, c): every run of equal ids that starts among the ROWS sorted positions of
        tile t, columns block c, added up one position at a time in sorted order (position order
        within a run), each add rounded to grad_table's dtype as index_put's accumulation rounds
        it; then the run's total is added to grad_table[id] (fp32, rounded). A run is read CHUNK
        positions at a time, and followed past the tile's end."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        dtype = grad_table.dtype.element_ty
        for i in range(ROWS):
            j = t * ROWS + i
            row = tl.load(sorted_ids + j, mask=j < n, other=-1)
            prev = tl.load(sorted_ids + j - 1, mask=(j > 0) & (j < n), other=-2)
            if (j < n) & (row != prev):   # a run starts here
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                p = j
                going = j < n
                while going:
                    for q in tl.static_range(CHUNK):
                        pq = p + q
                        same = (pq < n) & (tl.load(sorted_ids + pq, mask=pq < n, other=-1) == row)
                        src = tl.load(order + pq, mask=same, other=0).to(tl.int64)
                        v = tl.load(grad_rows + src * D + cols, mask=same & col_ok, other=0.0).to(tl.float32)
                        acc = tl.where(same, (acc + v).to(dtype).to(tl.float32), acc)
                    p += CHUNK
                    going = tl.load(sorted_ids + p, mask=p < n, other=-1) == row
                _add_rounded(grad_table + row.to(tl.int64) * D + cols, acc, col_ok)


def add_rows(grad_table: Tensor, ids: Tensor, grad_rows: Tensor, tile: tuple | None = None,
             in_order: bool = False) -> None:
    """grad_table[r] += round(sum of grad_rows[k] for ids[k] == r), for every distinct r in ids:
    the sum in fp32, rounded to grad_table's dtype, then added in fp32 and rounded again.
    in_order: the sum is taken one position at a time in position order, rounded to
    grad_table's dtype after each add (index_put with accumulate, as the backward of indexing)."""
    flat = ids.reshape(-1)
    rows = grad_rows.reshape(flat.numel(), grad_table.size(1))
    if not kernel_available(grad_table):
        touched = torch.unique(flat)
        if in_order:   # index_put with accumulate: one position at a time, in the table's dtype
            sums = torch.zeros_like(grad_table).index_put_((flat.long(),), rows.to(grad_table.dtype), accumulate=True)
        else:
            sums = torch.zeros(grad_table.shape, dtype=torch.float32, device=grad_table.device)
            sums.index_add_(0, flat, rows.float())
        new = grad_table[touched].float() + sums[touched].to(grad_table.dtype).float()
        grad_table[touched] = new.to(grad_table.dtype)
        return
    sorted_ids, order = torch.sort(flat, stable=in_order)
    D = grad_table.size(1)
    n_rows, block_d, warps = tile or TILE
    grid = (triton.cdiv(flat.numel(), n_rows), triton.cdiv(D, block_d))
    if in_order:
        _add_runs_in_order_kernel[grid](grad_table, rows.contiguous(), sorted_ids, order, flat.numel(), D,
                                        ROWS=n_rows, CHUNK=IN_ORDER_CHUNK, BLOCK_D=block_d, num_warps=warps)
    else:
        _add_segments_kernel[grid](grad_table, rows.contiguous(), sorted_ids, order, flat.numel(), D,
                                   ROWS=n_rows, BLOCK_D=block_d, num_warps=warps)


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor, in_order: bool) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.table, ctx.in_order = table, in_order
        return table.detach()[ids]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        table = ctx.table
        if table.grad is None:   # the first micro-batch since the optimizer took the gradient
            table.grad = torch.zeros_like(table)
        add_rows(table.grad, ids, grad, in_order=ctx.in_order)
        return None, None, None


def lookup(table: Tensor, ids: Tensor, in_order: bool = False) -> Tensor:
    """table[ids] ([*ids.shape, dim]); in training the gradient is added into table.grad in place,
    summed as nn.Embedding's backward sums it, or with `in_order` as indexing's backward does
    (add_rows)."""
    if MODE == "accumulate" and torch.is_grad_enabled() and table.requires_grad:
        return _Lookup.apply(table, ids, in_order)
    return table[ids]
