"""The trainer (speedrun/train.py, stage train_speedrun) on the cpu-tiny profile.

The expensive part is `resume_runs`: one uninterrupted run A and, at the same time, a run B of the
same parameters stopped three times by real signals (SIGINT through torchrun as `dvc repro` runs
it, then SIGINT and SIGTERM to the stage itself) and resumed each time. Both are stage
subprocesses with one torch thread each, so they share 2 cores without contending and are
bit-for-bit comparable. The other tests train in-process for a few steps or stop before
any training.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from speedrun import checkpoint as ckpt
from speedrun import train as train_mod
from speedrun.errors import SpeedrunError
from speedrun.train import Paths, Run, TrainParams
from speedrun.metrics import read_metrics
from test_evaluate import run_stage, write_tiny_shards

PROJECT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

STEPS = 8
RESUME_TRAIN = {"recipe": "classic", "profile": "cpu-tiny", "steps": STEPS, "val_every": 2, "val_tokens": 512,
                "ckpt_every": 0, "target_val_loss": 20.0}
REQUIRED_KEYS = ["dataset", "target", "reached_target", "time_to_target_s", "tokens_to_target",
                 "step_to_target", "final_val_loss", "steps", "tokens", "train_time_s",
                 "compile_time_s", "wall_time_s", "tokens_per_s", "peak_tokens_per_s", "mfu",
                 "peak_memory_gib", "gpu", "torch_version", "seed", "git_commit"]


# ----------------------------------------------------------------------------- helpers

def _tsv(path: Path, column: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f, delimiter="\t")]


def _live(run: Path, name: str) -> list[tuple[int, float]]:
    return _tsv(run / f"metrics/dvclive/plots/metrics/{name}.tsv", name.split("/")[-1])


def _leftover_temporaries(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*") if p.name.endswith(".tmp")]


def _stage_cmd(params: Path, shards: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train_speedrun", "--params", str(params),
            "--shards", str(shards), "--models", str(run / "models"), "--metrics", str(run / "metrics")]


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=PROJECT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, interrupt_at: int | None = None, sigs=(),
            timeout: float = 240) -> tuple[int, str, str]:
    """Wait for the stage; with interrupt_at, send `sigs` once its log reports that step's loss."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        out = []
        if interrupt_at is not None:
            while line := proc.stdout.readline():
                out.append(line)
                if re.match(rf"step\s+{interrupt_at}/\d+ \| loss", line):
                    for sig in sigs:
                        proc.send_signal(sig)
                    break
        out.append(proc.stdout.read())
        err = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(out), err


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def _in_process(root: Path, shards: Path, log: list | None = None, **train) -> Run:
    """A Run over `shards` writing under `root` (no subprocess: torch is already imported)."""
    p = TrainParams(**{**RESUME_TRAIN, **train})
    p.validate()
    paths = Paths(shards=shards, checkpoints=root / "models/checkpoints", final=root / "models/final.pt",
                  metrics=root / "metrics/train.json", live=root / "metrics/dvclive")
    return Run(p, paths, log=(lambda *a, **k: log.append(" ".join(map(str, a)))) if log is not None
               else (lambda *a, **k: None))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-shards") / "shards"
    write_tiny_shards(d, train_tokens=STEPS * 1024 + 1, val_tokens=600)
    return d


@dataclasses.dataclass
class ResumeRuns:
    a: Path
    b: Path
    b_segments: list[tuple[int, str, str]]   # (exit code, stdout, stderr) of B's four processes
    b_stops: list[int]                       # steps at which B's three interruptions checkpointed
    b_ckpt_progress: list[dict]              # latest.pt "progress" after each interruption


