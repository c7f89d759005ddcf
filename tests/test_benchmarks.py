"""CPU-checkable parts of the GPU benchmarks: the idle-gap analysis of benchmarks.profile_step,
the NaN-row prediction for FlexAttention's ROWS_GUARANTEED_SAFE, and the validity checks that keep
a broken variant's speed out of the results."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

import torch

from benchmarks.gpu_checks import rows_nan_without_guard, worst_of
from benchmarks.profile_step import gpu_times, idle_gaps
from benchmarks.throughput import invalid_reason
from speedrun.model import EOT_ID, document_window_masks


def _x(cat, name, ts, dur, corr=None):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **({"args": {"correlation": corr}} if corr else {})}


def test_idle_gaps_finds_the_stall_and_the_host_op_that_caused_it():
    trace = {"traceEvents": [
        _x("kernel", "matmul", 0, 100, 1),
        _x("gpu_memcpy", "Memcpy HtoD", 50, 100, 2),     # overlaps: busy until 150
        _x("kernel", "norm", 400, 50, 3),                # idle 150..400 = 250 us
        _x("kernel", "tiny", 455, 5, 4),                 # 5 us: under the 10 us threshold
        _x("cuda_runtime", "cudaLaunchKernel", 1, 2, 1),
        _x("cuda_runtime", "cudaMemcpyAsync", 2, 2, 2),
        _x("cuda_driver", "cuLaunchKernel", 390, 3, 3),  # Triton launches go through the driver API
        _x("cuda_runtime", "cudaLaunchKernel", 395, 2, 4),
        _x("cuda_runtime", "cudaStreamSynchronize", 160, 20),
        _x("cpu_op", "build_masks", 140, 260),
        _x("cpu_op", "aten::arange", 385, 10),
    ]}
    g = idle_gaps(trace)
    assert g["gaps_over_min"] == 1 and g["idle_ms"] == 0.25 and g["span_ms"] == 0.46
    gap = g["largest_gaps"][0]
    assert gap["prev_kernel"] == "Memcpy HtoD" and gap["next_kernel"] == "norm"
    assert gap["launched_us_before_start"] == 10      # launched just before it ran: host-bound
    assert gap["host_inner"] == ["build_masks", "aten::arange"]
    assert g["idle_by_host_op_ms"] == {"aten::arange < build_masks": 0.25}
    assert g["sync_calls"] == {"cudaStreamSynchronize": {"count": 1, "ms": 0.02}}
    assert sorted(gpu_times(trace)) == [("Memcpy HtoD", 100), ("matmul", 100), ("norm", 50), ("tiny", 5)]


def _masks(tokens, window_blocks):
    return document_window_masks(tokens, torch.tensor(window_blocks, dtype=torch.int32))


def test_rows_nan_without_guard_counts_a_late_document_start_in_the_first_64_key_tile():
    toks = torch.randint(0, 50000, (1024,), generator=torch.Generator().manual_seed(0))
    toks[100] = EOT_ID   # a document starts 100 tokens into block 0: rows 100..127 see only
    for long_or_short in _masks(toks, 4):   # masked keys in block 0's first 64-key tile
        assert rows_nan_without_guard(toks, long_or_short, 64) == 28
        # 128-key tiles: the first tile is the whole diagonal block, which holds the row itself
        assert rows_nan_without_guard(toks, long_or_short, 128) == 0


def test_rows_nan_without_guard_is_zero_when_documents_start_in_first_tile_halves():
    toks = torch.randint(0, 50000, (1024,), generator=torch.Generator().manual_seed(1))
    toks[[0, 130, 300, 520]] = EOT_ID   # offsets 0, 2, 44, 8 within their blocks: all below 64
    assert toks.ne(EOT_ID).sum() == 1020
    for bm in _masks(toks, 3):
        assert rows_nan_without_guard(toks, bm, 64) == 0


def test_rows_nan_without_guard_on_training_like_documents():
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, 50000, (4096,), generator=g)
    toks[torch.randint(0, 4096, (8,), generator=g)] = EOT_ID
    starts = (toks == EOT_ID).nonzero().flatten()
    late = [int(s) for s in starts if int(s) % 128 >= 64]
    long_bm, _ = _masks(toks, 8)
    n64 = rows_nan_without_guard(toks, long_bm, 64)
    # every late start leaves its rows up to the block end unsafe (unless another start follows)
    assert (n64 > 0) == bool(late)
    assert n64 <= sum(128 - s % 128 for s in late)
    assert rows_nan_without_guard(toks, long_bm, 128) == 0


def test_worst_of_treats_nan_as_the_worst_error():
    assert max([0.0, float("nan")]) == 0.0          # the trap: max() kept the first value
    assert math.isnan(worst_of([0.0, float("nan"), 1e-3]))
    assert worst_of([1e-4, 3e-3, 2e-3]) == 3e-3


def test_invalid_reason_flags_non_finite_losses_only():
    assert invalid_reason({"start": 10.9, "middle": 10.5, "end": 10.2}) is None
    assert "nan" in invalid_reason({"start": 10.9, "middle": float("nan"), "end": float("nan")})
    assert "inf" in invalid_reason({"start": float("inf"), "middle": 1.0, "end": 1.0})


def test_every_variant_override_is_a_train_param_or_a_library_switch(monkeypatch):
    """A misspelt override would otherwise surface only on the GPU machine, minutes into a call."""
    import dataclasses

    import speedrun.embedding
    from benchmarks import learning, throughput
    from benchmarks.switches import SWITCHES, apply_switches
    from speedrun.train import TrainParams

    fields = {f.name for f in dataclasses.fields(TrainParams)} | {"steps_frac", "emulate"}
    for variants in (throughput.VARIANTS, learning.VARIANTS):
        for name, overrides in variants.items():
            unknown = set(overrides) - fields - set(SWITCHES)
            assert not unknown, (name, unknown)
    monkeypatch.setattr(speedrun.embedding, "GRAD_MODE", "accumulate")
    assert apply_switches({"embed_grad": "dense", "steps": 7}) == {"steps": 7}
    assert speedrun.embedding.GRAD_MODE == "dense"
    import importlib   # a switch names an attribute that exists (setattr would create a dead one)
    for module, attr in SWITCHES.values():
        assert hasattr(importlib.import_module(module), attr), (module, attr)


def test_schedule_rate_averages_step_times_not_rates():
    from benchmarks.throughput import schedule_rate, table
    # 1000 ms at both ends, 2000 ms in the middle: mean step (1000 + 8000 + 1000) / 6 ms
    assert math.isclose(schedule_rate(600, 1000.0, 2000.0, 1000.0), 600 / (10000 / 6e3))
    row = {"variant": "v", "tokens_per_s_start": 6e5, "tokens_per_s_middle": 5e5, "tokens_per_s_end": 4e5,
           "tokens_per_s_schedule_mean": 4.9e5, "tokens_per_s_schedule_median_steps": 5.1e5, "mfu": 0.5,
           "peak_memory_gib": 18.7, "compile_warmup_s": 15, "recompiles_after_warmup": 0}
    line = table([row]).splitlines()[-1]
    assert "**490k**" in line and "| 510k |" in line
    # a recipe_4090 row in the same call adds every row's ratio to it
    # (by schedule means and by median steps: one slow step moves only the first)
    base = {**row, "variant": "recipe_4090", "tokens_per_s_schedule_mean": 3.5e5,
            "tokens_per_s_schedule_median_steps": 4.0e5}
    lines = table([row, base]).splitlines()
    assert lines[0].endswith("x recipe_4090 | x recipe_4090, median steps |")
    assert lines[2].endswith(" 1.40 | 1.27 |") and lines[3].endswith(" 1.00 | 1.00 |")


def test_median_step_rate_ignores_one_stalled_step_the_mean_counts():
    from benchmarks.throughput import median_step_rate, run_mean_rate
    from speedrun.record.trainer import RecordParams, schedule
    sched = schedule(RecordParams())
    steady = {f"step_ms_each_stage{i + 1}": [100.0 * (i + 1)] * 5 for i in range(3)}
    stalled = {**steady, "step_ms_each_stage3": [900.0] + [300.0] * 4}
    rates = [sched.stages[i].batch_tokens / (0.1 * (i + 1)) for i in range(3)]
    assert math.isclose(median_step_rate(sched, stalled), run_mean_rate(sched, rates)[0])
    assert math.isclose(median_step_rate(sched, steady), median_step_rate(sched, stalled))


def test_turns_train_one_at_a_time_in_order_after_every_warm_up(tmp_path):
    """learning --jobs N: variants compile together but their timed runs never overlap, and a
    variant that crashed before its turn (the parent marks it) blocks nobody."""
    import threading

    from benchmarks.learning import Turns

    group, events, lock = 4, [], threading.Lock()
    warmup_s = [0.3, 0.0, 0.15, 0.05]   # the first variant finishes its warm-up last

    def variant(i):
        time.sleep(warmup_s[i])
        with lock:
            events.append(("warm", i))
        Turns(tmp_path, i, group, poll_s=0.01).wait_for_turn()
        with lock:
            events.append(("start", i))
        time.sleep(0.05)
        with lock:
            events.append(("end", i))
        Turns(tmp_path, i, group).mark("done")   # what the parent does when the process exits

    threads = [threading.Thread(target=variant, args=(i,)) for i in (0, 1, 3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    for what in ("ready", "done"):   # variant 2 crashed during its warm-up
        Turns(tmp_path, 2, group).mark(what)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    runs = [e for e in events if e[0] != "warm"]
    assert runs == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 3), ("end", 3)]
    assert events.index(("start", 0)) > max(events.index(("warm", i)) for i in (0, 1, 3))


# ----------------------------------------------------------------------------- benchmarks/reference.py

@pytest.mark.parametrize("capability, fp8, tma, small_tiles", [
    ((8, 0), False, False, False),    # A100: bf16 matmuls, compiled MLP
    ((8, 6), False, False, True),     # RTX 3090: 99 KiB of shared memory per block
    ((8, 9), True, False, True),      # RTX 4090 / L4: FP8 matmuls, no TMA kernels, 99 KiB
    ((9, 0), True, True, False),      # H100 / H200
    ((10, 0), True, True, False),     # B200
])
def test_each_capability_selects_its_kernel_paths(monkeypatch, capability, fp8, tma, small_tiles):
    # the CUDA loss kernel goes wherever the FP8 head does: its row of 50,304 sigmoids fits 8.9's 99 KiB
    """What the forced-8.9 throughput mode (record_sm89) relies on: every capability check answers
    from torch.cuda.get_device_capability, so faking it picks that card's paths."""
    import torch

    from benchmarks.throughput import selected_paths
    from speedrun.errors import SpeedrunError
    from speedrun.train import fp8_wanted

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test card")
    cuda = torch.device("cuda", 0)
    paths = selected_paths(cuda)
    assert {k: paths[k] for k in ("fp8_matmuls", "tma_mlp_kernels", "cuda_loss_kernel")} == \
        {"fp8_matmuls": fp8, "tma_mlp_kernels": tma, "cuda_loss_kernel": fp8}
    assert (paths["flex_kernel_options"] is not None) == small_tiles
    assert selected_paths(torch.device("cpu")) == {"fp8_matmuls": False, "tma_mlp_kernels": False,
                                                   "flex_kernel_options": None, "cuda_loss_kernel": False}
    if not fp8:   # asking for FP8 where the tensor cores have none is one clear error
        with pytest.raises(SpeedrunError, match="compute capability >= 8.9"):
            fp8_wanted("on", cuda, "record.fp8")


