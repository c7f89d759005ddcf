"""Head and loss of record #89.

Logits are rescaled, not soft-capped: z = 23 * sigmoid((u + 5) / 7.5) for the raw logit u, so
every z lies in (0, 23).

Training objective per position t (the record's fused kernel):

    sum_k w_k * CE(z_t, target[t + k])  +  w_p * CE(z_t, prefix(target[t]))

with k = 0, 1, 2 (multi-token prediction; targets past the micro-batch's end are dropped,
document borders are not) and prefix(T) the longest proper prefix of token T's bytes that is a
token itself (-1: none; the term drops). The weights follow the schedule (schedule.py). The
sigmoid is rounded to bf16 before it is scaled, as the record's kernel keeps it in bf16 shared
memory; the gradient's normaliser term uses the sum of all MTP weights (also for the last rows,
whose later targets fall off the micro-batch), as the record's kernel does.

FP8 (training on a GPU, the record's static scales): x / (100/448) and W / (1.6/448) in e4m3,
one fp8 matmul to bf16 logits; the logit gradient is written by the loss kernel in e5m2 with the
scale grad_scale * 0.75/448, and both backward matmuls are fp8 too (the weight gradient in
fp32). The gradient is computed in the forward pass, and both backward matmuls with it, a chunk of
rows at a time (the logits never exist whole), so the objective must be
`losses.sum() * grad_scale` with the `grad_scale` given here (the record's 1/8 per micro-batch).

Validation: bf16 logits, the same rescale, plain next-token cross-entropy, rows in chunks so a
262,144-token evaluation micro-batch never holds its whole logit matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# `from .x import` (not `from . import x`): transformers copies an exported model's modules by
# that pattern, so the exported folder's loss.py finds its kernel module
from .loss_cuda import available as cuda_kernel_available, run as run_cuda_kernel

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs use the PyTorch path
    triton = None

A, B, C = 23.0, 5.0, 7.5          # z = A * sigmoid((u + B) / C)
X_SCALE = 100 / 448               # static FP8 scales of the head's input, weight and gradient
W_SCALE = 1.6 / 448
GRAD_SCALE = 0.75 / 448
EVAL_ROWS = 8192                  # rows of logits per chunk when evaluating


def rescale(u: Tensor) -> Tensor:
    """The logit rescale, written as the record's validation writes it."""
    return A * torch.sigmoid((u + B) / C)


# ----------------------------------------------------------------------------- reference math