# how B is stopped: as `dvc repro` runs the stage (under torchrun, which forwards the signal to its
# worker), then the stage alone: SIGINT at once followed by SIGTERM (one request, as Ctrl-C plus a
# forwarded SIGTERM: it must still checkpoint, not abort), then SIGTERM alone. A 4th process finishes.
INTERRUPTIONS = [("torchrun", (signal.SIGINT,)), ("direct", (signal.SIGINT, signal.SIGTERM)),
                 ("direct", (signal.SIGTERM,))]


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, shards) -> ResumeRuns:
    root = tmp_path_factory.mktemp("resume")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"train": RESUME_TRAIN}))
    a_proc = _popen(_stage_cmd(params, shards, root / "A"))  # uninterrupted, alongside B
    b_cmd = _stage_cmd(params, shards, root / "B")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                *b_cmd[1:]]
    latest = root / "B/models/checkpoints/latest.pt"
    segments, stops, progress = [], [], []
    at = 1
    for how, sigs in INTERRUPTIONS:
        segments.append(_finish(_popen(torchrun if how == "torchrun" else b_cmd), interrupt_at=at, sigs=sigs))
        assert latest.exists(), segments[-1]
        state = torch.load(latest, map_location="cpu", weights_only=True)  # safe to load
        stops.append(int(state["step"]))
        progress.append(state["progress"])
        at = min(stops[-1] + 1, STEPS - 2)   # the first step this resumed process will log
    segments.append(_finish(_popen(b_cmd)))
    a_code, a_out, a_err = _finish(a_proc)
    assert a_code == 0, a_out + a_err
    return ResumeRuns(root / "A", root / "B", segments, stops, progress)


# ----------------------------------------------------------------------------- 1. resume

def test_interrupt_writes_checkpoint_and_exits_with_one_line(resume_runs):
    r = resume_runs
    print(f"interrupted at steps {r.b_stops}; exit codes {[s[0] for s in r.b_segments]}")
    assert 0 < r.b_stops[0] < r.b_stops[1] < r.b_stops[2] < STEPS, r.b_stops
    for (code, out, err), (how, sigs), stop in zip(r.b_segments, INTERRUPTIONS, r.b_stops):
        assert code != 0, out + err
        assert out.count("saving a checkpoint") == 1, out   # one request, however many signals
        assert f"signal {sigs[0].name}: saving a checkpoint" in out, out
        message = f"interrupted: stopped at step {stop}, checkpoint saved to "
        lines = _error_lines(err)
        if how == "torchrun":  # torchrun adds its own warnings and traceback around the worker's line
            assert any(ln.startswith(message) for ln in lines), err
            continue
        assert len(lines) == 1, err
        assert lines[0].startswith(message) and lines[0].endswith("run `dvc repro` again to resume")
        assert str(r.b / "models/checkpoints/latest.pt") in lines[0]
    for (_, out, _), stop in zip(r.b_segments[1:], r.b_stops):
        assert f"resuming from step {stop}" in out
    code, out, err = r.b_segments[-1]
    assert code == 0 and err.strip() == "", out + err


def test_resumed_run_matches_uninterrupted(resume_runs):
    r = resume_runs
    a_loss, b_loss = _live(r.a, "train/loss"), _live(r.b, "train/loss")
    assert [s for s, _ in a_loss] == list(range(1, STEPS + 1))
    # resumed segments append exactly the missing steps: no gap, no repeat
    assert [s for s, _ in b_loss] == list(range(1, STEPS + 1))
    diffs = [abs(x - y) for (_, x), (_, y) in zip(a_loss, b_loss)]
    print(f"A losses {[round(v, 5) for _, v in a_loss]}\nmax |A - B| per-step train loss {max(diffs):.3g}")
    assert max(diffs) <= 1e-6 * max(abs(v) for _, v in a_loss), (a_loss, b_loss)
    assert a_loss[-1][1] < a_loss[0][1] - 2.0, f"the tiny model did not learn: {a_loss}"

    a_val, b_val = _live(r.a, "val/loss"), _live(r.b, "val/loss")
    assert [s for s, _ in a_val] == [s for s, _ in b_val] == [2, 4, 6, 8]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a_val, b_val)) <= 1e-6
    ma = read_metrics(r.a / "metrics/train.json")
    mb = read_metrics(r.b / "metrics/train.json")
    assert abs(ma["final_val_loss"] - mb["final_val_loss"]) <= 1e-5, (ma["final_val_loss"], mb["final_val_loss"])
    assert mb["step_to_target"] == ma["step_to_target"] == 2
    # the final weights themselves agree
    fa = torch.load(r.a / "models/final.pt", weights_only=True)["model"]
    fb = torch.load(r.b / "models/final.pt", weights_only=True)["model"]
    worst = max((fa[k] - fb[k]).abs().max().item() for k in fa)
    print(f"max |A - B| final weight {worst:.3g}; final val {ma['final_val_loss']} vs {mb['final_val_loss']}")
    assert worst <= 1e-5