def test_emulated_capability_answers_inside_compiled_code():
    """The forced-8.9 mode's answer is traced by Dynamo where library code asks inside compiled
    code (the record MLP's backward): it must answer 8.9 there without a graph break, and the real
    capability to the compile target."""
    import torch

    from benchmarks.throughput import capability_answer

    answer = capability_answer(lambda device=None: (9, 0), (8, 9))

    @torch.compile(fullgraph=True, backend="eager")
    def scaled(x):
        major, minor = answer(x.device)
        return x * (major * 10 + minor)

    torch._dynamo.reset()
    assert scaled(torch.ones(2)).tolist() == [89.0, 89.0]
    assert answer() == (8, 9)                       # called from here: a caller that is not a target


def test_forward_check_runs_each_configuration_in_its_own_process(monkeypatch, tmp_path):
    """Stage 3 recompiled after stage 1 in one process crashed the record's compiled model; the
    parent runs a worker per configuration (the deliberate difference with the first, validation
    with the last, spreads handed on in one file), and a worker that dies fails the check."""
    import json

    from benchmarks import reference

    calls = []

    def fake_run(cmd, cwd=None):
        args = dict(zip(cmd[3:], cmd[4:]))   # argparse keeps the last value: so does dict()
        calls.append(args)
        cfg, floors = args["--forward-configs"], Path(args["--forward-worker"])
        if cfg == "stage2":   # this worker crashes before writing anything
            return subprocess.CompletedProcess(cmd, 1)
        seen = json.loads(floors.read_text()) if floors.is_file() else []
        floors.write_text(json.dumps(seen + [cfg]))
        checks = {f"forward {cfg}": {"pass": True, "spreads_seen": seen}}
        if "deliberate" in args["--forward-parts"]:
            checks["forward (deliberate) must fail"] = {"pass": cfg == "stage1"}
        Path(args["--out"]).write_text(json.dumps({"checks": checks}))
        return subprocess.CompletedProcess(cmd, 0)

    import subprocess
    monkeypatch.setattr(reference.subprocess, "run", fake_run)
    argv = ["--checks", "forward,optimizer", "--fetch", "URL", "--out", "all.json", "--seed", "7"]
    report = reference.Report()
    assert reference.forward_in_processes(argv, ("stage1", "stage3"), report, tmp_path)
    assert [(c["--forward-configs"], c["--forward-parts"], c["--checks"], c["--fetch"], c["--seed"])
            for c in calls] == [("stage1", "deliberate", "forward", "", "7"), ("stage3", "validation", "forward", "", "7")]
    assert report.results["forward stage3"]["spreads_seen"] == ["stage1"]   # validation sees every spread
    assert set(report.results) == {"forward stage1", "forward stage3", "forward (deliberate) must fail"}
    calls.clear()
    report = reference.Report()
    assert not reference.forward_in_processes(argv, ("stage1", "stage2", "stage3"), report, tmp_path)
    assert [c["--forward-parts"] for c in calls] == ["deliberate", "none", "validation"]
    assert report.results["forward stage2"] == {"pass": False, "error": "worker exited 1"}
    assert report.results["forward stage3"]["spreads_seen"] == ["stage1"]   # a fresh file per run


