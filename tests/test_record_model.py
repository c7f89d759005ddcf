"""The record recipe's model pieces on CPU: attention masks, DC correction, the loss and its
gradient, the FP8 weight state, the optimizer's bf16 + mantissa arithmetic, tying and untying.
(Equality with the record's own code is benchmarks/reference.py's job on a GPU machine.)"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from speedrun.record import loss as L
from speedrun.record.attention import dense_window_mask, doc_ids, window_mask
from speedrun.record.dc import dc_correct
from speedrun.record.loader import _pack
from speedrun.record.model import GRAD_SCALE, RecordConfig, build
from speedrun.record.optimizer import NorMuonAdam, cautious_step, label

TINY = RecordConfig(model_dim=48, head_dim=8, bigram_vocab=512, max_seq_len=1024)


def _batch(T=256, seed=0, every=50):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50257, T + 1).astype(np.int64)
    toks[0] = 50256
    toks[rng.integers(1, T, T // every)] = 50256
    ends = np.append(np.flatnonzero(toks[1:-1] == 50256) + 1, T)
    return _pack(toks, ends, T, TINY.bigram_vocab)


def _tensors(mb):
    return (torch.from_numpy(a) for a in (mb.inputs, mb.targets, mb.bigram, mb.cu_seqlens))


def _train_step(model, opt, batch, step: int, fp8: bool) -> torch.Tensor:
    """One step as the trainer takes it: forward, sum(losses) * GRAD_SCALE backward, NorMuon
    every step and Adam on odd ones; returns the per-token losses."""
    x, y, bg, cu = batch
    m = model.masks(cu, x.numel())
    h = model.hidden_states(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, fp8)
    losses = model.train_losses(h, y, torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.25]), fp8)
    (losses.sum() * GRAD_SCALE).backward()
    opt.step(1.0, 0.85, adam=step % 2 == 1)
    return losses


def test_block_mask_equals_the_dense_rule():
    """FlexAttention's block bookkeeping (full / partial blocks + mask_mod) gives exactly the
    token rule doc[q] == doc[k], q - window <= k <= q, for windows inside and across blocks."""
    T = 640
    cu = torch.tensor([0, 100, 101, 350, 600, 640, 640], dtype=torch.int32)
    doc = doc_ids(cu, T)
    for w in (0, 1, 127, 128, 300, 1000):
        bm = window_mask(doc, torch.tensor(w, dtype=torch.int32))
        blocks = bm.to_dense()[0, 0].bool()
        pos = torch.arange(T)
        partial_rule = bm.mask_mod(0, 0, pos[:, None], pos[None, :])
        full = torch.zeros(T // 128, T // 128, dtype=torch.bool)
        fi, fn = bm.full_kv_indices[0, 0], bm.full_kv_num_blocks[0, 0]
        for q in range(T // 128):
            full[q, fi[q, :fn[q]].long()] = True
        token = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1) & partial_rule
        token |= full.repeat_interleave(128, 0).repeat_interleave(128, 1)
        assert torch.equal(token, dense_window_mask(doc, w)), w
        # a full block must pass the rule everywhere (else the kernel would skip needed masking)
        assert torch.all(dense_window_mask(doc, w)[full.repeat_interleave(128, 0).repeat_interleave(128, 1)])


def flex_forward_shared_bytes(block_m: int, block_n: int, stages: int, head_dim: int = 128) -> int:
    """Shared memory of FlexAttention's bf16 forward tile: the query tile, `stages` key and value
    tiles, and 1 KiB of reduction scratch (what the H200's compiled kernels report: 132,096 bytes
    for 128 x 64 in 3 stages)."""
    return 2 * head_dim * (block_m + 2 * stages * block_n) + 1024


def test_flex_tiles_fit_a_99_kib_card_where_inductors_own_do_not(monkeypatch):
    """On compute capability 8.9 (RTX 4090) Inductor gives FlexAttention's forward the A100's tile,
    whose shared memory is over what an 8.9 block may use; the options passed there fit, and the
    tile stays 128 x 64 (the block mask's 128-token blocks must divide by it). Where a card has
    room, Inductor keeps its own choice. Reads Inductor's heuristics of the installed torch, so a
    torch whose 8.9 tile changes shows here."""
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    from speedrun.record.attention import SMALL_SHARED_MEMORY, flex_kernel_options

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    inductor = CUDAConfigHeuristic().get_flex_attn_fwd_configs(128, torch.bfloat16)[-1]
    limit = SMALL_SHARED_MEMORY[(8, 9)]
    assert flex_forward_shared_bytes(inductor.block_m, inductor.block_n, inductor.num_stages) > limit
    ours = flex_kernel_options((8, 9))
    assert flex_forward_shared_bytes(ours["fwd_BLOCK_M"], ours["fwd_BLOCK_N"], ours["fwd_num_stages"]) <= limit
    assert 128 % ours["fwd_BLOCK_M"] == 0 and 128 % ours["fwd_BLOCK_N"] == 0
    assert flex_kernel_options((9, 0)) is None and flex_kernel_options((8, 0)) is None
    assert flex_kernel_options(None) is None


def test_dc_correction_equals_a_per_token_loop():
    torch.manual_seed(0)
    T, H, D = 256, 6, 8
    q, k, v = (torch.randn(1, T, H, D).to(torch.bfloat16) for _ in range(3))
    y = torch.randn(1, T, H, D).to(torch.bfloat16)
    w1, w2 = torch.randn(1, T, H).bfloat16(), torch.randn(1, T, H).bfloat16()
    doc = doc_ids(torch.tensor([0, 70, 200, 256], dtype=torch.int32), T)
    scale = torch.tensor(0.3)
    out = dc_correct(y, q, k, v, w1, w2, doc, scale, window=112)
    expect = y[0].float().clone()
    for t in range(T):
        keys = [s for s in range(max(0, t - 111), t + 1) if doc[s] == doc[t]]
        p = torch.softmax(torch.stack([(q[0, t].float() * k[0, s].float()).sum(-1) for s in keys], -1) * 0.3, -1)
        a = (w1[0, t].float()[:, None] * p).sum(0)                          # [len(keys)]
        for h in range(H):
            mix = (w2[0, t, h].float() * a).bfloat16().float()
            expect[t, h] += (mix[:, None] * v[0, keys, h].float()).sum(0)
    assert torch.allclose(out[0].float(), expect.bfloat16().float(), atol=2e-2, rtol=2e-2)
    # odd lengths (exported models) pad to a block and drop the padding again
    out_odd = dc_correct(y[:, :200], q[:, :200], k[:, :200], v[:, :200], w1[:, :200], w2[:, :200], doc[:200], scale)
    assert torch.equal(out_odd, out[:, :200])


def test_dc_bf16_products_keep_the_forward_and_round_only_the_backward(monkeypatch):
    """MATMUL="bf16" (tensor-core GEMMs with fp32 outputs on CUDA; here the same products widened):
    the forward equals the fp32 path bit for bit, and the backward differs only by rounding the
    score gradient to bf16 before its GEMMs, as the record's backward kernel does."""
    import speedrun.record.dc as dc
    torch.manual_seed(2)
    T, H, D = 256, 6, 16
    doc = doc_ids(torch.tensor([0, 90, 256], dtype=torch.int32), T)
    base = [torch.randn(1, T, H, D).bfloat16() for _ in range(4)] + [torch.randn(1, T, H).bfloat16() for _ in range(2)]
    runs = {}
    for mode in ("fp32", "bf16"):
        monkeypatch.setattr(dc, "MATMUL", mode)
        y, q, k, v, w1, w2 = (t.clone().requires_grad_() for t in base)
        out = dc_correct(y, q, k, v, w1, w2, doc, torch.tensor(0.25))
        out.float().mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs[mode] = (out, [t.grad for t in (y, q, k, v, w1, w2)])
    assert torch.equal(runs["bf16"][0], runs["fp32"][0])
    diffs = [((a.float() - b.float()).norm() / b.float().norm()).item()
             for a, b in zip(runs["bf16"][1], runs["fp32"][1])]
    # the gradient reaching the v product is the bf16 output's: rounding it changes nothing, so
    # y, v, w1 and w2 get the same gradients; q and k get the score gradient rounded to bf16
    assert diffs[0] == diffs[3] == diffs[4] == diffs[5] == 0.0, diffs
    assert 0 < diffs[1] < 2e-2 and 0 < diffs[2] < 2e-2, diffs
    # the autograd function's own backward: the gradient rounded to bf16, then both products
    a, b = torch.randn(3, 5, 7).bfloat16().requires_grad_(), torch.randn(3, 7, 4).bfloat16().requires_grad_()
    g = torch.randn(3, 5, 4)
    dc._Bf16Bmm.apply(a, b).backward(g)
    assert torch.equal(a.grad, (g.bfloat16().float() @ b.float().mT).bfloat16())
    assert torch.equal(b.grad, (a.float().mT @ g.bfloat16().float()).bfloat16())


def test_training_loss_and_its_gradient():
    """Per-row loss = sum_k w_k CE(z, t[r+k]) + w_p CE(z, prefix), z = 23 sigmoid((u+5)/7.5)
    (sigmoid rounded to bf16); the gradient matches autograd of that loss on the rows whose
    targets all exist, and keeps the record's normaliser on the last rows."""
    torch.manual_seed(1)
    N, V = 12, 300
    u = torch.randn(N, V) * 4
    t = torch.randint(0, V, (N,))
    prefix = torch.randint(-1, V, (N,))
    mtp, pw = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.3])
    losses, g = L.loss_and_logit_grad(u, t, mtp, prefix, pw, grad_mul=1.0)
    uu = u.clone().requires_grad_()
    s = torch.sigmoid(uu / 7.5 + 5 / 7.5)
    z = 23 * (s + (s.bfloat16().float() - s).detach())        # bf16-rounded value, exact derivative
    lse = torch.logsumexp(z, -1)
    ref = torch.zeros(N)
    for k, w in enumerate(mtp):
        ok = torch.arange(N) + k < N
        tk = torch.where(ok, torch.roll(t, -k), 0)
        ref = ref + torch.where(ok, w * (lse - z.gather(1, tk[:, None])[:, 0]), 0.0)
    ok = prefix >= 0
    ref = ref + torch.where(ok, pw * (lse - z.gather(1, prefix.clamp(0)[:, None])[:, 0]), 0.0)
    assert torch.allclose(losses, ref.detach(), rtol=1e-5, atol=1e-5)
    ref.sum().backward()
    full = slice(0, N - 2)                                      # rows with all three targets
    assert torch.allclose(g[full], uu.grad[full], rtol=2e-2, atol=2e-4)
    # the record's normaliser sums every MTP weight, also where a later target is past the end
    assert not torch.allclose(g[-1], uu.grad[-1], rtol=1e-3, atol=1e-6)
    # validation: plain CE of the rescaled logits
    x, w = torch.randn(7, 16).bfloat16(), torch.randn(16, V).bfloat16()
    ce = L.eval_losses(x, w, t[:7], rows=3)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(L.rescale(x @ w).float(), t[:7], reduction="none"))


