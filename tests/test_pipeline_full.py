"""End to end: all seven stages with `dvc repro`, then a second experiment, in a throw-away repo on CPU."""
from __future__ import annotations

import sys

import pytest

from conftest import run_dvc
from speedrun.metrics import EVAL_HEADLINE, HELLASWAG_HEADLINE, TRAIN_HEADLINE, read_metrics

TRAIN = {"profile": "cpu-tiny", "val_every": 2, "val_tokens": 1024, "ckpt_every": 0}   # the default recipe
RECORD = {"scheduled_steps": 3, "extension_steps": 1}   # one step per stage: 512, 1024, 1024 (+1024) tokens
EVALUATE = {"device": "cpu"}   # the run's own validation size


@pytest.mark.slow
def test_full_pipeline_and_a_second_experiment(pipeline_repo):
    repo = pipeline_repo
    repo.set_params("train", **TRAIN)
    repo.set_params("record", **RECORD)
    repo.set_params("evaluate", **EVALUATE)
    repo.commit("tiny CPU run")

    proc = run_dvc(repo, "repro", timeout=600)
    for stage in ("download", "tokenize_shards", "train_speedrun", "evaluate_val", "download_hellaswag",
                  "evaluate_hellaswag", "export_hf"):
        assert f"Running stage '{stage}'" in proc.stdout, proc.stdout
    train = read_metrics(repo.path / "metrics/train.json")
    ev = read_metrics(repo.path / "metrics/eval.json")
    assert abs(ev["val_loss"] - train["final_val_loss"]) < 1e-3  # evaluate_val reproduces the trainer
    assert (repo.path / "metrics/val_curve.png").read_bytes()[:4] == b"\x89PNG"
    hf = repo.path / "models/hf"
    assert {"model.safetensors", "config.json", "README.md", "vocab.json", "merges.txt", "model.py"} <= {
        p.name for p in hf.iterdir()}
    assert train["recipe"] == "record" and train["steps"] == 4
    swag = read_metrics(repo.path / "metrics/hellaswag.json")   # conftest's 12-item file
    assert swag["items"] == 12 and swag["malformed_lines"] == 0 and 0 <= swag["acc_norm"] <= 1
    assert "HellaSwag acc_norm / acc" in (hf / "README.md").read_text()
    assert "Data and pipelines are up to date" in run_dvc(repo, "status").stdout
    repo.commit("baseline run")

    # a second experiment: a different learning rate changes training and everything after it
    proc = run_dvc(repo, "exp", "run", "-n", "lower-lr", "-S", "record.muon_lr=0.02", timeout=600)
    assert "Running stage 'train_speedrun'" in proc.stdout
    assert "Running stage 'download'" not in proc.stdout  # data stages are cached
    assert "Running stage 'download_hellaswag'" not in proc.stdout and "Running stage 'evaluate_hellaswag'" in proc.stdout

    diff = run_dvc(repo, "params", "diff").stdout
    assert "record.muon_lr" in diff and "0.023" in diff and "0.02" in diff
    shown = run_dvc(repo, "metrics", "show").stdout
    print(shown)
    assert "metrics/eval.json" in shown and "metrics/train.json" in shown and "val_loss" in shown
    assert "metrics/hellaswag.json" in shown and "acc_norm" in shown
    # readable in a terminal: the headline figures only; timings, flags, versions sit in *_details.json
    columns = max(len(line.split()) for line in shown.splitlines())
    assert columns <= 1 + len(TRAIN_HEADLINE) + len(EVAL_HEADLINE) + len(HELLASWAG_HEADLINE), shown
    assert "recompiles_after_warmup" not in shown and "torch_version" not in shown and "runtime_s" not in shown
    assert "recompiles_after_warmup" in read_metrics(repo.path / "metrics/train.json")
    mdiff = run_dvc(repo, "metrics", "diff").stdout  # baseline vs the experiment, side by side
    assert "final_val_loss" in mdiff and "metrics/eval.json" in mdiff

    board = repo.run(sys.executable, "-m", "stages.leaderboard", "--plot", "metrics/leaderboard.png").stdout
    print(board)
    rows = [line.split(" | ") for line in board.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r[1] for r in rows[1:]]
    assert "lower-lr" in names and len(names) == 2  # the baseline commit and the experiment
    assert any("record.muon_lr=0.02" in r[2] for r in rows[1:])
    assert (repo.path / "metrics/leaderboard.png").read_bytes()[:4] == b"\x89PNG"
