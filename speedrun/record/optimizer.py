"""NorMuon + Adam of record #89, over the model's labelled parameters (one label per parameter).

NorMuon (the three weight banks): Nesterov momentum in fp32, Polar Express orthogonalisation in
bf16 (five quintic steps; X^T X for tall matrices, X X^T otherwise), NorMuon's per-neuron
normalisation with an EMA of the mean squares (beta2 0.9), then a cautious decoupled weight
decay (only where the update and the weight agree in sign) and the step, applied to an fp32
value assembled from the bf16 weight and a 16-bit mantissa kept in the optimizer state: the
weights are bf16 for the forward and exact fp32 for the optimizer. Every matrix of a bank is
orthogonalised on its own (Q and K per head pair, V and O per layer, each MLP matrix); the
learning rate is scaled by sqrt(max(1, rows/cols)), and the MLP down projections get twice
that.

Adam (everything else): fp32 moments, bias correction with eps outside it, cautious weight decay
scaled by lr^2, per-label betas and lr / weight-decay multipliers (ADAM_TABLE). Adam steps on odd
steps only; on even steps its gradients are kept and summed with the next step's.

Tying: until `untie()` the embedding is the head's transpose. On an Adam step the embedding's
gradient is added (transposed) to the head's, the head is updated, and its transpose copied into
the embedding. `untie()` (at the schedule's untie step, after that step's update) gives the
embedding the head's Adam moments, transposed, and its step count.

All arithmetic follows the record's `NorMuonAndAdam` operation by operation (per-step scalars are
0-d CPU tensors, so the compiled updates never recompile); benchmarks/reference.py compares the
updates of the two on the same gradients.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

MUON_LABELS = ("qk_bank", "vo_bank", "mlp_bank")
# label -> (beta1, beta2, lr multiplier, weight-decay multiplier)
ADAM_TABLE = {
    "scalars": (0.9, 0.99, 5.0, 0.0),
    "smear_gate": (0.9, 0.99, 0.01, 0.0),
    "ve_gate_bank": (0.9, 0.99, 1.0, 1.0),
    "lm_head": (0.5, 0.95, 1.0, 150.0),
    "bigram_embed": (0.75, 0.95, 75.0, 5.0),
    "post_lambdas": (0.9, 0.95, 1.0, 0.0),
    "resid_lambdas": (0.9, 0.95, 5.0, 0.0),
    "value_embeds": (0.75, 0.95, 75.0, 5.0),
    "embed": (0.5, 0.95, 1.0, 150.0),
    "mudd_w1": (0.9, 0.99, 0.25, 1.0),
    "mudd_w2": (0.9, 0.99, 0.25, 1.0),
    "mudd_b2": (0.9, 0.99, 0.25, 0.0),
    "mudd_gate_w1": (0.9, 0.99, 0.1, 1.0),
    "mudd_gate_w2": (0.9, 0.99, 0.1, 1.0),
    "mudd_gate_b2": (0.9, 0.99, 0.1, 0.0),
    "_mudd_gate_scale": (0.9, 0.99, 0.1, 0.0),
}
# Polar Express (Amsel et al. 2025, arXiv:2505.16932), computed for 5 iterations, safety factor
# 2e-2, cushion 2 (the record's `polar_express_coeffs`)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MLP_DOWN_LR = 2.0   # extra lr multiplier of the MLP down projections (odd matrices of mlp_bank)


@dataclasses.dataclass
class Hyper:
    muon_lr: float = 0.023
    muon_beta2: float = 0.9
    muon_weight_decay: float = 1.2
    adam_lr: float = 0.008
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.005


def label(name: str) -> str:
    return name.replace(".weight", "")


# ----------------------------------------------------------------------------- the math

def polar_express(grad: Tensor, momentum_buffer: Tensor, momentum: Tensor) -> Tensor:
    """Nesterov momentum (fp32, in place on `grad` and the buffer), then the orthogonalised
    update in bf16. grad [N, rows, cols] fp32."""
    m = momentum.to(grad.dtype)
    momentum_buffer.lerp_(grad, 1 - m)
    g = grad.lerp_(momentum_buffer, m)
    X = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)
    X = X.contiguous()
    split = g.size(-2) > 1024     # the record splits a*X + X@B in two for the large MLP matrices
    for a, b, c in POLAR_EXPRESS:
        if tall:
            A = X.mT @ X
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            if split:
                C = torch.bmm(X, B)
                C.add_(X, alpha=a)
            else:
                C = torch.baddbmm(X, X, B, beta=a)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            if split:
                C = torch.bmm(B, X)
                C.add_(X, alpha=a)
            else:
                C = torch.baddbmm(X, B, X, beta=a)
        X = C
    return X


def normuon(v: Tensor, second: Tensor, beta2: float) -> Tensor:
    """NorMuon's normalisation: divide by the root of an EMA of the mean square along the larger
    dim, keeping each matrix's Frobenius norm. v bf16 [N, rows, cols]; second fp32, in place."""
    red = -1 if v.size(-2) >= v.size(-1) else -2
    v_mean = v.float().square().mean(dim=red, keepdim=True)
    n = v.size(red)
    v_norm = v_mean.sum(dim=(-2, -1), keepdim=True).mul_(n).sqrt_()
    second.lerp_(v_mean.to(dtype=second.dtype), 1 - beta2)
    step = second.clamp_min(1e-10).rsqrt_()
    scaled_sq_sum = (v_mean * n) * step.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt_()
    scale = step * (v_norm / v_norm_new.clamp_min_(1e-10))
    return v.mul_(scale.type_as(v))


