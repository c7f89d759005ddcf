"""Dynamically composable attention, post-only (record #89, layer 10; Xiao et al. 2024, "Improving
Transformers with Dynamically Composable Multi-Head Attention", trimmed as the record trims it).

After the layer's ordinary attention, each head h adds a correction that mixes the attention
patterns of all heads, with per-token weights made by the MUDD gate (mudd.py):

    a[t, s]  = sum_h' w1[t, h'] * P_h'[t, s]        P_h' = softmax over the last `window` keys
    y_h[t]  += sum_s (w2[t, h] * a[t, s]) v_h[s]

P is recomputed over a short window (112 keys, causal, inside the document) with the layer's own
q, k and scale. w1 is RMS-normalised over the heads, w2 is used as is (zero at init: no
correction). The numbers follow the record's Triton kernel: scores and probabilities in fp32 from
bf16 operands, the mixing weight w2 * a rounded to bf16 before it meets v, the sum accumulated in
fp32 and added to the attention output before one rounding to bf16. Here it is written with
tensor ops over 128-query blocks, each seeing its own block of keys and the one before
(window <= 128); autograd gives the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 128
WINDOW = 112
# The two products with v and k: "bf16" (bf16 tensor-core GEMMs with fp32 outputs on CUDA, the
# record kernel's way) or "fp32" (GEMMs of the bf16 operands widened to fp32: CUDA cores). The
# forward is the same math either way: a product of two bf16 numbers is exact in fp32, and both
# accumulate in fp32 (in another order: on an H200 99.98% of the outputs agree bit for bit). The bf16
# backward rounds each incoming fp32 gradient to bf16 before its two GEMMs, as the record's
# backward kernel does (ds.to(k.dtype)): a change for the score gradient (q and k), none for the
# output's, which is bf16 already. On an H200 a 16k-token micro-batch's DC forward + backward takes
# 1.6-1.8 ms against 2.3 with fp32 GEMMs; training steps 2% faster
MATMUL = "bf16"
# The head mix a = sum_h w1[h] P_h: "sum" (the six products added left to right, the record kernel's
# order: pointwise work that Inductor fuses with the softmax and its backward) or "einsum" (one
# batched matrix-vector product: on an H200 cuBLAS's fp32 gemv and, in backward, an fp32 GEMM,
# ≈ 0.9 ms a 32k-token micro-batch). The same math; fp32 sums in another order
MIX = "sum"


class _Bf16Bmm(torch.autograd.Function):
    """a [B, M, K] @ b [B, K, N], both bf16, -> fp32 [B, M, N]; gradients in bf16."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return _bmm_fp32_out(a, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        g = grad.to(a.dtype)
        return _bmm_fp32_out(g, b.mT).to(a.dtype), _bmm_fp32_out(a.mT, g).to(b.dtype)


def _bmm_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    if a.is_cuda:   # cuBLAS: bf16 operands, fp32 accumulation and output
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())   # elsewhere the same products, exact in fp32


def _heads_first(t: Tensor) -> Tensor:
    """[nb, L, H, X] -> [nb * H, L, X]."""
    nb, L, H, X = t.shape
    return t.transpose(1, 2).reshape(nb * H, L, X)


def dc_weights(x: Tensor, w1_logits: Tensor, w2_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(w1, w2) [B, T, H] in x's dtype from the gate's raw outputs: w1 RMS-normalised over heads."""
    w1 = F.rms_norm(w1_logits.float(), (w1_logits.size(-1),), eps=1e-6).type_as(x)
    return w1, w2_logits.type_as(x)


def _blocks_with_previous(t: Tensor) -> Tensor:
    """[nb*BLOCK, ...] -> [nb, 2*BLOCK, ...]: each block preceded by the one before (zeros first)."""
    b = t.reshape(-1, BLOCK, *t.shape[1:])
    prev = torch.cat([torch.zeros_like(b[:1]), b[:-1]])
    return torch.cat([prev, b], dim=1)


def dc_correct(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, doc: Tensor,
               scale: Tensor, window: int = WINDOW) -> Tensor:
    """y (attention output), q, k, v [1, T, H, D]; w1, w2 [1, T, H]; doc [T] document ids.
    Returns y plus the correction, in y's dtype."""
    assert window <= BLOCK
    T = q.size(1)
    pad = -T % BLOCK
    if pad:   # exported models see any length: pad with a document of their own
        z = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        out = dc_correct(z(y), z(q), z(k), z(v), z(w1), z(w2), F.pad(doc, (0, pad), value=-1), scale, window)
        return out[:, :T]
    nb = T // BLOCK
    qb = q[0].reshape(nb, BLOCK, *q.shape[2:])                        # [nb, 128, H, D]
    kb = _blocks_with_previous(k[0])                                  # [nb, 256, H, D]
    vb = _blocks_with_previous(v[0])                                  # [nb, 256, H, D]
    if MATMUL == "bf16":
        qk = _Bf16Bmm.apply(_heads_first(qb), _heads_first(kb).mT).view(nb, -1, BLOCK, 2 * BLOCK)
    else:
        qk = torch.einsum("bqhd,bkhd->bhqk", qb.float(), kb.float())
    scores = qk * scale                                                # fp32 [nb, H, 128, 256]
    qpos = torch.arange(T, device=q.device).view(nb, BLOCK, 1)
    kpos = (torch.arange(nb, device=q.device) * BLOCK - BLOCK).view(nb, 1, 1) \
        + torch.arange(2 * BLOCK, device=q.device).view(1, 1, -1)     # [nb, 1, 256]
    rel = qpos - kpos                                                  # [nb, 128, 256]
    kdoc = _blocks_with_previous(doc.view(T, 1)).view(nb, 1, 2 * BLOCK)
    valid = (rel >= 0) & (rel < window) & (kpos >= 0) & (kdoc == doc.view(nb, BLOCK, 1))
    probs = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1)
    w1b = w1[0].float().reshape(nb, BLOCK, -1)                         # [nb, 128, H]
    if MIX == "sum":
        a = w1b[..., :1] * probs[:, 0]                                 # [nb, 128, 256]
        for h in range(1, probs.size(1)):
            a = a + w1b[..., h:h + 1] * probs[:, h]
    else:
        a = torch.einsum("bhqk,bqh->bqk", probs, w1b)
    mix = (w2[0].float().reshape(nb, BLOCK, -1, 1) * a[:, :, None, :]).to(v.dtype)   # [nb, 128, H, 256]
    if MATMUL == "bf16":
        corr = _Bf16Bmm.apply(_heads_first(mix), _heads_first(vb))     # fp32 [nb * H, 128, D]
        corr = corr.view(nb, -1, BLOCK, corr.size(-1)).transpose(1, 2)
    else:
        corr = torch.einsum("bqhk,bkhd->bqhd", mix.float(), vb.float())  # fp32 [nb, 128, H, D]
    out = (y[0].float().reshape(nb, BLOCK, *y.shape[2:]) + corr).to(y.dtype)
    return out.view(1, T, *y.shape[2:])
