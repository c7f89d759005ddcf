"""The head's loss kernel (loss.py's `_loss_kernel`) in CUDA C, one row of logits per block, the
row's bf16 sigmoids kept in shared memory.

Why: the Triton kernel reads each row twice and computes the sigmoid twice (tanh.approx, then
two more multiply-adds and a bf16 rounding per logit); the special-function unit, which does
tanh and exp2, is what bounds it. Shared memory is not a tensor Triton lets a kernel keep across
loops. Here the first pass reads the logits once, rounds their sigmoid to bf16 into shared
memory (50,304 x 2 bytes: two blocks per Hopper SM, one per Ada SM) and sums exp; the second
pass reads the sigmoids back and writes the gradient. Three special-function operations per
logit instead of four, one read of the logits instead of two.

The math is the Triton kernel's, operation for operation (fixed shift by the bound `a`, the same
multiply-adds, tanh.approx, ex2.approx, the same products in the same order); only the order of
the row's sum differs (a block reduction instead of Triton's), so losses and gradients agree to
fp32 rounding, not bit for bit. benchmarks.gpu_checks --only record_head compares them.

Compiled at first use with NVRTC (torch.cuda._compile_kernel), for the device's own compute
capability. `available()` says whether it can run: a CUDA device of compute capability 8.9 or
newer (the e5m2 conversion), a row that fits the device's shared memory, and NVRTC present.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

THREADS = 512      # threads per block (gpu_checks' record_head times others)

_SOURCE = r"""
#define V {V}
#define N_PRED {N_PRED}
#define THREADS {THREADS}
#define GRAD_E5M2 {GRAD_E5M2}
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

__device__ __forceinline__ float bf16_bits_to_f32(u32 bits) {{ return __uint_as_float(bits << 16); }}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {{   // round to nearest even, as cvt.rn
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}}

__device__ __forceinline__ u32 pack_e5m2x2(float lo, float hi) {{
    unsigned short r;
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}}

