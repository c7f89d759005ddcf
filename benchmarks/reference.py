"""Differential checks of the default recipe against the public record's own code.

    python -m benchmarks.reference --ref .reference/modded-nanogpt [--checks init,loader,schedule,forward,optimizer,curves]
                                   [--shards .corpus/imdb-packed/shards] [--out benchmarks/results/reference.json]

The reference is KellerJordan/modded-nanogpt at REF_COMMIT (record #89): `train_gpt.py`,
`triton_kernels.py`, `dc_triton_kernels.py`. It is never part of this project: `--fetch URL_OR_GIT_DIR`
clones it into the git-ignored `.reference/`. Its module code (everything above its `# int main`)
is executed as it is; the one substitution is its FlashAttention-3 kernel (the `kernels` hub
package, unreachable offline), replaced by `torch.nn.attention.varlen.varlen_attn` with the same
arguments (KERNELS_SHIM). On a machine without CUDA (development only) its Triton and CUDA kernels
are replaced by this project's PyTorch versions of the same math and a few device lines are
patched (CPU_PATCHES): such a run checks the wiring, not the kernels.

Checks (each prints PASS/FAIL and is shown failing once on a deliberately changed copy of ours):
  init       same seed -> the same initial weights, bit for bit
  loader     same shards -> the same training micro-batches (document pieces, cu_seqlens, bigram
             ids) through a batch-size change, and the same validation chunks, bit for bit
  schedule   every per-step value of all 1285 steps + the final validation: batch tokens, piece
             length, windows, lr, momentum, MTP and prefix weights, Adam parity, untie step, YaRN
             tables and scale; bit for bit
  forward    the same weights (the init plus noise, so every branch is live) and tokens -> the same
             per-token losses and per-parameter gradients, training and validation; tolerance: twice
             the larger of what the reference itself and ours move between eager and compiled
             execution (floor 1e-2 for gradients, 2e-3 for losses). `--no-fp8`: the MLP in bf16 on
             both sides, the head FP8 on both (the record's training loss has no bf16 head)
  optimizer  the same gradients -> the same updates over steps around the untie step (Muon every
             step, Adam on odd steps with summed gradients, the tied head/embedding, the untie)
  curves     both trained from the same initial weights on the same tokens for --curve-steps steps
             of the real schedule: the validation curve within the spread of reference seeds (its
             largest deviation within their largest range, its mean deviation within the largest
             mean deviation between two of them)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

REF_URL = "https://github.com/KellerJordan/modded-nanogpt.git"
REF_COMMIT = "f411b3d346aa52d3504324ca93c230fd84c6c07f"
REF_FILES = ("train_gpt.py", "triton_kernels.py", "dc_triton_kernels.py")
MAIN_MARKER = "\n# int main\n"

# FlashAttention-3 from the `kernels` hub -> torch's varlen attention (same arguments); on CPU a
# dense mask with the same rule (development runs only)
KERNELS_SHIM = r'''
import torch

def _dense(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, window_size):
    L = q.size(0)
    pos = torch.arange(L, device=q.device)
    doc = torch.searchsorted(cu_seqlens_q.to(torch.int64), pos, right=True)
    d = pos[:, None] - pos[None, :]
    left = window_size[0]
    mask = (d >= 0) & (doc[:, None] == doc[None, :])
    if left >= 0:
        mask = mask & (d <= left)
    y = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=softmax_scale)
    return y[0].transpose(0, 1)

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=True, softmax_scale=None, window_size=(-1, -1)):
    assert causal
    if not q.is_cuda:
        return _dense(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, window_size)
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                       scale=softmax_scale, window_size=(int(window_size[0]), int(window_size[1])))

class _Kernel:
    class flash_attn_interface:
        flash_attn_varlen_func = staticmethod(flash_attn_varlen_func)

def get_kernel(name, version=None):
    return _Kernel
'''

# Eager execution of the reference (the record itself always runs compiled): its in-place shift of
# the keys (`k[:, 1:] = k[:, :-1]`) overlaps itself, which compiled code treats as a shift and eager
# code as a smear; `.clone()` gives eager the compiled meaning.
# Its FP8 head's backward returns 9 gradients for 10 inputs, which compiled code tolerates and eager
# autograd rejects: one more None.
EAGER_PATCHES = [
    ("k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:]",
     "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:].clone()"),
]
EAGER_KERNEL_PATCHES = [   # triton_kernels.py
    ("        return grad_x, None, None, None, None, grad_w, None, None, None",
     "        return grad_x, None, None, None, None, grad_w, None, None, None, None"),
]
# Its per-layer FP8 scales are 4-byte slices of one buffer, and cuBLAS here (torch 2.11, CUDA 13)
# rejects scale pointers that are not 16-byte aligned (pytorch/pytorch#159957): CUBLAS_STATUS_NOT_
# SUPPORTED in the MLP's down projection. `.abs()` of the (positive) scales gives the same values in a
# fresh, aligned buffer, eager and compiled (Inductor removes a `.clone()` as a no-op).
CUBLAS_PATCHES = [
    ("mlp_down_proj_scales = [self._mlp_down_proj_scales[i:i+1] for i in range(12)]",
     "mlp_down_proj_scales = [self._mlp_down_proj_scales[i:i+1].abs() for i in range(12)]"),
    ("                    self._mlp_down_act_scales[i:i+1],\n",
     "                    self._mlp_down_act_scales[i:i+1].abs(),\n"),
]
CPU_PATCHES = [
    ("import triton\n", ""),
    ('torch.empty(\n    1, device=f"cuda:{os.environ[\'LOCAL_RANK\']}", requires_grad=True\n).backward()', ""),
    ("assert torch.cuda.is_available()\n", ""),
    ('device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))', 'device = torch.device("cpu")'),
    ("torch.cuda.set_device(device)\n", ""),
    ('dist.init_process_group(backend="cuda:nccl,cpu:gloo", device_id=device)', 'dist.init_process_group(backend="gloo")'),
    ("num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count", "num_sms = 132"),
    ("pin_memory=True", "pin_memory=False", 3),
    ('.to(device="cuda", non_blocking=True)', ".to(device=device)", 4),
    # memory of a development machine: a 50,304-row bigram table instead of 377,280
    ("bigram_vocab_size: int = 50304 * 15 // 2", "bigram_vocab_size: int = 50304"),
]

# CPU stand-ins for the reference's Triton/CUDA kernels: this project's PyTorch code for the same math
CPU_TRITON_KERNELS = r'''
import torch
from speedrun.record import loss as _loss, mlp as _mlp

def XXT(A, out): out.copy_(A @ A.mT); return out
def XTX(A, out): out.copy_(A.mT @ A); return out
def ba_plus_cAA(A, alpha, beta, out):
    out.copy_(torch.baddbmm(A, A, A, beta=beta, alpha=alpha) if A.dim() == 3 else torch.addmm(A, A, A, beta=beta, alpha=alpha))
    return out
def transpose_add(src, dst): dst.add_(src.t())
def transpose_copy(src, dst): dst.copy_(src.t())
def quantize_transpose_mlp_down_weights(*a, **k): raise RuntimeError("FP8 MLP needs CUDA")
def reduce_mlp_activation_scales(*a, **k): raise RuntimeError("FP8 MLP needs CUDA")

class FusedLinearReLUSquareFunction:
    @staticmethod
    def apply(x, W1, W2, *fp8):
        assert not fp8, "set DISABLE_FP8=1 on CPU"
        return _mlp.relu2_mlp(x, W1, W2)[0]

class FusedSoftcappedCrossEntropy:
    @staticmethod
    def apply(x, targets, mtp_weights, prefix_targets, prefix_weight, w, x_s, w_s, grad_s, grad_scale):
        return _loss.train_losses(x, w, targets, mtp_weights, prefix_targets, prefix_weight, grad_scale, fp8=False)
'''
CPU_DC_KERNELS = r'''
import torch
from speedrun.record import dc as _dc
from speedrun.record.attention import doc_ids

def dc_attention_postonly_nodd_correction_add_base_triton(base_out, q, k, v, dc_weights, softmax_lse, scaling,
                                                          window=112, seq_lens=None, block_m=16, block_n=32):
    w1, w2 = dc_weights
    T = q.size(1)
    doc = doc_ids(seq_lens, T)
    y = _dc.dc_correct(base_out.view(q.shape), q, k, v, w1, w2, doc, torch.tensor(scaling), window)
    return y.view(base_out.shape)
'''


# ----------------------------------------------------------------------------- the reference

def fetch(dest: Path, source: str = REF_URL) -> Path:
    """Clone `source` (a URL or a local git dir) and check out REF_COMMIT's three files into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if Path(source).is_dir() and (Path(source) / "HEAD").exists():   # a bare mirror
            git = ["git", "--git-dir", source]
        else:
            subprocess.run(["git", "clone", "-q", "--filter=blob:none", "--no-checkout", source, tmp], check=True)
            git = ["git", "-C", tmp]
        for f in REF_FILES:
            blob = subprocess.run([*git, "show", f"{REF_COMMIT}:{f}"], check=True, capture_output=True).stdout
            (dest / f).write_bytes(blob)
    (dest / "COMMIT").write_text(REF_COMMIT + "\n")
    return dest


