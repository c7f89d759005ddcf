"""Muon: batched Newton-Schulz orthogonalisation and the stacked update of equal-shape matrices."""
from __future__ import annotations

import copy

import pytest
import torch

from speedrun.optimizer import Muon, build_optimizers, newton_schulz, set_lr


@pytest.mark.parametrize("shape", [(6, 24, 40), (6, 40, 24), (5, 32, 32)])
def test_batched_newton_schulz_equals_per_matrix(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g)
    G[1] *= 1000.0  # a matrix of another scale: normalisation must be per matrix
    G[2] *= 1e-3
    batched = newton_schulz(G, 5)
    single = torch.cat([newton_schulz(G[i:i + 1], 5) for i in range(shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    # and a 2-D matrix alone gives the same as its batch slot
    torch.testing.assert_close(newton_schulz(G[3], 5), batched[3], rtol=1e-5, atol=1e-6)


def _singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


@pytest.mark.parametrize("shape", [(4, 64, 16), (4, 16, 64), (4, 96, 48), (3, 3 * 32, 64)])
def test_newton_schulz_is_near_orthogonal(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    s = _singular_values(newton_schulz(G, 5))
    print(shape, f"singular values in [{s.min():.3f}, {s.max():.3f}]")
    assert s.min() > 0.5 and s.max() < 1.5


def test_newton_schulz_flattens_a_spread_spectrum():
    """Square matrices with singular values spread over 0.01..1 (condition number 100) all come out
    near 1 (a far wider spread is not flattened in 5 steps: a 1e-4 relative singular value stays small)."""
    g = torch.Generator().manual_seed(2)
    n = 48
    U, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g))
    S = torch.logspace(-2, 0, n).expand(3, n)
    G = U @ torch.diag_embed(S) @ V.mT
    X = newton_schulz(G, 5)
    s = _singular_values(X)
    print(f"singular values in [{s.min():.3f}, {s.max():.3f}]")
    assert s.min() > 0.5 and s.max() < 1.5
    # same singular vectors: X ~ U V^T (the orthogonal polar factor), not some other orthogonal matrix
    cos = (X * (U @ V.mT)).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * n ** 0.5)
    assert (cos > 0.9).all(), cos


def test_muon_step_stacks_without_mixing_matrices():
    """Muon's stacked update equals Nesterov momentum + Newton-Schulz applied to each matrix alone,
    for 2-D weights and the 2-D slices of a 3-D [3, h, d] weight, over several steps."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 16, 24), (16, 24), (16, 24), (48, 24), (24, 48), (48, 24)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    lr, mom, ns = 0.02, 0.9, 5
    opt = Muon(params, lr=lr, momentum=mom, ns_steps=ns)
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, (w, gr) in enumerate(zip(ref, grads)):
            bufs[i] = mom * bufs[i] + (1 - mom) * gr
            nesterov = (1 - mom) * gr + mom * bufs[i]
            rows, cols = w.shape[-2:]
            mats = nesterov.reshape(-1, rows, cols)
            upd = torch.stack([newton_schulz(m, ns) for m in mats]).view_as(w)
            w -= lr * max(1.0, rows / cols) ** 0.5 * upd
        for p, w in zip(params, ref):
            torch.testing.assert_close(p.detach(), w, rtol=1e-4, atol=1e-5)


def test_muon_skips_params_without_grad_and_state_round_trips():
    g = torch.Generator().manual_seed(4)
    a, b = (torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(2))
    opt = Muon([a, b], lr=0.1, momentum=0.5)
    a.grad = torch.randn(8, 8, generator=g)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b_before) and b not in opt.state
    # a resumed optimizer (state_dict round trip) continues identically
    clone_a = torch.nn.Parameter(a.detach().clone())
    opt2 = Muon([clone_a, torch.nn.Parameter(b.detach().clone())], lr=0.1, momentum=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a checkpoint file
    grad = torch.randn(8, 8, generator=g)
    a.grad, clone_a.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(a.detach(), clone_a.detach())


def test_set_lr_scales_every_group_from_its_base():
    w = torch.nn.Parameter(torch.randn(4, 4))
    groups = {"embed": [torch.nn.Parameter(torch.randn(10, 4))], "head": [torch.nn.Parameter(torch.randn(3, 4))],
              "scalar": [torch.nn.Parameter(torch.ones(2))], "hidden": [w]}
    adam, muon = build_optimizers(groups, muon_lr=0.05, muon_momentum=0.85, ns_steps=5, embed_lr=0.6,
                                  head_lr=0.008, scalar_lr=0.04, betas=(0.8, 0.95), fused=False,
                                  compile=False)
    set_lr((adam, muon), 0.5)
    set_lr((adam, muon), 0.1)  # not compounding: always relative to base_lr
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([0.06, 0.0008, 0.004])
    assert muon.param_groups[0]["lr"] == pytest.approx(0.005)
