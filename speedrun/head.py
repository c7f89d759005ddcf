"""Output head fused with the soft-capped cross-entropy: one Triton kernel over the logits.

The unfused head (matmul, float32 cast, tanh cap, log-softmax, NLL; then the same again in
backward) reads and writes the [tokens, 50304] logits several times and spends most of its
time in accurate libdevice tanh. Here one kernel per row computes the loss AND the gradient
w.r.t. the raw logits in the forward pass, writing the gradient over the logits in place, so
backward is just the two matmuls that the unfused head runs too.

Why no running max: the capped logits lie in [-cap, cap], so sum(exp(c - cap)) cannot
overflow or lose the largest terms for any cap this recipe uses (checked at <= 60).

Multi-token prediction (`softcap_mtp_loss`) scores the same logits against up to 4 targets per row
(the next token and the ones after it): one log-sum-exp serves all of them, so the extra targets
cost a few compares per logit, not another head.

`fast_tanh=True` uses the GPU's tanh.approx instruction in the training pass: one instruction
instead of an exp and a division, with an error far below bf16's rounding (gradients stay close
to the reference; gpu_checks.check_head measures how close).

Optional FP8 (`fp8=True`, Hopper/Ada): all three head matmuls use `torch._scaled_mm` with e4m3
activations and weights (per-tensor scales from the current amax, a tiny reduction over x and W)
and an e5m2 gradient with a static power-of-two scale (its entries lie in [-1, 1]). FP8 tensor
cores take K-major operands only, so the kernel writes the e5m2 gradient twice: [tokens, vocab]
for the input gradient, inside the bf16 logits' own storage (no extra memory), and
[vocab, tokens] for the weight gradient.
Training only: a loss without gradients (validation) always takes the bf16 head, so reported
losses carry no FP8 rounding.
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from .fp8 import E4M3_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below is used
    triton = None

MAX_CAP = 60.0
GRAD_FP8_SCALE = 2.0 ** 14   # e5m2 holds up to 57344: [-1, 1] * 2^14 keeps tiny probabilities normal


def reference_softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Plain PyTorch: mean over rows of CE(cap * tanh(x @ W^T / cap), targets)."""
    logits = F.linear(x, weight.type_as(x)).float()
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets.long())