def _patch(src: str, patches: list[tuple]) -> str:
    """Exact text replacements, each target found exactly as often as stated (default once)."""
    for old, new, *count in patches:
        n, want = src.count(old), (count[0] if count else 1)
        if n != want:
            raise RuntimeError(f"reference patch target found {n} times (expected {want}): {old[:60]!r}")
        src = src.replace(old, new)
    return src


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_reference(ref_dir: Path, run_dir: Path, cpu: bool) -> Path:
    """A directory holding the reference files (+ shims) as the reference expects to import them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in REF_FILES:
        shutil.copy2(ref_dir / f, run_dir / f)
    (run_dir / "kernels.py").write_text(KERNELS_SHIM)
    if cpu:
        (run_dir / "triton_kernels.py").write_text(CPU_TRITON_KERNELS)
        (run_dir / "dc_triton_kernels.py").write_text(CPU_DC_KERNELS)
    return run_dir


def reference_env(data_path: Path | None) -> dict:
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    if data_path is not None:
        env["DATA_PATH"] = str(data_path)
    return env


def load_reference(ref_dir: Path, run_dir: Path, device: torch.device, eager: bool,
                   data_path: Path | None = None) -> types.ModuleType:
    """The reference's module code (above `# int main`) as a module object."""
    cpu = device.type == "cpu"
    run_dir = stage_reference(ref_dir, run_dir, cpu)
    if eager and not cpu:
        kernels = run_dir / "triton_kernels.py"
        kernels.write_text(_patch(kernels.read_text(), EAGER_KERNEL_PATCHES))
    src = (run_dir / "train_gpt.py").read_text()
    src = src[:src.index(MAIN_MARKER)]
    patches = (CPU_PATCHES if cpu else CUBLAS_PATCHES) + (EAGER_PATCHES if eager else [])
    src = _patch(src, patches)
    os.environ.update(reference_env(data_path))
    if cpu:
        os.environ["DISABLE_FP8"] = "1"
    from speedrun.tokenizer import ensure_offline_cache
    ensure_offline_cache()
    name = f"record_reference_{'eager' if eager else 'compiled'}"
    mod = types.ModuleType(name)
    mod.__file__ = str(run_dir / "train_gpt.py")
    sys.modules[name] = mod
    old_argv0, old_path = sys.argv[0], list(sys.path)
    sys.argv[0] = str(run_dir / "train_gpt.py")
    sys.path.insert(0, str(run_dir))
    for m in ("kernels", "triton_kernels", "dc_triton_kernels"):
        sys.modules.pop(m, None)
    try:
        exec(compile(src, str(run_dir / "train_gpt.py"), "exec"), mod.__dict__)
    finally:
        sys.argv[0] = old_argv0
        sys.path[:] = old_path
    return mod


def build_reference_model(ref, seed: int, max_seq_len: int):
    """The reference GPT as its main section builds it (dtypes, FP8 copies), from `seed`."""
    torch.manual_seed(seed)
    model = ref.GPT(vocab_size=50257, num_layers=11, num_heads=6, head_dim=128, model_dim=768,
                    max_seq_len=max_seq_len).to(ref.device)
    nn = torch.nn
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.Linear)):
            m.weight.data = m.weight.data.bfloat16()
    for name in ("ve_gate_bank", "qk_bank", "vo_bank", "mlp_bank", "mudd_w1", "mudd_w2", "mudd_b2",
                 "mudd_gate_w1", "mudd_gate_w2", "mudd_gate_b2"):
        p = getattr(model, name)
        p.data = p.data.bfloat16()
    if ref.device.type == "cuda":
        model.quantize_mlp_fp8(bootstrap_down=True)
    return model


def ref_state(model) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- results

