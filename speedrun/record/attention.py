"""Attention of record #89: causal inside each document and inside a sliding window, over one flat
sequence per micro-batch; paired-head layers; XSA.

The record calls FlashAttention-3's varlen kernel with `window_size=(W, 0)`: a query at position q
sees the keys at q-W .. q of its own document (W + 1 keys at most). Here the same pattern is a
FlexAttention BlockMask built from the document ids, with W a device tensor and the softmax
scale a device tensor too (a score_mod), so growing windows and YaRN's scale changes never
recompile anything. The CPU path (tests, the cpu-tiny profile, exported models) applies the same
rule as a dense mask through SDPA.

Paired-head layers (record #89's `attn_paired`): q, k and v are re-viewed so that every token
appears twice in a sequence of length 2T with 3 head slots, i.e. two of the six heads share one
sequence and each query also sees the other head's keys; the window and the document borders are
counted in that doubled sequence (documents [2a, 2b)), which halves the effective window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128

# FlexAttention must run compiled (its eager fallback materialises the full score matrix). Inside
# the compiled model it is inlined; this wrapper only serves eager callers on CUDA.
_flex = None


def _compiled_flex():
    global _flex
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


# Shared memory a thread block may use on compute capability 8.6 / 8.9 (RTX 30x0 / 40x0): 99 KiB,
# against 163 KiB on the A100 (8.0) and 227 KiB on Hopper
SMALL_SHARED_MEMORY = {(8, 6): 101376, (8, 9): 101376}


def flex_kernel_options(capability: tuple[int, int] | None) -> dict | None:
    """FlexAttention tiles for a GPU of `capability`: None (Inductor's own choice) except where a
    block may use only 99 KiB of shared memory. There Inductor takes the A100's forward tile for
    head_dim 128 (128 x 64 keys in 3 stages: 129 KiB) and the kernel cannot launch (an RTX 4090's
    "out of resources: shared memory"); the same tile in 2 stages needs 97 KiB. The backward's
    8.x tiles fit as they are."""
    if capability not in SMALL_SHARED_MEMORY:
        return None
    return {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8}


def doc_ids(cu_seqlens: Tensor, T: int) -> Tensor:
    """Document index of each of the T positions, from cu_seqlens (0, ends..., T, T, ...)."""
    pos = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, pos, right=True).to(torch.int32)


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """[q_block, kv_block] bool -> (counts, kv indices, most recent first) as BlockMask wants them."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.argsort(dim=-1, descending=False, stable=True).flip(-1).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def window_mask(doc: Tensor, window: Tensor) -> BlockMask:
    """BlockMask for keys kv with doc[kv] == doc[q] and q - window <= kv <= q.

    `doc` [L] int32 (L a multiple of 128), `window` a 0-d int32 device tensor. Block-level
    bookkeeping: a kv block is full when every (q, kv) pair of the two blocks passes, partial when
    some pair does; the mask_mod decides inside partial blocks.
    """
    L = doc.numel()
    n = L // BLOCK
    lo, hi = doc.view(n, BLOCK)[:, 0], doc.view(n, BLOCK)[:, -1]
    blk = torch.arange(n, device=doc.device, dtype=torch.int32)
    gap = (blk[:, None] - blk[None, :]) * BLOCK          # q block start - kv block start
    causal_any, causal_all = gap >= 0, gap > 0
    win_any, win_all = gap - (BLOCK - 1) <= window, gap + (BLOCK - 1) <= window
    doc_any = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
    doc_all = (lo[:, None] == hi[None, :]) & (lo[None, :] == hi[:, None])
    full = causal_all & doc_all & win_all
    partial = causal_any & doc_any & win_any & ~full

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv <= window) & (doc[q] == doc[kv])

    p_n, p_idx = _ordered(partial)
    f_n, f_idx = _ordered(full)
    return BlockMask.from_kv_blocks(p_n, p_idx, f_n, f_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod)


def dense_window_mask(doc: Tensor, window: int) -> Tensor:
    """The same rule as a dense [L, L] bool mask (CPU)."""
    pos = torch.arange(doc.numel(), device=doc.device)
    d = pos[:, None] - pos[None, :]
    return (d >= 0) & (d <= window) & (doc[:, None] == doc[None, :])


class Masks:
    """The masks of one micro-batch: (window name, paired) -> BlockMask on CUDA, dense on CPU.

    `windows` maps a name ("short", "long") to a 0-d int32 device tensor; `scale` is a 0-d
    float32 device tensor (YaRN's attention scale)."""

    def __init__(self, cu_seqlens: Tensor, T: int, windows: dict[str, Tensor], scale: Tensor,
                 wanted: tuple[tuple[str, bool], ...]):
        doc = doc_ids(cu_seqlens, T)
        self.scale = scale
        self.masks = {}
        for name, paired in wanted:
            d = doc.repeat_interleave(2) if paired else doc
            if doc.is_cuda:
                self.masks[(name, paired)] = window_mask(d, windows[name])
            else:
                self.masks[(name, paired)] = dense_window_mask(d, int(windows[name]))
        self.doc = doc

    def __getitem__(self, key: tuple[str, bool]):
        return self.masks[key]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | Tensor, scale: Tensor,
           options: dict | None = None) -> Tensor:
    """q, k, v [1, L, H, D] -> [1, L, H, D]; `options` FlexAttention's kernel options
    (flex_kernel_options)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if isinstance(mask, BlockMask):
        def scaled(score, b, h, q_idx, kv_idx):
            return score * scale

        # inside a compiled region dynamo takes flex_attention itself; eager callers need it compiled
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        y = flex(q, k, v, score_mod=scaled, block_mask=mask, scale=1.0, kernel_options=options)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=float(scale))
    return y.transpose(1, 2)


def xsa(y: Tensor, v: Tensor, alpha_logit: Tensor) -> Tensor:
    """Gated exclusive self-attention (arXiv:2603.09078), as record #89: remove from each head's
    output the share tanh(alpha) of its component along the token's own value vector.
    y, v [B, T, H, D]; alpha_logit [B, T, H]."""
    dot = (y * v).sum(-1, keepdim=True)
    denom = v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    alpha = torch.tanh(alpha_logit).type_as(y).view(*y.shape[:3], 1)
    return y - alpha * (dot / denom) * v
