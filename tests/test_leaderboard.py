"""The leaderboard over `dvc exp show --json`, and the overlaid validation curves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedrun.leaderboard import differing_params, markdown_table, rows_from_exp_show
from speedrun.plots import curve_from_texts, plot_curves, read_curve

PROJECT = Path(__file__).resolve().parents[1]

# A stage that writes what train_speedrun writes (train.json + the DVCLive val TSVs), instantly:
# loss falls by `lr` per validation, so a larger lr reaches the 3.28 target sooner.
FAKE_TRAIN = r'''
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
loss, hist, t = 6.0, [], 0.0
for step in range(1, 6):
    loss, t = loss - p["lr"], t + 2.0
    hist.append((step, loss, t, step * 1000))
hit = next((h for h in hist if h[1] <= 3.28), None)
os.makedirs("metrics/dvclive/plots/metrics/val", exist_ok=True)
for i, name in ((1, "loss"), (2, "seconds"), (3, "tokens")):
    with open(f"metrics/dvclive/plots/metrics/val/{name}.tsv", "w") as f:
        f.write(f"step\t{name}\n" + "".join(f"{h[0]}\t{h[i]}\n" for h in hist))
json.dump({"target": 3.28, "reached_target": hit is not None,
           "time_to_target_s": hit[2] if hit else None, "tokens_to_target": hit[3] if hit else None,
           "final_val_loss": loss, "tokens_per_s": 500.0, "gpu": "NVIDIA H100", "world_size": 1},
          open("metrics/train.json", "w"))
'''

DVC_YAML = """stages:
  train_speedrun:
    cmd: python fake_train.py
    deps: [fake_train.py]
    params: [train]
    metrics:
      - metrics/train.json: {cache: false}
    plots:
      - metrics/dvclive/plots: {cache: false}
"""


def _entry(rev, name, params, train, eval_=None, hellaswag=None):
    metrics = {"metrics/train.json": {"data": train}}
    if eval_:
        metrics["metrics/eval.json"] = {"data": eval_}
    if hellaswag:
        metrics["metrics/hellaswag.json"] = {"data": hellaswag}
    return {"rev": rev, "name": name, "error": None, "experiments": None,
            "data": {"rev": rev, "timestamp": None, "params": {"params.yaml": {"data": params}},
                     "metrics": metrics, "deps": {}, "outs": {}, "meta": {}}}


def test_ranking_from_exp_show_json():
    """DVC 3.x layout (as printed by dvc 3.67): baselines, then experiments[].revs[]; null metrics omitted."""
    base = _entry("a" * 40, "main", {"train": {"lr": 0.1, "seed": 1}},
                  {"time_to_target_s": 30.0, "reached_target": True, "tokens_to_target": 3000,
                   "final_val_loss": 3.2, "tokens_per_s": 100.0, "gpu": "cpu"})
    fast = _entry("b" * 40, "fast-exp", {"train": {"lr": 0.2, "seed": 1}},
                  {"time_to_target_s": 12.5, "reached_target": True, "tokens_to_target": 1000,
                   "final_val_loss": 3.1, "tokens_per_s": 120.0, "gpu": "H100", "world_size": 8},
                  {"val_loss": 3.0999}, {"acc": 0.2911, "acc_norm": 0.3012, "items": 10042})
    slow = _entry("c" * 40, "missed", {"train": {"lr": 0.01, "seed": 1}},
                  {"reached_target": False, "final_val_loss": 4.5, "tokens_per_s": 90.0, "gpu": "cpu"})
    failed = dict(_entry("d" * 40, "broken", {"train": {"lr": 9.0, "seed": 1}}, {}),
                  error={"type": "ReproductionError", "msg": "failed"})
    base["experiments"] = [{"name": "missed", "executor": None, "revs": [slow]},
                           {"name": "fast-exp", "executor": None, "revs": [fast]},
                           {"name": "broken", "executor": "failed", "revs": [failed]}]
    workspace = _entry("workspace", None, {"train": {"lr": 0.01, "seed": 1}}, slow["data"]["metrics"]
                       ["metrics/train.json"]["data"])
    rows = rows_from_exp_show([workspace, base])
    assert [r.name for r in rows] == ["main", "missed", "fast-exp"]  # no workspace, no failed run
    assert differing_params(rows) == ["train.lr"]
    table = markdown_table(rows).splitlines()
    print("\n".join(table))
    assert table[0].startswith("| # | experiment | params | time to target (s)")
    assert table[2].split(" | ")[1:4] == ["fast-exp", "train.lr=0.2", "12.5"]
    assert "1,000" in table[2] and "3.0999" in table[2] and "8 x H100" in table[2]  # eval loss wins
    assert table[0].split(" | ")[6] == "HellaSwag acc_norm" and table[2].split(" | ")[6] == "0.3012"
    assert table[3].split(" | ")[6] == "—"   # not evaluated
    assert table[3].split(" | ")[1] == "main"
    assert table[4].split(" | ")[1] == "missed" and "—" in table[4]  # missed the target: last


def test_a_lone_experiment_shows_what_it_changed_from_the_commit():
    """One ranked row has no param that differs between rows: the column compares it with the
    commit's params.yaml instead of printing a dash."""
    from speedrun.leaderboard import baseline_params

    base = _entry("a" * 40, "main", {"train": {"lr": 0.1, "seed": 1}}, {})   # HEAD: never trained
    exp = _entry("b" * 40, "lower-lr", {"train": {"lr": 0.05, "seed": 1}},
                 {"time_to_target_s": 9.0, "reached_target": True, "tokens_to_target": 900,
                  "final_val_loss": 3.2, "tokens_per_s": 100.0, "gpu": "cpu"})
    base["experiments"] = [{"name": "lower-lr", "executor": None, "revs": [exp]}]
    data = [base]
    rows = rows_from_exp_show(data)
    assert [r.name for r in rows] == ["lower-lr"] and baseline_params(data) == {"train.lr": 0.1, "train.seed": 1}
    assert markdown_table(rows, baseline_params(data)).splitlines()[2].split(" | ")[2] == "train.lr=0.05"
    same = _entry("c" * 40, "main", {"train": {"lr": 0.1, "seed": 1}}, exp["data"]["metrics"]["metrics/train.json"]["data"])
    alone = rows_from_exp_show([same])
    assert markdown_table(alone, baseline_params([same])).splitlines()[2].split(" | ")[2] == "params.yaml as committed"