def test_resumed_run_metrics_cover_all_segments(resume_runs):
    r = resume_runs
    ma = read_metrics(r.a / "metrics/train.json")
    mb = read_metrics(r.b / "metrics/train.json")
    assert ma["resumed_at_steps"] == []
    assert mb["resumed_at_steps"] == r.b_stops
    # the training clock continues across processes: the saved clock grows, the final one exceeds it
    clocks = [p["train_time_s"] for p in r.b_ckpt_progress] + [mb["train_time_s"]]
    assert 0 < clocks[0] and all(x < y for x, y in zip(clocks, clocks[1:])), clocks
    seconds = [v for _, v in _live(r.b, "train/seconds")]
    assert seconds == sorted(seconds) and seconds[0] > 0, seconds
    assert seconds[-1] <= mb["train_time_s"] + 1e-3
    # B trained as many steps as A: its training time is of A's order (timing noise: loose bounds)
    assert 0.4 * ma["train_time_s"] < mb["train_time_s"] < 2.5 * ma["train_time_s"], (ma, mb)
    # one warm-up/compile entry per process (cpu-tiny has no warm-up); val history survives restarts
    assert mb["compile_time_s"] == 0.0 and ma["compile_time_s"] == 0.0
    assert [len(p["compile_time_s"]) for p in r.b_ckpt_progress] == [1, 2, 3]
    assert mb["tokens"] == ma["tokens"] == STEPS * 1024
    for stop, prog in zip(r.b_stops, r.b_ckpt_progress):
        assert [e["step"] for e in prog["val_history"]] == [s for s in (2, 4, 6) if s <= stop]


# ----------------------------------------------------------------------------- 3. checkpoint files

