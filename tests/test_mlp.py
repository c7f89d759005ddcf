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
# (tokens, dim, hidden): multiples of the interpreter's 32x32x16 tiles, and ragged ones (masks)
for M, K, N in [(64, 32, 128), (50, 48, 72)]:
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