class _CpuSoftcapCrossEntropy(torch.autograd.Function):
    """The reference's numbers in about half its CPU time (the cpu-tiny profile and the tests spend
    most of theirs in this 50304-wide head): in-place tanh and exp, and a hand-written backward
    instead of autograd's chain of divide, tanh, multiply and log-softmax, each a pass over
    [tokens, vocab]. exp needs no max subtraction: |logits| <= cap <= MAX_CAP."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
        t = F.linear(x, weight.type_as(x)).float().mul_(1.0 / cap).tanh_()   # logits = cap * t
        tgt = targets.long()[:, None]
        e = torch.mul(t, cap).exp_()
        s = e.sum(-1, keepdim=True)
        ctx.save_for_backward(x, weight, tgt, t, e, s)
        return (s.log() - cap * t.gather(1, tgt)).mean()

    @staticmethod
    def loss_only(x: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
        """The forward without autograd (validation): one [tokens, vocab] buffer, all in place."""
        t = F.linear(x, weight.type_as(x)).float().mul_(1.0 / cap).tanh_()
        target_logit = cap * t.gather(1, targets.long()[:, None])
        return (t.mul_(cap).exp_().sum(-1, keepdim=True).log_() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # the saved buffers become the gradient in place: a second backward (retain_graph) would
        # read softmax where exp was
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the CPU soft-capped cross-entropy supports one backward per forward")
        ctx.consumed = True
        x, weight, tgt, t, e, s = ctx.saved_tensors
        grad = e.div_(s)                                                 # softmax
        grad.scatter_add_(1, tgt, grad.new_full(tgt.shape, -1.0))        # minus the one-hot target
        grad.mul_(t.square_().neg_().add_(1)).mul_(grad_out / x.size(0))  # d cap*tanh(z/cap) / dz
        grad = grad.to(x.dtype)
        return grad @ weight.type_as(x), (grad.t() @ x).to(weight.dtype), None, None


def reference_mtp_loss(x: Tensor, weight: Tensor, targets: Tensor, weights: Tensor,
                       cap: float) -> tuple[Tensor, Tensor]:
    """Plain PyTorch `softcap_mtp_loss`: (mean_rows sum_k w_k CE_k, mean_rows CE_0); -1 = no target."""
    logits = F.linear(x, weight.type_as(x)).float()
    logits = cap * torch.tanh(logits / cap)
    ce = torch.stack([F.cross_entropy(logits, targets[:, k].long(), ignore_index=-1, reduction="none")
                      for k in range(targets.size(1))])
    return (weights.float()[:, None] * ce).sum(0).mean(), ce[0].mean().detach()


if triton is not None:
    @triton.jit
    def _tanh(x, FAST: tl.constexpr):
        if FAST:  # one SFU instruction (max rel. error ~2^-11, below bf16's 2^-8 rounding)
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:     # exact to fp32 rounding, via one exp and one division (also runs interpreted)
            return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _softcap_ce_kernel(logits_ptr, grad_ptr, grad2_ptr, targets_ptr, weights_ptr, loss_ptr, ce_ptr,
                           N, V, grad_stride, cap, grad_scale, grad2_scale, N_TGT: tl.constexpr,
                           WITH_GRAD: tl.constexpr, WITH_GRAD2: tl.constexpr, GRAD2_T: tl.constexpr,
                           FAST_TANH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """ROWS rows per program. Pass 1: log-sum-exp and the loss; pass 2 (WITH_GRAD): the
        gradient w.r.t. the raw logits, written as grad * grad_scale into grad_ptr ([N, V] in its
        dtype, rows grad_stride apart) and, WITH_GRAD2, as grad * grad2_scale into grad2_ptr:
        [N, V], or [V, N] when GRAD2_T (a transposed tile per store: ROWS contiguous entries per
        vocabulary column).

        grad_ptr may alias the logits: in place in bf16, or an e5m2 gradient in the first half of
        each row's own bf16 storage (grad_stride = 2V). A store then only overwrites logits of
        this row that the loop has already read, except in the first tile, hence the barrier
        between each tile's loads and stores."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        base = logits_ptr + rows[:, None] * V
        inv_cap = 1.0 / cap
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            t = _tanh(z * inv_cap, FAST_TANH)
            acc += tl.where(ok, tl.exp(cap * t - cap), 0.0)
        lse = cap + tl.log(tl.sum(acc, axis=1))
        # targets k = 0 .. N_TGT-1: the next token, the one after, ...; -1 = none (past the end)
        loss = tl.zeros([ROWS], dtype=tl.float32)
        w_sum = tl.zeros([ROWS], dtype=tl.float32)
        for k in tl.static_range(N_TGT):
            tgt = tl.load(targets_ptr + rows * N_TGT + k, mask=row_ok, other=-1)
            w = tl.where(tgt >= 0, tl.load(weights_ptr + k), 0.0)
            zt = tl.load(logits_ptr + rows * V + tl.where(tgt >= 0, tgt, 0), mask=row_ok).to(tl.float32)
            ce = lse - cap * _tanh(zt * inv_cap, FAST_TANH)
            loss += w * ce
            w_sum += w
            if k == 0:
                tl.store(ce_ptr + rows, ce, mask=row_ok)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if WITH_GRAD:
            # d loss / d z = (sum_k w_k * softmax(c) - sum_k w_k * onehot_k) * (1 - t^2)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = row_ok[:, None] & (cols[None, :] < V)
                z = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                t = _tanh(z * inv_cap, FAST_TANH)
                hit = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
                for k in tl.static_range(N_TGT):
                    tgt = tl.load(targets_ptr + rows * N_TGT + k, mask=row_ok, other=-1)
                    w = tl.where(tgt >= 0, tl.load(weights_ptr + k), 0.0)
                    hit += tl.where(cols[None, :] == tgt[:, None], w[:, None], 0.0)
                g = (w_sum[:, None] * tl.exp(cap * t - lse[:, None]) - hit) * (1.0 - t * t)
                tl.debug_barrier()   # every thread's loads of this tile are done before any store
                tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :],
                         (g * grad_scale).to(grad_ptr.dtype.element_ty), mask=ok)
                if WITH_GRAD2:
                    g2 = g * grad2_scale
                    if GRAD2_T:
                        # int64: vocab x tokens passes 2^31 at ~42.7k tokens per micro-batch
                        tl.store(grad2_ptr + cols.to(tl.int64)[:, None] * N + rows[None, :],
                                 tl.trans(g2).to(grad2_ptr.dtype.element_ty), mask=tl.trans(ok))
                    else:
                        tl.store(grad2_ptr + rows[:, None] * V + cols[None, :],
                                 g2.to(grad2_ptr.dtype.element_ty), mask=ok)


