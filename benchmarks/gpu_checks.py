"""Correctness checks that need a GPU (run before trusting any timing):

    python -m benchmarks.gpu_checks

1. compiled FlexAttention with the document/window BlockMask == SDPA with `dense_mask` (the CPU and
   export path), for several windows and document layouts: same attention pattern, same numbers;
2. the full model gives the same loss through FlexAttention (GPU) and the dense path (CPU);
3. FP8 (torchao) on the MLP trains: loss after a few steps close to the bf16 run's;
4. the fused Triton head + soft-capped CE (bf16 and FP8) == the PyTorch reference: loss and
   gradients at full vocabulary, plus its fwd+bwd time against the compiled reference;
5. the fused ReLU^2 MLP kernels (mlp.py) at the training shape: output and gradients against an
   fp32 reference (next to the unfused bf16 MLP's own error), and fwd+bwd time against the
   compiled unfused MLP;
6. the accumulating embedding lookups (embedding.py): one step's table gradients against an
   fp64 sum, and their time against bf16 nn.Embedding tables.

    python -m benchmarks.gpu_checks --only record_head [--baseline OLD_LOSS_PY]

checks the record recipe's FP8 head alone (its loss kernel, its tiled transpose) and times it;
`--only record_mlp` the record recipe's MLP backward, pointwise vs fused d(pre); `--only
record_mlp_fwd` its FP8 up projection, fused vs _scaled_mm + Inductor's kernels; `--only record_dc`
its DC correction with fp32 vs bf16 GEMMs; `--only record_lookup` its tables' in-place gradient
rows against the dense path.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
from unittest import mock

import torch
import torch.nn.functional as F


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, both read as fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def worst_of(errors) -> float:
    """Largest error, where NaN counts as the worst (Python's max() silently drops a NaN that is
    not in first place: that once made a NaN-producing kernel look bit-identical)."""
    errors = list(errors)
    return max(errors, key=lambda e: (math.isnan(e), e))


def check_masks() -> list[dict]:
    from speedrun.model import _flex_attention, dense_mask, document_window_masks

    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    T = 4096
    for doc_every in (50, 700, 5000):
        toks = torch.randint(0, 50000, (T,), device="cuda", generator=g)
        toks[torch.randint(0, T, (max(1, T // doc_every),), device="cuda", generator=g)] = 50256
        for wb in (1, 2, 3, 7, 14):
            bms = document_window_masks(toks, torch.tensor(wb, dtype=torch.int32, device="cuda"))
            for name, bm in zip(("long", "short"), bms):
                q, k, v = (torch.randn(1, 2, T, 64, device="cuda", generator=g) for _ in range(3))
                yf = _flex_attention(q, k, v, block_mask=bm, scale=0.12)
                yd = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(bm, toks), scale=0.12)
                rel = ((yf - yd).norm() / yd.norm()).item()
                out.append({"doc_every": doc_every, "window_blocks": wb, "mask": name, "rel_err": rel})
    return out


def rows_nan_without_guard(tokens: torch.Tensor, block_mask, block_n: int) -> int:
    """Query rows whose FIRST visited kv tile of `block_n` keys holds no key they may attend to.

    FlexAttention's forward walks a row's kv blocks in BlockMask order (ours: most recent first,
    so the diagonal block leads), each 128-key sparse block in tiles of the kernel's BLOCK_N keys,
    oldest tile first. Without the ROWS_GUARANTEED_SAFE guard, the online softmax maps a row whose
    running max is still -inf to 0; with the option set it computes exp2(-inf - (-inf)) = NaN, and
    the NaN never leaves that row. So the option is safe exactly when this count is 0. Inductor's
    H100 default forward tile is BLOCK_N = 64: a document that starts in the second half of a
    128-token block leaves its first rows with only masked keys in the diagonal block's first tile.
    Works on any device (dense [T, T] bool mask: use a few thousand tokens).
    """
    from speedrun.model import BLOCK_SIZE, dense_mask

    allowed = dense_mask(block_mask, tokens)
    n_partial = block_mask.kv_num_blocks[0, 0]
    first = torch.where(n_partial > 0, block_mask.kv_indices[0, 0, :, 0],
                        block_mask.full_kv_indices[0, 0, :, 0])
    rows = torch.arange(tokens.numel(), device=tokens.device)
    cols = (first[rows // BLOCK_SIZE] * BLOCK_SIZE)[:, None] + torch.arange(block_n, device=tokens.device)
    return int((~allowed.gather(1, cols.long()).any(dim=1)).sum())


# Inductor's H100 forward tile for bf16, head_dim 128, is (BLOCK_M, BLOCK_N) = (128, 64); a 128-key
# tile makes every row's first tile the diagonal one, which holds the row's own key
SAFE_ROWS_OPTIONS = {"ROWS_GUARANTEED_SAFE": True}
SAFE_ROWS_N128_OPTIONS = {"ROWS_GUARANTEED_SAFE": True, "BLOCK_N": 128, "fwd_num_stages": 2}


def check_safe_rows() -> list[dict]:
    """FlexAttention with ROWS_GUARANTEED_SAFE, standalone, on training-like masks: rows that come
    out non-finite vs `rows_nan_without_guard`'s prediction, and the worst relative error of the
    finite outputs and gradients against the default kernel, for the default forward tile and for
    128-key tiles. (An earlier version reported "bit-identical" because Python's max() drops NaN.)"""
    from speedrun.model import _flex_attention, document_window_masks

    g = torch.Generator(device="cuda").manual_seed(0)
    T, out = 8192, []
    for doc_every in (50, 700, 5000):
        toks = torch.randint(0, 50000, (T,), device="cuda", generator=g)
        toks[torch.randint(0, T, (max(1, T // doc_every),), device="cuda", generator=g)] = 50256
        for wb in (2, 8, 14):
            for name, bm in zip(("long", "short"),
                                document_window_masks(toks, torch.tensor(wb, dtype=torch.int32, device="cuda"))):
                q, k, v = (torch.randn(1, 6, T, 128, device="cuda", generator=g, dtype=torch.bfloat16)
                           for _ in range(3))
                runs = {}
                for label, opts in (("default", None), ("safe_rows", SAFE_ROWS_OPTIONS),
                                    ("safe_rows_n128", SAFE_ROWS_N128_OPTIONS)):
                    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                    y = _flex_attention(qq, kk, vv, block_mask=bm, scale=0.12, kernel_options=opts)
                    y.float().square().sum().backward()
                    runs[label] = [y.detach(), qq.grad, kk.grad, vv.grad]
                row = {"doc_every": doc_every, "window_blocks": wb, "mask": name,
                       "predicted_nan_rows_n64": rows_nan_without_guard(toks, bm, 64),
                       "predicted_nan_rows_n128": rows_nan_without_guard(toks, bm, 128)}
                for label in ("safe_rows", "safe_rows_n128"):
                    y = runs[label][0]
                    row[f"{label}_nan_rows"] = int((~torch.isfinite(y[0, 0])).any(dim=-1).sum())
                    row[f"{label}_all_finite"] = all(bool(torch.isfinite(t).all()) for t in runs[label])
                    errs = [((a.float() - b.float()).norm() / b.float().norm()).item()
                            for a, b in zip(runs[label], runs["default"])]
                    row[f"{label}_worst_rel_err"] = worst_of(errs)
                out.append(row)
    return out


def check_model_paths() -> dict:
    from speedrun.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, model_dim=256, n_head=2, head_dim=128, value_embeds=2, no_attn_layer=-1,
                    max_seq_len=2048)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    toks = torch.randint(0, 50257, (2049,))
    toks[torch.randint(0, 2048, (6,))] = 50256
    wb = torch.tensor(3, dtype=torch.int32)
    with torch.no_grad():
        cpu = m(toks[:-1], toks[1:], wb).item()
        mg = m.cuda()
        gpu = mg(toks[:-1].cuda(), toks[1:].cuda(), wb.cuda()).item()
    return {"loss_cpu_dense": cpu, "loss_gpu_flex": gpu, "abs_diff": abs(cpu - gpu)}


def check_fp8(steps: int = 30) -> dict:
    from speedrun.model import build_model, param_groups
    from speedrun.optimizer import build_optimizers
    from speedrun.train import TrainParams, enable_fp8, model_config

    res = {}
    p = dataclasses.replace(TrainParams(), n_layer=4, value_embeds=2, no_attn_layer=-1,
                            micro_batch_tokens=8192)
    g = torch.Generator().manual_seed(1)
    # a learnable stream: repeated random "documents"
    base = torch.randint(0, 50257, (8192 * 4,), generator=g)
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = build_model(model_config(p), torch.device("cuda"))
        fp8 = enable_fp8(model, mode, torch.device("cuda"))
        adam, muon = build_optimizers(param_groups(model), muon_lr=0.05, muon_momentum=0.95, ns_steps=5,
                                      embed_lr=0.6, head_lr=0.008, scalar_lr=0.04, betas=(0.8, 0.95),
                                      compile=True)
        f = torch.compile(model, dynamic=False)
        wb = torch.tensor(8, dtype=torch.int32, device="cuda")
        losses = []
        for s in range(steps):
            i = (s % 3) * 8192
            x = base[i:i + 8193].cuda()
            loss = f(x[:-1], x[1:], wb)
            loss.backward()
            adam.step(); muon.step(); model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        res[f"fp8_{mode}"] = {"enabled": fp8, "first": losses[0], "last": losses[-1]}
    return res


def check_head(N: int = 32768, D: int = 768, V: int = 50304, cap: float = 30.0) -> dict:
    """Fused head + CE against the compiled PyTorch reference at a training micro-batch: loss,
    gradients, and fwd+bwd time (CUDA events), for bf16, fast tanh, and the FP8 head."""
    from speedrun.head import reference_softcap_cross_entropy, softcap_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    w = torch.randn(V, D, device="cuda", generator=g) * 0.05
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    ref_fn = torch.compile(reference_softcap_cross_entropy, dynamic=False)

    def run(fn):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xr, wr, t)
        (loss * 0.25).backward()   # a non-unit upstream gradient, as with gradient accumulation
        return loss.detach(), xr.grad, wr.grad

    def fused(**kw):
        return lambda a, b, c: softcap_cross_entropy(a, b, c, cap, fused=True, **kw)

    variants = {"reference": lambda a, b, c: ref_fn(a, b, c, cap),
                "fused": fused(),
                "fused_fast_tanh": fused(fast_tanh=True),
                "fused_fp8": fused(fp8=True, fast_tanh=True)}
    ref = run(variants["reference"])
    out = {"tokens": N}
    for name, fn in variants.items():
        try:
            res = run(fn)
            ms = _cuda_ms(lambda: run(fn), reps=10)
        except Exception as e:   # e.g. FP8 on a GPU without FP8 tensor cores
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
            continue
        with torch.no_grad():   # validation path: no gradient wanted, FP8/fast tanh must not be used
            nograd = fn(x, w, t).item()
        out[name] = {
            "loss": res[0].item(),
            "nograd_loss_abs_diff": abs(nograd - ref[0].item()),
            "loss_abs_diff": abs(res[0].item() - ref[0].item()),
            "grad_x_rel_err": ((res[1].float() - ref[1].float()).norm() / ref[1].float().norm()).item(),
            "grad_w_rel_err": ((res[2] - ref[2]).norm() / ref[2].norm()).item(),
            "fwd_bwd_ms": round(ms, 3),
        }
    return out


# the loss kernel's shapes timed by check_record_head: (logits per iteration, warps)
LOSS_SHAPES = [(2048, 8), (4096, 8), (2048, 4), (4096, 16)]


# threads per block of the CUDA loss kernel timed by check_record_head
LOSS_CUDA_THREADS = [256, 512, 1024]


def _compare_loss_kernels(L, u, t, mtp, pre, pw, g_triton, times: dict) -> dict:
    """The CUDA loss kernel (record/loss_cuda.py) against the Triton one on the same logits: their
    losses, how many e5m2 gradient bytes agree, the gradients' relative difference; the CUDA
    kernel's time, registers and spilled bytes for each of LOSS_CUDA_THREADS (into `times`)."""
    from speedrun.record import loss_cuda as LC

    L.LOSS_KERNEL = "triton"
    l_tri = L._run_kernel(u, t, mtp, pre, pw, g_triton, L.A / L.C, True)
    g_cuda = torch.empty_like(g_triton)
    g_cuda.view(torch.uint8).fill_(0x47)   # nonzero: a byte the kernel skips shows as a difference
    L.LOSS_KERNEL = "cuda"
    out = {"available": LC.available(u, g_cuda)}
    threads = LC.THREADS
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    for n_threads in LOSS_CUDA_THREADS:
        LC.THREADS = n_threads
        l_cuda = L._run_kernel(u, t, mtp, pre, pw, g_cuda, L.A / L.C, True)
        k = LC._kernels.get((u.shape[1], mtp.numel(), True, n_threads, u.device.index))
        regs, local = ctypes.c_int(-1), ctypes.c_int(-1)
        if k is not None:   # CU_FUNC_ATTRIBUTE_NUM_REGS = 4, LOCAL_SIZE_BYTES = 3
            libcuda.cuFuncGetAttribute(ctypes.byref(regs), 4, k.func)
            libcuda.cuFuncGetAttribute(ctypes.byref(local), 3, k.func)
        same = (g_cuda.view(torch.uint8) == g_triton.view(torch.uint8)).float().mean().item()
        out[f"{n_threads}_threads"] = {
            "loss_max_abs_diff": (l_cuda - l_tri).abs().max().item(),
            "grad_same_bytes": same, "grad_rel_diff": rel_diff(g_cuda.float(), g_triton.float()),
            "registers": regs.value, "local_bytes": local.value}
        times[f"cuda_{n_threads}_threads"] = round(_cuda_ms(
            lambda: L._run_kernel(u, t, mtp, pre, pw, g_cuda, L.A / L.C, True), reps=10), 3)
        g_cuda.view(torch.uint8).fill_(0x47)
    LC.THREADS = threads
    return out


def check_record_head(N: int = 49152, D: int = 768, V: int = 50304, baseline: str | None = None,
                      device: str = "cuda") -> dict:
    """The record recipe's FP8 head (speedrun/record/loss.py) at a stage-3 micro-batch: the loss
    kernel against its PyTorch reference, the tiled transpose bit for bit against PyTorch's copy,
    the loss kernel's time for each of LOSS_SHAPES, fwd+bwd time and peak memory for several
    HEAD_CHUNK_ROWS, and fwd+bwd with PyTorch's transposes in its place. `baseline`: another
    loss.py (an earlier version, say) timed in the same process, with its peak memory and the
    difference of its gradients from ours."""
    import importlib.util

    from speedrun.record import loss as L

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, D, device=device, generator=g).bfloat16()
    w = (torch.randn(D, V, device=device, generator=g) * 0.05).bfloat16()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    pre = torch.randint(-1, V, (N,), device=device, generator=g)
    mtp, pw = torch.tensor([1.0, 0.5, 0.25], device=device), torch.tensor([0.25], device=device)
    out = {"tokens": N}
    n = min(N, 1024)   # the kernels against the fp32 reference, gradient stored in bf16
    u = (x[:n] @ w)
    ref_l, ref_g = L.loss_and_logit_grad(u, t[:n], mtp, pre[:n], pw, grad_mul=1.0)
    kernel_choice = L.LOSS_KERNEL
    cases = [("triton", False), ("triton", True), ("cuda", True)] if device == "cuda" else [("triton", False)]
    for kind, fast in cases:   # tanh.approx: GPU only; the CUDA kernel always uses it
        L.LOSS_KERNEL = kind
        grad = torch.empty(n, V, device=device, dtype=torch.bfloat16)
        losses = L._run_kernel(u, t[:n], mtp, pre[:n], pw, grad, L.A / L.C, fast)
        out[f"kernel_{kind}_fast{int(fast)}"] = {
            "loss_rel_err": ((losses - ref_l).abs().max() / ref_l.abs().max()).item(),
            "grad_rel_err": rel_diff(grad, ref_g)}
    L.LOSS_KERNEL = kernel_choice
    big = torch.randn(N, V, device=device, generator=g).to(torch.float8_e5m2)
    out["transpose_same_bits"] = torch.equal(L.transposed(big).view(torch.uint8), big.t().contiguous().view(torch.uint8))
    out["transpose_ms"] = round(_cuda_ms(lambda: L.transposed(big), reps=10), 3)
    out["torch_transpose_ms"] = round(_cuda_ms(lambda: big.t().contiguous(), reps=10), 3)
    del big

    u_big = (x @ w)
    g_big = torch.empty(N, V, device=device, dtype=torch.float8_e5m2)
    shape = (L.LOSS_BLOCK, L.LOSS_WARPS)
    out["loss_kernel_ms"] = {}
    L.LOSS_KERNEL = "triton"
    for blk, warps in LOSS_SHAPES:
        L.LOSS_BLOCK, L.LOSS_WARPS = blk, warps
        out["loss_kernel_ms"][f"triton_{blk}x{warps}w"] = round(_cuda_ms(
            lambda: L._run_kernel(u_big, t, mtp, pre, pw, g_big, L.A / L.C, True), reps=10), 3)
    L.LOSS_BLOCK, L.LOSS_WARPS = shape
    if device == "cuda":
        out["cuda_vs_triton"] = _compare_loss_kernels(L, u_big, t, mtp, pre, pw, g_big, out["loss_kernel_ms"])
    L.LOSS_KERNEL = kernel_choice
    del u_big, g_big

    def step(mod):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        mod.train_losses(xr, wr, t, mtp, pre, pw, 1 / 8, fp8=True).sum().backward()
        return xr.grad, wr.grad

    def peak_gib(mod) -> float:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(mod)
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)

    chunk = L.HEAD_CHUNK_ROWS
    out["by_chunk_rows"] = {}
    for rows in (4096, 8192, 16384, N):
        L.HEAD_CHUNK_ROWS = rows
        out["by_chunk_rows"][rows] = {"fwd_bwd_ms": round(_cuda_ms(lambda: step(L), reps=10), 3),
                                      "peak_gib": peak_gib(L)}
    L.HEAD_CHUNK_ROWS = chunk
    gx, gw = step(L)
    out["fwd_bwd_ms"] = round(_cuda_ms(lambda: step(L), reps=10), 3)
    out["peak_gib"] = peak_gib(L)
    if device == "cuda":   # the whole head with the Triton loss kernel instead of the CUDA one
        with mock.patch.object(L, "LOSS_KERNEL", "triton"):
            kx, kw = step(L)
            out["fwd_bwd_ms_triton_loss"] = round(_cuda_ms(lambda: step(L), reps=10), 3)
            out["triton_loss_grad_rel_diff"] = {"x": rel_diff(kx, gx), "w": rel_diff(kw, gw)}
    with mock.patch.object(L, "transposed", lambda a: a.t().contiguous()):
        tx, tw = step(L)
        out["fwd_bwd_ms_torch_transpose"] = round(_cuda_ms(lambda: step(L), reps=10), 3)
        out["grads_equal_with_torch_transpose"] = torch.equal(gx, tx) and torch.equal(gw, tw)
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_loss", baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        bx, bw = step(old)
        out["fwd_bwd_ms_baseline"] = round(_cuda_ms(lambda: step(old), reps=10), 3)
        out["peak_gib_baseline"] = peak_gib(old)
        out["baseline_grad_rel_diff"] = {"x": rel_diff(bx, gx), "w": rel_diff(bw, gw)}
    return out


def check_record_mlp_backward(M: int = 16384, D: int = 768, H: int = 3072, device: str = "cuda",
                              dtype: torch.dtype = torch.bfloat16) -> dict:
    """The record recipe's MLP backward at a training micro-batch, d(pre) pointwise (the default)
    vs inside the matmul's epilogue (record/mlp.py BACKWARD = "fused"): how many elements of
    d(pre) agree bit for bit (they may differ by the matmul's summation order), the largest
    relative difference of every gradient, and each backward's time."""
    from speedrun.record import mlp as RM

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, D, device=device, generator=g).to(dtype)
    grad = torch.randn(M, D, device=device, generator=g).to(dtype)
    w1 = (torch.randn(H, D, device=device, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(H, D, device=device, generator=g) / H ** 0.5).to(dtype)
    post = torch.relu(x @ w1.t()).square()
    out, res, dpre = {"tokens": M}, {}, {}
    for mode in ("pointwise", "fused"):
        with mock.patch.object(RM, "BACKWARD", mode):
            res[mode] = RM._backward(grad, x, w1, w2, post)
            dpre[mode] = RM.d_pre(grad, w2, post)
            out[f"{mode}_ms"] = round(_cuda_ms(lambda: RM._backward(grad, x, w1, w2, post)), 3)
    fused, point = dpre["fused"], dpre["pointwise"]
    out["dpre_equal_fraction"] = (fused == point).float().mean().item()
    out["dpre_max_rel_diff"] = ((fused.float() - point.float()).abs()
                                / point.float().abs().clamp_min(1e-6)).max().item()
    out["grad_rel_diff"] = {n: rel_diff(a, b) for n, a, b in zip(("x", "w1", "w2"), res["fused"], res["pointwise"])}
    return out


def check_record_mlp_forward(M: int = 32768, D: int = 768, H: int = 3072, device: str = "cuda") -> dict:
    """The record recipe's FP8 up projection at a training micro-batch: the fused kernel
    (record/mlp.py FORWARD = "fused", speedrun/mlp.py linear_relu2_fp8_quant) vs _scaled_mm and
    the pointwise kernel + amax that torch.compile makes of the record's formulas (the pointwise
    path, compiled as in training). How many elements of post and of its e4m3 copy agree bit for
    bit (the two matmuls sum in different orders), each path's error against the fp32 product
    of the same e4m3 operands, the amaxes, and the times."""
    import speedrun.mlp as fused_mlp
    from speedrun.record.mlp import ACT_HEADROOM, E4M3_MAX

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, D, device=device, generator=g).bfloat16()
    w1 = ((torch.rand(H, D, device=device, generator=g) * 2 - 1) * (3 ** 0.5 * 0.5 * D ** -0.5)).bfloat16()
    x_amax = x.abs().max().float()
    x_f8 = (x * (E4M3_MAX / x_amax)).to(torch.float8_e4m3fn)
    w1_scale = (w1.abs().max().float() / E4M3_MAX).reshape(1)
    w1_f8 = (w1 / w1_scale).to(torch.float8_e4m3fn)
    dequant = (w1_scale * x_amax / E4M3_MAX).float()

    def pointwise(x_f8, w1_f8, dequant, act_scale):
        pre = torch._scaled_mm(x_f8, w1_f8.t(), scale_a=dequant, scale_b=torch.ones_like(dequant),
                               out_dtype=torch.bfloat16)
        post = torch.relu(pre).square()
        post_f8 = torch.clamp_max(post * (1.0 / act_scale), E4M3_MAX).to(torch.float8_e4m3fn)
        return post, post_f8, post.detach().amax().float()

    compiled = torch.compile(pointwise, fullgraph=True, dynamic=False)
    exact = torch.relu((x_f8.float() @ w1_f8.float().t()) * dequant).square()
    act_scale = (exact.max() * ACT_HEADROOM / E4M3_MAX).reshape(1)   # the delayed scale's headroom
    ref = compiled(x_f8, w1_f8, dequant, act_scale)
    got = fused_mlp.linear_relu2_fp8_quant(x_f8, w1_f8, dequant, act_scale)
    out = {"tokens": M}
    out["post_equal_fraction"] = (got[0] == ref[0]).float().mean().item()
    out["post_f8_equal_fraction"] = (got[1].view(torch.uint8) == ref[1].view(torch.uint8)).float().mean().item()
    out["amax"] = {"fused": got[2].item(), "pointwise": ref[2].item()}
    out["post_rel_err_vs_fp32"] = {"fused": rel_diff(got[0], exact), "pointwise": rel_diff(ref[0], exact)}
    out["fused_ms"] = round(_cuda_ms(lambda: fused_mlp.linear_relu2_fp8_quant(x_f8, w1_f8, dequant, act_scale)), 4)
    out["pointwise_ms"] = round(_cuda_ms(lambda: compiled(x_f8, w1_f8, dequant, act_scale)), 4)
    out["scaled_mm_alone_ms"] = round(_cuda_ms(lambda: torch._scaled_mm(
        x_f8, w1_f8.t(), scale_a=dequant, scale_b=torch.ones_like(dequant), out_dtype=torch.bfloat16)), 4)
    return out