class Report:
    """Collects each check's verdict and numbers; prints one line per check."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def add(self, name: str, ok: bool, **info) -> bool:
        self.results[name] = {"pass": bool(ok), **info}
        brief = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()
                          if not isinstance(v, dict) and not (isinstance(v, list) and len(v) > 6))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {brief}", flush=True)
        return ok


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (0 when both are 0; inf if a is not finite)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    nb = b.norm().item()
    d = (a - b).norm().item()
    return d / nb if nb > 0 else (0.0 if d == 0 else math.inf)


# ----------------------------------------------------------------------------- check: loader

def check_loader(ref, shards: Path, report: Report, name: str = "loader", seq_shift: int = 0) -> bool:
    """The reference's data generator and ours on the same shards: stage-1 micro-batches, a switch
    to stage 2's size and piece length mid-run, and validation chunks."""
    from speedrun.record.loader import DocumentBatches, ValidationChunks
    from speedrun.shards import shard_paths

    train, val = shard_paths(shards, "train"), shard_paths(shards, "val")
    plan = [(131072, 896)] * 12 + [(262144, 2048)] * 6      # (batch tokens, piece length) per step
    gen = ref.distributed_data_generator(str(train[0].parent / "train_*.bin"), plan[0][0], plan[0][1],
                                         grad_accum_steps=8)
    ours = DocumentBatches(train, ref.args.bigram_vocab_size)
    compared, bad = 0, []
    prev = plan[0]
    for step, (batch, seq) in enumerate(plan):
        send = (batch, seq, 8) if (batch, seq) != prev else None
        prev = (batch, seq)
        for _ in range(8):
            r = gen.send(send)
            o = ours.next(batch // 8, seq + seq_shift)
            for field, a, b in (("inputs", o.inputs, r[0]), ("targets", o.targets, r[1]),
                                ("cu_seqlens", o.cu_seqlens, r[2]), ("bigram", o.bigram, r[3])):
                if not np.array_equal(a, b.cpu().numpy()):
                    bad.append(f"step {step} {field}")
            compared += 1
    vgen = ref.distributed_data_generator(str(val[0].parent / "val_*.bin"), 8 * 65536, -1,
                                          grad_accum_steps=8, align_to_bos=False)
    vals = ValidationChunks(val, ref.args.bigram_vocab_size)
    for i, o in enumerate(vals(8 * 65536, 65536)):
        r = next(vgen)
        for field, a, b in (("inputs", o.inputs, r[0]), ("targets", o.targets, r[1]),
                            ("cu_seqlens", o.cu_seqlens, r[2]), ("bigram", o.bigram, r[3])):
            if not np.array_equal(a, b.cpu().numpy()):
                bad.append(f"val chunk {i} {field}")
        compared += 1
    ok = not bad if "must fail" not in name else bool(bad)
    return report.add(name, ok, micro_batches=compared, mismatches=len(bad), first=bad[:3])


# ----------------------------------------------------------------------------- check: schedule

def our_schedule(cooldown_frac: float = 0.6):
    from speedrun.record.schedule import Schedule, record_stages
    return Schedule(record_stages(), 1270, 15, cooldown_frac=cooldown_frac, final_lr=0.15, untie_stage=2,
                    final_long_window=20)


def check_schedule(ref, report: Report, name: str = "schedule", cooldown_frac: float = 0.6) -> bool:
    from speedrun.record.yarn import Yarn

    sched = our_schedule(cooldown_frac)
    dev = ref.device
    # the reference's own TrainingManager.advance_schedule, on a stand-in holding only its rotary
    mgr = types.SimpleNamespace(block_size=128, model=types.SimpleNamespace(
        yarn=ref.Yarn(128, 4096), yarn_paired_head=ref.Yarn(128, 4096, paired=True)))
    stage0 = ref.training_schedule.lookup(0)[0]
    mgr.ws_short, mgr.ws_long = stage0.window_sizes
    mgr.batch_size, mgr.train_max_seq_len = stage0.batch_size, stage0.train_max_seq_len
    ours_y, ours_p = Yarn(128, 4096, False, dev), Yarn(128, 4096, True, dev)
    bad = []
    total = ref.training_schedule.total_steps
    if total != sched.total:
        bad.append(f"total steps {total} vs {sched.total}")
    if ref.training_schedule.split_step != sched.untie_step:
        bad.append(f"untie step {ref.training_schedule.split_step} vs {sched.untie_step}")
    for step in range(total + 1):
        ref.TrainingManager.advance_schedule(mgr, step)
        plan = sched.plan(step)
        r_mtp = [float(v) for v in mgr.mtp_weights.tolist()]
        r = {"batch": mgr.batch_size, "seq": mgr.train_max_seq_len, "short": mgr.ws_short * 128,
             "long": mgr.ws_long * 128, "lr": ref.training_schedule.get_lr(step),
             "momentum": ref.get_muon_momentum(step), "adam": step % 2 == 1,
             "mtp": r_mtp + [0.0] * (3 - len(r_mtp)), "prefix": float(mgr.prefix_weight.item())}
        o = {"batch": plan.batch_tokens, "seq": plan.seq_len, "short": plan.short_window,
             "long": plan.long_window, "lr": plan.lr, "momentum": plan.momentum, "adam": plan.adam,
             "mtp": [float(torch.tensor(v, dtype=torch.float32)) for v in plan.mtp_weights],
             "prefix": float(torch.tensor(plan.prefix_weight, dtype=torch.float32))}
        for k in r:
            if r[k] != o[k]:
                bad.append(f"step {step} {k}: {r[k]} vs {o[k]}")
        hist = sched.long_window_history(step)
        if step == 0 or hist != sched.long_window_history(step - 1):
            ours_y.replay(hist)
            ours_p.replay(hist)
            for ry, oy, tag in ((mgr.model.yarn, ours_y, "yarn"), (mgr.model.yarn_paired_head, ours_p, "paired yarn")):
                if not (torch.equal(ry.factor1[:4096], oy.cos) and torch.equal(ry.factor2[:4096], oy.sin)
                        and ry.attn_scale == oy.attn_scale):
                    bad.append(f"step {step} {tag} tables/scale")
    ref.TrainingManager.apply_final_ws_ext(mgr)
    if mgr.ws_long * 128 != sched.windows(total, final_validation=True)[1]:
        bad.append("final validation window")
    ok = not bad if "must fail" not in name else bool(bad)
    return report.add(name, ok, steps=total + 1, mismatches=len(bad), first=bad[:3])


# ----------------------------------------------------------------------------- check: init

def check_init(ref, report: Report, seed: int, max_seq_len: int, name: str = "init") -> bool:
    from speedrun.record.model import RecordConfig, build

    rm = build_reference_model(ref, seed, max_seq_len)
    om = build(RecordConfig(max_seq_len=max_seq_len, bigram_vocab=ref.args.bigram_vocab_size), ref.device,
               fp8=ref.device.type == "cuda", seed=seed)   # both make their FP8 copies and scales
    rs, os_ = ref_state(rm), om.state_dict()
    missing = sorted(set(rs) ^ set(os_))
    bad = [k for k in rs if k in os_ and not (rs[k].dtype == os_[k].dtype and rs[k].shape == os_[k].shape
                                              and torch.equal(rs[k].cpu(), os_[k].cpu()))]
    del rm, om
    return report.add(name, not missing and not bad, tensors=len(rs), unmatched_names=missing[:3], differing=bad[:3])


# ----------------------------------------------------------------------------- check: forward

def perturbed(state: dict, seed: int) -> dict:
    """The state plus noise on every parameter (zero-initialised ones too), so that every branch
    of the model carries signal: the check must not pass because a term is zero at init."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point() or k.startswith("_mlp_down") or k == "bigram_sign_table":
            out[k] = v.clone()
            continue
        x = v.float().cpu()
        std = x.std().item() if x.numel() > 1 else 0.0
        sigma = 0.1 if x.numel() <= 64 else (0.25 * std if std > 0 else 0.02)
        out[k] = (x + sigma * torch.randn(x.shape, generator=g)).to(v.dtype).to(v.device)
    return out


STEP_CONFIGS = {
    # name: (step, windows in blocks, mtp weights, prefix weight, piece length, long-window history)
    "stage1": (100, (1, 3), [1.0, 0.5, 0.25 * (1 - 100 / 423)], 0.25, 896, [384]),
    "stage3": (1000, (5, 11), [1.0], 0.0, 2048, [384, 896, 1408]),
}


def _ref_yarn(model, history):
    for y in (model.yarn, model.yarn_paired_head):
        y.reset()
        for old, new in zip(history, history[1:]):
            y.apply(old, new)


def _grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        out[name.removeprefix("_orig_mod.")] = p.grad.detach().float().clone() if p.grad is not None else None
        p.grad = None
    return out


def run_reference_step(ref, model, fwd, batch, cfg_name, fp8: bool):
    step, (ws, wl), mtp, pw, seq, hist = STEP_CONFIGS[cfg_name]
    dev = ref.device
    _ref_yarn(model, hist)
    sc = ref.ForwardScheduleConfig(mtp_weights=torch.tensor(mtp, device=dev), prefix_weight=torch.tensor([pw], device=dev),
                                   ws_short=ws * 128, ws_long=wl * 128, train_max_seq_len=seq)
    model.train()
    x, y, cu, bg = (torch.from_numpy(a).to(dev) for a in (batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram))
    losses = fwd(x, y, cu, bg, sc)
    (losses.sum() * ref.grad_scale).backward()
    return losses.detach().float(), _grads(model)


def run_our_step(model, hidden_fn, batch, cfg_name, fp8: bool, head_fp8: bool):
    """One forward/backward of ours; `fp8` is the MLP's, `head_fp8` the loss head's (apart: the
    record's training loss has no bf16 head, see check_forward)."""
    from speedrun.record.model import GRAD_SCALE

    step, (ws, wl), mtp, pw, seq, hist = STEP_CONFIGS[cfg_name]
    dev = model.attn_scale.device
    model.set_rotary(hist)
    model.set_windows(ws * 128, wl * 128)
    model.train()
    x, y, cu, bg = (torch.from_numpy(a).to(dev) for a in (batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram))
    m = model.masks(cu, x.numel())
    h = hidden_fn(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, fp8)
    mtp3 = torch.tensor(mtp + [0.0] * (3 - len(mtp)), device=dev)
    losses = model.train_losses(h, y, mtp3, torch.tensor([pw], device=dev), head_fp8)
    (losses.sum() * GRAD_SCALE).backward()
    return losses.detach().float(), _grads(model)


def eval_reference(ref, model, fwd, batch):
    dev = ref.device
    _ref_yarn(model, [384, 896, 1408, 1664])
    sc = ref.ForwardScheduleConfig(mtp_weights=torch.tensor([1.0], device=dev), prefix_weight=torch.tensor([0.0], device=dev),
                                   ws_short=6 * 128, ws_long=20 * 128, train_max_seq_len=2048)
    model.eval()
    with torch.no_grad():
        x, y, cu, bg = (torch.from_numpy(a).to(dev) for a in (batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram))
        out = fwd(x, y, cu, bg, sc).float()
    model.train()
    return out


def eval_ours(model, hidden_fn, batch):
    dev = model.attn_scale.device
    model.set_rotary([384, 896, 1408, 1664])
    model.set_windows(6 * 128, 20 * 128)
    model.eval()
    with torch.no_grad():
        x, y, cu, bg = (torch.from_numpy(a).to(dev) for a in (batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram))
        m = model.masks(cu, x.numel())
        h = hidden_fn(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, False)
        out = model.eval_losses(h, y).float()
    model.train()
    return out


def compare(a_losses, a_grads, b_losses, b_grads) -> dict:
    out = {"loss_sum": rel(a_losses.sum(), b_losses.sum()), "losses": rel(a_losses, b_losses), "grads": {}}
    for k, g in b_grads.items():
        og = a_grads.get(k)
        if g is None or og is None:
            out["grads"][k] = 0.0 if (g is None and og is None) else math.inf
        else:
            out["grads"][k] = rel(og, g)
    return out


# ----------------------------------------------------------------------------- check: optimizer

OPT_STEPS = (0, 1, 2, 3, 845, 846, 847, 848, 849, 850)   # first steps; the untie at 847


def _labelled(model) -> dict:
    from speedrun.record.optimizer import label
    return {label(n.removeprefix("_orig_mod.")): p for n, p in model.named_parameters()}


def run_optimizers(ref, rm, other, step_other, steps, seed: int) -> dict:
    """Feed the same gradients to the reference's optimizer (on rm) and another one (on `other`,
    stepped by `step_other(step)`); per label, the worst relative difference of their updates."""
    mgr = ref.TrainingManager(rm)
    rp, op = _labelled(rm), _labelled(other)
    dev = next(iter(rp.values())).device
    g = torch.Generator(device=dev).manual_seed(seed)
    scales = {}
    for k, p in rp.items():   # gradients at 1% of each weight's spread
        sd = p.detach().float().std().item() if p.numel() > 1 else 0.0
        scales[k] = 1e-2 * (sd if sd > 0 else 1.0)
    worst: dict[str, float] = {}
    for step in steps:
        before = {k: p.detach().float().clone() for k, p in rp.items()}
        before_o = {k: p.detach().float().clone() for k, p in op.items()}
        for k in rp:
            grad = (scales[k] * torch.randn(rp[k].shape, generator=g, device=dev)).to(rp[k].dtype)
            for p in (rp[k], op[k]):   # summed into .grad as backward would (Adam keeps even steps')
                p.grad = grad.clone() if p.grad is None else p.grad + grad
        mgr.step_optimizers(step)
        step_other(step)
        for k in rp:
            du_r = rp[k].detach().float() - before[k]
            du_o = op[k].detach().float() - before_o[k]
            err = rel(du_o, du_r) if du_r.abs().sum() > 0 else (0.0 if du_o.abs().sum() == 0 else math.inf)
            worst[k] = max(worst.get(k, 0.0), err)
            if os.environ.get("REF_DEBUG") and err > 1e-3:
                print(f"  step {step} {k}: update rel err {err:.3g} |ref| {du_r.norm().item():.3g} |other| {du_o.norm().item():.3g}")
    return worst


def ours_stepper(om, compile: bool, adam_parity: int = 1):
    from speedrun.record.optimizer import NorMuonAdam

    sched = our_schedule()
    opt = NorMuonAdam(om, compile=compile)

    def step(s: int) -> None:
        opt.step(sched.lr(s), sched.muon_momentum(s), adam=s % 2 == adam_parity)
        if s == sched.untie_step:
            opt.untie()
    return step


def eager_polar_express_stepper(ref, rm2):
    """The reference's own optimizer with its Polar Express run eagerly (same math, other
    rounding): how far two legitimate bf16 executions of the record's update lie apart."""
    mgr = ref.TrainingManager(rm2)
    compiled = ref.polar_express
    eager = getattr(compiled, "_torchdynamo_orig_callable", None) or compiled.__wrapped__

    def step(s: int) -> None:
        ref.polar_express = eager
        try:
            mgr.step_optimizers(s)
        finally:
            ref.polar_express = compiled
    return step


def _act_scales(model) -> torch.Tensor:
    return model._mlp_down_act_scales.detach().clone()


def check_forward(ref, shards: Path, report: Report, seed: int, max_seq_len: int, T: int, val_T: int,
                  compile_ours: bool, fp8_on: bool = True, configs: tuple[str, ...] = tuple(STEP_CONFIGS),
                  deliberate: bool = True, validation: bool = True, prior_floors: tuple = ()) -> tuple[bool, list]:
    """Loss and gradients of the two models on the same weights and tokens (see the module doc).
    fp8_on=False turns the MLP's FP8 off on both sides (the record's DISABLE_FP8); the head stays
    FP8 on both, because the record's training loss (FusedSoftcappedCrossEntropy) has no other.
    Returns (all passed, the legitimate spreads measured, prior_floors first): validation is judged
    by the largest spread of any configuration, also of those checked in other processes."""
    args = (ref, shards, report, seed, max_seq_len, T, val_T, compile_ours, fp8_on, configs,
            deliberate, validation, list(prior_floors))
    if fp8_on or os.environ.get("DISABLE_FP8"):
        return _check_forward(*args)
    os.environ["DISABLE_FP8"] = "1"   # read by the reference's model at build and in its forward
    try:
        return _check_forward(*args)
    finally:
        del os.environ["DISABLE_FP8"]


def _check_forward(ref, shards: Path, report: Report, seed: int, max_seq_len: int, T: int, val_T: int,
                   compile_ours: bool, fp8_on: bool, configs: tuple[str, ...], deliberate: bool,
                   validation: bool, all_floors: list) -> tuple[bool, list]:
    from speedrun.record import model as our_model
    from speedrun.record.loader import DocumentBatches, ValidationChunks
    from speedrun.record.model import RecordConfig, build, compile_hidden_states
    from speedrun.shards import shard_paths

    dev = ref.device
    fp8 = dev.type == "cuda" and fp8_on
    head_fp8 = dev.type == "cuda"
    rm = build_reference_model(ref, seed, max_seq_len)
    rm.prefix_table.copy_(ref.build_prefix_table(rm.vocab_size).to(dev))
    state = perturbed(ref_state(rm), seed + 1)
    rm.load_state_dict(state)
    # the record's own spread: a twin of its model, compiled, on the same weights and buffers
    twin = ref_compiled = None
    if compile_ours:
        twin = build_reference_model(ref, seed, max_seq_len)
        twin.prefix_table.copy_(rm.prefix_table)
        twin.load_state_dict(state)
        ref_compiled = torch.compile(twin, dynamic=False, fullgraph=True)
    om = build(RecordConfig(max_seq_len=max_seq_len, bigram_vocab=ref.args.bigram_vocab_size), dev, fp8, seed=seed)
    om.load_state_dict(state)
    om.fill_prefix_table()
    if fp8:
        rm.quantize_mlp_fp8(bootstrap_down=True)
        om.refresh_fp8(bootstrap=True)
        if twin is not None:
            twin.quantize_mlp_fp8(bootstrap_down=True)
    compiled = compile_hidden_states(om) if compile_ours else None   # as the trainer compiles it
    train = shard_paths(shards, "train")
    ok_all, out, tols = True, {}, {}
    # both legitimate spreads are measured at every configuration: a spread taken at stage 1 and
    # reused at stage 3 judges one stage by another's numbers (longer windows and pieces, other
    # YaRN tables: the spreads grow)
    for cfg in configs:
        seq = STEP_CONFIGS[cfg][4]
        loader = DocumentBatches(train, ref.args.bigram_vocab_size)
        warm, batch = loader.next(T, seq), loader.next(T, seq)
        if fp8:   # one forward first, so that the delayed FP8 activation scales come from data
            _, _ = run_reference_step(ref, rm, rm, warm, cfg, fp8)
        scales = _act_scales(rm)
        buffers = {k: v.detach().clone() for k, v in rm.named_buffers()}
        rl, rg = run_reference_step(ref, rm, rm, batch, cfg, fp8)
        floor = ref_floor = None
        if twin is not None:
            with torch.no_grad():
                for k, v in twin.named_buffers():
                    v.copy_(buffers[k])
            t = time.perf_counter()
            ref_floor = compare(*run_reference_step(ref, twin, ref_compiled, batch, cfg, fp8), rl, rg)
            print(f"  {cfg}: reference compiled in {time.perf_counter() - t:.1f}s", flush=True)
        runs = {}
        for tag, fn in (("eager", om.hidden_states), ("compiled", compiled)):
            if fn is None:
                continue
            om._mlp_down_act_scales.copy_(scales)
            t = time.perf_counter()
            runs[tag] = run_our_step(om, fn, batch, cfg, fp8, head_fp8)
            print(f"  {cfg}: ours {tag} in {time.perf_counter() - t:.1f}s", flush=True)
        main = runs.get("compiled", runs.get("eager"))
        c = compare(*main, rl, rg)
        if "compiled" in runs and "eager" in runs:
            floor = compare(*runs["compiled"], *runs["eager"])
        tight = compare(*runs["eager"], rl, rg) if "eager" in runs else {"grads": None, "losses": None}
        all_floors += [floor, ref_floor]
        tol_loss, tol = tols[cfg] = forward_tolerances((floor, ref_floor), c["grads"])
        bad, worst = grads_over(c["grads"], tol), worst_grad(c["grads"], tol)
        ok = c["losses"] <= tol_loss and not bad
        ok_all &= report.add(f"forward {cfg}", ok, loss_rel=c["losses"], loss_tol=tol_loss, **worst,
                             failing=bad[:4],
                             ref_loss=rl.mean().item(), our_loss=main[0].mean().item(),
                             grads_rel=c["grads"], grad_tol=tol,
                             eager_vs_reference=tight["grads"], eager_loss_rel=tight["losses"],
                             compiled_vs_eager=floor["grads"] if floor else None,
                             reference_compiled_vs_eager=ref_floor["grads"] if ref_floor else None,
                             reference_compiled_vs_eager_loss=ref_floor["losses"] if ref_floor else None)
        out[cfg] = c
    # validation: the final windows (long 20 blocks, YaRN after 3 -> 7 -> 11 -> 13)
    if validation:
        vb = next(ValidationChunks(shard_paths(shards, "val"), ref.args.bigram_vocab_size)(val_T, val_T))
        rv = eval_reference(ref, rm, rm, vb)
        main = eval_ours(om, compiled or om.hidden_states, vb)
        tol = forward_tolerances(all_floors, {})[0]   # the final windows: the largest spread of any stage
        ok_all &= report.add("forward validation", rel(main, rv) <= tol, loss_rel=rel(main, rv), tol=tol,
                             ref_loss=rv.mean().item(), our_loss=main.mean().item(), tokens=val_T,
                             mean_loss_diff=abs(main.mean().item() - rv.mean().item()))
    # the check fails on a deliberately changed model, run on the first configuration (stage 1 by
    # default: at stage 3 the legitimate spreads are wider, up to 0.10 for the record's own
    # compiled-vs-eager gradients, reference-h200-r8)
    if not deliberate:
        return ok_all, all_floors
    cfg = configs[0]
    seq = STEP_CONFIGS[cfg][4]
    loader = DocumentBatches(train, ref.args.bigram_vocab_size)
    loader.next(T, seq)
    batch = loader.next(T, seq)
    scales = _act_scales(rm)
    rl, rg = run_reference_step(ref, rm, rm, batch, cfg, fp8)
    tol_loss, tol = tols[cfg]   # the tolerances the real check used on this configuration
    seen = {}
    for label, attr, value in DELIBERATE:
        with mock.patch.object(our_model, attr, value(getattr(our_model, attr))):
            om._mlp_down_act_scales.copy_(scales)
            c = compare(*run_our_step(om, om.hidden_states, batch, cfg, fp8, head_fp8), rl, rg)
        over = grads_over(c["grads"], tol)
        seen[label] = dict(caught=bool(over) or c["losses"] > tol_loss, loss_rel=c["losses"], over_tolerance=over[:6],
                           **worst_grad(c["grads"], tol), grads_rel=c["grads"])
    (label, *_), (edge, *_) = DELIBERATE
    report.add(f"forward (deliberate: {label}) must fail", seen[label]["caught"], loss_tol=tol_loss,
               **{k: v for k, v in seen[label].items() if k != "caught"},
               resolution_caught=seen[edge]["caught"], resolution={"change": edge, **seen[edge]})
    return ok_all, all_floors


def forward_here(ref, args, configs, report: Report, max_seq_len: int, T: int, val_T: int, cuda: bool) -> bool:
    """The forward check in this process; as a worker (--forward-worker FLOORS.json) it reads the
    spreads measured by earlier workers from that file and writes them back with its own."""
    floors_file = Path(args.forward_worker) if args.forward_worker else None
    prior = json.loads(floors_file.read_text()) if floors_file and floors_file.is_file() else []
    parts = set(args.forward_parts.split(","))   # a worker's; all of them otherwise
    ok, floors = check_forward(ref, Path(args.shards), report, args.seed, max_seq_len, T, val_T,
                               compile_ours=cuda and not args.no_compile, fp8_on=not args.no_fp8,
                               configs=configs, deliberate="deliberate" in parts,
                               validation="validation" in parts, prior_floors=prior)
    if floors_file:
        from speedrun.atomic import write_json
        write_json(floors_file, floors)
    return ok


def forward_worker_cmd(argv: list[str], cfg: str, first: bool, last: bool, floors: Path, out: Path) -> list[str]:
    """This command line again for one configuration (argparse keeps an option's last value): the
    deliberate difference with the first, validation with the last, no second fetch."""
    parts = ",".join((["deliberate"] if first else []) + (["validation"] if last else [])) or "none"
    return [sys.executable, "-m", "benchmarks.reference", *argv, "--fetch", "", "--checks", "forward",
            "--forward-configs", cfg, "--forward-worker", str(floors), "--forward-parts", parts, "--out", str(out)]


def forward_in_processes(argv: list[str], configs: tuple[str, ...], report: Report, root: Path) -> bool:
    """The forward check, one process per configuration. On an H200 (torch 2.11) the record's
    model, compiled for stage 1 and then recompiled in the same process for stage 3, hit an
    illegal memory access in an Inductor kernel; compiled fresh for stage 3 in its own process it
    ran and passed (reference-h200-r7, r8). Each worker's verdicts join this report."""
    floors, ok = root / "forward-floors.json", True
    floors.unlink(missing_ok=True)
    for i, cfg in enumerate(configs):
        out = root / f"forward-{cfg}.json"
        rc = subprocess.run(forward_worker_cmd(argv, cfg, i == 0, i == len(configs) - 1, floors, out),
                            cwd=PROJECT).returncode
        checks = json.loads(out.read_text())["checks"] if out.is_file() else {}
        if rc != 0 or not checks:
            ok &= report.add(f"forward {cfg}", False, error=f"worker exited {rc}")
        for name, res in checks.items():   # already printed by the worker
            report.results[name] = res
            ok &= bool(res["pass"])
    return ok


def forward_tolerances(floors, grad_keys) -> tuple[float, dict]:
    """(loss tolerance, gradient tolerance per key): twice the larger of the legitimate spreads
    measured (ours compiled vs eager, the record's likewise; None where not measured), no tighter
    than 2e-3 for losses and 1e-2 for gradients."""
    floors = [f for f in floors if f]
    return (max([2e-3] + [2 * f["losses"] for f in floors]),
            {k: max([1e-2] + [2 * f["grads"][k] for f in floors]) for k in grad_keys})


# The forward check's deliberate differences, (label, our model's module constant, new value from
# the old). The first must be caught: a wiring slip a port can make, two layers' value-embedding
# tables swapped; on CPU (eager, 2,048 tokens) it moved two gradient tensors 9x past the H200's
# stage-1 tolerances with the loss within 2e-4. The second, one layer without XSA, sits at the edge
# of what the check resolves (caught on an H200 in reference r6, not in r9, as the record's own
# compiled-vs-eager spread moved between calls): reported with the first, not judged
DELIBERATE = (
    ("value-embedding tables of layers 9 and 10 swapped", "VALUE_EMBED", lambda ve: {**ve, 9: ve[10], 10: ve[9]}),
    ("no XSA on layer 7", "XSA", lambda xsa: tuple(i for i in xsa if i != 7)),
)


def closest_to_tolerance(grads: dict, tol: dict) -> str:
    """The gradient whose relative difference is the largest share of its tolerance."""
    return max(grads, key=lambda k: grads[k] / tol[k])


def worst_grad(grads: dict, tol: dict) -> dict:
    """That gradient as a report names it: its own difference and tolerance beside its name."""
    k = closest_to_tolerance(grads, tol)
    return {"worst_grad": k, "worst_grad_rel": grads[k], "worst_grad_tol": tol[k]}


def grads_over(grads: dict, tol: dict) -> list[str]:
    """The gradients outside their tolerance (NaN counts as outside)."""
    return [k for k, v in grads.items() if not v <= tol[k]]


def check_optimizer(ref, report: Report, seed: int, max_seq_len: int, compile_ours: bool,
                    deliberate: bool = True) -> bool:
    from speedrun.record.model import RecordConfig, build

    dev = ref.device
    rm = build_reference_model(ref, seed, max_seq_len)
    state = perturbed(ref_state(rm), seed + 2)

    def fresh_pair(ours: bool):
        a = build_reference_model(ref, seed, max_seq_len)
        a.load_state_dict(state)
        if ours:
            b = build(RecordConfig(max_seq_len=max_seq_len, bigram_vocab=ref.args.bigram_vocab_size), dev, False, seed=seed)
        else:
            b = build_reference_model(ref, seed, max_seq_len)
        b.load_state_dict(state)
        return a, b

    del rm
    a, b = fresh_pair(False)
    floor = run_optimizers(ref, a, b, eager_polar_express_stepper(ref, b), OPT_STEPS, seed + 3)
    del a, b
    a, b = fresh_pair(True)
    worst = run_optimizers(ref, a, b, ours_stepper(b, compile_ours), OPT_STEPS, seed + 3)
    del a, b
    # Muon: twice the spread of the record's own eager vs compiled Polar Express (bf16 rounding);
    # Adam: fp32 arithmetic on bf16 weights, where a last-bit rounding flip is all that may differ
    tol = {k: max(2 * floor[k], 1e-3) if k.endswith("_bank") else 1e-3 for k in worst}
    bad = [k for k, v in worst.items() if not v <= tol[k]]
    ok = report.add("optimizer", not bad, steps=list(OPT_STEPS), failing=bad, worst_update_rel=worst, tol=tol,
                    reference_eager_vs_compiled=floor)
    if not deliberate:
        return ok
    a, b = fresh_pair(True)
    worst = run_optimizers(ref, a, b, ours_stepper(b, compile_ours, adam_parity=0), OPT_STEPS, seed + 3)
    caught = [k for k, v in worst.items() if not v <= tol[k]]
    report.add("optimizer (deliberate: Adam on even steps) must fail", bool(caught), failing=caught[:5])
    return ok


# ----------------------------------------------------------------------------- check: curves

def curve_patches(seed: int, steps: int, every: int, val_tokens: int, init_path: Path | None) -> list[tuple]:
    """The reference's main section cut to a short run: a seed, validation size and cadence, only
    the stage-1 warm-up steps, a stop after `steps`; its initial weights saved for ours."""
    save = (f"\nimport torch as _t; _t.save({{k: v.detach().cpu() for k, v in model.state_dict().items()}}, "
            f"{str(init_path)!r})\n" if init_path else "\n")
    return [
        ("args = Hyperparameters()\n",
         f"args = Hyperparameters()\nargs.val_tokens = {val_tokens}\nargs.val_batch_size = {val_tokens}\n"
         f"args.val_loss_every = {every}\n"),
        ("warmup_steps = sorted({0, 1} | {s + offset for s in transition_steps for offset in [-2, -1, 0, 1] if s + offset >= 2})",
         "warmup_steps = [0, 1]"),
        ("model: nn.Module = GPT(\n", f"torch.manual_seed({seed})\nmodel: nn.Module = GPT(\n"),
        ("model.quantize_mlp_fp8(bootstrap_down=True)\n\nmodel: nn.Module = torch.compile(",
         f"model.quantize_mlp_fp8(bootstrap_down=True)\n{save}\nmodel: nn.Module = torch.compile("),
        ("    # --------------- TRAINING SECTION -----------------\n",
         f"    if step >= {steps}:\n        break\n    # --------------- TRAINING SECTION -----------------\n"),
    ]


WARMUP_VAL_FORWARD = """    model.eval()
    with torch.no_grad():
        inputs, targets, cum_seqlens, bigram_inputs, _ = next(val_loader)
        model(inputs, targets, cum_seqlens, bigram_inputs, training_manager.get_forward_args()).mean()
    model.train()
    for idx in range(grad_accum_steps):
"""


def throughput_patches(steps: int, settle: int, profile_stage: int | None = None,
                       trace: Path | None = None) -> list[tuple]:
    """The reference's main section as a throughput run: its own warm-up (timed) cut to what the
    timed steps use (the first two steps of its three batch stages, one validation forward: its
    full warm-up compiles the extension stage and four validation graphs, minutes of a 10-minute
    device call), then `settle` + `steps` steps at the start of each stage, each step's end marked by a
    CUDA event (no host sync between steps, as its own loop), no validation. Prints REF_WARMUP_S
    and REF_STEP_MS [[step, ms], ...] for benchmarks.throughput. With `profile_stage`, only that
    stage's steps run, and torch.profiler (CUDA) records its `steps` timed steps into `trace` (a
    Chrome trace, for benchmarks.profile_step)."""
    stages = "[0, *training_manager.get_transition_steps()][:3]"
    warm_stages, val_step = "[0, *transition_steps][:3]", "0"
    primed = []
    if profile_stage is not None:
        # only that stage is compiled and run; its first step sends the stage's batch size to a
        # loader generator that has not started yet, so each loader is started (one batch) first
        stages = f"{stages}[{profile_stage - 1}:{profile_stage}]"
        warm_stages = f"{warm_stages}[{profile_stage - 1}:{profile_stage}]"
        val_step = "warmup_steps[0]"
        loader = ("train_loader = distributed_data_generator(args.train_files, TRAINING_STAGES[0].batch_size, "
                  "TRAINING_STAGES[0].train_max_seq_len, grad_accum_steps=grad_accum_steps)\n")
        primed = [(loader, loader + "next(train_loader)\n", 2)]
    prof_start = (f"    if _k == {settle}:\n"
                  "        _prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])\n"
                  "        _prof.__enter__()\n") if profile_stage is not None else ""
    prof_end = ("torch.cuda.synchronize()\n_prof.__exit__(None, None, None)\n"
                f"_prof.export_chrome_trace({str(trace)!r})\n") if profile_stage is not None else ""
    return [
        ("args = Hyperparameters()\n", "args = Hyperparameters()\nargs.val_loss_every = 0\n"),
        ("warmup_steps = sorted({0, 1} | {s + offset for s in transition_steps for offset in [-2, -1, 0, 1] if s + offset >= 2})",
         f"warmup_steps = [s + k for s in {warm_stages} for k in (0, 1)]"),
        # one validation forward stays, at step 0: it creates triton_kernels' module-level dummy
        # buffer outside an autograd.Function, where dynamo refuses the global's first write
        (WARMUP_VAL_FORWARD, f"    if step == {val_step}:\n" + "".join(
            "    " + line + "\n" for line in WARMUP_VAL_FORWARD.splitlines()[:-1]) + "    for idx in range(grad_accum_steps):\n"),
        ('print0(f"Sampling steps {warmup_steps} for warmup", console=True)\n',
         'print0(f"Sampling steps {warmup_steps} for warmup", console=True)\n_t_warm = time.perf_counter()\n'),
        ('print0("Resetting Model", console=True)\n',
         'torch.cuda.synchronize()\nprint(f"REF_WARMUP_S {time.perf_counter() - _t_warm:.2f}", flush=True)\n'
         'print0("Resetting Model", console=True)\n'),
        ("for step in range(train_steps + 1):\n",
         f"_marks = []\nfor _k, step in [(k, s + k) for s in {stages} for k in range({settle + steps})]:\n"
         + prof_start),
        ('    approx_training_time_ms = training_time_ms + 1000 * (time.perf_counter() - t0)\n'
         '    print0(f"step:{step+1}/{train_steps} train_time:{approx_training_time_ms:.0f}ms step_avg:{approx_training_time_ms/(step + 1):.2f}ms", console=True)\n',
         "    _marks.append((step, torch.cuda.Event(enable_timing=True)))\n    _marks[-1][1].record()\n"),
        ("\nif args.run_evals:\n",
         "\ntorch.cuda.synchronize()\n" + prof_end + "import json as _json\n"
         "print('REF_STEP_MS ' + _json.dumps([[b[0], a[1].elapsed_time(b[1])] for a, b in zip(_marks, _marks[1:])]), flush=True)\n"
         "\nif args.run_evals:\n"),
        *primed,
    ]


def launch_reference_script(ref_dir: Path, run_dir: Path, shards: Path, patches: list[tuple],
                            log: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """The reference's train_gpt.py, patched, as its own process over our shards (linked under the
    names it globs)."""
    from speedrun.shards import shard_paths

    run_dir = stage_reference(ref_dir, run_dir, cpu=False)
    src = _patch((run_dir / "train_gpt.py").read_text(), CUBLAS_PATCHES + patches)
    (run_dir / "train_gpt.py").write_text(src)
    data = run_dir / "data" / "fineweb10B"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for i, f in enumerate(shard_paths(shards, split)):
            (data / f"fineweb_{split}_{i:06d}.bin").symlink_to(f.resolve())
    from speedrun.tokenizer import ensure_offline_cache
    ensure_offline_cache()
    env = {**os.environ, **reference_env(run_dir)}
    log = log or run_dir / "stdout.log"
    proc = subprocess.Popen([sys.executable, "train_gpt.py"], cwd=run_dir, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, log


def launch_reference_curve(ref_dir: Path, root: Path, shards: Path, seed: int, steps: int, every: int,
                           val_tokens: int, init_path: Path | None) -> tuple[subprocess.Popen, Path]:
    return launch_reference_script(ref_dir, root / f"ref-seed{seed}", shards,
                                   curve_patches(seed, steps, every, val_tokens, init_path))


def parse_reference_curve(log: Path) -> dict[int, float]:
    import re
    out = {}
    for m in re.finditer(r"step:(\d+)/\d+ val_loss:([0-9.]+)", log.read_text()):
        out[int(m.group(1))] = float(m.group(2))
    return out


def curve_worker(args) -> None:
    """Our trainer from the reference's initial weights (a subprocess of check_curves)."""
    from speedrun.record.trainer import RecordParams, RecordRun
    from speedrun.train import Paths, TrainParams

    init = Path(args.init)
    t0 = time.time()
    while not init.exists():
        if time.time() - t0 > 900:
            raise SystemExit(f"no initial weights at {init}")
        time.sleep(2)
    time.sleep(2)
    state = torch.load(init, weights_only=True)
    tmp = Path(tempfile.mkdtemp())
    p = TrainParams(profile="gpu", val_every=args.curve_every, val_tokens=args.curve_val_tokens,
                    target_val_loss=0.0, ckpt_every=0, warmup_steps=1)
    # 16,384-token micro-batches: the record's own in stage 1 (where the curve's steps lie), so both
    # sides see the same documents cut at the same places
    r = RecordParams(val_chunk_tokens=args.curve_val_tokens // 8, muon_lr=0.023 * args.muon_lr_mult,
                     micro_batch_tokens=16384)
    run = RecordRun(p, r, Paths(Path(args.shards), tmp / "ckpt", tmp / "final.pt", tmp / "train.json", None),
                    init_state=state, stop_at=args.curve_steps)
    metrics = run.run()
    Path(args.out).write_text(json.dumps({"val": {h["step"]: h["val_loss"] for h in run.val_history},
                                          "metrics": metrics}))


def parse_our_curve(log: Path) -> dict[int, float]:
    import re
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"step +(\d+)/\d+ \| val_loss ([0-9.]+)", log.read_text())}


def start_curves(ref_dir: Path, shards: Path, root: Path, steps: int, every: int, val_tokens: int,
                 seeds: list[int]) -> dict:
    init = root / "init.pt"
    procs = {}
    for k, seed in enumerate(seeds):
        procs[f"reference seed {seed}"] = launch_reference_curve(ref_dir, root, shards, seed, steps, every, val_tokens,
                                                                 init if k == 0 else None)
    # the deliberate difference only needs to show itself: half the steps
    ours = {"ours": (1.0, steps), "ours (deliberate: Muon lr x0.5)": (0.5, max(every * 2, steps // 2))}
    for name, (mult, n_steps) in ours.items():
        out = root / f"{name.split()[0]}-{mult}.json"
        log = root / f"{name.split()[0]}-{mult}.log"
        cmd = [sys.executable, "-m", "benchmarks.reference", "--curve-worker", "--init", str(init),
               "--shards", str(shards), "--curve-steps", str(n_steps), "--curve-every", str(every),
               "--curve-val-tokens", str(val_tokens), "--muon-lr-mult", str(mult), "--out", str(out)]
        procs[name] = (subprocess.Popen(cmd, cwd=PROJECT, stdout=open(log, "w"), stderr=subprocess.STDOUT), log, out)
    return procs


def finish_curves(procs: dict, report: Report, out_dir: Path, deadline: float) -> bool:
    curves = {}
    end = time.time() + deadline
    for name, item in procs.items():
        proc, log = item[0], item[1]
        try:
            rc = proc.wait(timeout=max(end - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "stopped at the deadline"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        shutil.copy2(log, out_dir / f"curve-{safe}.log")
        if rc != 0:
            print(f"{name}: {rc}; log tail:\n{log.read_text()[-2000:]}", flush=True)
        # what the log holds, also from a run that did not finish
        curves[name] = parse_reference_curve(log) if name.startswith("reference") else parse_our_curve(log)
    ref_names = [n for n in curves if n.startswith("reference")]
    points = sorted(set.intersection(*[set(c) for n, c in curves.items() if c and "deliberate" not in n] or [set()]) - {0})
    if not points or len(ref_names) < 2:
        return report.add("curves", False, error="missing curves", curves=curves)
    first = ref_names[0]   # ours starts from this seed's weights
    ok_all = True
    for name, must_pass in (("ours", True), ("ours (deliberate: Muon lr x0.5)", False)):
        if not curves.get(name):
            ok_all &= report.add(f"curves {name}", False, error="run failed")
            continue
        v = curve_verdict(curves, ref_names, first, name, points)
        if v is None:
            ok_all &= report.add(f"curves {name}", False, error="no common validation points")
            continue
        title = "curves" if must_pass else f"curves {name} must fail"
        ok_all &= report.add(title, v["within"] if must_pass else not v["within"], **v, curves=curves)
    return ok_all


def curve_verdict(curves: dict, ref_names: list[str], first: str, name: str, points: list[int]) -> dict | None:
    """Is `name`'s validation curve within the reference seeds' spread? Two rules, both must hold:
    its largest deviation from the seed it started from is no larger than the seeds' largest range
    at any point; and its mean deviation is no larger than the largest mean deviation between two
    reference seeds (a pointwise range of three seeds is a noisy yardstick, the mean over all
    points a steadier one)."""
    from itertools import combinations

    dev = {s: abs(curves[name][s] - curves[first][s]) for s in points if s in curves[name]}
    if not dev:
        return None
    spread = {s: max(curves[a][s] for a in ref_names) - min(curves[a][s] for a in ref_names) for s in points}
    pair_means = {f"{a} vs {b}": sum(abs(curves[a][s] - curves[b][s]) for s in dev) / len(dev)
                  for a, b in combinations(ref_names, 2)}
    mean_dev = sum(dev.values()) / len(dev)
    max_spread = max(spread[s] for s in dev)
    return {"within": max(dev.values()) <= max_spread and mean_dev <= max(pair_means.values()),
            "max_dev": max(dev.values()), "max_seed_spread": max_spread, "mean_dev": mean_dev,
            "seed_pairs_mean_dev": pair_means, "points": sorted(dev), "deviation": dev, "seed_spread": spread}


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=".reference/modded-nanogpt")
    ap.add_argument("--fetch", default=None, help="clone the reference from this URL or git dir first")
    ap.add_argument("--checks", default="init,loader,schedule,forward,optimizer")
    ap.add_argument("--shards", default=".corpus/imdb-packed/shards")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tokens", type=int, default=None, help="micro-batch of the forward check (16384 on GPU)")
    ap.add_argument("--val-tokens", type=int, default=None, help="validation chunk of the forward check")
    ap.add_argument("--no-compile", action="store_true", help="skip our compiled path (CPU development)")
    ap.add_argument("--forward-configs", default=",".join(STEP_CONFIGS),
                    help="forward check: which step configurations (the deliberate difference runs on the first)")
    ap.add_argument("--no-fp8", action="store_true",
                    help="forward check in bf16 on both sides (DISABLE_FP8 for the reference): separates FP8 "
                         "rounding from the rest of the math on the GPU")
    ap.add_argument("--forward-worker", default=None, help=argparse.SUPPRESS)   # FLOORS.json: one configuration
    ap.add_argument("--forward-parts", default="validation,deliberate", help=argparse.SUPPRESS)
    ap.add_argument("--skip-deliberate-optimizer", action="store_true", help="skip the optimizer's failing demo")
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--curve-every", type=int, default=25)
    ap.add_argument("--curve-val-tokens", type=int, default=1048576)
    ap.add_argument("--curve-seeds", default="1234,2345,3456")
    ap.add_argument("--curve-deadline", type=float, default=3600,
                    help="seconds from the curves' launch before unfinished runs are stopped")
    ap.add_argument("--curves-alongside", action="store_true",
                    help="train the curves while the other checks run (five training processes and the forward "
                         "check need ~140 GiB of one GPU); by default they start after them")
    ap.add_argument("--curve-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--muon-lr-mult", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.curve_worker:
        return curve_worker(args)
    ref_dir = Path(args.ref)
    if args.fetch:
        fetch(ref_dir, args.fetch)
    if not all((ref_dir / f).is_file() for f in REF_FILES):
        raise SystemExit(f"{ref_dir} lacks {', '.join(REF_FILES)}: run with --fetch {REF_URL}")
    forward_configs = tuple(args.forward_configs.split(","))
    unknown = set(forward_configs) - set(STEP_CONFIGS)
    if unknown:
        raise SystemExit(f"--forward-configs: unknown {sorted(unknown)}; known: {','.join(STEP_CONFIGS)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    checks = args.checks.split(",")
    report = Report()
    out_dir = Path(args.out).parent if args.out else Path(tempfile.mkdtemp())
    root = Path(tempfile.mkdtemp(prefix="reference-"))
    t0 = time.time()
    meta = {"reference_commit": REF_COMMIT, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "patches": ["kernels: FlashAttention-3 -> torch varlen_attn"]
            + (["cuBLAS: .clone() of the FP8 scale slices (16-byte alignment)"] if cuda else [])
            + (["eager: .clone() in the key shift; the FP8 head's backward returns one more None"]
               if "forward" in checks else [])
            + ([f"cpu: {old[:50]!r} -> {new[:50]!r}" for old, new, *_ in CPU_PATCHES] if not cuda else [])
            + (["forward without FP8 on both sides (DISABLE_FP8)"] if args.no_fp8 else [])}
    print(json.dumps(meta), flush=True)

    def save():
        if args.out:
            from speedrun.atomic import write_json
            write_json(args.out, {**meta, "seconds": round(time.time() - t0, 1), "checks": report.results})

    def launch_curves():
        try:
            return start_curves(ref_dir, Path(args.shards), root, args.curve_steps, args.curve_every,
                                args.curve_val_tokens, [int(s) for s in args.curve_seeds.split(",")])
        except Exception as e:
            import traceback
            traceback.print_exc()
            report.add("curves", False, error=f"{type(e).__name__}: {str(e)[:300]}")

    curve_jobs = None
    if "curves" in checks and args.curves_alongside:   # its processes train while the other checks run
        curve_jobs = launch_curves()
    torch._dynamo.config.recompile_limit = 256   # eager FlexAttention compiles per mask shape
    if set(checks) - {"curves"}:
        ref = load_reference(ref_dir, root / "module", device, eager=True)
        max_seq = args.val_tokens or (131072 if cuda else 2048)
        T = args.tokens or (16384 if cuda else 1024)
        steps = {"init": lambda: check_init(ref, report, args.seed, max_seq),
                 "loader": lambda: (check_loader(ref, Path(args.shards), report),
                                    check_loader(ref, Path(args.shards), report,
                                                 "loader (deliberate: pieces 1 token longer) must fail", seq_shift=1)),
                 "schedule": lambda: (check_schedule(ref, report),
                                      check_schedule(ref, report, "schedule (deliberate: cooldown 0.55) must fail", 0.55)),
                 # rotary tables of the trainer's default size (262,144 rows): its compiled graph is reused
                 "forward": lambda: (forward_in_processes(sys.argv[1:], forward_configs, report, root)
                                     if len(forward_configs) > 1 and not args.forward_worker else
                                     forward_here(ref, args, forward_configs, report, 262144 if cuda else max(max_seq, T),
                                                  T, max_seq, cuda)),
                 "optimizer": lambda: check_optimizer(ref, report, args.seed, 4096, compile_ours=not args.no_compile,
                                                      deliberate=not args.skip_deliberate_optimizer)}
        for name in checks:
            if name in steps:
                t = time.time()
                try:
                    steps[name]()
                except Exception as e:   # one broken check must not hide the others' results
                    import traceback
                    traceback.print_exc()
                    report.add(name, False, error=f"{type(e).__name__}: {str(e)[:300]}")
                print(f"  ({name}: {time.time() - t:.0f}s)", flush=True)
                save()
    if "curves" in checks and not args.curves_alongside:
        t_curves = time.time()
        curve_jobs = launch_curves()
    else:
        t_curves = t0
    if curve_jobs is not None:
        try:
            finish_curves(curve_jobs, report, out_dir, args.curve_deadline - (time.time() - t_curves))
        except Exception as e:
            import traceback
            traceback.print_exc()
            report.add("curves", False, error=f"{type(e).__name__}: {str(e)[:300]}")
        save()
    # "... must fail" rows pass when the deliberate difference was caught
    failed = [k for k, v in report.results.items() if not v["pass"]]
    print(f"{len(report.results) - len(failed)}/{len(report.results)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    save()


if __name__ == "__main__":
    main()
