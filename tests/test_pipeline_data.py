"""End to end: `dvc repro` of download -> tokenize_shards in a throw-away git + DVC repo, on CPU."""
import json

import pytest

from conftest import run_dvc
from speedrun.shards import open_shard, shard_paths
from speedrun.tokenizer import encode_document


@pytest.mark.slow
def test_dvc_repro_data_stages(pipeline_repo):
    repo = pipeline_repo
    proc = run_dvc(repo, "repro", "tokenize_shards")
    assert "Running stage 'download'" in proc.stdout
    assert "Running stage 'tokenize_shards'" in proc.stdout

    all_docs = [d for docs in repo.corpus.values() for d in docs]
    raw = json.loads((repo.path / "data/raw/manifest.json").read_text())
    assert raw["complete"] and raw["documents"] == len(all_docs)
    shards = repo.path / "data/shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["train"]) > 1  # several 4096-token shards
    assert manifest["val_tokens"] >= 2048
    tokens = [int(t) for split in ("val", "train") for p in shard_paths(shards, split)
              for t in open_shard(p)]
    assert tokens == [t for d in all_docs for t in encode_document(d)]

    # nothing changed: both stages are skipped
    proc = run_dvc(repo, "repro", "tokenize_shards")
    assert "Stage 'download' didn't change, skipping" in proc.stdout
    assert "Stage 'tokenize_shards' didn't change, skipping" in proc.stdout

    # an experiment on a download param: the stage starts over on the new corpus selection
    repo.commit("data stages ran")  # dvc.lock
    run_dvc(repo, "exp", "run", "tokenize_shards", "-S", 'download.local_globs=[".corpus/tiny/*.jsonl"]')
    raw = json.loads((repo.path / "data/raw/manifest.json").read_text())
    assert raw["local_globs"] == [".corpus/tiny/*.jsonl"]
    assert raw["documents"] == len(repo.corpus["a.jsonl"])
    diff = run_dvc(repo, "params", "diff").stdout
    assert "download.local_globs" in diff and ".corpus/tiny/*.jsonl.xz" in diff
    assert "Data and pipelines are up to date" in run_dvc(repo, "status", "tokenize_shards").stdout


@pytest.mark.slow
def test_a_bad_param_is_one_line_through_dvc_repro(pipeline_repo):
    """What a user sees from `dvc repro`: the stage's own one-line error and DVC's stage line, no
    traceback (the train stage runs without a launcher for one process)."""
    repo = pipeline_repo
    run_dvc(repo, "repro", "tokenize_shards")
    repo.set_params("train", profile="cpu-tiny", micro_batch_tokens=100)   # not a multiple of 128
    proc = repo.run_dvc("repro", "train_speedrun", check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "micro_batch_tokens" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
