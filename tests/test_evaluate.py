"""evaluate_val: the trainer's validation reproduced from models/final.pt, metrics/eval.json, the plot.

Also home of `tiny_run`, a 6-step cpu-tiny training run shared by the export, generate and push
tests (trained once per session, in-process: about 5 s).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_docs
from speedrun.shards import write_shard
from speedrun.tokenizer import encode_document
from speedrun.metrics import read_metrics

TINY_TRAIN = {"recipe": "classic", "profile": "cpu-tiny", "steps": 6, "val_every": 3, "val_tokens": 1024, "ckpt_every": 0}
TINY_EVAL = {"val_tokens": 1024, "micro_batch_tokens": 256}
_RUNS: dict[str, Path] = {}


def write_tiny_shards(shards: Path, train_tokens: int = 7000, val_tokens: int = 2100) -> dict:
    """Token shards of English-like documents plus the manifest keys the stages read."""
    def tokens(n, prefix):
        ids, n_bytes, i = [], 0, 0
        while len(ids) < n:
            docs = make_docs(50, prefix, seed=i)
            for d in docs:
                ids += encode_document(d)
                n_bytes += len(d.encode())
            i += 1
        return np.array(ids), n_bytes

    train, _ = tokens(train_tokens, "train")
    val, val_bytes = tokens(val_tokens, "val")
    shards.mkdir(parents=True, exist_ok=True)
    write_shard(shards / "train_000000.bin", train)
    write_shard(shards / "val_000000.bin", val)
    manifest = {"train": [{"file": "train_000000.bin"}], "val": [{"file": "val_000000.bin"}],
                "train_tokens": len(train), "val_tokens": len(val), "val_text_bytes": val_bytes,
                "source": {"source": "local", "local_globs": ["tiny.jsonl"]}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def write_params(root: Path, **sections) -> Path:
    data = {"train": dict(TINY_TRAIN), "evaluate": dict(TINY_EVAL)}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    return root / "params.yaml"


def stage_args(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--models", str(root / "models"),
            "--metrics", str(root / "metrics")]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained cpu-tiny run: params.yaml, data/shards, models/final.pt, metrics/ (read-only!)."""
    if "run" not in _RUNS:  # one per session, even when several test modules use it
        from stages.train_speedrun import main as train

        root = tmp_path_factory.mktemp("tiny-run")
        write_tiny_shards(root / "data" / "shards")
        write_params(root)
        train(["--shards", str(root / "data" / "shards"), *stage_args(root)])
        _RUNS["run"] = root
    return _RUNS["run"]


def clone_run(src: Path, dst: Path) -> Path:
    """A private copy a test may modify (the shards are shared, read-only)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "params.yaml", dst / "params.yaml")
    (dst / "data").mkdir(exist_ok=True)
    (dst / "data" / "shards").symlink_to(src / "data" / "shards")
    (dst / "models").mkdir(exist_ok=True)
    shutil.copy2(src / "models" / "final.pt", dst / "models" / "final.pt")
    shutil.copytree(src / "metrics", dst / "metrics")
    return dst


def run_stage(main, argv, capsys) -> tuple[int, str, str]:
    """Call a stage's main in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def evaluate(root: Path, capsys) -> tuple[int, str, str]:
    from stages.evaluate_val import main

    return run_stage(main, ["--shards", str(root / "data" / "shards"), *stage_args(root)], capsys)


# ----------------------------------------------------------------------------- tests