def test_reference_throughput_patches_apply_to_the_reference_when_present():
    """The reference is fetched at run time, never committed: CI has none and skips this."""
    from benchmarks.reference import CUBLAS_PATCHES, _patch, throughput_patches

    ref = Path(__file__).resolve().parents[1] / ".reference" / "modded-nanogpt" / "train_gpt.py"
    if not ref.exists():
        pytest.skip("no reference fetched")
    src = _patch(ref.read_text(), CUBLAS_PATCHES + throughput_patches(steps=3, settle=2))
    compile(src, str(ref), "exec")
    assert "REF_STEP_MS" in src and "range(5)" in src
    warmup = src.split("for step in warmup_steps")[1].split("Resetting Model")[0]
    # one validation forward at step 0 (it creates a buffer the compiled backward needs), no more
    assert warmup.count("next(val_loader)") == 1 and "if step == 0:" in warmup


def test_shared_memory_report_names_inductor_kernels_that_no_config_fits(monkeypatch):
    """An emulated 8.9 run must count Inductor's kernels (FlexAttention's among them), which load
    through its own launchers, and judge each by its smallest config (an 8.9 autotuner drops the rest)."""
    from types import SimpleNamespace

    from benchmarks import throughput as tp

    monkeypatch.setattr(tp, "_TRITON_SHARED", {})
    launchers = lambda *b: [SimpleNamespace(shared=x) for x in b]
    tp.note_autotuner(SimpleNamespace(inductor_meta={"kernel_name": "triton_tem_fused_flex_0"},
                                      launchers=launchers(180_000, 120_000)))
    tp.note_autotuner(SimpleNamespace(inductor_meta={"kernel_name": "triton_tem_fused_flex_1"},
                                      launchers=launchers(200_000, 64_000)))
    tp.note_autotuner(SimpleNamespace(inductor_meta={}, fn=SimpleNamespace(__name__="triton_poi_0"),
                                      launchers=launchers(0)))
    tp.note_kernel("_ce_kernel", [512])
    from speedrun.record.attention import SMALL_SHARED_MEMORY

    report = tp.shared_memory_report(SMALL_SHARED_MEMORY[tp.SM89["capability"]])
    assert report["triton_kernels_seen"] == 4
    assert report["kernels_over_sm89_shared_memory"] == {"triton_tem_fused_flex_0": 120_000}
    assert report["max_shared_memory_bytes"] == 120_000


