"""The ReLU^2 MLP with its elementwise work inside the matmul kernels (speedrun/mlp.py).

On CPU the custom ops run plain PyTorch, which tests the autograd wiring (which matmul gets which
saved tensor) and that a compiled block takes the ops without a graph break. The Triton kernels
themselves run through Triton's interpreter where Triton is installed (fp32: the interpreter
mis-reads bf16); `python -m benchmarks.gpu_checks` checks them in bf16 on a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT
from test_head import needs_triton
from test_recipe import train_cpu_tiny

from speedrun.fp8 import quantize_rows
from speedrun.mlp import reference_mlp, relu2_mlp
from speedrun.model import MLP, norm


def _grads(fn, x, w1, w2, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    out = fn(*leaves)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ops_give_the_unfused_mlp_and_its_gradients(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 24, 32).to(dtype)
    w1, w2 = (torch.randn(128, 32) / 6).to(dtype), (torch.randn(32, 128) / 11).to(dtype)
    g = torch.randn(2, 24, 32).to(dtype)
    fused, ref = _grads(relu2_mlp, x, w1, w2, g), _grads(reference_mlp, x, w1, w2, g)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "dx", "dw1", "dw2"), fused, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol, name


def test_fp8_mlp_computes_on_the_quantized_operands():
    """fp8=True: forward = the MLP of the dequantized x and W1; gradients near fp32's."""
    torch.manual_seed(0)
    x, g = torch.randn(2, 24, 64), torch.randn(2, 24, 64)
    w1, w2 = torch.randn(256, 64) / 8, torch.randn(64, 256) / 16
    fp8, ref = _fp8_grads(x, w1, w2, g), _grads(reference_mlp, x, w1, w2, g)
    xq, sx = quantize_rows(x.reshape(-1, 64))
    wq, sw = quantize_rows(w1)
    exact = reference_mlp((xq.float() * sx[:, None]).view_as(x), wq.float() * sw[:, None], w2)
    assert torch.allclose(fp8[0], exact, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fp8[0], ref[0], rtol=1e-3, atol=1e-4)   # the flag did reach the op
    for name, a, b in zip(("out", "dx", "dw1", "dw2"), fp8, ref):
        assert ((a - b).norm() / b.norm()).item() < 0.08, name


def test_fp8_mlp_is_for_training_only():
    """Without autograd (validation) the FP8 switch is ignored: reported losses carry no FP8 rounding."""
    torch.manual_seed(0)
    layer = MLP(64)
    torch.nn.init.normal_(layer.c_proj.weight, std=0.05)
    layer.fused, x = True, torch.randn(1, 24, 64)
    with torch.no_grad():
        bf16 = layer(x)
        layer.fp8 = True
        assert torch.equal(layer(x), bf16)
    assert not torch.allclose(layer(x).detach(), bf16, rtol=1e-3, atol=1e-4)   # with autograd: FP8


def _fp8_grads(x, w1, w2, g):
    return _grads(lambda *t: relu2_mlp(*t, fp8=True), x, w1, w2, g)