def test_eval_reproduces_trainer_validation(tiny_run, tmp_path, capsys):
    root = clone_run(tiny_run, tmp_path / "run")
    code, out, err = evaluate(root, capsys)
    assert code == 0, err
    ev = read_metrics(root / "metrics" / "eval.json")
    train = read_metrics(root / "metrics" / "train.json")
    live = (root / "metrics/dvclive/plots/metrics/val/loss.tsv").read_text().split()
    print(f"eval val_loss {ev['val_loss']} vs trainer final_val_loss {train['final_val_loss']} "
          f"(dvclive {live[-1]})")
    # same model, same tokens, same window, same function: the numbers agree
    assert abs(ev["val_loss"] - train["final_val_loss"]) < 1e-3
    assert abs(ev["val_loss"] - float(live[-1])) < 1e-5
    assert ev["same_setup_as_training"] is True
    assert ev["tokens_evaluated"] == 1024
    assert ev["perplexity"] == pytest.approx(math.exp(ev["val_loss"]), rel=1e-4)
    manifest = json.loads((root / "data/shards/manifest.json").read_text())
    n_bytes = manifest["val_text_bytes"] * 1024 / (manifest["val_tokens"] - 1)
    assert ev["bits_per_byte"] == pytest.approx(ev["val_loss"] / math.log(2) * 1024 / n_bytes, rel=1e-4)
    assert ev["bytes_estimated_pro_rata"] is True  # 1024 of ~2100 validation tokens
    assert ev["target_val_loss"] == 3.28 and ev["meets_target"] is False  # 6 steps: far from it
    assert ev["runtime_s"] > 0 and ev["tokens_per_s"] > 0
    png = (root / "metrics" / "val_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "val_loss" in out


def test_eval_meets_target_and_longer_micro_batch(tiny_run, tmp_path, capsys):
    """A looser target is met; a micro-batch longer than the trainer's (its rotary table) works."""
    root = clone_run(tiny_run, tmp_path / "run")
    write_params(root, train={"target_val_loss": 50.0}, evaluate={"micro_batch_tokens": 512})
    code, _, err = evaluate(root, capsys)
    assert code == 0, err
    ev = read_metrics(root / "metrics" / "eval.json")
    assert ev["meets_target"] is True and ev["target_val_loss"] == 50.0
    assert ev["same_setup_as_training"] is False and math.isfinite(ev["val_loss"])


def test_bits_per_byte_full_split_is_exact():
    from speedrun.evaluate import bits_per_byte

    # all predictions of a 1001-token split (the first token is a byte-less <|endoftext|>)
    r = bits_per_byte(2.0, 1000, {"val_tokens": 1001, "val_text_bytes": 4000})
    assert r["bytes_estimated_pro_rata"] is False and r["bytes_evaluated"] == 4000
    assert r["bits_per_byte"] == pytest.approx(2.0 / math.log(2) * 1000 / 4000)
    assert bits_per_byte(2.0, 1000, None)["bits_per_byte"] is None


def test_eval_missing_checkpoint(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    write_params(root)
    write_tiny_shards(root / "data" / "shards", train_tokens=10, val_tokens=10)
    code, out, err = evaluate(root, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "final.pt not found" in err
    assert not (root / "metrics" / "eval.json").exists()


def test_eval_checkpoint_of_another_config(tiny_run, tmp_path, capsys):
    root = clone_run(tiny_run, tmp_path / "run")
    state = torch.load(root / "models/final.pt", weights_only=True)
    state["config"]["model_dim"] = 128  # the weights are 64 wide
    torch.save(state, root / "models/final.pt")
    code, _, err = evaluate(root, capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "weights do not match its config" in err


def test_eval_rejects_pickled_objects(tiny_run, tmp_path, capsys):
    root = clone_run(tiny_run, tmp_path / "run")
    torch.save({"format": 1, "model": {}, "evil": Path("x")}, root / "models/final.pt")  # needs unpickling
    code, _, err = evaluate(root, capsys)
    assert code == 2 and "cannot be loaded safely" in err


def test_eval_params_checked_first(tiny_run, tmp_path, capsys):
    root = clone_run(tiny_run, tmp_path / "run")
    write_params(root, evaluate={"val_tokens": 1000})
    code, _, err = evaluate(root, capsys)
    assert code == 2 and "evaluate.val_tokens (1000) must be a multiple" in err