def test_record_variants_stop_at_once_without_the_vocabulary(monkeypatch):
    """Offline without tiktoken's files the record recipe would fail at its first timed step,
    after its compile: the benchmark says so in one line before running any variant."""
    import benchmarks.throughput as tp
    import speedrun.tokenizer as tok

    def offline():
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tok, "get_encoding", offline)
    monkeypatch.setattr(tp.subprocess, "run", lambda *a, **k: pytest.fail("a variant ran"))
    monkeypatch.setattr(sys, "argv", ["throughput", "--variants", "classic,record"])
    with pytest.raises(SystemExit, match="TIKTOKEN_CACHE_DIR"):
        tp.main()


def test_each_deliberate_forward_difference_changes_our_gradients():
    """The forward check's deliberate differences must be live changes of our model (a no-op would
    make "must fail" fail, or worse, "resolution" meaningless), and the model is itself again after."""
    from unittest import mock

    import numpy as np

    from benchmarks.reference import DELIBERATE, perturbed
    from speedrun.record import model as our_model
    from speedrun.record.loader import _pack
    from speedrun.record.model import GRAD_SCALE, RecordConfig, build

    cfg = RecordConfig(model_dim=48, head_dim=8, bigram_vocab=512, max_seq_len=1024)
    model = build(cfg, torch.device("cpu"), fp8=False, seed=0)
    model.load_state_dict(perturbed(model.state_dict(), 1))   # as the check: every branch live
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50257, 257).astype(np.int64)
    toks[[0, 90, 200]] = 50256
    mb = _pack(toks, np.array([90, 200, 256]), 256, cfg.bigram_vocab)
    x, y, bg, cu = (torch.from_numpy(a) for a in (mb.inputs, mb.targets, mb.bigram, mb.cu_seqlens))
    model.set_windows(128, 256)

    def grads():
        m = model.masks(cu, x.numel())
        h = model.hidden_states(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, False)
        losses = model.train_losses(h, y, torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.0]), False)
        (losses.sum() * GRAD_SCALE).backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    base = grads()
    for label, attr, change in DELIBERATE:
        with mock.patch.object(our_model, attr, change(getattr(our_model, attr))):
            changed = grads()
        assert any(not torch.equal(changed[n], g) for n, g in base.items()), label
    after = grads()
    assert all(torch.equal(after[n], g) for n, g in base.items())


