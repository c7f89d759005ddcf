"""train.nproc > 1: the stage starts torchrun on itself and ends with the root cause as one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stage(tmp_path: Path, train: dict) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": train}))
    return subprocess.run([sys.executable, "-m", "stages.train_speedrun", "--params", str(params),
                           "--shards", str(tmp_path / "missing"), "--models", str(tmp_path / "models"),
                           "--metrics", str(tmp_path / "metrics")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_two_ranks_report_the_root_cause_once_as_the_last_line(tmp_path):
    r = _stage(tmp_path, {"profile": "cpu-tiny", "nproc": 2, "recipe": "classic"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    expected = f"error: no train shards in {tmp_path / 'missing'}"
    assert lines[-1].startswith(expected)
    assert sum(line.startswith(expected) for line in lines) == 1   # not once per rank
    assert "ChildFailedError" in r.stderr                           # it did go through torchrun


def test_one_process_needs_no_launcher(tmp_path):
    r = _stage(tmp_path, {"profile": "cpu-tiny", "nproc": 1, "recipe": "classic"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: no train shards in {tmp_path / 'missing'} "
                                             "(neither manifest.json nor *train*.bin)"]


def test_a_corrupted_shard_stops_the_stage_with_one_line_before_training(tmp_path):
    import numpy as np

    from speedrun.shards import file_sha256, write_shard
    shards = tmp_path / "shards"
    shards.mkdir()
    entries = {}
    for split in ("train", "val"):
        ids = np.arange(20_000, dtype=np.uint16) % 50257
        if split == "train":
            ids[777] = 50400                   # beyond the embedding's 50,304 rows
        write_shard(shards / f"{split}_000000.bin", ids)
        entries[split] = [{"file": f"{split}_000000.bin", "tokens": ids.size,
                           "sha256": file_sha256(shards / f"{split}_000000.bin")}]
    (shards / "manifest.json").write_text(__import__("json").dumps(entries))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"profile": "cpu-tiny"}}))
    r = subprocess.run([sys.executable, "-m", "stages.train_speedrun", "--params", str(params), "--shards", str(shards),
                        "--models", str(tmp_path / "models"), "--metrics", str(tmp_path / "metrics")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {shards / 'train_000000.bin'}: token 777 has id 50400, outside the vocabulary of 50304 rows: "
        "a corrupted shard or another tokenizer's; re-run `dvc repro -f tokenize_shards`")
    assert not (tmp_path / "models" / "final.pt").exists()