def head_in_chunks(x, w, t, pre, mtp, pw, chunk: int):
    """The bf16 head's losses in chunks of `chunk` rows and in one chunk: (losses equal, relative
    differences of the x and W gradients). Also run by the Triton interpreter's script (the kernel
    path)."""
    res, saved = [], L.HEAD_CHUNK_ROWS
    try:
        for rows in (x.shape[0], chunk):
            L.HEAD_CHUNK_ROWS = rows
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            losses = L.train_losses(xr, wr, t, mtp, pre, pw, 0.125, fp8=False, fast=False)
            losses.sum().backward()
            res.append((losses, xr.grad.float(), wr.grad.float()))
    finally:
        L.HEAD_CHUNK_ROWS = saved
    (whole, *grads), (chunked, *chunked_grads) = res
    return torch.equal(whole, chunked), [((a - b).norm() / b.norm()).item() for a, b in zip(chunked_grads, grads)]


def test_head_in_chunks_of_rows_equals_one_chunk():
    """The head runs HEAD_CHUNK_ROWS rows at a time (loss.py): the MTP targets of a chunk's last
    rows lie in the next chunk, the weight gradient is summed over chunks. Losses are the same and
    both gradients agree with one chunk of all rows."""
    torch.manual_seed(3)
    N, D, V = 24, 16, 300
    x, w = torch.randn(N, D).bfloat16(), (torch.randn(D, V) * 0.3).bfloat16()
    t, pre = torch.randint(0, V, (N,)), torch.randint(-1, V, (N,))
    mtp, pw = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.3])
    equal, errs = head_in_chunks(x, w, t, pre, mtp, pw, 7)
    assert equal
    assert max(errs) < 1e-2
    # a chunk that cut the next chunk's targets off would change the last rows' losses
    cut = torch.cat([L.loss_and_logit_grad((x[lo:lo + 7] @ w).float(), t[lo:lo + 7], mtp, pre[lo:lo + 7], pw,
                                           grad_mul=None)[0] for lo in range(0, N, 7)])
    whole = L.loss_and_logit_grad((x @ w).float(), t, mtp, pre, pw, grad_mul=None)[0]
    assert not torch.allclose(cut, whole)


