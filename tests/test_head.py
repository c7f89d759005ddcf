"""The fused head + soft-capped cross-entropy (speedrun/head.py).

The Triton kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel is defined, hence the subprocess); where Triton is not installed (the CI's CPU torch
has none) those tests skip and `python -m benchmarks.gpu_checks` covers the kernel on a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT

from speedrun.head import (
    MAX_CAP,
    reference_softcap_cross_entropy,
    softcap_cross_entropy,
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton not installed (CPU torch): gpu_checks covers the kernel")

_INTERPRETED = r"""
import json, sys, torch
from speedrun.head import softcap_cross_entropy, reference_softcap_cross_entropy
torch.manual_seed(0)
out = []
for N, D, V, cap in [(48, 32, 2500, 30.0), (16, 24, 700, 15.0)]:
    x = torch.randn(N, D) * 2
    w = torch.randn(V, D) * 0.7
    t = torch.randint(0, V, (N,))
    res = {}
    for name, fused in (("fused", True), ("ref", False)):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = softcap_cross_entropy(xr, wr, t, cap, fused=fused)
        (loss * 0.25).backward()
        res[name] = (loss.item(), xr.grad, wr.grad)
    with torch.no_grad():
        nograd = softcap_cross_entropy(x, w, t, cap, fused=True).item()
    f, r = res["fused"], res["ref"]
    out.append({"V": V, "cap": cap, "loss": f[0], "ref_loss": r[0], "nograd_loss": nograd,
                "gx_err": ((f[1] - r[1]).norm() / r[1].norm()).item(),
                "gw_err": ((f[2] - r[2]).norm() / r[2].norm()).item()})
from speedrun.head import mtp_targets, softcap_mtp_loss
x, w, t = torch.randn(40, 24) * 2, torch.randn(2500, 24) * 0.7, torch.randint(0, 2500, (40,))
tg, wt = mtp_targets(t, 3), torch.tensor([1.0, 0.5, 0.25])
res = {}
for fused in (True, False):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    obj, ce = softcap_mtp_loss(xr, wr, tg, wt, 30.0, fused=fused)
    (obj * 0.25).backward()
    res[fused] = (obj.item(), ce.item(), xr.grad, wr.grad)
f, r = res[True], res[False]
out.append({"V": 2500, "cap": 30.0, "mtp": True, "loss": f[0], "ref_loss": r[0], "nograd_loss": r[0],
            "next_ce": f[1], "ref_next_ce": r[1],
            "gx_err": ((f[2] - r[2]).norm() / r[2].norm()).item(),
            "gw_err": ((f[3] - r[3]).norm() / r[3].norm()).item()})
# the FP8-head layout of the kernel's outputs, with several rows per program (N and V not
# multiples of the tile): the gradient written into the first half of each logits row's own
# storage (fp16 into fp32 here, as e5m2 into bf16 on the GPU) and a second copy transposed [V, N]
from speedrun.head import _softcap_ce_kernel
import torch.nn.functional as F
N, V, cap = 50, 700, 30.0
z, t = torch.randn(N, V) * 20, torch.randint(0, V, (N, 1))
zr = z.clone().requires_grad_()
ref_loss = F.cross_entropy(cap * torch.tanh(zr / cap), t[:, 0])
ref_loss.backward()
g2t, obj, ce = torch.empty(V, N), torch.empty(N), torch.empty(N)
g = z.view(torch.float16)[:, :V]
_softcap_ce_kernel[(13,)](z, g, g2t, t, torch.ones(1), obj, ce, N, V, g.stride(0), cap, 64.0, 3.0,
                          N_TGT=1, WITH_GRAD=True, WITH_GRAD2=True, GRAD2_T=True, FAST_TANH=False,
                          ROWS=4, BLOCK=64)
ref = zr.grad * N
out.append({"transposed": True, "g_err": ((g.float() / 64.0 - ref).norm() / ref.norm()).item(),
            "g2t_err": ((g2t.t() / 3.0 - ref).norm() / ref.norm()).item(),
            "loss": obj.mean().item(), "ref_loss": ref_loss.item()})