def cautious_step(p16: Tensor, mantissa: Tensor, update: Tensor, wd: Tensor, lr: Tensor, lr_mults: Tensor) -> None:
    """p <- p - p * [update * p >= 0] * wd * lr - update * lr on the fp32 value (bf16 weight,
    viewed as uint16, << 16 | mantissa); writes both halves back. lr_mults: per-matrix powers of
    two (exact in fp32), [N, 1, 1]."""
    update = update.float()
    wd, lr = wd.to(torch.float32), lr.to(torch.float32) * lr_mults
    raw = (p16.to(torch.int32) << 16) | mantissa.to(torch.int32)
    p = raw.view(torch.float32)
    mask = (update * p) >= 0
    new = (p - (p * mask * wd * lr) - (update * lr)).view(torch.int32)
    p16.copy_(((new >> 16) & 0xFFFF).to(torch.uint16))
    mantissa.copy_((new & 0xFFFF).to(torch.uint16))


def adam_step(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: Tensor, one_m_beta1: Tensor,
              beta2: Tensor, one_m_beta2: Tensor, eps: Tensor, step_size: Tensor, wd: Tensor) -> None:
    """The record's compiled Adam step, written in fp32 with 0-d tensors for every constant (the
    expansions of its add_(alpha=) and addcmul_ in the same order), so that one graph serves
    every label."""
    gf = g.float()
    exp_avg.mul_(beta1).add_(one_m_beta1 * gf)
    exp_avg_sq.mul_(beta2).add_(one_m_beta2 * gf * gf)
    update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    mask = (update * p) > 0
    update.add_(wd * p.float() * mask)
    p.add_(other=update, alpha=-1.0)


# ----------------------------------------------------------------------------- the optimizer