def test_cuda_loss_kernel_goes_where_its_row_of_sigmoids_fits(monkeypatch):
    """loss_cuda keeps a row's 50,304 bf16 sigmoids in shared memory: an 8.9 card's 99 KiB per
    block holds them (704 bytes spare), a vocabulary 512 tokens larger does not; before 8.9 there
    is no e5m2 conversion. CPU tensors never take it."""
    from speedrun.record import loss_cuda as LC
    from speedrun.record.attention import SMALL_SHARED_MEMORY

    ada = SMALL_SHARED_MEMORY[(8, 9)]
    assert LC.fits((8, 9), ada, 50304) and LC.fits((9, 0), 232448, 50304) and LC.fits((10, 0), 232448, 50304)
    assert not LC.fits((8, 9), ada, 50304 + 512)
    assert not LC.fits((8, 6), ada, 50304) and not LC.fits((8, 0), 166912, 50304)
    assert not LC.fits((9, 0), 232448, 50300)          # rows are read 8 logits (16 bytes) at a time
    u = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert not LC.available(u, torch.empty(4, 64, dtype=torch.float8_e5m2))
    # the block size is the one set when compiled (a kernel built for 512 threads and launched
    # with 256 would skip half of each row; with 1024 it does not launch)
    assert "#define THREADS 512\n" in LC.source(50304, 3, True)
    monkeypatch.setattr(LC, "THREADS", 256)
    assert "#define THREADS 256\n" in LC.source(50304, 3, True)