def check_record_dc(T: int = 16384, H: int = 6, D: int = 128, device: str = "cuda", compile: bool = True) -> dict:
    """The record recipe's DC correction (record/dc.py) at a training micro-batch, its products as
    fp32 GEMMs (MATMUL="fp32") vs bf16 tensor-core GEMMs with fp32 outputs ("bf16", the default),
    then its head mix as one einsum (MIX="einsum") vs the default's sum:
    forward bit agreement compiled and eager (the sums' order only: on an H200 the eager paths
    agree on 99.98% of outputs, the compiled fp32 path with its own eager run on 83.5%), each
    gradient's relative difference (the score gradient's bf16 rounding in q and k), compiled
    fwd+bwd time."""
    from speedrun.record import dc
    from speedrun.record.attention import doc_ids

    g = torch.Generator(device=device).manual_seed(0)
    cuts = torch.cat([torch.tensor([0]), torch.randint(1, T, (40,), generator=torch.Generator().manual_seed(0)).sort().values,
                      torch.tensor([T])]).unique().to(torch.int32).to(device)
    doc = doc_ids(cuts, T)
    base = [torch.randn(1, T, H, D, device=device, generator=g).bfloat16() for _ in range(4)] + \
           [torch.randn(1, T, H, device=device, generator=g).bfloat16() for _ in range(2)]
    weight = torch.randn(1, T, H, D, device=device, generator=g)
    scale = torch.tensor(D ** -0.5, device=device)
    fn = torch.compile(dc.dc_correct, dynamic=False) if compile else dc.dc_correct
    out, runs, eager = {"tokens": T}, {}, {}

    def step(f, tensors):   # tensors: y, q, k, v, w1, w2
        o = f(*tensors, doc, scale)
        (o.float() * weight).sum().backward()
        return o

    for mode in ("fp32", "bf16"):
        with mock.patch.object(dc, "MATMUL", mode):
            torch._dynamo.reset()
            ts = [t.clone().requires_grad_() for t in base]
            o = step(fn, ts)
            runs[mode] = (o, [t.grad for t in ts])
            leaves = [t.clone().requires_grad_() for t in base]
            out[f"{mode}_fwd_bwd_ms"] = round(_cuda_ms(lambda: step(fn, leaves)), 3)
            # where any disagreement comes from: each mode compiled vs eager, the modes eager, and
            # one product's error against fp64 (products of bf16 numbers are exact: only the sums' order)
            with torch.no_grad():
                eager[mode] = dc.dc_correct(*base, doc, scale)
            out[f"{mode}_compiled_vs_eager_equal_fraction"] = (o == eager[mode]).float().mean().item()
    names = ("y", "q", "k", "v", "w1", "w2")
    out["forward_equal_fraction"] = (runs["bf16"][0] == runs["fp32"][0]).float().mean().item()
    out["eager_forward_equal_fraction"] = (eager["bf16"] == eager["fp32"]).float().mean().item()
    a, b = base[1][0, :, 0].view(-1, 128, D), base[2][0, :, 0].view(-1, 128, D).mT
    exact = torch.bmm(a.double(), b.double())
    for mode, prod in (("bf16", lambda: dc._bmm_fp32_out(a, b)), ("fp32", lambda: torch.bmm(a.float(), b.float()))):
        out[f"{mode}_product_max_rel_err_vs_fp64"] = ((prod().double() - exact).abs().max() / exact.abs().max()).item()
    out["grad_rel_diff"] = {n: rel_diff(a, b) for n, a, b in zip(names, runs["bf16"][1], runs["fp32"][1])}
    # the head mix as one einsum (cuBLAS gemv) instead of the default's six products summed
    with mock.patch.object(dc, "MIX", "einsum"):
        torch._dynamo.reset()
        ts = [t.clone().requires_grad_() for t in base]
        o = step(fn, ts)
        leaves = [t.clone().requires_grad_() for t in base]
        out["einsum_mix_fwd_bwd_ms"] = round(_cuda_ms(lambda: step(fn, leaves)), 3)
    out["einsum_mix_forward_equal_fraction"] = (o == runs["bf16"][0]).float().mean().item()
    out["einsum_mix_grad_rel_diff"] = {n: rel_diff(a, b) for n, a, b in zip(names, [t.grad for t in ts], runs["bf16"][1])}
    return out