def _fp8(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor e4m3 cast scaled by the current amax; returns (fp8 tensor, dequant scale)."""
    # the max-norm is the amax in one reduction, without abs()'s full-size temporary
    scale = (torch.linalg.vector_norm(t, ord=float("inf")).float() / E4M3_MAX).clamp_min(1e-12)
    return (t / scale).to(torch.float8_e4m3fn), scale


_weight_cast: list = [None]   # (weakref to the weight, its version, (w8, w8 column-major, scale))


def _forget_weight_cast(*_args) -> None:
    _weight_cast[0] = None


# Any optimizer step may have changed the weight; fused Adam writes it in place WITHOUT bumping
# its version counter (checked on torch 2.13), so the version alone cannot tell.
register_optimizer_step_post_hook(_forget_weight_cast)


def _fp8_weight(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The head weight's e4m3 cast, row- and column-major, and its scale, made once per optimizer
    step rather than once per micro-batch (a pass over the 50304 x 768 weight each). The cast is
    forgotten after any optimizer step, and when the weight's version counter moves (a checkpoint
    load or any other in-place write); the weak reference keeps a new tensor at a recycled
    address from matching."""
    hit = _weight_cast[0]
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    w8, sw = _fp8(weight.detach())
    casts = (w8, _col_major(w8), sw)
    _weight_cast[0] = (weakref.ref(weight), weight._version, casts)
    return casts


def _col_major(t: Tensor) -> Tensor:
    """Same values, column-major storage: the layout _scaled_mm wants for its second operand."""
    return t.t().contiguous().t()


# (rows, columns, warps) per tile of the CE kernel: one row per program keeps each load a long
# contiguous run; writing the transposed gradient needs several rows per program, so that each
# vocabulary column of a tile is stored as one run of ROWS bytes (far faster than a transposing
# copy after the kernel). The tiles are the fastest of the H100 sweeps (benchmarks/results)
ROW_TILE, TRANSPOSE_TILE = (1, 2048, 8), (64, 128, 16)


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, cap: float, fp8: bool,
                fast_tanh: bool) -> tuple[Tensor, Tensor]:
        N, V = x.size(0), weight.size(0)
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # validation/evaluation losses are always the bf16 head's with the exact tanh
        fp8 = fp8 and with_grad
        fast_tanh = fast_tanh and with_grad and x.is_cuda   # inline PTX: not in the interpreter
        if fp8:
            x8, sx = _fp8(x)
            w8, w8_cm, sw = _fp8_weight(weight)   # straight from the fp32 master weight
            logits = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)
        else:
            w = weight.to(x.dtype)
            logits = x @ w.t()
        # where the kernel writes the gradient: over the logits (bf16, mean-scaled), or as e5m2
        # into the first half of each logits row (rows 2V bytes apart) plus a transposed copy [V, N]
        # for the weight gradient (FP8 tensor cores take K-major operands only)
        grad, grad_scale, grad2, (rows, cols, warps) = logits, 1.0 / N, None, ROW_TILE
        if fp8:
            grad = logits.view(torch.float8_e5m2)[:, :V]
            grad_scale, grad2 = GRAD_FP8_SCALE, logits.new_empty((V, N), dtype=torch.float8_e5m2)
            rows, cols, warps = TRANSPOSE_TILE
        objective = torch.empty(N, device=x.device, dtype=torch.float32)
        next_ce = torch.empty(N, device=x.device, dtype=torch.float32)
        _softcap_ce_kernel[(triton.cdiv(N, rows),)](
            logits, grad, logits if grad2 is None else grad2, targets, weights, objective, next_ce,
            N, V, grad.stride(0), cap, grad_scale, GRAD_FP8_SCALE, N_TGT=targets.size(1),
            WITH_GRAD=with_grad, WITH_GRAD2=grad2 is not None, GRAD2_T=fp8, FAST_TANH=fast_tanh,
            ROWS=rows, BLOCK=cols, num_warps=warps)
        if with_grad:
            if not fp8:
                ctx.save_for_backward(x, w, logits)
            else:   # operands in the layouts _scaled_mm takes, made once here
                ctx.save_for_backward(_col_major(x8), sx, grad, grad2, w8_cm, sw)
            ctx.fp8, ctx.n, ctx.x_dtype = fp8, N, x.dtype
        next_ce = next_ce.mean()
        ctx.mark_non_differentiable(next_ce)
        return objective.mean(), next_ce

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_next_ce: Tensor):
        if not ctx.fp8:
            x, w, grad = ctx.saved_tensors
            grad_x, grad_w = grad @ w, (grad.t() @ x).float()
        else:
            x8_cm, sx, grad8, grad8_t, w8_cm, sw = ctx.saved_tensors
            inv = torch.full((), 1.0 / (GRAD_FP8_SCALE * ctx.n), device=x8_cm.device)
            grad_x = torch._scaled_mm(grad8, w8_cm, scale_a=inv, scale_b=sw, out_dtype=ctx.x_dtype)
            grad_w = torch._scaled_mm(grad8_t, x8_cm, scale_a=inv, scale_b=sx, out_dtype=torch.float32)
        return grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out, None, None, None, None, None


