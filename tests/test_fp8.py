"""FP8 with one scale per row (speedrun/fp8.py): the quantization, and the attention projections'
forward-only FP8 linear. The FP8 MLP kernels are tested in test_mlp.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from speedrun.fp8 import forward_fp8_linear, quantize_rows


def test_quantize_rows_uses_power_of_two_row_scales_and_e4m3_rounding():
    torch.manual_seed(0)
    t = torch.randn(6, 40) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 0.0])[:, None]
    q, scale = quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and scale.shape == (6,)
    assert torch.equal(scale[:5], torch.exp2(torch.log2(scale[:5]).round()))   # powers of two
    peak = q.float().abs().amax(dim=1)
    assert ((peak[:5] > 224) & (peak[:5] <= 448)).all()     # the row's largest value uses the top octave
    assert torch.equal(q[5].float(), torch.zeros(40))       # an all-zero row stays zero, no NaN
    deq = q.float() * scale[:, None]
    big = t.abs() > scale[:, None] * 2 ** -6               # e4m3 normals: 3 mantissa bits
    assert ((deq - t).abs()[big] <= t.abs()[big] * 2 ** -4).all()
    # a transposed view (W2's columns) quantizes to a contiguous copy, as the kernels' TMA needs
    qt, st = quantize_rows(t[:5].t())
    assert qt.shape == (40, 5) and qt.is_contiguous()
    assert ((qt.float() * st[:, None] - t[:5].t()).abs() <= t[:5].t().abs().amax(1, keepdim=True) * 2 ** -4).all()


def test_forward_fp8_linear_is_the_matmul_of_the_quantized_operands_with_bf16_gradients():
    torch.manual_seed(0)
    x, w, g = torch.randn(2, 24, 64), torch.randn(96, 64) / 8, torch.randn(2, 24, 96)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = forward_fp8_linear(xr, wr)
    y.backward(g)
    xq, sx = quantize_rows(x.reshape(-1, 64))
    wq, sw = quantize_rows(w)
    exact = F.linear((xq.float() * sx[:, None]).view_as(x), wq.float() * sw[:, None])
    assert y.shape == (2, 24, 96) and torch.allclose(y, exact, rtol=1e-5, atol=1e-6)
    assert ((y - F.linear(x, w)).norm() / F.linear(x, w).norm()).item() < 0.08
    # gradients of the unquantized matmul: dx = g @ w, dw = g^T @ x
    assert torch.allclose(xr.grad, g @ w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(wr.grad, g.reshape(-1, 96).t() @ x.reshape(-1, 64), rtol=1e-5, atol=1e-5)


def test_attention_fp8_switch_changes_training_forward_only():
    from speedrun.model import CausalSelfAttention, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, n_layer=2, model_dim=64, n_head=2, head_dim=32, max_seq_len=64)
    attn = CausalSelfAttention(cfg)
    torch.nn.init.normal_(attn.c_proj.weight, std=0.05)   # zero init would hide the output projection
    x = torch.randn(1, 32, 64)
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    with torch.no_grad():
        bf16 = attn(x, None, mask)
        attn.fp8 = True
        assert torch.equal(attn(x, None, mask), bf16)     # validation: no FP8 rounding
    y = attn(x, None, mask)
    assert not torch.allclose(y.detach(), bf16, rtol=1e-3, atol=1e-4)
    assert ((y.detach() - bf16).norm() / bf16.norm()).item() < 0.1
    y.square().sum().backward()
    assert all(p.grad is not None for p in (attn.qkv_w, attn.c_proj.weight))