def test_loss_kernel_choice_dispatches_only_the_fast_gpu_path(monkeypatch):
    """LOSS_KERNEL = "cuda" hands the fast (tanh.approx) path to loss_cuda with the rescale's
    constants, where it is available; the exact path, the "triton" choice, int32 targets and a
    kernel NVRTC could not build go to the Triton kernel."""
    from types import SimpleNamespace

    calls = []
    sentinel = torch.full((3,), 5.0)

    def fake_run(u, t, mtp, pre, pw, grad, coef, inv_c, b_div_c, a):
        calls.append(("cuda", coef, inv_c, b_div_c, a))
        return fake_run.result
    fake_run.result = sentinel

    class FakeTriton:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(("triton", grid, kw["FAST"]))
            return launch
    monkeypatch.setattr(L, "cuda_kernel_available", lambda u, g: True)
    monkeypatch.setattr(L, "run_cuda_kernel", fake_run)
    monkeypatch.setattr(L, "_loss_kernel", FakeTriton(), raising=False)
    monkeypatch.setattr(L, "triton", SimpleNamespace(cdiv=lambda a, b: -(-a // b)), raising=False)
    u = torch.zeros(3, 16, dtype=torch.bfloat16)
    args = (torch.zeros(5, dtype=torch.int64), torch.ones(3), torch.full((3,), -1, dtype=torch.int64),
            torch.zeros(1), torch.empty(3, 16, dtype=torch.float8_e5m2), 2.0)
    assert L._run_kernel(u, *args, fast=True) is sentinel
    assert calls.pop() == ("cuda", 2.0, 1 / L.C, L.B / L.C, L.A)
    L._run_kernel(u, *args, fast=False)
    assert calls.pop() == ("triton", (3,), False)
    monkeypatch.setattr(L, "LOSS_KERNEL", "triton")
    L._run_kernel(u, *args, fast=True)
    assert calls.pop() == ("triton", (3,), True)
    monkeypatch.setattr(L, "LOSS_KERNEL", "cuda")
    L._run_kernel(u, args[0].int(), *args[1:], fast=True)
    assert calls.pop() == ("triton", (3,), True)
    fake_run.result = None                              # NVRTC failed: the Triton kernel stands in
    L._run_kernel(u, *args, fast=True)
    assert calls[-2:] == [("cuda", 2.0, 1 / L.C, L.B / L.C, L.A), ("triton", (3,), True)]


@pytest.mark.skipif(not os.environ.get("SPEEDRUN_NVRTC"), reason="needs SPEEDRUN_NVRTC=path of libnvrtc.so")
def test_cuda_loss_kernel_compiles_for_ada_and_hopper():
    """NVRTC compiles the kernel's source to PTX for 8.9 and 9.0 (no GPU needed): the special
    functions and conversions it relies on are there. A developer's check before spending device
    time; CI has no NVRTC."""
    import ctypes

    from speedrun.record import loss_cuda as LC

    lib = ctypes.CDLL(os.environ["SPEEDRUN_NVRTC"])
    for arch in ("89", "90"):
        for e5m2 in (True, False):
            prog = ctypes.c_void_p()
            assert lib.nvrtcCreateProgram(ctypes.byref(prog), LC.source(50304, 3, e5m2).encode(), b"k.cu",
                                          0, None, None) == 0
            opts = (ctypes.c_char_p * 1)(f"--gpu-architecture=compute_{arch}".encode())
            rc = lib.nvrtcCompileProgram(prog, 1, opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            assert rc == 0, log.value.decode()
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, ptx)
            ptx = ptx.value.decode()
            assert "tanh.approx.f32" in ptx and "ex2.approx.f32" in ptx and "ld.global.nc.v4" in ptx
            assert ("cvt.rn.satfinite.e5m2x2.f32" in ptx) == e5m2


def test_fp8_head_operands_are_cast_as_the_record_casts_them(monkeypatch):
    """The record divides the bf16 input and weight by their scales in bf16 and then casts to e4m3
    (x.div(x_s).to(e4m3)). A direct fp32 -> e4m3 cast gives another value for ~3% of elements."""
    torch.manual_seed(0)
    n, d, v = 32, 64, 512
    x, w = torch.randn(n, d).bfloat16(), (torch.randn(d, v) * 0.01).bfloat16()
    seen = []
    real = torch._scaled_mm

    def spy(a, b, *args, **kw):
        seen.append((a, b))
        return real(a, b, *args, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    L.train_losses(x, w, torch.randint(0, v, (n,)), torch.tensor([1.0]), torch.full((n,), -1),
                   torch.tensor([0.0]), 1.0, fp8=True, fast=False)
    a, b = seen[0]
    assert torch.equal(a.view(torch.uint8), x.div(L.X_SCALE).to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(b.view(torch.uint8), w.div(L.W_SCALE).to(torch.float8_e4m3fn).view(torch.uint8))
    assert not torch.equal(a.view(torch.uint8), (x.float() / L.X_SCALE).to(torch.float8_e4m3fn).view(torch.uint8))


def test_prefix_table_is_the_longest_proper_prefix_token():
    from speedrun.tokenizer import get_encoding

    enc = get_encoding()
    from speedrun.record.prefix import prefix_table
    table = prefix_table(50304)
    for text in (" the", " everything", "ing", "Hello"):
        (tid,) = enc.encode_ordinary(text)
        b = enc.decode_single_token_bytes(tid)
        p = table[tid].item()
        prefixes = [n for n in range(1, len(b)) if b[:n] in enc._mergeable_ranks]
        if prefixes:
            assert enc.decode_single_token_bytes(p) == b[:max(prefixes)]
        else:
            assert p == -1
    assert table[50256] == -1 and table[50300] == -1    # <|endoftext|> and the padding rows


def test_model_seed_dtypes_and_a_learning_step():
    a = build(TINY, torch.device("cpu"), fp8=False, seed=3)
    b = build(TINY, torch.device("cpu"), fp8=False, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    fp32 = {n for n, p in a.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {"scalars", "post_lambdas", "resid_lambdas", "_mudd_gate_scale"}
    assert a.mlp_bank[:, 1].abs().sum() == 0 and a.bigram_embed.weight.abs().sum() == 0
    assert torch.equal(a.embed.weight, a.lm_head.weight.t())
    a.fill_prefix_table()
    opt = NorMuonAdam(a)
    x, y, bg, cu = _tensors(_batch())
    a.set_windows(128, 256)
    first = None
    for step in range(6):
        losses = _train_step(a, opt, (x, y, bg, cu), step, fp8=False)
        first = losses.mean().item() if first is None else first
        assert math.isfinite(losses.mean().item())
    assert losses.mean().item() < first   # the same batch six times: it must fit it


def test_bf16_weight_plus_mantissa_is_exact_fp32():
    """NorMuon updates an fp32 value split into the bf16 weight (upper half) and a 16-bit mantissa."""
    torch.manual_seed(2)
    w32 = torch.randn(4, 8, 16)
    bits = w32.view(torch.int32)
    p16 = (bits >> 16).to(torch.int16).view(torch.bfloat16).clone()   # truncation, as the record keeps it
    mant = (bits & 0xFFFF).to(torch.int32).to(torch.uint16)
    upd = torch.randn(4, 8, 16).bfloat16()
    wd, lr = torch.tensor(0.3), torch.tensor(0.01)
    mults = torch.tensor([1.0, 2.0, 1.0, 4.0]).view(-1, 1, 1)
    cautious_step(p16.view(torch.uint16), mant, upd, wd, lr, mults)
    lr_eff = 0.01 * mults
    mask = (upd.float() * w32) >= 0
    expect = w32 - w32 * mask * 0.3 * lr_eff - upd.float() * lr_eff
    got = ((p16.view(torch.int16).to(torch.int32) << 16) | mant.to(torch.int32)).view(torch.float32)
    assert torch.equal(got, expect)


def test_adam_on_odd_steps_sums_gradients_and_unties_the_embedding():
    model = build(TINY, torch.device("cpu"), fp8=False, seed=4)
    opt = NorMuonAdam(model)
    params = {label(n): p for n, p in model.named_parameters()}
    head0 = params["lm_head"].detach().clone()
    for step in range(4):
        for p in model.parameters():
            g = torch.full_like(p, 1e-3)
            p.grad = g if p.grad is None else p.grad + g
        bank0 = params["qk_bank"].detach().clone()
        opt.step(1.0, 0.9, adam=step % 2 == 1)
        assert not torch.equal(params["qk_bank"], bank0)          # Muon: every step
        if step % 2 == 0:   # Adam: not on even steps; its gradient waits for the next step's
            assert params["lm_head"].grad is not None and params["qk_bank"].grad is None
            if step == 0:
                assert torch.equal(params["lm_head"], head0)
        else:
            assert params["lm_head"].grad is None
        assert torch.equal(params["embed"], params["lm_head"].t())   # tied
    assert opt.state["lm_head"]["step"] == 2 and opt.state["embed"]["step"] == 0
    opt.untie()
    assert opt.state["embed"]["step"] == 2
    assert torch.equal(opt.state["embed"]["exp_avg"], opt.state["lm_head"]["exp_avg"].t())
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    params["embed"].grad = torch.full_like(params["embed"], -1e-3)
    opt.step(1.0, 0.9, adam=True)
    assert not torch.equal(params["embed"], params["lm_head"].t())   # apart now


def test_fp8_steps_keep_no_graph_across_steps_and_update_the_delayed_scales():
    """The FP8 path (CPU _scaled_mm here): two training steps in a row. The delayed activation
    scales are written inside the forward; no autograd history may reach them, or the second
    backward would run into the first step's freed graph."""
    model = build(TINY, torch.device("cpu"), fp8=True, seed=5)
    model.fill_prefix_table()
    opt = NorMuonAdam(model)
    x, y, bg, cu = _tensors(_batch(T=128, every=40))
    model.set_windows(128, 256)
    scales = []
    for step in range(2):
        losses = _train_step(model, opt, (x, y, bg, cu), step, fp8=True)
        model.refresh_fp8(bootstrap=step < 16)
        assert model._mlp_down_act_scales.grad_fn is None and not model._mlp_down_act_scales.requires_grad
        scales.append(model._mlp_down_act_scales.clone())
        assert torch.isfinite(losses).all()
    assert not torch.equal(scales[0][:11], torch.ones(11))   # set from the activations' amax


_INTERPRETED_KERNELS = r"""
import json, torch
import triton.runtime.interpreter as _interp
# Triton 3.5's interpreter takes a loop bound with int() of a 1-element array, an error from
# numpy 2.3 on: read it with .item()
_patch = _interp._patch_lang_tensor
def _patch_item(tensor):
    _patch(tensor)
    tensor.__index__ = lambda self: int(self.handle.data.item())
_interp._patch_lang_tensor = _patch_item
from speedrun.record import loss as L
torch.manual_seed(0)
out = {}
# the tiled transpose: shapes that are not multiples of its 64 x 128 tile, 1-, 2- and 4-byte types
same = []
for (m, n), dtype in [((70, 200), torch.float8_e5m2), ((130, 129), torch.bfloat16), ((5, 300), torch.float32)]:
    t = torch.randn(m, n).to(dtype)
    same.append(torch.equal(L.transposed(t).view(-1).view(torch.uint8), t.t().contiguous().view(-1).view(torch.uint8)))
out["transpose_same_bits"] = same
# the loss kernel against its PyTorch reference: a vocabulary with a masked tail, MTP targets
# that run past the end, targets out of range, prefix targets absent and present
N, V = 24, 2500
u = (torch.randn(N, V) * 8).bfloat16()
t = torch.randint(0, V, (N,))
t[3] = -1
pre = torch.randint(-1, V, (N,))
mtp, pw = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.3])
grad = torch.empty(N, V, dtype=torch.bfloat16)
losses = L._run_kernel(u, t, mtp, pre, pw, grad, 2.0 * (L.A / L.C), fast=False)
ref, g = L.loss_and_logit_grad(u, t, mtp, pre, pw, grad_mul=2.0)
out["loss_err"] = ((losses - ref).abs().max() / ref.abs().max()).item()
out["grad_err"] = ((grad.float() - g).norm() / g.norm()).item()
# the target columns, written after the softmax part: each one's gradient, duplicates included
t[5] = t[6] = t[7] = pre[5]
grad = torch.empty(N, V, dtype=torch.float32)
L._run_kernel(u, t, mtp, pre, pw, grad, 2.0 * (L.A / L.C), fast=False)
_, g = L.loss_and_logit_grad(u, t, mtp, pre, pw, grad_mul=2.0)
cols = torch.cat([t.clamp(0, V - 1), pre.clamp(0, V - 1)])
rows = torch.arange(N).repeat(2)
out["target_cols_err"] = ((grad[rows, cols] - g[rows, cols]).abs().max() / g[rows, cols].abs().max()).item()
# the head in chunks of rows (HEAD_CHUNK_ROWS) through the kernel: as in one chunk
from test_record_model import head_in_chunks
x, w = torch.randn(N, 16).bfloat16(), (torch.randn(16, V) * 0.3).bfloat16()
out["chunked_loss_equal"], out["chunked_grad_errs"] = head_in_chunks(x, w, t, pre, mtp, pw, 7)
# the MLP backward with d(pre) in the matmul's epilogue (record/mlp.py BACKWARD = "fused") against
# the pointwise one; W2 is stored [hidden, dim], so the kernel reads it as stored (its transpose).
# fp32: the interpreter's TMA loads of bf16 return garbage (numpy has no bf16); the GPU checks
# cover bf16
from speedrun import mlp as fused_mlp
from speedrun.record import mlp as RM
M, D, H = 64, 32, 128
x, g = torch.randn(M, D), torch.randn(M, D)
w1, w2 = torch.randn(H, D) / D ** 0.5, torch.randn(H, D) / H ** 0.5
post = torch.relu(x @ w1.t()).square()
grads = {}
for mode in ("pointwise", "fused"):
    RM.BACKWARD = mode
    grads[mode] = RM._backward(g, x, w1, w2, post)
out["mlp_fused_kernel"] = fused_mlp.kernels_available(g)
out["mlp_bwd_errs"] = [((a.float() - b.float()).norm() / b.float().norm()).item()
                       for a, b in zip(grads["fused"], grads["pointwise"])]
print(json.dumps(out))
"""


def test_head_kernels_in_the_triton_interpreter():
    """The loss kernel and the tiled transpose of the FP8 head, and the MLP backward's fused
    d(pre), run by Triton's interpreter on CPU (skipped where Triton is not installed, as on the
    CI's CPU torch)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    import pytest
    from conftest import PROJECT
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (CPU torch): the GPU checks cover the kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(PROJECT), str(PROJECT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNELS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["transpose_same_bits"] == [True, True, True], res
    assert res["loss_err"] < 1e-5 and res["grad_err"] < 1e-2, res   # the gradient is stored in bf16
    assert res["target_cols_err"] < 1e-5, res
    assert res["chunked_loss_equal"] and max(res["chunked_grad_errs"]) < 1e-2, res
    assert res["mlp_fused_kernel"] and max(res["mlp_bwd_errs"]) < 1e-5, res


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's compiler")
def test_our_triton_kernels_fit_an_8_9_cards_shared_memory():
    """The record recipe's own Triton kernels that an RTX 4090 runs (the head's loss kernel and
    transpose, the tables' gradient rows), compiled for compute capability 8.9 at their training
    shapes with Triton's own compiler (no GPU needed): the shared memory each block asks for is
    within what an 8.9 block may use, so none fails to launch there as FlexAttention's forward did."""
    import triton
    from triton.backends.compiler import GPUTarget

    from speedrun.record import lookup, loss
    from speedrun.record.attention import SMALL_SHARED_MEMORY

    def shared(fn, signature, constexprs, warps):
        src = triton.compiler.ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                        constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 89, 32), options={"num_warps": warps}).metadata.shared

    rows, block_d, warps = lookup.TILE
    sizes = {
        "loss": shared(loss._loss_kernel, {
            "logits_ptr": "*bf16", "grad_ptr": "*fp8e5", "targets_ptr": "*i64", "mtp_ptr": "*fp32",
            "prefix_ptr": "*i64", "prefix_w_ptr": "*fp32", "loss_ptr": "*fp32", "N": "i32", "inv_c": "fp32",
            "b_div_c": "fp32", "a": "fp32", "coef": "fp32"},
            {"V": 50304, "N_PRED": 3, "WITH_GRAD": True, "FAST": True, "EXACT_ROUND": False,
             "BLOCK": loss.LOSS_BLOCK}, loss.LOSS_WARPS),
        "transpose": shared(loss._transpose_kernel, {"src_ptr": "*i8", "dst_ptr": "*i8", "M": "i32", "N": "i32"},
                            {"BLOCK_M": 64, "BLOCK_N": 128}, 8),
        "table rows": shared(lookup._add_segments_kernel, {
            "grad_table": "*bf16", "grad_rows": "*bf16", "sorted_ids": "*i32", "order": "*i64", "n": "i32",
            "D": "i32"}, {"ROWS": rows, "BLOCK_D": block_d}, warps),
        "value-embedding rows in order": shared(lookup._add_runs_in_order_kernel, {
            "grad_table": "*bf16", "grad_rows": "*bf16", "sorted_ids": "*i32", "order": "*i64", "n": "i32",
            "D": "i32"}, {"ROWS": rows, "CHUNK": lookup.IN_ORDER_CHUNK, "BLOCK_D": block_d}, warps),
    }
    limit = SMALL_SHARED_MEMORY[(8, 9)]
    assert all(0 <= b <= limit for b in sizes.values()), sizes