def test_curve_overlay_png(tmp_path):
    a = curve_from_texts("run a", {"loss": "step\tloss\n1\t5.0\n2\t4.0\n", "seconds": "step\tseconds\n1\t1\n2\t2\n",
                                   "tokens": "step\ttokens\n1\t100\n2\t200\n"})
    assert a.steps == [1, 2] and a.loss == [5.0, 4.0] and a.tokens == [100.0, 200.0]
    b = read_curve(tmp_path / "missing-dir", "run b")  # no files: an empty curve, not an error
    assert b.steps == []
    png = plot_curves([a, b], tmp_path / "out.png", target=3.28)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory) -> tuple[Path, dict]:
    """A git + DVC repo with a baseline run and two experiments of the fake trainer."""
    repo = tmp_path_factory.mktemp("exp-repo")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(PROJECT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
        return proc

    (repo / "fake_train.py").write_text(FAKE_TRAIN)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("train:\n  lr: 0.5\n  seed: 1\n")
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", "fast", "-S", "train.lr=1.0")
    run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", "slow", "-S", "train.lr=0.1")
    return repo, env


def test_leaderboard_command_on_real_experiments(exp_repo):
    repo, env = exp_repo
    proc = subprocess.run([sys.executable, "-m", "stages.leaderboard", "--plot", "board.png"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r[1] for r in rows[1:]]
    assert names[0] == "fast" and names[-1] == "slow" and len(names) == 3  # baseline (branch) between
    assert rows[1][2] == "train.lr=1.0" and rows[1][3] == "6.0"  # 3 validations of 2 s to get <= 3.28
    assert rows[3][3] == "—"                                       # lr 0.1 never gets there
    png = (repo / "board.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20_000  # three curves, from the experiments' commits


def test_leaderboard_bad_inputs(tmp_path, capsys):
    from stages.leaderboard import main
    from test_evaluate import run_stage

    code, _, err = run_stage(main, ["--live", str(tmp_path / "nope"), "--plot", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "not found" in err
    (tmp_path / "exp.json").write_text(json.dumps([]))
    code, _, err = run_stage(main, ["--json", str(tmp_path / "exp.json")], capsys)
    assert code == 2 and "no experiment" in err and err.strip().count("\n") == 0