def test_compiled_block_takes_the_fused_mlp_without_graph_break():
    """fullgraph=True fails on any graph break: the custom ops must trace as opaque calls."""
    torch.manual_seed(0)
    layer = MLP(32)
    torch.nn.init.normal_(layer.c_proj.weight, std=0.05)   # zero init would hide a wrong dx / dw1

    def residual(x):
        return x + layer(norm(x))

    x = torch.randn(1, 64, 32)
    results = {}
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        fn = torch.compile(residual, fullgraph=True, dynamic=False) if fused else residual
        fn(xr).square().sum().backward()
        results[fused] = [xr.grad, layer.c_fc.weight.grad, layer.c_proj.weight.grad]
    for a, b in zip(results[True], results[False]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_block_takes_the_fp8_mlp_without_graph_break():
    torch.manual_seed(0)
    layer = MLP(32)
    torch.nn.init.normal_(layer.c_proj.weight, std=0.05)
    layer.fused = layer.fp8 = True
    x = torch.randn(1, 64, 32)
    results = []
    for fn in (lambda t: t + layer(norm(t)), None):
        fn = fn or torch.compile(lambda t: t + layer(norm(t)), fullgraph=True, dynamic=False)
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        fn(xr).square().sum().backward()
        results.append([xr.grad, layer.c_fc.weight.grad, layer.c_proj.weight.grad])
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_training_switch_reaches_every_block_and_keeps_the_loss(tmp_path):
    on, m_on, losses_on = train_cpu_tiny(tmp_path / "on", 3, fused_mlp=True)
    off, m_off, losses_off = train_cpu_tiny(tmp_path / "off", 3, fused_mlp=False)
    assert all(b.mlp.fused for b in on.model.blocks) and not any(b.mlp.fused for b in off.model.blocks)
    assert m_on["fused_mlp"] is True and m_off["fused_mlp"] is False
    assert losses_on == pytest.approx(losses_off, rel=1e-4)


_INTERPRETED = r"""
import json, torch
import speedrun.mlp as mlp
from speedrun.fp8 import quantize_rows
torch.manual_seed(0)
out = []
# (tokens, dim, hidden): multiples of the interpreter's 32x32x16 tiles, and ragged ones (masks; its
# tensor descriptors take rows of a multiple of 16 elements)
for M, K, N in [(64, 32, 128), (50, 48, 80)]:
    x, g = torch.randn(M, K), torch.randn(M, K)
    w1, w2 = torch.randn(N, K) / K ** 0.5, torch.randn(K, N) / N ** 0.5
    res = []
    for fn in (mlp.relu2_mlp, mlp.reference_mlp):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        y = fn(*leaves)
        y.backward(g)
        res.append([y.detach()] + [t.grad for t in leaves])
    post = mlp.linear_relu2(x, w1)
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(*res)]
    out.append({"shape": [M, K, N], "errs": errs,
                "post_err": ((post - torch.relu(x @ w1.t()).square()).norm()).item()})
    # FP8 kernels against the same math on the dequantized operands (K * 1 byte: TMA's 16-byte rows)
    xq, sx = quantize_rows(x)
    wq, sw = quantize_rows(w1)
    gq, sg = quantize_rows(g)
    w2q, sw2 = quantize_rows(w2.t())
    post = mlp.linear_relu2_fp8(xq, sx, wq, sw, torch.float32)
    post_ref = torch.relu((xq.float() * sx[:, None]) @ (wq.float() * sw[:, None]).t()).square()
    dpre = mlp.linear_relu2_grad_fp8(gq, sg, w2q, sw2, post)
    dpre_ref = 2 * post.sqrt() * ((gq.float() * sg[:, None]) @ (w2q.float() * sw2[:, None]).t())
    out.append({"shape": [M, K, N], "fp8": True, "kernels": mlp.kernels_available(xq),
                "errs": [((post - post_ref).norm() / post_ref.norm()).item(),
                         ((dpre - dpre_ref).norm() / dpre_ref.norm()).item()], "post_err": 0.0})
print(json.dumps(out))
"""


@needs_triton
def test_interpreted_kernels_match_the_unfused_mlp():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 4 and all(c["kernels"] for c in cases if c.get("fp8"))
    for case in cases:
        assert max(case["errs"]) < 1e-5 and case["post_err"] < 1e-4, case


# The record recipe's fused FP8 up projection (linear_relu2_fp8_quant) in Triton's interpreter.
# The operands are small integers, so the matmul is exact whatever its order and only the
# epilogue's formulas are tested. Two interpreter casts differ from the GPU's, and the reference
# follows them where it must: fp32 -> bf16 truncates (the GPU rounds to nearest), and an fp32 ->
# e4m3 rounding that carries into the next power of two lands a power of two too low (those
# elements are left out; every other one is compared bit for bit).
_INTERPRETED_QUANT = r"""
import json, torch
import speedrun.mlp as mlp

def bf16(t):   # the interpreter's fp32 -> bf16: truncation
    return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)

torch.manual_seed(0)
out = []
for M, K, N in [(64, 32, 128), (50, 48, 72)]:   # whole interpreter tiles, then ragged ones
    x = torch.randint(-8, 9, (M, K)).float().to(torch.float8_e4m3fn)
    w = torch.randint(-8, 9, (N, K)).float().to(torch.float8_e4m3fn)
    dequant, act_scale = torch.tensor([0.0123]), torch.tensor([0.37])
    post, q, amax = mlp.linear_relu2_fp8_quant(x, w, dequant, act_scale)
    square = torch.relu(bf16((x.float() @ w.float().t()) * dequant)).square()
    v = torch.clamp_max(square * (1 / act_scale), 448.0)
    v_rounded = torch.clamp_max(bf16(square) * (1 / act_scale), 448.0)   # e4m3 from the rounded post
    q_ref, q_rounded = v.to(torch.float8_e4m3fn), v_rounded.to(torch.float8_e4m3fn)
    binade = torch.exp2(torch.floor(torch.log2(v.clamp_min(2 ** -6))))
    comparable = (v == 0) | ((v >= 2 ** -6) & (q_ref.float() < 2 * binade))
    bits = lambda t: t.view(torch.uint8)[comparable]
    out.append({"kernels": mlp.kernels_available(x), "post": torch.equal(post.float(), bf16(square)),
                "amax": amax.item() == bf16(square).max().item(), "compared": comparable.float().mean().item(),
                "q": torch.equal(bits(q), bits(q_ref)), "q_rounded_caught": not torch.equal(bits(q_rounded), bits(q_ref))})
print(json.dumps(out))
"""


@needs_triton
def test_interpreted_record_fp8_up_projection_writes_post_its_e4m3_copy_and_amax():
    """post = bf16(relu(pre)^2), the e4m3 copy from the square before it is rounded (as Inductor's
    fused kernel computes the record's clamp_max(post / act_scale, 448)), amax of post."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_QUANT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 2
    for case in cases:
        assert case["kernels"] and case["post"] and case["amax"] and case["q"], case
        assert case["compared"] > 0.9 and case["q_rounded_caught"], case


def test_record_fp8_up_projection_traces_as_one_opaque_op():
    """The op's fake (shapes and dtypes without running it) matches what it returns, so a compiled
    block (the record's hidden_from_rows) holds it without a graph break."""
    from speedrun.mlp import linear_relu2_fp8_quant

    torch.manual_seed(0)
    x = torch.randn(40, 32).to(torch.float8_e4m3fn)
    w = torch.randn(96, 32).to(torch.float8_e4m3fn)
    dequant, act_scale = torch.tensor([0.02]), torch.tensor([0.5])

    def f(x, w):
        post, q, amax = linear_relu2_fp8_quant(x, w, dequant, act_scale)
        return post.float() + q.float() + amax

    eager = f(x, w)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    post, q, amax = linear_relu2_fp8_quant(x, w, dequant, act_scale)
    assert (post.dtype, q.dtype, amax.shape) == (torch.bfloat16, torch.float8_e4m3fn, torch.Size([]))
    assert torch.equal(eager, compiled) and amax.item() == post.float().max().item() > 0
