"""FP8 (e4m3) with one scale per row: the quantization the MLP kernels and the attention
projections share.

A matmul whose contraction runs over the model width (K = 768) can take e4m3 operands with one
scale per row of each operand: the scales factor out of every dot product and are applied to the
fp32 result. Gradients whose contraction runs over the hidden units or the tokens stay bf16 here.
"""
from __future__ import annotations

import torch
from torch import Tensor

E4M3_MAX = 448.0


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """t [R, K] -> (q e4m3 [R, K] contiguous, scale fp32 [R]) with t ~= q * scale[:, None].

    Power-of-two scales (as torchao's rowwise recipe): dividing by them is exact, so the only
    rounding is e4m3's own. An all-zero row gets the smallest scale and quantizes to zeros."""
    amax = t.abs().amax(dim=1).float().clamp_min(2.0 ** -100)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    return (t.float() / scale[:, None]).to(torch.float8_e4m3fn).contiguous(), scale


def scaled_matmul(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, dtype: torch.dtype) -> Tensor:
    """(aq * sa) @ (bq * sb)^T in `dtype`: cuBLAS's rowwise-scaled FP8 matmul on GPU, the same
    math on dequantized operands elsewhere."""
    if aq.is_cuda:
        return torch._scaled_mm(aq, bq.t(), scale_a=sa[:, None], scale_b=sb[None, :], out_dtype=dtype)
    return ((aq.float() * sa[:, None]) @ (bq.float() * sb[:, None]).t()).to(dtype)


class _ForwardFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return scaled_matmul(*quantize_rows(x), *quantize_rows(w), x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


def forward_fp8_linear(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] @ w [N, K]^T with e4m3 operands in forward; both gradients in bf16 (their
    contractions run over N and over the tokens, where one scale per row does not factor out)."""
    shape = x.shape
    y = _ForwardFP8Linear.apply(x.reshape(-1, shape[-1]), w)
    return y.view(*shape[:-1], w.size(0))