class NorMuonAdam:
    def __init__(self, model: nn.Module, hyper: Hyper = Hyper(), compile: bool = False):
        self.h = hyper
        self.params: dict[str, nn.Parameter] = {}
        for name, p in model.named_parameters():
            lab = label(name)
            if lab not in MUON_LABELS and lab not in ADAM_TABLE:
                raise ValueError(f"parameter {name} has no optimizer entry")
            self.params[lab] = p
        self.shapes = {lab: self._muon_shape(lab, p) for lab, p in self.params.items() if lab in MUON_LABELS}
        self.state: dict[str, dict] = {}
        for lab, p in self.params.items():
            if lab in MUON_LABELS:
                shape = self.shapes[lab]
                second = (*shape[:-1], 1) if shape[-2] >= shape[-1] else (*shape[:-2], 1, shape[-1])
                self.state[lab] = {
                    "momentum_buffer": torch.zeros(shape, dtype=torch.float32, device=p.device),
                    "second_momentum_buffer": torch.zeros(second, dtype=torch.float32, device=p.device),
                    "mantissa": torch.zeros(shape, dtype=torch.uint16, device=p.device),
                }
            else:
                self.state[lab] = {"step": 0,
                                   "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                   "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        self.tied = "embed" in self.params and "lm_head" in self.params
        cpu = dict(dtype=torch.float32, device="cpu")
        self._t = {k: torch.zeros((), **cpu) for k in ("momentum", "wd", "lr", "step_size", "adam_wd")}
        fn = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compile else (lambda f: f)
        self._polar, self._normuon, self._cautious = fn(polar_express), fn(normuon), fn(cautious_step)
        self._adam = torch.compile(adam_step, dynamic=True, fullgraph=True) if compile else adam_step
        self._mults: dict[str, Tensor] = {}
        self._consts: dict[tuple, tuple[Tensor, ...]] = {}

    @staticmethod
    def _muon_shape(lab: str, p: Tensor) -> tuple[int, ...]:
        if lab == "mlp_bank":                       # [layers, 2, hidden, dim] -> [2 * layers, hidden, dim]
            return (p.size(0) * p.size(1), *p.shape[2:])
        return tuple(p.shape)

    def lr_multipliers(self, lab: str) -> list[float]:
        """Per-matrix lr multipliers of a Muon bank (shape rule, then the MLP down projections)."""
        rows, cols = self.shapes[lab][-2:]
        shape_mult = max(1.0, rows / cols) ** 0.5
        n = self.shapes[lab][0]
        if lab == "mlp_bank":
            return [shape_mult * (MLP_DOWN_LR if j % 2 == 1 else 1.0) for j in range(n)]
        return [shape_mult] * n

    @torch.no_grad()
    def step(self, lr: float, momentum: float, adam: bool) -> None:
        """One update at learning-rate multiplier `lr` (schedule.lr) and Muon momentum."""
        h = self.h
        if adam and self.tied and self.params["embed"].grad is not None and self.params["lm_head"].grad is not None:
            self.params["lm_head"].grad.add_(self.params["embed"].grad.t())
        for lab, p in self.params.items():
            if p.grad is None:
                continue
            if lab in MUON_LABELS:
                self._muon(lab, p, h.muon_lr * lr, momentum)
            elif adam and not (lab == "embed" and self.tied):
                self._adam_update(lab, p, h.adam_lr * lr)
        if adam and self.tied:
            self.params["embed"].data.copy_(self.params["lm_head"].data.t())
        for lab, p in self.params.items():
            if lab in MUON_LABELS or adam:
                p.grad = None

    def pending_grads(self) -> dict[str, Tensor]:
        """Gradients carried into the next step: Adam's labels after an even (Muon-only) step sum
        two steps' gradients, so a checkpoint taken between them must keep the first."""
        return {lab: p.grad.detach().cpu().clone() for lab, p in self.params.items() if p.grad is not None}

    def load_pending_grads(self, grads: dict[str, Tensor]) -> None:
        for lab, p in self.params.items():
            p.grad = grads[lab].to(p.device, p.dtype) if lab in grads else None

    def _muon(self, lab: str, p: Tensor, lr: float, momentum: float) -> None:
        st, shape = self.state[lab], self.shapes[lab]
        self._t["momentum"].fill_(momentum)
        self._t["wd"].fill_(self.h.muon_weight_decay * lr)   # the record's wd_mul (1.0) * wd * lr
        self._t["lr"].fill_(lr)
        v = self._polar(p.grad.view(shape).float(), st["momentum_buffer"], self._t["momentum"])
        v = self._normuon(v, st["second_momentum_buffer"], self.h.muon_beta2)
        mults = self._mults.get(lab)
        if mults is None:
            mults = torch.tensor(self.lr_multipliers(lab), dtype=torch.float32, device=p.device)
            self._mults[lab] = mults = mults.view(-1, *[1] * (len(shape) - 1))
        self._cautious(p.data.view(shape).view(torch.uint16), st["mantissa"], v, self._t["wd"], self._t["lr"], mults)

    def _adam_update(self, lab: str, p: Tensor, base_lr: float) -> None:
        beta1, beta2, lr_mul, wd_mul = ADAM_TABLE[lab]
        st = self.state[lab]
        lr = base_lr * lr_mul
        st["step"] += 1
        t = st["step"]
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        self._t["step_size"].fill_(lr * (bias2 ** 0.5 / bias1))
        self._t["adam_wd"].fill_(lr * lr * self.h.adam_weight_decay * wd_mul)
        consts = self._consts.get((beta1, beta2))
        if consts is None:   # fp32 of the record's Python constants (1 - beta computed in fp64)
            consts = self._consts[(beta1, beta2)] = tuple(
                torch.tensor(v, dtype=torch.float32) for v in (beta1, 1 - beta1, beta2, 1 - beta2, self.h.adam_eps))
        self._adam(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], *consts, self._t["step_size"], self._t["adam_wd"])

    def untie(self) -> None:
        """Give the embedding the head's Adam state, transposed; from now on they train apart."""
        head, emb = self.state["lm_head"], self.state["embed"]
        emb["step"] = head["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            emb[key].copy_(head[key].t())
        self.tied = False

    def reset_muon(self) -> None:
        for lab in MUON_LABELS:
            if lab in self.state:
                for t in self.state[lab].values():
                    t.zero_()

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"tied": self.tied, "state": {lab: dict(st) for lab, st in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.tied = bool(sd["tied"])
        for lab, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    self.state[lab][k].copy_(v)
                else:
                    self.state[lab][k] = v