def test_forward_check_names_the_gradient_closest_to_its_own_tolerance():
    """The forward check's worst gradient is the largest share of its tolerance, reported with that
    gradient's own difference (a reference call once named one tensor with another's number)."""
    from benchmarks.reference import closest_to_tolerance

    grads, tol = {"mudd_w1": 0.065, "smear_gate": 0.013}, {"mudd_w1": 0.128, "smear_gate": 0.0255}
    assert closest_to_tolerance(grads, tol) == "smear_gate"
    assert closest_to_tolerance(grads, {**tol, "smear_gate": 0.05}) == "mudd_w1"


def test_reference_patches_must_match_exactly():
    from benchmarks.reference import _patch

    src = "a = 1\nb = 2\nb = 2\n"
    assert _patch(src, [("a = 1", "a = 3")]) == "a = 3\nb = 2\nb = 2\n"
    assert _patch(src, [("b = 2", "b = 5", 2)]) == "a = 1\nb = 5\nb = 5\n"
    with pytest.raises(RuntimeError, match="found 2 times"):
        _patch(src, [("b = 2", "b = 5")])
    with pytest.raises(RuntimeError, match="found 0 times"):
        _patch(src, [("c = 3", "")])


def test_reference_curve_logs_parse_both_formats(tmp_path):
    from benchmarks.reference import parse_our_curve, parse_reference_curve

    (tmp_path / "ref.log").write_text("step:0/1285 val_loss:10.8250 train_time:0ms\nstep:25/1285 "
                                      "val_loss:7.1234 train_time:5000ms step_avg:200ms\n")
    (tmp_path / "ours.log").write_text("step    25/200 | val_loss 7.1301 | train_time 5.0s | tokens 3,276,800\n"
                                       "step    26/200 | loss 7.0 | 200.0 ms\n")
    assert parse_reference_curve(tmp_path / "ref.log") == {0: 10.825, 25: 7.1234}
    assert parse_our_curve(tmp_path / "ours.log") == {25: 7.1301}


