"""The ReLU^2 MLP of record #89, with its FP8 forward.

    post = relu(x @ W1^T)^2          (bf16; kept for the backward, which reads relu = sqrt(post))
    out  = post @ W2                 (W2 stored [hidden, dim])

Training on a GPU with FP8 (the record's arithmetic, per-tensor e4m3 scales):
  * up projection: x in e4m3 scaled by its current amax (x * 448 / amax), W1 in e4m3 scaled per
    layer by its amax when the weights were last refreshed; one fp32 dequantisation factor
    (W1 scale * amax / 448) on the accumulator, then bf16;
  * down projection: post in e4m3 with a *delayed* scale (1.8x headroom over the amax the
    previous forward pass saw; the new amax is reduced after the whole forward), W2 in e4m3 with
    a delayed per-layer scale (1.12x headroom over the amax at the previous refresh; the first
    16 steps use the current amax);
  * backward in bf16 from post and the bf16 weights.
The up projection's ReLU^2, e4m3 copy and amax can also run inside its matmul on Hopper (FORWARD:
measured slower there, off).
Validation and the CPU run the same formulas in bf16.
"""
from __future__ import annotations

import torch
from torch import Tensor

from speedrun import mlp as fused_mlp

E4M3_MAX = 448.0
ACT_HEADROOM = 1.80      # headroom of the delayed activation scale
WEIGHT_HEADROOM = 1.12   # headroom of the delayed down-projection weight scale
# d(pre) = 2 sqrt(post) * (grad @ W2^T): "fused" (speedrun/mlp.py's matmul kernel with the product
# in its epilogue, the record's way; Hopper only, elsewhere the pointwise path runs) or "pointwise"
# (a cuBLAS matmul, then one pointwise kernel). The two give bit-identical d(pre) on an H200; the
# fused one is 2.4x faster in isolation and +0.8% tok/s over the whole record step there
# (benchmarks/results/README.md). A benchmark switch (benchmarks/switches.py)
BACKWARD = "fused"
# relu(x @ W1^T)^2 and its e4m3 copy: "pointwise" (the record's way: _scaled_mm to bf16, then the
# pointwise kernel and the amax reduction Inductor compiles) or "fused" (speedrun/mlp.py's matmul
# kernel writes post, the e4m3 copy and the amax from its accumulator; Hopper only). On an H200
# the two gave the same bits for post and its copy, but the fused kernel took 0.39 ms a 32k-token
# micro-batch against 0.32 for the three kernels (cuBLAS's matmul alone 0.15), and the training
# step 1.4% longer (benchmarks/results/README.md). A benchmark switch (benchmarks/switches.py)
FORWARD = "pointwise"