def _sigmoid_bf16(u: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmoid fp32, sigmoid rounded to bf16 then fp32) of (u / C + B / C)."""
    inv_c = 1.0 / C
    s = torch.sigmoid(u.float() * inv_c + B * inv_c)
    return s, s.to(torch.bfloat16).float()


def loss_and_logit_grad(u: Tensor, targets: Tensor, mtp_weights: Tensor, prefix_targets: Tensor,
                        prefix_weight: Tensor, grad_mul: float | None) -> tuple[Tensor, Tensor | None]:
    """PyTorch version of the training kernel (CPU, and the kernel's reference in tests).

    u [N, V] logits; targets [N or more] (from u's first row on: the MTP targets of the last rows
    may lie past them); mtp_weights [K]; prefix_targets [N] (-1: none); prefix_weight [1].
    Returns per-row losses [N] fp32 and, unless grad_mul is None, d(loss)/du * grad_mul
    (fp32 [N, V]) where grad_mul = grad_scale (times 1/gradient-scale for FP8). In place where it
    can be: a [tokens, 50304] pass costs tens of milliseconds on a CPU."""
    N, V = u.shape
    inv_c = 1.0 / C
    z = u.to(torch.float32, copy=True).mul_(inv_c).add_(B * inv_c).sigmoid_()   # sigmoid, fp32 (u untouched)
    m = z.amax(dim=1, keepdim=True).mul_(A)                     # the max comes from the unrounded sigmoid
    sb = z.to(torch.bfloat16)                                   # ... the rest from its bf16 rounding
    z.copy_(sb).mul_(A)
    p = z.sub(m).exp_()
    lse = m[:, 0] + p.sum(dim=1).log_()
    losses = torch.zeros(N, dtype=torch.float32, device=u.device)
    targets_k, weights_k = [], []
    for k in range(mtp_weights.numel()):
        tgt = torch.full((N,), -1, dtype=torch.long, device=u.device)
        n = max(0, min(N, targets.numel() - k))
        tgt[:n] = targets[k:k + n]
        ok = (tgt >= 0) & (tgt < V)
        w = torch.where(ok, mtp_weights[k].float(), 0.0)
        losses += w * (lse - z.gather(1, tgt.clamp(0, V - 1)[:, None])[:, 0])
        targets_k.append(tgt.clamp(0, V - 1))
        weights_k.append(w)
    pok = (prefix_targets >= 0) & (prefix_targets < V)
    pw = torch.where(pok, prefix_weight.float().reshape(()), 0.0)
    losses += pw * (lse - z.gather(1, prefix_targets.clamp(0, V - 1)[:, None])[:, 0])
    if grad_mul is None:
        return losses, None
    s_w = mtp_weights.float().sum() + pw
    g = p.mul_((s_w * torch.exp(m[:, 0] - lse))[:, None])        # s_w * softmax
    for tgt, w in zip(targets_k + [prefix_targets.clamp(0, V - 1)], weights_k + [pw]):
        g.scatter_add_(1, tgt[:, None], -w[:, None])
    sf = sb.float()
    return losses, g.mul_(grad_mul * (A / C)).mul_(sf).mul_(sf.neg_().add_(1.0))


# ----------------------------------------------------------------------------- GPU kernel

if triton is not None:
    @triton.jit
    def _sigmoid(x, FAST: tl.constexpr):
        if FAST:   # 0.5 + 0.5 tanh(x / 2) with the tanh.approx instruction, as the record's kernel
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return 0.5 + t * 0.5
        else:
            return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _round_bf16(x):
        """x rounded to the nearest bf16 (ties to even), as fp32: integer ops, so the result is
        the same in Triton's interpreter (whose bf16 casts do not round to nearest) and on GPUs."""
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _rescale(u, inv_c, b_div_c, FAST: tl.constexpr, EXACT_ROUND: tl.constexpr):
        s = _sigmoid(u * inv_c + b_div_c, FAST)
        if EXACT_ROUND:   # Triton's interpreter: its bf16 casts do not round to nearest
            return s, _round_bf16(s)
        else:             # one cvt.rn.bf16.f32 on a GPU, the same value
            return s, s.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _target_terms(logits_row, targets_ptr, mtp_ptr, prefix_ptr, prefix_w_ptr, row, N, V: tl.constexpr,
                      inv_c, b_div_c, FAST: tl.constexpr, EXACT_ROUND: tl.constexpr, J: tl.constexpr,
                      N_PRED: tl.constexpr):
        """Prediction J of a row (J < N_PRED: the token J ahead; J == N_PRED: the prefix target):
        (its column, whether it counts, its weight, its rescaled bf16 sigmoid)."""
        if J < N_PRED:
            tgt = tl.load(targets_ptr + row + J, mask=row + J < N, other=-1)
            w = tl.load(mtp_ptr + J)
        else:
            tgt = tl.load(prefix_ptr + row)
            w = tl.load(prefix_w_ptr)
        ok = (tgt >= 0) & (tgt < V)
        tgt = tl.where(ok, tgt, 0)
        _, sb = _rescale(tl.load(logits_row + tgt).to(tl.float32), inv_c, b_div_c, FAST, EXACT_ROUND)
        return tgt, ok, w, sb

    @triton.jit
    def _loss_kernel(logits_ptr, grad_ptr, targets_ptr, mtp_ptr, prefix_ptr, prefix_w_ptr, loss_ptr,
                     N, V: tl.constexpr, inv_c, b_div_c, a, coef, N_PRED: tl.constexpr,
                     WITH_GRAD: tl.constexpr, FAST: tl.constexpr, EXACT_ROUND: tl.constexpr,
                     BLOCK: tl.constexpr):
        """One row of logits per program, two passes over it: the sum of exp and the loss terms,
        then the logit gradient (scaled by `coef`, stored in grad_ptr's dtype: e5m2 or bf16).
        `targets` has N entries from this block's first row on (the MTP targets of its last rows
        lie past it).

        Every rescaled logit lies in (0, a), so exp(z - a) is in (e^-a, 1]: a fixed shift by the
        bound `a` replaces the row maximum and its pass (the record's kernel shifts by the row
        maximum; the log-sum-exp is the same up to fp32 rounding). The second pass writes the
        softmax part only; the target columns (at most N_PRED + 1) are written after it, as the
        record's kernel does, instead of a comparison per logit."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * V
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            s, sb = _rescale(tl.load(base + cols, mask=ok, other=0.0).to(tl.float32), inv_c, b_div_c,
                             FAST, EXACT_ROUND)
            acc += tl.where(ok, tl.exp(a * sb - a), 0.0)
        lse = a + tl.log(tl.sum(acc, axis=0))
        loss = 0.0
        s_w = 0.0
        for j in tl.static_range(N_PRED + 1):
            tgt, ok_j, w, sbt = _target_terms(base, targets_ptr, mtp_ptr, prefix_ptr, prefix_w_ptr, row, N, V,
                                              inv_c, b_div_c, FAST, EXACT_ROUND, j, N_PRED)
            loss += tl.where(ok_j, w * (lse - a * sbt), 0.0)
            if j < N_PRED:   # the normaliser counts every MTP weight, the prefix only where it exists
                s_w += w
            else:
                s_w += tl.where(ok_j, w, 0.0)
        tl.store(loss_ptr + row, loss)
        if WITH_GRAD:
            gbase = grad_ptr + row * V
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = cols < V
                s, sb = _rescale(tl.load(base + cols, mask=ok, other=0.0).to(tl.float32), inv_c, b_div_c,
                                 FAST, EXACT_ROUND)
                g = coef * s_w * tl.exp(a * sb - lse) * sb * (1.0 - sb)
                tl.store(gbase + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)
            tl.debug_barrier()   # the whole row is stored before its target columns are rewritten
            for j in tl.static_range(N_PRED + 1):
                tgt, ok_j, w, sbt = _target_terms(base, targets_ptr, mtp_ptr, prefix_ptr, prefix_w_ptr, row, N,
                                                  V, inv_c, b_div_c, FAST, EXACT_ROUND, j, N_PRED)
                hit = 0.0   # every prediction of this row whose target is this column
                for i in tl.static_range(N_PRED + 1):
                    tgt_i, ok_i, w_i, _ = _target_terms(base, targets_ptr, mtp_ptr, prefix_ptr, prefix_w_ptr,
                                                        row, N, V, inv_c, b_div_c, FAST, EXACT_ROUND, i, N_PRED)
                    hit += tl.where(ok_i & (tgt_i == tgt), w_i, 0.0)
                g = coef * (s_w * tl.exp(a * sbt - lse) - hit) * sbt * (1.0 - sbt)
                tl.store(gbase + tgt, g.to(grad_ptr.dtype.element_ty), mask=ok_j)


if triton is not None:
    @triton.jit
    def _transpose_kernel(src_ptr, dst_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dst [N, M] = src [M, N].T, both row-major: a tile read along src's rows and written
        along dst's rows, so both sides are coalesced."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        ok = (rows[:, None] < M) & (cols[None, :] < N)
        tile = tl.load(src_ptr + rows[:, None] * N + cols[None, :], mask=ok)
        tl.store(dst_ptr + cols[:, None] * M + rows[None, :], tl.trans(tile), mask=tl.trans(ok))


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def transposed(t: Tensor) -> Tensor:
    """t.t().contiguous() of a 2-D tensor. On a GPU a tiled kernel: PyTorch's copy of a transposed
    view writes across rows, uncoalesced, and the e5m2 logit gradient's copy for the weight
    gradient took 124 ms of an 884 ms stage-3 step on an H200. The kernel moves raw bits (an
    integer view of the same width), so any dtype of 1, 2 or 4 bytes goes through it."""
    if not (kernel_available(t) and t.dim() == 2 and t.element_size() in _SAME_SIZE_INT):
        return t.t().contiguous()
    t = t.contiguous()
    M, N = t.shape
    out = torch.empty((N, M), dtype=t.dtype, device=t.device)
    as_int = _SAME_SIZE_INT[t.element_size()]
    _transpose_kernel[(triton.cdiv(M, 64), triton.cdiv(N, 128))](
        t.view(as_int), out.view(as_int), M, N, BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)
    return out


def kernel_available(x: Tensor) -> bool:
    import os
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


# the loss kernel's shape: logits per iteration and warps (gpu_checks' record_head times others)
LOSS_BLOCK, LOSS_WARPS = 2048, 8
# "cuda": loss_cuda's kernel (one read of the logits, the row's sigmoids in shared memory) where it
# can run, else this module's Triton kernel; "triton": always the Triton kernel
LOSS_KERNEL = "cuda"
HEAD_CHUNK_ROWS = 8192     # rows of logits at a time (their gradient in e5m2 beside them): 1.2 GB


def _run_kernel(u: Tensor, targets: Tensor, mtp_weights: Tensor, prefix_targets: Tensor,
                prefix_weight: Tensor, grad: Tensor | None, coef: float, fast: bool) -> Tensor:
    """Losses of u's rows [R]; `targets` holds R entries or more (the MTP targets past the last
    row: a slice of the micro-batch's targets from u's first row on)."""
    rows, V = u.shape
    inv_c = 1.0 / C
    if (LOSS_KERNEL == "cuda" and fast and targets.dtype == prefix_targets.dtype == torch.int64
            and cuda_kernel_available(u, grad)):
        losses = run_cuda_kernel(u, targets, mtp_weights, prefix_targets, prefix_weight, grad, coef, inv_c,
                                 B * inv_c, A)
        if losses is not None:
            return losses
    losses = torch.empty(rows, dtype=torch.float32, device=u.device)
    _loss_kernel[(rows,)](
        u, u if grad is None else grad, targets, mtp_weights, prefix_targets, prefix_weight, losses,
        targets.numel(), V, inv_c, B * inv_c, A, coef, N_PRED=mtp_weights.numel(),
        WITH_GRAD=grad is not None, FAST=fast, EXACT_ROUND=not u.is_cuda, BLOCK=LOSS_BLOCK,
        num_warps=LOSS_WARPS)
    return losses


# ----------------------------------------------------------------------------- autograd

def _col_major(t: Tensor) -> Tensor:
    return transposed(t).t()


def _scalar(v: float, like: Tensor) -> Tensor:
    return torch.full((), v, dtype=torch.float32, device=like.device)


class _TrainLoss(torch.autograd.Function):
    """The head, its loss and both of its gradients, all in the forward pass, HEAD_CHUNK_ROWS rows
    at a time: the logits and their gradient exist for one chunk only (at 16,384 rows they took
    2.5 GB, the largest tensors of a micro-batch). The backward hands over the two gradients."""

    @staticmethod
    def forward(ctx, x, weight, targets, mtp_weights, prefix_targets, prefix_weight, grad_scale, fp8, fast):
        # x [N, D] bf16; weight [D, V] bf16 (the head stores W transposed); returns losses [N]
        use_kernel = kernel_available(x)
        N = x.shape[0]
        if fp8:
            # divided in bf16, then cast, as the record does: rounding to bf16 first moves about 3%
            # of the elements to another e4m3 value than a direct fp32 -> e4m3 cast would
            x_f8 = (x / X_SCALE).to(torch.float8_e4m3fn)
            w_f8 = (weight / W_SCALE).to(torch.float8_e4m3fn)
            w_col = _col_major(w_f8)
            g_scale = grad_scale * GRAD_SCALE
            coef = grad_scale * (1.0 / C * A) * (1.0 / g_scale)
            x_s, w_s, g_s = _scalar(X_SCALE, x), _scalar(W_SCALE, x), _scalar(g_scale, x)
        else:
            g_scale, coef = None, grad_scale * (1.0 / C * A)
        losses, grad_x, grad_w = [], [], None
        for lo in range(0, N, HEAD_CHUNK_ROWS):
            hi = min(N, lo + HEAD_CHUNK_ROWS)
            if fp8:
                u = torch._scaled_mm(x_f8[lo:hi], w_col, scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16,
                                     use_fast_accum=True)
            else:
                u = x[lo:hi] @ weight
            if use_kernel:
                g = torch.empty(u.shape, device=u.device, dtype=torch.float8_e5m2 if fp8 else torch.bfloat16)
                losses.append(_run_kernel(u, targets[lo:], mtp_weights, prefix_targets[lo:hi], prefix_weight,
                                          g, coef, fast))
            else:
                loss, g = loss_and_logit_grad(u, targets[lo:], mtp_weights, prefix_targets[lo:hi], prefix_weight,
                                              grad_scale if not fp8 else grad_scale / g_scale)
                losses.append(loss)
                g = g.to(torch.float8_e5m2 if fp8 else torch.bfloat16)
            del u
            if fp8:
                grad_x.append(torch._scaled_mm(g, w_f8.t(), scale_a=g_s, scale_b=w_s, out_dtype=torch.bfloat16))
                gw = torch._scaled_mm(transposed(x_f8[lo:hi]), _col_major(g), scale_a=x_s, scale_b=g_s,
                                      out_dtype=torch.float32)
            else:
                grad_x.append(g @ weight.t())
                gw = (x[lo:hi].t() @ g).float()
            grad_w = gw if grad_w is None else grad_w.add_(gw)
        ctx.grads = (torch.cat(grad_x) if len(grad_x) > 1 else grad_x[0], grad_w)
        return torch.cat(losses) if len(losses) > 1 else losses[0]

    @staticmethod
    def backward(ctx, _grad_losses):
        # made in forward for the objective losses.sum() * grad_scale
        grad_x, grad_w = ctx.grads
        del ctx.grads
        return grad_x, grad_w, None, None, None, None, None, None, None


def train_losses(x: Tensor, weight: Tensor, targets: Tensor, mtp_weights: Tensor,
                 prefix_targets: Tensor, prefix_weight: Tensor, grad_scale: float,
                 fp8: bool, fast: bool = True) -> Tensor:
    """Per-position training losses [N] (see the module docstring). x [N, D]; weight [D, V]."""
    return _TrainLoss.apply(x.contiguous(), weight, targets.contiguous(), mtp_weights.float().contiguous(),
                            prefix_targets.contiguous(), prefix_weight.float().reshape(1).contiguous(),
                            float(grad_scale), bool(fp8), bool(fast) and x.is_cuda)


if triton is not None:   # a hand-written kernel: a surrounding torch.compile leaves it alone
    train_losses = torch.compiler.disable(train_losses)


def eval_losses(x: Tensor, weight: Tensor, targets: Tensor, rows: int = EVAL_ROWS) -> Tensor:
    """Per-position next-token cross-entropy [N] of the bf16 head, in chunks of `rows` rows."""
    out = []
    for i in range(0, x.size(0), rows):
        z = rescale(x[i:i + rows] @ weight).float()
        out.append(F.cross_entropy(z, targets[i:i + rows], reduction="none"))
    return torch.cat(out)