def test_checkpoints_load_weights_only_and_leave_no_temporaries(resume_runs):
    r = resume_runs
    for run in (r.a, r.b):
        latest = torch.load(run / "models/checkpoints/latest.pt", map_location="cpu", weights_only=True)
        final = torch.load(run / "models/final.pt", map_location="cpu", weights_only=True)
        assert latest["format"] == final["format"] == ckpt.FORMAT
        assert latest["step"] == final["step"] == STEPS
        assert set(latest) >= {"fingerprint", "model", "adam", "muon", "rng", "progress", "config"}
        assert latest["fingerprint"] == final["fingerprint"]
        assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
        # the final model rebuilds from its own config
        ckpt.model_from_checkpoint(final, torch.device("cpu"))
        leftovers = _leftover_temporaries(run / "models", run / "metrics")
        assert not leftovers, leftovers


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact and no temporary file."""
    path = tmp_path / "checkpoints/latest.pt"
    ckpt.save(path, {"format": ckpt.FORMAT, "model": {"w": torch.ones(3)}, "step": 1})
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:   # half-written file, then the process "dies"
            fh.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        ckpt.save(path, {"format": ckpt.FORMAT, "model": {"w": torch.zeros(3)}, "step": 2})
    assert path.read_bytes() == before
    assert ckpt.load(path)["step"] == 1
    assert _leftover_temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- 2. other config

@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, shards) -> Path:
    """Run X, in-process: 2 steps, validation after each, the default (unreachable) target."""
    root = tmp_path_factory.mktemp("two-step") / "run"
    _in_process(root, shards, **TWO_STEP).run()
    return root


TWO_STEP = dict(steps=2, val_every=1, val_tokens=256, target_val_loss=3.28)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unreachable_target_metrics(two_step_run):
    m = read_metrics(two_step_run / "metrics/train.json")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    assert not missing, missing
    assert m["target"] == 3.28 and m["reached_target"] is False
    assert m["time_to_target_s"] is None and m["tokens_to_target"] is None and m["step_to_target"] is None
    assert math.isfinite(m["final_val_loss"]) and m["final_val_loss"] > 3.28
    assert [s for s, _ in _live(two_step_run, "val/loss")] == [1, 2]
    assert m["resumed_at_steps"] == []


def test_checkpoint_of_another_config_is_not_resumed(two_step_run, tmp_path, shards):
    """Y = X with a model key changed (logit_cap; the cpu-tiny profile fixes the shape keys)."""
    root = _copy_run(two_step_run, tmp_path / "run")
    old = torch.load(root / "models/checkpoints/latest.pt", weights_only=True)
    log: list[str] = []
    y = _in_process(root, shards, log, **{**TWO_STEP, "logit_cap": 15.0})
    assert y.fingerprint != old["fingerprint"]
    m = y.run()
    assert any("belongs to another configuration" in ln and "starting fresh" in ln for ln in log), log
    assert not any(ln.startswith("resuming") for ln in log), log
    assert m["resumed_at_steps"] == []
    assert [s for s, _ in _live(root, "train/loss")] == [1, 2]   # both steps trained again
    new = torch.load(root / "models/checkpoints/latest.pt", weights_only=True)
    assert new["fingerprint"] == y.fingerprint and new["step"] == 2
    assert not torch.equal(new["model"]["embed.weight"], old["model"]["embed.weight"])


@pytest.fixture(scope="module")
def retargeted(two_step_run, tmp_path_factory, shards) -> tuple[Path, dict, list[str]]:
    """X re-run with only run-control keys changed (target 20, checkpoint cadence)."""
    root = _copy_run(two_step_run, tmp_path_factory.mktemp("retarget") / "run")
    log: list[str] = []
    m = _in_process(root, shards, log, **{**TWO_STEP, "target_val_loss": 20.0, "ckpt_every": 5}).run()
    return root, m, log


def test_run_control_keys_resume_without_retraining(retargeted):
    root, m, log = retargeted
    assert any(ln.startswith("resuming from step 2") for ln in log), log
    assert m["resumed_at_steps"] == [2]
    assert [s for s, _ in _live(root, "train/loss")] == [1, 2]   # no step trained again
    assert m["target"] == 20.0 and m["reached_target"] is True


def test_resume_with_another_target_recomputes_time_to_target(retargeted):
    """target_val_loss may change without invalidating the checkpoint, so the first validation at
    or below the NEW target must be taken from the restored val_history: step 1 (~10.7 < 20)."""
    root, m, _ = retargeted
    assert m["step_to_target"] == 1, m


def test_resume_at_the_last_step_does_not_validate_twice(retargeted):
    root, _, _ = retargeted
    assert [s for s, _ in _live(root, "val/loss")] == [1, 2]
    state = torch.load(root / "models/checkpoints/latest.pt", weights_only=True)
    assert [e["step"] for e in state["progress"]["val_history"]] == [1, 2]


def test_fingerprint_ignores_run_control_keys_only():
    manifest = {"train": [{"file": "train_000000.bin", "sha256": "ab"}]}
    base = TrainParams(profile="cpu-tiny")
    fp = train_mod.fingerprint(train_mod.effective(base), manifest)
    for key, value in [("val_every", 7), ("ckpt_every", 3), ("target_val_loss", 9.0), ("nproc", 2),
                       ("compile", True), ("warmup_steps", 5)]:
        p = dataclasses.replace(base, **{key: value})
        assert train_mod.fingerprint(train_mod.effective(p), manifest) == fp, key
    for key, value in [("logit_cap", 15.0), ("seed", 1), ("steps", 99), ("muon_lr", 0.01),
                       ("vocab_size", 50432)]:
        p = dataclasses.replace(base, **{key: value})
        assert train_mod.fingerprint(train_mod.effective(p), manifest) != fp, key
    other_data = {"train": [{"file": "train_000000.bin", "sha256": "cd"}]}
    assert train_mod.fingerprint(train_mod.effective(base), other_data) != fp


# ----------------------------------------------------------------------------- 4. divergence

def test_divergence_without_checkpoint_is_a_clear_error(tmp_path, shards):
    run = _in_process(tmp_path / "run", shards, steps=2, val_tokens=256, embed_lr=1e30, head_lr=1e30,
                      muon_lr=1e30)
    with pytest.raises(SpeedrunError, match="diverged") as e:
        run.run()
    msg = str(e.value)
    print(msg)
    assert "no checkpoint had been written yet" in msg and "train.muon_lr" in msg
    assert not (tmp_path / "run/models/final.pt").exists()
    assert not (tmp_path / "run/models/checkpoints/latest.pt").exists()


def test_divergence_keeps_last_good_checkpoint(tmp_path, shards, monkeypatch):
    """The lr explodes from step 1 on (a real divergence through the optimizers): the step-1
    checkpoint stays, is not replaced by a non-finite one, and no final.pt is written."""
    real = train_mod.lr_multiplier
    monkeypatch.setattr(train_mod, "lr_multiplier",
                        lambda step, *a: 1e30 if step >= 1 else real(step, *a))
    latest = tmp_path / "run/models/checkpoints/latest.pt"
    run = _in_process(tmp_path / "run", shards, steps=3, ckpt_every=1, val_every=0, val_tokens=256)
    with pytest.raises(SpeedrunError, match="diverged") as e:
        run.run()
    msg = str(e.value)
    print(msg)
    assert f"the last good checkpoint {latest} is kept" in msg
    state = torch.load(latest, weights_only=True)
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run/models/final.pt").exists()
    assert _leftover_temporaries(tmp_path / "run") == []


# ----------------------------------------------------------------------------- 5-7. clear errors

def test_gpu_profile_without_cuda_is_one_line(tmp_path, shards):
    params = tmp_path / "params.yaml"
    params.write_text("train: {}\n")   # the defaults: profile gpu
    proc = subprocess.run(_stage_cmd(params, shards, tmp_path / "run"), cwd=PROJECT,
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA GPU"), proc.stderr
    assert "train.profile=cpu-tiny" in lines[0]
    assert not (tmp_path / "run/models").exists()


def _stage_error(tmp_path, shards, capsys, train: dict) -> str:
    from stages.train_speedrun import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"recipe": "classic", **train}}))
    code, out, err = run_stage(main, ["--params", str(params), "--shards", str(shards),
                                      "--models", str(tmp_path / "models"),
                                      "--metrics", str(tmp_path / "metrics")], capsys)
    lines = _error_lines(err)
    assert code == 2, out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()
    return lines[0]


@pytest.mark.parametrize("train, expected", [
    ({"batch_tokens": 32768 * 3 + 128}, ["train.batch_tokens", "train.micro_batch_tokens"]),
    ({"window_start": 1024, "window_end": 512}, ["train.window_end", "train.window_start"]),
    ({"muon_learning_rate": 0.1}, ["unknown key train.muon_learning_rate"]),
    ({"steps": "ten"}, ["train.steps", "integer"]),
    ({"compile": "yes"}, ["train.compile", "true or false"]),
    ({"micro_batch_tokens": 1000}, ["train.micro_batch_tokens", "multiple of 128"]),
    ({"profile": "tpu"}, ["train.profile", "cpu-tiny"]),
    ({"muon_lr": 0}, ["train.muon_lr", "> 0"]),
    ({"profile": "cpu-tiny", "val_tokens": 300}, ["train.val_tokens"]),
])
def test_bad_params_are_one_line_naming_the_key(tmp_path, shards, capsys, train, expected):
    line = _stage_error(tmp_path, shards, capsys, train)
    for text in expected:
        assert text in line, line


def test_not_enough_training_tokens(tmp_path, shards, capsys):
    line = _stage_error(tmp_path, shards, capsys, {**RESUME_TRAIN, "steps": 50})
    assert "train.steps" in line and "download.max_tokens" in line, line
    assert f"need {50 * 1024 + 1:,}" in line


def test_not_enough_validation_tokens(tmp_path, shards, capsys):
    line = _stage_error(tmp_path, shards, capsys, {**RESUME_TRAIN, "val_tokens": 8192})
    assert "train.val_tokens" in line and "tokenize.val_tokens" in line, line


def test_interrupted_stage_exits_130(monkeypatch, capsys, tmp_path):
    from stages.train_speedrun import main

    def interrupted(self):
        raise train_mod.Interrupted("interrupted at step 3: checkpoint saved", 130)

    monkeypatch.setattr(Run, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Run, "run", interrupted)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"recipe": "classic", "profile": "cpu-tiny"}}))
    code, _, err = run_stage(main, ["--params", str(params)], capsys)
    assert code == 130, err


# ----------------------------------------------------------------------------- 8. metrics

def test_metrics_have_every_key_and_a_reached_target(resume_runs):
    m = read_metrics(resume_runs.a / "metrics/train.json")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    assert not missing, missing
    assert m["dataset"] == "local:tiny.jsonl" and m["target"] == 20.0
    assert m["reached_target"] is True
    assert m["step_to_target"] == 2                      # the first validation (val_every=2)
    assert m["tokens_to_target"] == 2 * 1024
    assert 0 < m["time_to_target_s"] < m["train_time_s"]
    assert m["steps"] == STEPS and m["tokens"] == STEPS * 1024
    assert abs(m["final_val_loss"] - _live(resume_runs.a, "val/loss")[-1][1]) < 1e-5
    assert m["wall_time_s"] > m["train_time_s"] > 0
    assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["train_time_s"], rel=1e-3)
    assert m["peak_tokens_per_s"] > 0
    assert m["mfu"] is None and m["peak_memory_gib"] is None and m["gpu"] == "cpu"  # CPU: no GPU peak
    assert 0.1 < m["peak_host_memory_gib"] < 24                                   # but the process's own
    assert m["torch_version"] == torch.__version__ and m["seed"] == 1337
    assert m["fp8"] is False and m["fp8_head"] is False and m["fused_ce"] is True  # CPU: no FP8
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", m["git_commit"]), m["git_commit"]
    # the val history behind time_to_target: the first entry is the target's
    val = _live(resume_runs.a, "val/loss")
    assert val[0][0] == 2 and val[0][1] <= 20.0


# ----------------------------------------------------------------------------- crash (no signal)

def test_resume_after_crash_does_not_repeat_steps(tmp_path, shards, monkeypatch):
    """The process dies after logging step 2, before its step-2 checkpoint (as a SIGKILL would)."""
    real_save = Run.save_checkpoint

    def killed_at_2(self, step, progress, last_loss):
        if step == 2:
            raise RuntimeError("simulated kill")
        return real_save(self, step, progress, last_loss)

    monkeypatch.setattr(Run, "save_checkpoint", killed_at_2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _in_process(tmp_path / "run", shards, steps=2, ckpt_every=1, val_every=0, val_tokens=256).run()
    assert torch.load(tmp_path / "run/models/checkpoints/latest.pt", weights_only=True)["step"] == 1
    monkeypatch.setattr(Run, "save_checkpoint", real_save)
    m = _in_process(tmp_path / "run", shards, steps=2, ckpt_every=1, val_every=0, val_tokens=256).run()
    assert m["resumed_at_steps"] == [1]
    steps = [s for s, _ in _live(tmp_path / "run", "train/loss")]
    assert steps == [1, 2], steps


def test_git_commit_says_when_the_tree_is_not_head(tmp_path, monkeypatch):
    """A run's metrics must not attribute edited code to HEAD: tracked changes add "-dirty"."""
    import subprocess

    from speedrun.metrics import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.chdir(tmp_path)
    clean = git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert git_commit() == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit() == clean + "-dirty"