__device__ __forceinline__ float tanh_approx(float x) {{
    float r;
    asm("tanh.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}}

__device__ __forceinline__ float exp_approx(float x) {{   // e^x as Triton's tl.exp: ex2.approx(x log2 e)
    float r;
    asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
    return r;
}}

__device__ __forceinline__ float sigmoid(float u, float inv_c, float b_div_c) {{   // of (u + B) / C, as Triton's
    return 0.5f + tanh_approx((u * inv_c + b_div_c) * 0.5f) * 0.5f;
}}

// prediction j of a row (j < N_PRED: the token j ahead; j == N_PRED: the prefix target)
__device__ __forceinline__ void target_of(int j, i64 row, int n_targets, const i64* targets,
                                          const float* mtp, const i64* prefix, const float* prefix_w,
                                          int* col, bool* ok, float* w) {{
    i64 t;
    if (j < N_PRED) {{
        t = (row + j < n_targets) ? targets[row + j] : -1;
        *w = mtp[j];
    }} else {{
        t = prefix[row];
        *w = prefix_w[0];
    }}
    *ok = (t >= 0) && (t < V);
    *col = *ok ? (int)t : 0;
}}

extern "C" __global__ void __launch_bounds__(THREADS, (THREADS <= 512 ? 2 : 1))
head_loss_kernel(const u16* __restrict__ logits, void* __restrict__ grad, const i64* __restrict__ targets,
                 const float* __restrict__ mtp, const i64* __restrict__ prefix,
                 const float* __restrict__ prefix_w, float* __restrict__ losses, int n_targets,
                 double inv_c_d, double b_div_c_d, double a_d, double coef_d) {{
    extern __shared__ __align__(16) u32 sb_row[];         // V bf16 sigmoids, two per word
    __shared__ float warp_sums[THREADS / 32];
    const float inv_c = (float)inv_c_d, b_div_c = (float)b_div_c_d, a = (float)a_d, coef = (float)coef_d;
    const i64 row = blockIdx.x;
    const uint4* src = reinterpret_cast<const uint4*>(logits + row * V);
    uint4* sb_vec = reinterpret_cast<uint4*>(sb_row);

    // pass 1: sigmoid -> bf16 -> shared memory; sum of exp(a sb - a) (every a sb lies in (0, a))
    float acc = 0.0f;
    #pragma unroll 4
    for (int i = threadIdx.x; i < V / 8; i += THREADS) {{
        uint4 v = __ldg(src + i);
        u32 in[4] = {{v.x, v.y, v.z, v.w}};
        u32 out[4];
        #pragma unroll
        for (int k = 0; k < 4; k++) {{
            float s_lo = sigmoid(bf16_bits_to_f32(in[k] & 0xFFFFu), inv_c, b_div_c);
            float s_hi = sigmoid(bf16_bits_to_f32(in[k] >> 16), inv_c, b_div_c);
            out[k] = pack_bf16x2(s_lo, s_hi);
            acc += exp_approx(a * bf16_bits_to_f32(out[k] & 0xFFFFu) - a);
            acc += exp_approx(a * bf16_bits_to_f32(out[k] >> 16) - a);
        }}
        sb_vec[i] = make_uint4(out[0], out[1], out[2], out[3]);
    }}
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    float total = 0.0f;
    #pragma unroll
    for (int i = 0; i < THREADS / 32; i++) total += warp_sums[i];
    const float lse = a + logf(total);

    const u16* sb_half = reinterpret_cast<const u16*>(sb_row);
    float s_w = 0.0f;                 // the normaliser counts every MTP weight, the prefix where it exists
    float loss = 0.0f;
    #pragma unroll
    for (int j = 0; j <= N_PRED; j++) {{
        int col; bool ok; float w;
        target_of(j, row, n_targets, targets, mtp, prefix, prefix_w, &col, &ok, &w);
        float sbt = bf16_bits_to_f32(sb_half[col]);
        loss += ok ? w * (lse - a * sbt) : 0.0f;
        s_w += (j < N_PRED || ok) ? w : 0.0f;
    }}
    if (threadIdx.x == 0) losses[row] = loss;

    // pass 2: the softmax part of the gradient, from shared memory
    const float scale = coef * s_w;
    #pragma unroll 4
    for (int i = threadIdx.x; i < V / 8; i += THREADS) {{
        uint4 v = sb_vec[i];
        u32 in[4] = {{v.x, v.y, v.z, v.w}};
        float g[8];
        #pragma unroll
        for (int k = 0; k < 4; k++) {{
            float lo = bf16_bits_to_f32(in[k] & 0xFFFFu), hi = bf16_bits_to_f32(in[k] >> 16);
            g[2 * k] = scale * exp_approx(a * lo - lse) * lo * (1.0f - lo);
            g[2 * k + 1] = scale * exp_approx(a * hi - lse) * hi * (1.0f - hi);
        }}
#if GRAD_E5M2
        uint2 o;
        o.x = pack_e5m2x2(g[0], g[1]) | (pack_e5m2x2(g[2], g[3]) << 16);
        o.y = pack_e5m2x2(g[4], g[5]) | (pack_e5m2x2(g[6], g[7]) << 16);
        reinterpret_cast<uint2*>(static_cast<unsigned char*>(grad) + row * V)[i] = o;
#else
        reinterpret_cast<uint4*>(static_cast<u16*>(grad) + row * V)[i] =
            make_uint4(pack_bf16x2(g[0], g[1]), pack_bf16x2(g[2], g[3]), pack_bf16x2(g[4], g[5]),
                       pack_bf16x2(g[6], g[7]));
#endif
    }}
    __syncthreads();   // the whole row is stored before its target columns are rewritten

    // the target columns (at most N_PRED + 1), one thread each: softmax part minus every weight
    // whose prediction has this column as target
    if (threadIdx.x <= N_PRED) {{
        int col; bool ok; float w;
        target_of(threadIdx.x, row, n_targets, targets, mtp, prefix, prefix_w, &col, &ok, &w);
        if (ok) {{
            float hit = 0.0f;
            #pragma unroll
            for (int i = 0; i <= N_PRED; i++) {{
                int col_i; bool ok_i; float w_i;
                target_of(i, row, n_targets, targets, mtp, prefix, prefix_w, &col_i, &ok_i, &w_i);
                hit += (ok_i && col_i == col) ? w_i : 0.0f;
            }}
            float sbt = bf16_bits_to_f32(sb_half[col]);
            float g = coef * (s_w * exp_approx(a * sbt - lse) - hit) * sbt * (1.0f - sbt);
#if GRAD_E5M2
            static_cast<unsigned char*>(grad)[row * V + col] = (unsigned char)(pack_e5m2x2(g, 0.0f) & 0xFFu);
#else
            static_cast<u16*>(grad)[row * V + col] = (u16)(pack_bf16x2(g, 0.0f) & 0xFFFFu);
#endif
        }}
    }}
}}
"""

_kernels: dict = {}
_failed: set = set()


def source(V: int, n_pred: int, e5m2: bool, threads: int | None = None) -> str:
    """The kernel's CUDA source for a vocabulary, a number of MTP targets and a gradient dtype, for
    blocks of `threads` threads (THREADS as it is set when called)."""
    return _SOURCE.format(V=V, N_PRED=n_pred, THREADS=threads or THREADS, GRAD_E5M2=int(e5m2))


def _smem_bytes(V: int) -> int:
    return V * 2


def fits(capability: tuple[int, int], shared_memory_per_block: int, V: int) -> bool:
    """Whether a card of `capability` with that much shared memory per block (opt-in) runs the
    kernel for a vocabulary of V: the e5m2 conversion needs 8.9, the row of sigmoids (2V bytes)
    and the warps' partial sums must fit one block's shared memory. On an RTX 4090 (99 KiB) the
    50,304-token row leaves 704 bytes."""
    return (tuple(capability) >= (8, 9) and V % 8 == 0
            and _smem_bytes(V) + 4 * (THREADS // 32) <= shared_memory_per_block)


def available(logits: Tensor, grad: Tensor | None) -> bool:
    """Whether the CUDA kernel can take this call (else loss.py's Triton kernel does). The
    capability is asked of torch.cuda.get_device_capability, so benchmarks.throughput's forced-8.9
    mode answers for an RTX 4090; so is its smaller shared memory (attention.SMALL_SHARED_MEMORY)."""
    if grad is None or not logits.is_cuda or logits.dtype != torch.bfloat16 or logits.dim() != 2:
        return False
    if grad.dtype not in (torch.float8_e5m2, torch.bfloat16) or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    from .attention import SMALL_SHARED_MEMORY
    capability = torch.cuda.get_device_capability(logits.device)
    optin = getattr(torch.cuda.get_device_properties(logits.device), "shared_memory_per_block_optin", 49152)
    return fits(capability, min(optin, SMALL_SHARED_MEMORY.get(capability, optin)), logits.shape[1])


def _kernel(V: int, n_pred: int, e5m2: bool, device: torch.device):
    key = (V, n_pred, e5m2, THREADS, device.index)
    if key not in _kernels:
        props = torch.cuda.get_device_properties(device)
        with torch.cuda.device(device):
            k = torch.cuda._compile_kernel(source(V, n_pred, e5m2, THREADS), "head_loss_kernel",
                                           compute_capability=f"{props.major}{props.minor}")
            k.set_shared_memory_config(_smem_bytes(V))
        _kernels[key] = k
    return _kernels[key]


def run(u: Tensor, targets: Tensor, mtp_weights: Tensor, prefix_targets: Tensor, prefix_weight: Tensor,
        grad: Tensor, coef: float, inv_c: float, b_div_c: float, a: float) -> Tensor | None:
    """Losses of u's rows [R], the gradient written into `grad` (e5m2 or bf16, u's shape); None
    when the kernel could not be compiled here (then the caller runs the Triton kernel)."""
    rows, V = u.shape
    n_pred = mtp_weights.numel()
    key = (V, n_pred, grad.dtype == torch.float8_e5m2)
    if key in _failed:
        return None
    try:
        kernel = _kernel(V, n_pred, key[2], u.device)
    except Exception as err:   # no NVRTC, or an unexpected toolkit: the Triton kernel stands in
        _failed.add(key)
        warnings.warn(f"CUDA loss kernel unavailable ({type(err).__name__}: {err}); using the Triton kernel")
        return None
    losses = torch.empty(rows, dtype=torch.float32, device=u.device)
    if rows:
        kernel(grid=(rows, 1, 1), block=(THREADS, 1, 1),
               args=[u.contiguous(), grad, targets.contiguous(), mtp_weights, prefix_targets.contiguous(),
                     prefix_weight, losses, int(targets.numel()), float(inv_c), float(b_div_c), float(a),
                     float(coef)],
               shared_mem=_smem_bytes(V))
    return losses
