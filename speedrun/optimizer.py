"""Muon for the hidden matrices, Adam for everything else.

Muon = SGD with Nesterov momentum whose update is orthogonalised by a Newton-Schulz iteration.
Matrices of equal shape are stacked and orthogonalised in one batched call (12 layers x 4-6 matrices
become 3 launches of batched matmuls instead of ~60 small ones), the iteration is compiled once.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

# quintic Newton-Schulz coefficients (Keller Jordan): maximal slope at zero, converges to ~[0.7, 1.2]
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise each matrix of a batch [N, rows, cols] (bf16 on GPU)."""
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


_compiled_ns = None


def _ns_fn(compile: bool):
    global _compiled_ns
    if not compile:
        return newton_schulz
    if _compiled_ns is None:
        _compiled_ns = torch.compile(newton_schulz, dynamic=False, fullgraph=True)
    return _compiled_ns


class Muon(torch.optim.Optimizer):
    """Muon over 2-D (or stacked 3-D, e.g. [3, h, d] q/k/v) weights.

    The effective lr of each matrix is scaled by sqrt(max(1, rows/cols)) so that tall matrices
    (the MLP input projection) move as much per step, in RMS terms, as square ones.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5,
                 compile: bool = False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self._ns = _ns_fn(compile)
        # stacking groups: matrices of one shape are orthogonalised together
        self._by_shape: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                self._by_shape[tuple(p.shape[-2:])].append(p)

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, mom, ns_steps = group["lr"], group["momentum"], group["ns_steps"]
        for (rows, cols), params in self._by_shape.items():
            params = [p for p in params if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs.append(st["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            torch._foreach_lerp_(grads, bufs, mom)  # Nesterov: g + mom * (buf - g)
            stacked = torch.cat([g.reshape(-1, rows, cols) for g in grads])
            update = self._ns(stacked, ns_steps)
            scale = -lr * max(1.0, rows / cols) ** 0.5
            offset = 0
            for p in params:
                n = p.numel() // (rows * cols)
                p.add_(update[offset:offset + n].view_as(p), alpha=scale)
                offset += n


def build_optimizers(groups: dict[str, list], *, muon_lr: float, muon_momentum: float,
                     ns_steps: int, embed_lr: float, head_lr: float, scalar_lr: float,
                     betas: tuple[float, float], fused: bool, compile: bool):
    adam = torch.optim.Adam(
        [dict(params=groups["embed"], lr=embed_lr), dict(params=groups["head"], lr=head_lr),
         dict(params=groups["scalar"], lr=scalar_lr)],
        betas=betas, eps=1e-10, fused=fused)
    muon = Muon(groups["hidden"], lr=muon_lr, momentum=muon_momentum, ns_steps=ns_steps,
                compile=compile)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return adam, muon


def set_lr(optimizers, multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * multiplier