def test_reference_perturbation_reaches_every_parameter():
    from benchmarks.reference import perturbed
    from speedrun.record.model import RecordConfig, build

    model = build(RecordConfig(model_dim=48, head_dim=8, bigram_vocab=256, max_seq_len=256), torch.device("cpu"),
                  fp8=False, seed=0)
    state = model.state_dict()
    new = perturbed(state, 1)
    for name, p in model.named_parameters():
        assert not torch.equal(new[name], state[name]) and new[name].dtype == state[name].dtype, name
    assert torch.equal(new["bigram_sign_table"], state["bigram_sign_table"])   # not a weight


def test_curve_verdict_needs_both_the_pointwise_and_the_mean_rule():
    from benchmarks.reference import curve_verdict

    steps = [25, 50, 75, 100]
    seeds = {"reference seed 1": [5.80, 5.20, 4.90, 4.71], "reference seed 2": [5.81, 5.19, 4.91, 4.74],
             "reference seed 3": [5.79, 5.21, 4.90, 4.72]}
    curves = {n: dict(zip(steps, v)) for n, v in seeds.items()}
    names = list(seeds)
    # within the seeds' noise: small deviations of both signs
    curves["ours"] = dict(zip(steps, [5.805, 5.195, 4.905, 4.72]))
    v = curve_verdict(curves, names, names[0], "ours", steps)
    assert v["within"] and v["max_dev"] <= v["max_seed_spread"]
    # a steady offset: each point inside the largest range (0.03), the mean far over any seed pair's
    curves["shifted"] = {s: x + 0.025 for s, x in curves[names[0]].items()}
    v = curve_verdict(curves, names, names[0], "shifted", steps)
    assert v["max_dev"] <= v["max_seed_spread"] and not v["within"]
    # a plainly different curve fails both
    curves["slow"] = {s: x + 0.1 for s, x in curves[names[0]].items()}
    assert not curve_verdict(curves, names, names[0], "slow", steps)["within"]


def test_profile_families_sort_the_record_s_own_kernels_like_ours():
    """profile_step --variant reference compares family by family with ours: the record's fused FP8
    MLP is matmul, its Polar Express kernels are optimizer, its flash kernels attention."""
    from benchmarks.profile_step import family

    assert family("linear_relu_square_kernel") == "matmul"
    assert family("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_params>") \
        == "attention (flex, flash)"
    assert family("triton_tem_fused_flex_attention_0") == "attention (flex, flash)"
    assert family("XXT_kernel") == family("ba_plus_cAA_kernel") == "optimizer"
    assert family("_dc_postonly_corr_fwd_wsmall_cached_kernel") == "dynamically composable attention"
    assert family("_ce_fwd_bwd_kernel") == "cross-entropy/softcap"


def test_reference_profile_patches_run_one_stage_under_the_profiler_when_present():
    from benchmarks.reference import CUBLAS_PATCHES, _patch, throughput_patches

    ref = Path(__file__).resolve().parents[1] / ".reference" / "modded-nanogpt" / "train_gpt.py"
    if not ref.exists():
        pytest.skip("no reference fetched")
    src = _patch(ref.read_text(), CUBLAS_PATCHES + throughput_patches(3, 2, profile_stage=3, trace=Path("t.json")))
    compile(src, str(ref), "exec")
    loop = src.split("_marks = []")[1]
    assert "[:3][2:3]" in loop and "if _k == 2:" in loop and "_prof.export_chrome_trace('t.json')" in loop
    # only the profiled stage is compiled, its validation forward on the first warm-up step
    warm = src.split("Sampling steps")[0].split("transition_steps = ")[1]
    assert "for s in [0, *transition_steps][:3][2:3]" in warm
    assert "if step == warmup_steps[0]:" in src
    # a stage after the first sends its batch size as the loader's first message, which a
    # just-started generator refuses (the first GPU profile of stage 3 died so): both loaders start first
    made = src.count("train_loader = distributed_data_generator(")
    assert made == 2 and src.count("grad_accum_steps=grad_accum_steps)\nnext(train_loader)\n") == made