def relu2_bf16(x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    post = torch.relu(x @ w1.t()).square()
    return post @ w2, post


class FP8State:
    """Per-layer FP8 copies of the MLP weights and their scales (not weights: rebuilt from them).

    `act_scales`, `w2_scales` (the scales the current copies were made with) and
    `w2_next_scales` are buffers of the model, saved in checkpoints, because they carry history."""

    def __init__(self, n_layers: int, hidden: int, dim: int, device: torch.device):
        f8 = torch.float8_e4m3fn
        self.w1 = torch.zeros(n_layers, hidden, dim, dtype=f8, device=device)
        self.w1_scales = torch.ones(n_layers, dtype=torch.float32, device=device)
        # W2 [hidden, dim] stored transposed: the column-major operand _scaled_mm wants
        self.w2_storage = torch.zeros(n_layers, dim, hidden, dtype=f8, device=device)
        self.w2 = self.w2_storage.transpose(1, 2)

    @torch.no_grad()
    def quantize_up(self, bank: Tensor) -> None:
        """W1 per layer, scaled by its current amax (computed in the weights' dtype, as the record)."""
        n = bank.size(0)
        up = bank[:, 0]
        s = up.reshape(n, -1).abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
        self.w1_scales.copy_(s.float())
        self.w1.copy_((up / s.view(n, 1, 1)).to(torch.float8_e4m3fn))

    @torch.no_grad()
    def refresh(self, bank: Tensor, w2_scales: Tensor, w2_next: Tensor, bootstrap: bool) -> None:
        """Re-quantize after an optimizer step. bank [layers, 2, hidden, dim] (W1, W2)."""
        n = bank.size(0)
        self.quantize_up(bank)
        down = bank[:, 1]
        if bootstrap:   # the current scale, in the weights' dtype as the record computes it
            w2_next.copy_(down.reshape(n, -1).abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX)
        amax = down.reshape(n, -1).abs().amax(dim=1).float()
        self.requantize_down(down, w2_next)
        w2_scales.copy_(w2_next)
        w2_next.copy_(amax.clamp(min=1e-12) * (WEIGHT_HEADROOM / E4M3_MAX))

    @torch.no_grad()
    def requantize_down(self, down: Tensor, scales: Tensor) -> None:
        q = (down.float() / scales.view(-1, 1, 1)).clamp(-E4M3_MAX, E4M3_MAX)
        self.w2_storage.copy_(q.transpose(1, 2).to(torch.float8_e4m3fn))


class _FP8ReLU2MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, w1_f8, w1_scale, w2_f8, w2_scale, act_scale):
        # x [N, dim] bf16; returns (out [N, dim], amax of post as fp32 0-d, for the next scale)
        amax = x.detach().abs().max().clamp(min=1e-12)
        x_f8 = (x.detach() * (E4M3_MAX / amax)).to(torch.float8_e4m3fn)
        dequant = (w1_scale * amax / E4M3_MAX).float()
        if FORWARD == "fused" and fused_mlp.kernels_available(x_f8):
            post, post_f8, post_amax = fused_mlp.linear_relu2_fp8_quant(x_f8, w1_f8, dequant, act_scale)
        else:
            pre = torch._scaled_mm(x_f8, w1_f8.t(), scale_a=dequant, scale_b=torch.ones_like(dequant),
                                   out_dtype=torch.bfloat16)
            post = torch.relu(pre).square()
            post_f8 = torch.clamp_max(post * (1.0 / act_scale), E4M3_MAX).to(torch.float8_e4m3fn)
            post_amax = post.detach().amax().float()
        out = torch._scaled_mm(post_f8, w2_f8, scale_a=act_scale, scale_b=w2_scale,
                               out_dtype=torch.bfloat16, use_fast_accum=True)
        ctx.save_for_backward(x, w1, w2, post)
        return out, post_amax

    @staticmethod
    def backward(ctx, grad, _grad_amax):
        x, w1, w2, post = ctx.saved_tensors
        return (*_backward(grad, x, w1, w2, post), None, None, None, None, None)


class _ReLU2MLP(torch.autograd.Function):
    """The bf16 path with the record's backward (relu(pre) read back as sqrt(post))."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        out, post = relu2_bf16(x, w1, w2)
        ctx.save_for_backward(x, w1, w2, post)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _backward(grad, *ctx.saved_tensors)


def d_pre(grad: Tensor, w2: Tensor, post: Tensor) -> Tensor:
    """2 relu(pre) * (grad @ W2^T), relu(pre) read back as sqrt(post); grad contiguous. BACKWARD
    picks the kernel."""
    if BACKWARD == "fused" and fused_mlp.kernels_available(grad):
        return fused_mlp.linear_relu2_grad(grad, w2.t(), post, True)
    return ((grad @ w2.t()).float() * 2 * post.float().sqrt()).to(grad.dtype)


def _backward(grad: Tensor, x: Tensor, w1: Tensor, w2: Tensor, post: Tensor):
    grad = grad.contiguous()
    d_w2 = post.t() @ grad
    dp = d_pre(grad, w2, post)
    return dp @ w1, dp.t() @ x, d_w2


def relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor, fp8: tuple | None = None) -> tuple[Tensor, Tensor | None]:
    """x [..., dim] -> (out [..., dim], amax of post or None). `fp8`: (w1_f8, w1_scale [1],
    w2_f8, w2_scale [1], act_scale [1]) for the FP8 forward (training on a GPU)."""
    flat = x.reshape(-1, x.size(-1))
    if fp8 is None:
        if torch.is_grad_enabled():
            out = _ReLU2MLP.apply(flat, w1, w2)
        else:
            out = relu2_bf16(flat, w1, w2)[0]
        return out.view_as(x), None
    out, amax = _FP8ReLU2MLP.apply(flat, w1, w2, *fp8)
    return out.view_as(x), amax