def test_warmup_forgets_what_it_learned_and_freezes_the_gc(tmp_path):
    """Warm-up steps train on dummy tokens (to compile); the run must start from the initial
    weights anyway, and the objects alive by then leave the garbage collector's generations."""
    import gc

    shards = tmp_path / "shards"
    write_tiny_shards(shards, train_tokens=4 * 1024 + 1, val_tokens=600)
    p = TrainParams(profile="cpu-tiny", steps=4, val_tokens=512, ckpt_every=0)
    run = Run(p, Paths(shards, tmp_path / "ckpt", tmp_path / "final.pt", tmp_path / "m.json", None),
              log=lambda *a, **k: None)
    run.p = dataclasses.replace(run.p, warmup_steps=2)   # cpu-tiny skips the warm-up otherwise
    run._build()
    run._window = torch.tensor(1, dtype=torch.int32)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    gc.unfreeze()
    try:
        assert run.warmup() > 0
        assert gc.get_freeze_count() > 0
        for k, v in run.model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(q.grad is None for q in run.model.parameters())
    finally:
        gc.unfreeze()


def test_stack_compile_is_the_same_model_in_one_graph():
    """compile_regions compiles the whole block stack as one graph (cross-block fusion):
    the loss and every gradient must match the uncompiled model, and the blocks must not be
    compiled one by one as well (one graph for the stack, one for the embedding prelude)."""
    import copy

    import torch._dynamo.utils as dyn_utils

    from speedrun import train
    from speedrun.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, n_layer=4, model_dim=64, n_head=2, head_dim=32, value_embeds=1,
                    no_attn_layer=2, max_seq_len=256, key_offset=True)
    eager = GPT(cfg)
    with torch.no_grad():   # zero-initialised projections would hide a wrong block order
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = copy.deepcopy(eager)
    train.compile_regions(model)
    before = dyn_utils.counters["stats"]["unique_graphs"]
    toks = torch.randint(0, 500, (257,))
    wb = torch.tensor(2, dtype=torch.int32)
    ref = eager(toks[:-1], toks[1:], wb)
    ref.backward()
    got = model(toks[:-1], toks[1:], wb)
    got.backward()
    assert dyn_utils.counters["stats"]["unique_graphs"] - before == 2
    assert torch.allclose(got, ref, atol=1e-5), (got, ref)
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        assert torch.allclose(q.grad, p.grad, atol=1e-5, rtol=1e-3), name
    torch._dynamo.reset()


def test_params_errors_point_at_the_line_and_the_likely_key(tmp_path):
    from speedrun.errors import ParamError
    from speedrun.params import load_yaml, parse_section
    from speedrun.train import TrainParams

    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  steps: 10\n  window_end: [1792\n")
    with pytest.raises(ParamError, match=r"not valid YAML at line 4, column 1: expected ',' or ']'"):
        load_yaml(bad)
    with pytest.raises(ParamError, match=r"unknown key train.muon_lrr \(did you mean train.muon_lr( or [a-z_.]+)*\?\)$"):
        parse_section({"train": {"muon_lrr": 0.1}}, "train", TrainParams)
    with pytest.raises(ParamError, match=r"unknown key train.qqq \(the \d+ keys of train are documented"):
        parse_section({"train": {"qqq": 0.1}}, "train", TrainParams)