def _cuda_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def check_mlp(M: int = 32768, D: int = 768) -> dict:
    """Fused ReLU^2 MLP (bf16 and FP8 operands) vs the unfused one: errors against fp32, and
    fwd+bwd / kernel times."""
    import speedrun.mlp as mlp
    from speedrun.fp8 import quantize_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, D, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(4 * D, D, device="cuda", generator=g) * D ** -0.5).bfloat16()
    w2 = (torch.randn(D, 4 * D, device="cuda", generator=g) * (4 * D) ** -0.5).bfloat16()
    gy = torch.randn(M, D, device="cuda", generator=g).bfloat16()
    unfused = torch.compile(mlp.reference_mlp, dynamic=False)

    def fwd_bwd(fn, dtype=torch.bfloat16):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (x, w1, w2)]
        y = fn(*leaves)
        y.backward(gy.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    ref = fwd_bwd(mlp.reference_mlp, torch.float32)

    def errors(res):
        return [round(((a.float() - b).norm() / b.norm()).item(), 6) for a, b in zip(res, ref)]

    out = {"shape": [M, D, 4 * D], "err_order": ["out", "dx", "dw1", "dw2"],
           "unfused_bf16_err": errors(fwd_bwd(unfused)),
           "unfused_fwd_bwd_ms": round(_cuda_ms(lambda: fwd_bwd(unfused)), 3),
           "cublas_up_ms": round(_cuda_ms(lambda: x @ w1.t()), 3),
           "cublas_grad_ms": round(_cuda_ms(lambda: gy @ w2), 3)}
    pre = x @ w1.t()
    post = torch.relu(pre).square()
    out["fused"] = {"err": errors(fwd_bwd(mlp.relu2_mlp)),
                    "fwd_bwd_ms": round(_cuda_ms(lambda: fwd_bwd(mlp.relu2_mlp)), 3),
                    "up_kernel_ms": round(_cuda_ms(lambda: mlp.linear_relu2(x, w1)), 3),
                    "grad_kernel_ms": round(_cuda_ms(lambda: mlp.linear_relu2_grad(gy, w2, post)), 3)}
    # FP8 operands (train.fp8_mlp): the kernels alone on quantized inputs, and the whole MLP with
    # its quantization, against cuBLAS's rowwise-scaled FP8 matmul of the same shapes
    xq, sx = quantize_rows(x)
    wq, sw = quantize_rows(w1)
    gq, sg = quantize_rows(gy)
    w2q, sw2 = quantize_rows(w2.t())
    try:
        out["cublas_fp8_up_ms"] = round(_cuda_ms(lambda: torch._scaled_mm(
            xq, wq.t(), sx[:, None], sw[None, :], out_dtype=torch.bfloat16)), 3)
        out["cublas_fp8_grad_ms"] = round(_cuda_ms(lambda: torch._scaled_mm(
            gq, w2q.t(), sg[:, None], sw2[None, :], out_dtype=torch.bfloat16)), 3)
    except Exception as e:
        out["cublas_fp8"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    def fp8_mlp(*t): return mlp.relu2_mlp(*t, fp8=True)   # quantization eager here: not fused
    out["fused_fp8"] = {"err": errors(fwd_bwd(fp8_mlp)),
                        "fwd_bwd_ms": round(_cuda_ms(lambda: fwd_bwd(fp8_mlp)), 3),
                        "up_kernel_ms": round(_cuda_ms(lambda: mlp.linear_relu2_fp8(xq, sx, wq, sw, x.dtype)), 3),
                        "grad_kernel_ms": round(_cuda_ms(lambda: mlp.linear_relu2_grad_fp8(gq, sg, w2q, sw2, post)), 3)}
    out["quantize_x_ms"] = round(_cuda_ms(lambda: quantize_rows(x)), 3)   # eager: an upper bound
    return out


def check_embedding(tokens: int = 32768, vocab: int = 50304, dim: int = 768, tables: int = 4,
                    micro_batches: int = 16) -> dict:
    """One optimizer step's embedding work at the training shape: `tables` lookups per micro-batch
    and their gradients summed over `micro_batches`. The accumulating lookups (fp32 tables, Triton
    kernels) against bf16 nn.Embedding tables (dense backward + bf16 adds, as before):
    gradient error against an fp64 sum, and ms per step. Realistic ids: Zipf-like frequencies, so
    frequent rows take thousands of atomic adds per micro-batch."""
    import speedrun.embedding as emb

    g = torch.Generator(device="cuda").manual_seed(0)
    ranks = torch.arange(1, vocab + 1, device="cuda", dtype=torch.float64)
    ids = [torch.multinomial(1 / ranks, tokens, replacement=True, generator=g).to(torch.int32)
           for _ in range(micro_batches)]
    ups = [torch.randn(tokens, dim, device="cuda", generator=g).bfloat16() for _ in range(micro_batches)]
    base = torch.randn(vocab, dim, device="cuda", generator=g)
    exact = torch.zeros(vocab, dim, device="cuda", dtype=torch.float64)
    for i, u in zip(ids, ups):
        exact.index_add_(0, i.long(), u.double())

    def tables_of(accumulate: bool) -> list:
        mods = []
        for _ in range(tables):
            m = (emb.Embedding if accumulate else torch.nn.Embedding)(1, dim).cuda()
            m.weight = torch.nn.Parameter(base.clone() if accumulate else base.bfloat16())
            if accumulate:
                m.out_dtype = torch.bfloat16
            mods.append(m)
        return mods

    def step(mods):
        for m in mods:
            m.weight.grad = None
        for i, u in zip(ids, ups):
            for m in mods:   # the same per-element work in every variant: rows * u, summed
                (m(i) * u).sum().backward()
        return mods[0].weight.grad

    out = {"shape": [tokens, vocab, dim], "tables": tables, "micro_batches": micro_batches}
    acc, dense = tables_of(True), tables_of(False)
    for name, fn in (("accumulate_triton", lambda: step(acc)), ("dense_bf16", lambda: step(dense))):
        grad = fn()
        out[name] = {"grad_rel_err": round(((grad.double() - exact).norm() / exact.norm()).item(), 7),
                     "ms_per_step": round(_cuda_ms(fn, reps=5), 2)}
    # the two kernels alone, per 32k-token lookup: timed over all micro-batches' ids at once, so
    # that the GPU time dwarfs the time it takes the host to launch a kernel (timing one 32k
    # lookup measures the host). The per-step figures above are host-bound the same way (64
    # backward() calls per step) and vary by machine
    table, grad = acc[0].weight.detach(), torch.zeros_like(base)
    i, u = torch.cat(ids), torch.cat(ups)
    out["triton"] = {"gather_ms": round(_cuda_ms(lambda: emb.gather_rows(table, i, torch.bfloat16))
                                        / micro_batches, 4),
                     "scatter_add_ms": round(_cuda_ms(lambda: emb.scatter_add_rows(grad, i, u))
                                             / micro_batches, 4)}
    return out


LOOKUP_TILES = [(32, 256, 4), (32, 128, 4), (16, 256, 4), (32, 64, 2)]


def check_record_lookup(tokens: int = 32768, vocab: int = 50304, dim: int = 768) -> dict:
    """The record recipe's table-gradient rows (record/lookup.py) per micro-batch, at the training
    shape of each table: the value embeddings (5 tables, 5 x 32k ids), the bigram table (377,280
    rows, near-uniform ids), the token embedding (Zipf-like ids: frequent rows have thousands of
    gradient rows). Bit equality with a dense fp32 sum rounded once (integer-valued gradients, so
    that every order sums exactly), then ms per micro-batch for each tile of LOOKUP_TILES against
    the dense path that autograd takes (a table-sized fp32 index_put, its bf16 cast, and the bf16
    add into .grad)."""
    from speedrun.record import lookup as lk

    g = torch.Generator(device="cuda").manual_seed(0)
    ranks = torch.arange(1, vocab + 1, device="cuda", dtype=torch.float64)
    zipf = torch.multinomial(1 / ranks, tokens, replacement=True, generator=g).to(torch.int32)
    cases = {"value_embeds": (5 * vocab, zipf[None] + torch.arange(5, device="cuda", dtype=torch.int32)[:, None] * vocab),
             "bigram": (377280, torch.randint(0, 377280, (tokens,), device="cuda", generator=g, dtype=torch.int32)),
             "embed": (vocab, zipf)}
    out = {"tokens": tokens, "dim": dim}
    for name, (rows, ids) in cases.items():
        flat = ids.reshape(-1)
        grads = (torch.randint(-64, 65, (flat.numel(), dim), device="cuda", generator=g) * 2.0 ** -4).bfloat16()
        start = torch.randn(rows, dim, device="cuda", generator=g).bfloat16()

        def dense(grad):
            d = torch.zeros(rows, dim, device="cuda").index_put_((flat.long(),), grads.float(), accumulate=True)
            grad.add_(d.bfloat16())

        expected = start.clone()
        dense(expected)
        res = {"ids": flat.numel(), "distinct": int(torch.unique(flat).numel())}
        for tile in LOOKUP_TILES:
            got = start.clone()
            lk.add_rows(got, flat, grads, tile)
            key = "x".join(map(str, tile))
            res[key] = {"equal": bool(torch.equal(got, expected)),
                        "ms": round(_cuda_ms(lambda: lk.add_rows(got, flat, grads, tile), reps=10), 4)}
        work = start.clone()
        res["dense_ms"] = round(_cuda_ms(lambda: dense(work), reps=10), 4)
        res["sort_ms"] = round(_cuda_ms(lambda: torch.sort(flat), reps=10), 4)
        if name == "value_embeds":   # the record indexes this table: its backward is index_put's
            res["in_order"] = _check_in_order(lk, rows, dim, flat, start, g)
        out[name] = res
    return out


def _check_in_order(lk, rows: int, dim: int, flat: torch.Tensor, start: torch.Tensor, g) -> dict:
    """The in-order kernel (add_rows(in_order=True)) against the record's own backward of its
    value-embedding indexing, CUDA's index_put with accumulate into a bf16 zeros table, then the
    bf16 add into .grad, on random bf16 rows (each add rounds): bit equality, time, and how far
    the fp32-sum kernel's added gradient lies from the record's."""
    grads = torch.randn(flat.numel(), dim, device="cuda", generator=g).bfloat16()

    def record(grad):
        d = torch.zeros(rows, dim, device="cuda", dtype=torch.bfloat16)
        grad.add_(d.index_put_((flat.long(),), grads, accumulate=True))

    expected, got, fp32 = start.clone(), start.clone(), start.clone()
    record(expected)
    lk.add_rows(got, flat, grads, in_order=True)
    lk.add_rows(fp32, flat, grads)
    work = start.clone()
    return {"equal_to_index_put": bool(torch.equal(got, expected)),
            "ms": round(_cuda_ms(lambda: lk.add_rows(work, flat, grads, in_order=True), reps=10), 4),
            "index_put_path_ms": round(_cuda_ms(lambda: record(work), reps=10), 4),
            "fp32_sums_rel_diff_from_index_put": rel_diff(fp32.float() - start.float(), expected.float() - start.float())}


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["record_head", "record_mlp", "record_mlp_fwd", "record_dc", "record_lookup"], default=None,
                    help="one check instead of all")
    ap.add_argument("--baseline", default=None, help="record_head: another loss.py to time beside ours")
    args = ap.parse_args()
    if args.only == "record_head":
        print(json.dumps(check_record_head(baseline=args.baseline)))
        return
    if args.only == "record_mlp":
        print(json.dumps(check_record_mlp_backward()))
        return
    if args.only == "record_mlp_fwd":
        print(json.dumps(check_record_mlp_forward()))
        return
    if args.only == "record_dc":
        print(json.dumps(check_record_dc()))
        return
    if args.only == "record_lookup":
        print(json.dumps(check_record_lookup()))
        return
    masks = check_masks()
    worst = worst_of(m["rel_err"] for m in masks)
    print(json.dumps({"mask_checks": len(masks), "worst_rel_err": worst}))
    print(json.dumps(check_model_paths()))
    print(json.dumps(check_fp8()))
    print(json.dumps(check_head()))
    print(json.dumps(check_mlp()))
    print(json.dumps(check_embedding()))
    print("MASKS", "OK" if worst < 1e-2 else "MISMATCH")


if __name__ == "__main__":
    main()