def fused_available(x: Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _fused(x: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, cap: float, fp8: bool,
           fast_tanh: bool) -> tuple[Tensor, Tensor]:
    return _SoftcapCrossEntropy.apply(x.contiguous(), weight, targets.contiguous(), weights.float().contiguous(),
                                      cap, fp8, fast_tanh)


if triton is not None:   # a hand-written kernel: a surrounding torch.compile leaves it as is
    # (only where the kernel can run: torch.compiler pulls in dynamo, seconds of CPU-only imports)
    _fused = torch.compiler.disable(_fused)


@functools.cache
def _unit_weight(device: torch.device) -> Tensor:
    """The weight [1.0] of plain next-token CE, made once per device (no kernel launch per call)."""
    return torch.ones(1, device=device)


def mtp_targets(targets: Tensor, n: int) -> Tensor:
    """Next-token targets [N] -> [N, n]: column k holds the token k+1 places further on, -1 past
    the end of the sequence. Document borders are not masked (modded-nanogpt does not either:
    the few targets across a border are hard to predict, nothing more)."""
    if n == 1:
        return targets[:, None]
    ext = torch.cat([targets, targets.new_full((n - 1,), -1)])
    return ext.unfold(0, n, 1)


def softcap_mtp_loss(x: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, cap: float,
                     fused: bool = True, fp8: bool = False, fast_tanh: bool = False) -> tuple[Tensor, Tensor]:
    """Multi-token prediction through the one head: (objective, next-token CE), both row means.

    targets [N, K] from `mtp_targets`, weights [K] (a device tensor, so per-step values never
    recompile anything). objective = sum_k weights[k] * CE(logits, targets[:, k]): one logit
    matrix and one log-sum-exp serve every k, so extra targets cost almost nothing. The
    next-token CE (k = 0) is what validation measures; it carries no gradient.
    """
    if not (fused and fused_available(x)) or cap > MAX_CAP:
        return reference_mtp_loss(x, weight, targets, weights, cap)
    return _fused(x, weight, targets, weights, float(cap), fp8, fast_tanh)


def softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, cap: float,
                          fused: bool = True, fp8: bool = False, fast_tanh: bool = False) -> Tensor:
    """Mean soft-capped cross-entropy of the head `weight` [vocab, dim] on states x [tokens, dim].

    Uses the fused Triton kernel where it can run (CUDA, or Triton's CPU interpreter in tests)
    and the plain PyTorch reference elsewhere; `fp8` needs a GPU with FP8 tensor cores.
    `fast_tanh`: the training pass uses the GPU's approximate tanh instruction (losses without
    gradients keep the exact one).
    """
    if not (fused and fused_available(x)) or cap > MAX_CAP:
        if x.device.type == "cpu" and cap <= MAX_CAP:
            if torch.is_grad_enabled():
                return _CpuSoftcapCrossEntropy.apply(x, weight, targets, cap)
            return _CpuSoftcapCrossEntropy.loss_only(x, weight, targets, cap)
        return reference_softcap_cross_entropy(x, weight, targets, cap)
    return _fused(x, weight, targets[:, None], _unit_weight(x.device), float(cap), fp8, fast_tanh)[0]