print(json.dumps(out))
"""


@needs_triton
def test_fused_kernel_matches_reference_loss_and_gradients():
    """Vocabularies that are not a multiple of the kernel's block (masked tail), two caps, a
    non-unit upstream gradient, the no-grad (evaluation) path, multi-token prediction, and the
    FP8 head's layout: gradient inside the logits' storage plus a transposed copy."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    tr = cases.pop()
    assert tr["transposed"] and tr["g_err"] < 1e-3 and tr["g2t_err"] < 1e-5, tr   # fp16: 2^-11
    assert abs(tr["loss"] - tr["ref_loss"]) < 1e-5 * tr["ref_loss"], tr
    for case in cases:
        assert abs(case["loss"] - case["ref_loss"]) < 1e-5 * case["ref_loss"], case
        assert abs(case["nograd_loss"] - case["ref_loss"]) < 1e-5 * case["ref_loss"], case
        assert case["gx_err"] < 1e-5 and case["gw_err"] < 1e-5, case
        if case.get("mtp"):   # weighted t+1..t+3 objective, and its next-token part
            assert abs(case["next_ce"] - case["ref_next_ce"]) < 1e-5 * case["ref_next_ce"], case
            assert case["loss"] > case["next_ce"] * 1.5, case


def test_reference_is_capped_cross_entropy():
    """The reference caps logits at +-cap: a huge logit on the target cannot push the loss below
    the capped floor log(1 + (V-1) * exp(-cap))."""
    V, cap = 100, 5.0
    x = torch.zeros(1, 4)
    x[0, 0] = 1.0
    w = torch.zeros(V, 4)
    w[3, 0] = 1e4   # target logit -> +cap, all others 0
    loss = reference_softcap_cross_entropy(x, w, torch.tensor([3]), cap).item()
    floor = torch.log(torch.tensor(1 + (V - 1) * torch.exp(torch.tensor(-cap)).item())).item()
    assert abs(loss - floor) < 1e-5


def test_cpu_path_equals_the_reference_in_loss_and_gradients():
    """On CPU tensors (no interpreter) the fused request takes the CPU function, whose hand-written
    backward must give the reference's gradients, with or without autograd, at any cap up to what
    an exp without max subtraction allows; above it, the reference itself."""
    torch.manual_seed(0)
    x, w = torch.randn(24, 16) * 3, torch.randn(500, 16)
    t = torch.randint(0, 500, (24,))
    t[:2] = torch.tensor([0, 499])   # first and last vocabulary rows
    for cap in (5.0, 30.0, MAX_CAP, MAX_CAP + 1):
        grads = []
        for fn in (lambda a, b: softcap_cross_entropy(a, b, t, cap, fused=True),
                   lambda a, b: reference_softcap_cross_entropy(a, b, t, cap)):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            loss = fn(xr, wr)
            (loss * 0.5).backward()
            grads.append((loss.detach(), xr.grad, wr.grad))
            with torch.no_grad():
                torch.testing.assert_close(fn(x, w), loss.detach(), rtol=1e-6, atol=0)
        (la, gxa, gwa), (lb, gxb, gwb) = grads
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
        torch.testing.assert_close(gxa, gxb, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gwa, gwb, rtol=1e-5, atol=1e-7)
        assert gwb.abs().max() > 1e-3   # the gradients compared are not all ~0
    # only the states need a gradient (the head frozen): still through the CPU function
    xr = x.clone().requires_grad_()
    softcap_cross_entropy(xr, w, t, 30.0, fused=True).backward()
    xb = x.clone().requires_grad_()
    reference_softcap_cross_entropy(xb, w, t, 30.0).backward()
    torch.testing.assert_close(xr.grad, xb.grad, rtol=1e-5, atol=1e-7)
    # its backward works in place on the saved buffers: a second one must fail, not return garbage
    loss = softcap_cross_entropy(x.clone().requires_grad_(), w, t, 30.0, fused=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_fp8_weight_cast_is_made_once_per_optimizer_step():
    """The FP8 head casts its weight once per step, not per micro-batch; a stale cast would
    train against old weights silently, so every way the weight changes must drop it."""
    from speedrun.head import _fp8_weight
    w = torch.nn.Parameter(torch.randn(64, 32))
    first = _fp8_weight(w)
    assert _fp8_weight(w) is first   # the next micro-batch reuses it
    w8, w8_cm, scale = first
    torch.testing.assert_close(w8.float() * scale, w.detach(), rtol=0.07, atol=1e-3)
    assert torch.equal(w8_cm.float(), w8.float()) and w8_cm.stride() == (1, 64)
    opt = torch.optim.Adam([w], lr=0.1, fused=True)   # fused Adam leaves the version counter alone
    w.grad = torch.randn_like(w)
    opt.step()
    after_step = _fp8_weight(w)
    assert after_step is not first
    torch.testing.assert_close(after_step[0].float() * after_step[2], w.detach(), rtol=0.07, atol=1e-3)
    with torch.no_grad():
        w.mul_(2)   # e.g. a checkpoint load: an in-place write
    assert _fp8_weight(w) is not after_step
    other = torch.nn.Parameter(w.detach().clone())
    assert _fp8_weight(other) is not _fp8_weight(w)
