"""Muon for the hidden matrices, Adam for everything else.

Muon = SGD with Nesterov momentum whose update is orthogonalised by a Newton-Schulz iteration.
Matrices of equal shape are stacked and orthogonalised in one batched call (12 layers x 4-6 matrices
become 3 launches of batched matmuls instead of ~60 small ones), the iteration is compiled once.

Three recipe switches: Polar Express coefficients for the iteration, NorMuon's per-neuron
normalisation of the update, and cautious weight decay. The class defaults give the plain update;
params.yaml turns on Polar Express + NorMuon, which the learning benchmark measured ahead. They follow KellerJordan/modded-nanogpt train_gpt.py (`polar_express`,
`NorMuonAndAdam._apply_normuon_variance_reduction`, `_cautious_wd_and_update_inplace`).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

# quintic Newton-Schulz coefficients (Keller Jordan): maximal slope at zero, converges to ~[0.7, 1.2]
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, arXiv:2505.16932): one quintic per iteration, each optimal for
# the singular-value interval the previous ones leave, so the same 5 steps land much closer to 1.
# From KellerJordan/modded-nanogpt train_gpt.py `polar_express_coeffs` ("computed for num_iters=5,
# safety_factor=2e-2, cushion=2"); iterations past the 5th repeat the last tuple.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
COEFFS = {"newton-schulz": (NS_COEFFS,), "polar-express": POLAR_EXPRESS_COEFFS}
# NorMuon's second-moment decay (the NorMuon paper's default; modded-nanogpt now uses 0.9)
NORMUON_BETA2 = 0.95


def newton_schulz(G: Tensor, steps: int, coeffs: str = "newton-schulz") -> Tensor:
    """Approximately orthogonalise each matrix of a batch [N, rows, cols] (bf16 on GPU)."""
    table = COEFFS[coeffs]
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    if coeffs == "polar-express":
        # modded-nanogpt's normalisation for these coefficients: 2% headroom, as they were
        # computed with that safety factor for a spectrum in (0, 1]
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)
    else:
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def normuon(update: Tensor, second: Tensor, beta2: float = NORMUON_BETA2) -> tuple[Tensor, Tensor]:
    """NorMuon: divide a stacked orthogonalised update [N, rows, cols] by the root of an EMA of its
    mean square per row (rows >= cols) or per column (wide), then restore each matrix's Frobenius
    norm, so only the balance between neurons changes, not the step size. Returns the new update
    and the new second moment `second` ([N, rows, 1] or [N, 1, cols], float32).

    The statistic is taken along the larger dim, as modded-nanogpt does (red_dim = -1 if rows >=
    cols else -2): an orthogonalised update has orthonormal vectors along the smaller dim (all of
    norm 1), so only the larger dim's norms carry information. For our (out, in) weights that is
    per output neuron for the square attention and tall MLP-in matrices, per hidden unit (input)
    for the wide MLP-out. No bias correction is needed: a uniform factor cancels in the rescale.
    """
    red = -1 if update.size(-2) >= update.size(-1) else -2
    n = update.size(red)
    v_mean = update.float().square().mean(dim=red, keepdim=True)
    second = second.lerp(v_mean, 1 - beta2)
    step = second.clamp_min(1e-10).rsqrt()
    # both Frobenius norms from the row means: no extra pass over the full update
    norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    new_norm = (v_mean * step.square()).sum(dim=(-2, -1), keepdim=True).mul(n).sqrt()
    return update * (step * norm / new_norm.clamp_min(1e-10)).to(update.dtype), second


_compiled_ns: dict[str, object] = {}


def _ns_fn(compile: bool, coeffs: str = "newton-schulz"):
    def ns(G: Tensor, steps: int) -> Tensor:
        return newton_schulz(G, steps, coeffs)

    if not compile:
        return ns
    if coeffs not in _compiled_ns:  # one compiled function per coefficient set
        _compiled_ns[coeffs] = torch.compile(ns, dynamic=False, fullgraph=True)
    return _compiled_ns[coeffs]


class Muon(torch.optim.Optimizer):
    """Muon over 2-D (or stacked 3-D, e.g. [3, h, d] q/k/v) weights.

    The effective lr of each matrix is scaled by sqrt(max(1, rows/cols)) so that tall matrices
    (the MLP input projection) move as much per step, in RMS terms, as square ones.

    coeffs: "newton-schulz" | "polar-express" (the iteration's coefficients); normuon: per-neuron
    normalisation of the update (state "second_momentum_buffer", saved with the momentum);
    weight_decay: cautious decay, see `step`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5,
                 compile: bool = False, coeffs: str = "newton-schulz", normuon: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        if coeffs not in COEFFS:
            raise ValueError(f"coeffs must be one of {list(COEFFS)} (got {coeffs!r})")
        self._ns = _ns_fn(compile, coeffs)
        self.coeffs, self.normuon, self.weight_decay = coeffs, normuon, weight_decay
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
            if self.normuon:
                update = self._normuon(params, update, rows, cols)
            scale = -lr * max(1.0, rows / cols) ** 0.5
            # cautious weight decay (modded-nanogpt's scaling): p -= wd * lr * lr_eff * p where the
            # update (subtracted) has p's sign, i.e. where the step already moves toward zero; lr
            # enters twice, so the decay follows the lr schedule squared (their wd 1.2 at lr 0.023)
            decay = self.weight_decay * lr * -scale
            offset = 0
            for p in params:
                n = p.numel() // (rows * cols)
                u = update[offset:offset + n].view_as(p)
                if decay:
                    p.sub_(p * ((u * p) > 0), alpha=decay)
                p.add_(u, alpha=scale)
                offset += n

    def _normuon(self, params: list[Tensor], update: Tensor, rows: int, cols: int) -> Tensor:
        shape = (rows, 1) if rows >= cols else (1, cols)
        seconds = []
        for p in params:
            st = self.state[p]
            if "second_momentum_buffer" not in st:
                st["second_momentum_buffer"] = torch.zeros(
                    p.numel() // (rows * cols), *shape, dtype=torch.float32, device=p.device)
            seconds.append(st["second_momentum_buffer"])
        update, second = normuon(update, torch.cat(seconds))
        torch._foreach_copy_(seconds, list(second.split([s.size(0) for s in seconds])))
        return update


def build_optimizers(groups: dict[str, list], *, muon_lr: float, muon_momentum: float,
                     ns_steps: int, embed_lr: float, head_lr: float, scalar_lr: float,
                     betas: tuple[float, float], compile: bool,
                     muon_coeffs: str = "newton-schulz", muon_normuon: bool = False,
                     muon_weight_decay: float = 0.0):
    adam = torch.optim.Adam(
        [dict(params=groups["embed"], lr=embed_lr), dict(params=groups["head"], lr=head_lr),
         dict(params=groups["scalar"], lr=scalar_lr)],
        # fused on CPU too (torch >= 2.4): 11 vs 62 ms per step for the cpu-tiny tables
        betas=betas, eps=1e-10, fused=True)
    muon = Muon(groups["hidden"], lr=muon_lr, momentum=muon_momentum, ns_steps=ns_steps,
                compile=compile, coeffs=muon_coeffs, normuon=muon_normuon,
                weight_decay=muon_weight_decay)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return adam, muon


def set_lr(optimizers, multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * multiplier
