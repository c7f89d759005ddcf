"""ReLU^2 MLP, out = relu(x @ W1^T)^2 @ W2^T, with its elementwise work inside two matmul kernels.

Unfused, the [tokens, 4*dim] hidden activation makes extra trips through memory: the up
projection writes `pre`, a pointwise kernel reads it and writes `post`; in backward one matmul
writes d(post), and a pointwise kernel reads it with `pre` to write d(pre) (and recomputes `post`
for the weight gradient). At 32k tokens x 3072 every such trip is 200 MB per layer. Here:

- forward: one Triton kernel computes pre = x @ W1^T and writes only post = relu(pre)^2,
  straight from its fp32 accumulator;
- backward: one Triton kernel computes g @ W2 and writes d(pre) = 2 relu(pre) * (g @ W2),
  reading relu(pre) back as sqrt(post). So `post` is the only activation kept between the passes
  (the same bytes as the `pre` a compiled unfused MLP keeps), and the weight gradient g^T @ post
  uses it as it is. sqrt(post) carries half of post's bf16 rounding error, less than the
  rounded `pre` the unfused MLP differentiates with.

The other four matmuls (post @ W2^T, both weight gradients, dx) stay cuBLAS's. The kernels are
`torch.library` custom ops, so a compiled block treats them as opaque calls (no graph break).
On CPU the ops run the same math in plain PyTorch; under TRITON_INTERPRET=1 (tests) the kernels
run interpreted on CPU tensors. Hopper or newer only: the operands load through TMA.

The fused MLP is faster and smaller than the compiled unfused one (which keeps `post` for
backward as well); the up kernel runs close to the bare cuBLAS matmul, the grad kernel a little
behind it (it reads `post` and writes d(pre), partly hidden behind the matmul). With FP8 operands
(`fp8=True`, train.fp8_mlp) both kernels run faster again. The numbers, on an H100:
benchmarks/results/README.md (gpu-checks-mlp, throughput).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8 import quantize_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain PyTorch path below is used
    triton = None

# Tile shape (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, warp_specialize): the fastest of
# the H100 tile sweeps (benchmarks/results); small tiles for Triton's CPU interpreter (tests)
_HOPPER_TILE = (128, 256, 64, 4, 8, False)
_INTERPRETER_TILE = (32, 32, 16, 1, 4, False)
# the same for the FP8 kernels: FP8 tensor-core instructions take 32 K-elements, twice bf16's
_HOPPER_TILE_FP8 = (128, 256, 128, 4, 8, False)


def reference_mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """The unfused MLP, as the model computed it before (and as exported models compute it)."""
    return F.linear(F.relu(F.linear(x, w1)).square(), w2)


if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _tile_coords(tile, n_m, n_n, GROUP_M: tl.constexpr):
        """Grouped order: GROUP_M row tiles share each B column tile while it sits in L2."""
        group = GROUP_M * n_n
        first_m = (tile // group) * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        return first_m + (tile % group) % size_m, (tile % group) // size_m

    @triton.jit
    def _relu2_epilogue(acc, om, on, saved_ptr, out_ptr, a_scale_ptr, b_scale_ptr, q_ptr, amax_ptr, M, N,
                        BACKWARD: tl.constexpr, SCALED: tl.constexpr, ROUND_DPOST: tl.constexpr,
                        QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # plain stores straight from registers, not TMA stores: those stage through shared memory
        # and wait on it, and the shared memory they free admits a 4th pipeline stage
        rm = (om + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = on + tl.arange(0, BLOCK_N)
        offs = rm[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SCALED:     # FP8 operands: undo the per-row scales of A and of B (one per output column)
            sa = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
            sb = tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
        dtype = out_ptr.dtype.element_ty
        if BACKWARD:   # d pre = 2 relu(pre) * d post, with d post = acc (unrounded unless ROUND_DPOST)
            # relu(pre) = sqrt(post): post is all backward needs, and it is kept already
            if ROUND_DPOST:   # d post rounded to the activation dtype first, as an unfused matmul's output
                acc = acc.to(dtype).to(tl.float32)
            r = tl.sqrt(tl.load(saved_ptr + offs, mask=mask, other=0.0).to(tl.float32))
            tl.store(out_ptr + offs, (2.0 * r * acc).to(dtype), mask=mask)
        elif QUANT:    # the record recipe's FP8 forward (linear_relu2_fp8_quant)
            # pre = bf16(acc * dequant), as _scaled_mm with per-tensor scales (the other one 1) rounds it
            pre = (acc * tl.load(a_scale_ptr)).to(dtype)
            r = tl.maximum(pre.to(tl.float32), 0.0)
            square = r * r
            post = square.to(dtype)
            tl.store(out_ptr + offs, post, mask=mask)
            # the e4m3 copy from the UNROUNDED square, as Inductor's fused kernel for
            # clamp_max(post * (1 / act_scale), 448) computes it (its reciprocal written the same way)
            inv_scale = 1 / tl.load(b_scale_ptr)
            tl.store(q_ptr + offs, tl.minimum(square * inv_scale, 448.0).to(tl.float8e4nv), mask=mask)
            # amax of the bf16 post; post >= 0, so 0 (the buffer's start) is the identity
            tl.atomic_max(amax_ptr, tl.max(tl.max(tl.where(mask, post.to(tl.float32), 0.0), axis=1), axis=0))
        else:          # post from the ROUNDED pre: the same numbers as the unfused MLP
            pre = acc.to(dtype)
            r = tl.maximum(pre.to(tl.float32), 0.0)
            tl.store(out_ptr + offs, (r * r).to(dtype), mask=mask)

    @triton.jit
    def _mm_relu2_kernel(a_desc, b_desc, saved_ptr, out_ptr, a_scale_ptr, b_scale_ptr, q_ptr, amax_ptr, M, N, K,
                         BACKWARD: tl.constexpr, SCALED: tl.constexpr, ROUND_DPOST: tl.constexpr,
                         QUANT: tl.constexpr, IMPRECISE_ACC: tl.constexpr, B_NK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        """acc = A[M, K] @ B (B stored [N, K] if B_NK else [K, N]), then the ReLU^2 epilogue.

        Persistent (one program per SM looping over output tiles) with TMA operand loads: the
        flattened loop lets the pipeliner fetch the next tile's operands while this tile's
        epilogue writes, which hides part of the epilogue's extra traffic behind the matmul.
        """
        start = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        tile_out = start - NUM_SMS
        for tile in tl.range(start, n_m * n_n, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
            om, on = pid_m * BLOCK_M, pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = a_desc.load([om, ki * BLOCK_K])
                if B_NK:
                    b = b_desc.load([on, ki * BLOCK_K]).T
                else:
                    b = b_desc.load([ki * BLOCK_K, on])
                if IMPRECISE_ACC > 0:   # else Triton's default
                    acc = tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE_ACC)
                else:
                    acc = tl.dot(a, b, acc)
            # the epilogue's own tile counter (as in Triton's persistent-matmul tutorial: the
            # flattened loop must not carry the coordinates across its software pipeline)
            tile_out += NUM_SMS
            pid_m, pid_n = _tile_coords(tile_out, n_m, n_n, GROUP_M)
            om, on = pid_m * BLOCK_M, pid_n * BLOCK_N
            # two half-width subtiles: half the live registers in the epilogue
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _relu2_epilogue(acc0, om, on, saved_ptr, out_ptr, a_scale_ptr, b_scale_ptr, q_ptr, amax_ptr,
                            M, N, BACKWARD, SCALED, ROUND_DPOST, QUANT, BLOCK_M, BLOCK_N // 2)
            _relu2_epilogue(acc1, om, on + BLOCK_N // 2, saved_ptr, out_ptr, a_scale_ptr, b_scale_ptr,
                            q_ptr, amax_ptr, M, N, BACKWARD, SCALED, ROUND_DPOST, QUANT, BLOCK_M, BLOCK_N // 2)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def tma_capable(device: torch.device) -> bool:
    """Hopper or newer: the kernels load their tiles through TMA, which older cards (the RTX 4090's
    8.9 included) lack; there the MLP runs as compiled matmuls + pointwise kernels."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def kernels_run_on(device: torch.device) -> bool:
    """A TMA-capable GPU, or Triton's CPU interpreter."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return tma_capable(device)


def kernels_available(x: Tensor) -> bool:
    return kernels_run_on(x.device) and x.size(-1) * x.element_size() % 16 == 0   # TMA: 16-byte rows


def _launch(a: Tensor, b: Tensor, b_nk: bool, saved: Tensor, out: Tensor, backward: bool,
            scales: tuple[Tensor, Tensor] | None = None, round_dpost: bool = False,
            quant: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> None:
    """quant: (dequant [1], act_scale [1], e4m3 out, amax 0-d) for the record recipe's forward."""
    M, K = a.shape
    N = out.size(1)
    if not a.is_cuda:
        bm, bn, bk, stages, warps, ws = _INTERPRETER_TILE
    else:
        fp8 = scales is not None or quant is not None
        bm, bn, bk, stages, warps, ws = _HOPPER_TILE_FP8 if fp8 else _HOPPER_TILE
    desc = TensorDescriptor.from_tensor
    n_sms = _num_sms(a.device)
    grid = (min(n_sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    a_scale, b_scale = scales if scales is not None else (out, out)   # unread unless SCALED
    q, amax = out, out                                                 # unread unless QUANT
    # FP8 dot products on Hopper accumulate in a narrower accumulator unless promoted: Triton's
    # default there promotes never (_scaled_mm's use_fast_accum=True); the record's up projection
    # asks for the precise mode, so QUANT promotes into fp32 once per K tile
    imprecise = 0
    if quant is not None:
        a_scale, b_scale, q, amax = quant
        imprecise = bk
    _mm_relu2_kernel[grid](desc(a, [bm, bk]), desc(b, [bn, bk] if b_nk else [bk, bn]), saved, out,
                           a_scale, b_scale, q, amax, M, N, K, BACKWARD=backward, SCALED=scales is not None,
                           ROUND_DPOST=round_dpost, QUANT=quant is not None, IMPRECISE_ACC=imprecise,
                           B_NK=b_nk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           GROUP_M=8, NUM_SMS=n_sms, WARP_SPECIALIZE=ws, num_stages=stages,
                           num_warps=warps)


@torch.library.custom_op("speedrun::linear_relu2", mutates_args=())
def linear_relu2(x: Tensor, w1: Tensor) -> Tensor:
    """post = relu(x @ w1^T)^2; x [M, K] contiguous, w1 [N, K]."""
    if not kernels_available(x):
        return F.relu(x @ w1.t()).square()
    post = x.new_empty(x.size(0), w1.size(0))
    _launch(x, w1.contiguous(), True, post, post, backward=False)
    return post


@linear_relu2.register_fake
def _(x: Tensor, w1: Tensor) -> Tensor:
    return x.new_empty(x.size(0), w1.size(0))


@torch.library.custom_op("speedrun::linear_relu2_grad", mutates_args=())
def linear_relu2_grad(g: Tensor, w2: Tensor, post: Tensor, round_dpost: bool = False) -> Tensor:
    """d pre = 2 sqrt(post) * (g @ w2), as relu(pre) = sqrt(post); g [M, K], w2 [K, N] (or the
    transposed view of a contiguous [N, K]: read as it is stored), post [M, N]. round_dpost:
    g @ w2 is rounded to g's dtype before the product, as an unfused bf16 matmul would (and as
    the record's fused kernel does); otherwise it enters unrounded (more exact)."""
    if not kernels_available(g):
        return (2 * post.float().sqrt() * (g @ w2).float()).to(g.dtype)
    post = post.contiguous()
    dpre = torch.empty_like(post)
    if w2.t().is_contiguous() and not w2.is_contiguous():
        _launch(g, w2.t(), True, post, dpre, backward=True, round_dpost=round_dpost)
    else:
        _launch(g, w2.contiguous(), False, post, dpre, backward=True, round_dpost=round_dpost)
    return dpre


@linear_relu2_grad.register_fake
def _(g: Tensor, w2: Tensor, post: Tensor, round_dpost: bool = False) -> Tensor:
    return torch.empty_like(post)


# FP8 operands (train.fp8_mlp): the two fused matmuls take e4m3 inputs with one power-of-two
# scale per row of A (per token) and per output column, so the scales factor out of each dot
# product and the epilogue applies them to the fp32 accumulator. K = model_dim (768) in both
# matmuls: a row's scale spans the whole contraction, no block scales needed. The other four MLP
# matmuls stay bf16 (their K is 3072 hidden units or the tokens: a row scale of post / d(pre)
# would need a reduction across the fused kernel's column tiles).
@torch.library.custom_op("speedrun::linear_relu2_fp8", mutates_args=())
def linear_relu2_fp8(xq: Tensor, sx: Tensor, w1q: Tensor, sw1: Tensor, dtype: torch.dtype) -> Tensor:
    """post = relu(pre)^2 in `dtype`, pre = (xq * sx) @ (w1q * sw1)^T; xq [M, K], w1q [N, K] e4m3."""
    if not kernels_available(xq):
        pre = ((xq.float() * sx[:, None]) @ (w1q.float() * sw1[:, None]).t()).to(dtype)
        return F.relu(pre).square()
    post = torch.empty(xq.size(0), w1q.size(0), dtype=dtype, device=xq.device)
    _launch(xq, w1q, True, post, post, backward=False, scales=(sx, sw1))
    return post


@linear_relu2_fp8.register_fake
def _(xq: Tensor, sx: Tensor, w1q: Tensor, sw1: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(xq.size(0), w1q.size(0), dtype=dtype, device=xq.device)


@torch.library.custom_op("speedrun::linear_relu2_fp8_quant", mutates_args=())
def linear_relu2_fp8_quant(x_f8: Tensor, w1_f8: Tensor, dequant: Tensor, act_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The record recipe's FP8 up projection (record/mlp.py) in one kernel: with
    pre = bf16((x_f8 @ w1_f8^T) * dequant), returns post = bf16(relu(pre)^2), its e4m3 copy
    min(relu(pre)^2 / act_scale, 448) taken before post is rounded, and amax(post) (fp32, 0-d).
    x_f8 [M, K], w1_f8 [N, K] e4m3; dequant, act_scale: fp32 [1]. Unfused, that is a matmul, one
    pointwise kernel and one reduction, two of them reading the whole [M, N] activation back."""
    if not kernels_available(x_f8):   # the same formulas in PyTorch (products of e4m3 values are exact in fp32)
        pre = ((x_f8.float() @ w1_f8.float().t()) * dequant).to(torch.bfloat16)
        square = torch.relu(pre.float()).square()
        post = square.to(torch.bfloat16)
        q = torch.clamp_max(square * (1 / act_scale), 448.0).to(torch.float8_e4m3fn)
        return post, q, post.amax().float()
    M, N = x_f8.size(0), w1_f8.size(0)
    post = torch.empty(M, N, dtype=torch.bfloat16, device=x_f8.device)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=x_f8.device)
    amax = torch.zeros((), dtype=torch.float32, device=x_f8.device)
    _launch(x_f8, w1_f8, True, post, post, backward=False, quant=(dequant, act_scale, q, amax))
    return post, q, amax


@linear_relu2_fp8_quant.register_fake
def _(x_f8: Tensor, w1_f8: Tensor, dequant: Tensor, act_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    M, N = x_f8.size(0), w1_f8.size(0)
    return (x_f8.new_empty(M, N, dtype=torch.bfloat16), x_f8.new_empty(M, N),
            x_f8.new_empty((), dtype=torch.float32))


@torch.library.custom_op("speedrun::linear_relu2_grad_fp8", mutates_args=())
def linear_relu2_grad_fp8(gq: Tensor, sg: Tensor, w2q_t: Tensor, sw2: Tensor, post: Tensor) -> Tensor:
    """d pre = 2 sqrt(post) * ((gq * sg) @ (w2q_t * sw2)^T); gq [M, K], w2q_t [N, K] e4m3 (W2 transposed)."""
    if not kernels_available(gq):
        dpost = (gq.float() * sg[:, None]) @ (w2q_t.float() * sw2[:, None]).t()
        return (2 * post.float().sqrt() * dpost).to(post.dtype)
    post = post.contiguous()
    dpre = torch.empty_like(post)
    _launch(gq, w2q_t, True, post, dpre, backward=True, scales=(sg, sw2))
    return dpre


@linear_relu2_grad_fp8.register_fake
def _(gq: Tensor, sg: Tensor, w2q_t: Tensor, sw2: Tensor, post: Tensor) -> Tensor:
    return torch.empty_like(post)


class _ReLU2MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, fp8: bool) -> Tensor:
        ctx.fp8 = fp8
        if fp8:
            post = linear_relu2_fp8(*quantize_rows(x), *quantize_rows(w1), x.dtype)
        else:
            post = linear_relu2(x, w1)
        ctx.save_for_backward(x, w1, w2, post)
        return post @ w2.t()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, w2, post = ctx.saved_tensors
        if ctx.fp8:   # W2's scales run along its columns: quantize its transpose by rows
            dpre = linear_relu2_grad_fp8(*quantize_rows(g), *quantize_rows(w2.t()), post)
        else:
            dpre = linear_relu2_grad(g.contiguous(), w2, post)
        return dpre @ w1, dpre.t() @ x, g.t() @ post, None


def relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor, fp8: bool = False) -> Tensor:
    """relu(x @ w1^T)^2 @ w2^T over the last dim of x, through the fused kernels.

    w1 [4*dim, dim] and w2 [dim, 4*dim] in the activation dtype; gradients flow to all three.
    fp8: the up projection and its gradient matmul take e4m3 operands (`quantize_rows`).
    Where the kernels cannot run (`kernels_run_on`) the ops compute the same in plain PyTorch:
    callers on such GPUs should take the unfused MLP, which torch.compile fuses better.
    """
    shape = x.shape
    out = _ReLU2MLP.apply(x.reshape(-1, shape[-1]).contiguous(), w1, w2, fp8)
    return out.view(*shape[:-1], w2.size(0))
