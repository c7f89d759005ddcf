"""The README's offline CPU command, pasted as written, runs the whole pipeline to an exported model."""
from __future__ import annotations

import re
import shlex
import shutil

import pytest

from conftest import PROJECT, make_docs, write_jsonl
from speedrun.metrics import read_metrics


def readme_block(*must_contain: str) -> str:
    """The one ```bash block of the README holding all of must_contain, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (PROJECT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if all(m in b for m in must_contain)]
    assert len(found) == 1, f"{len(found)} README blocks hold {must_contain}"
    return found[0].replace("\\\n", " ").strip()


@pytest.mark.slow
def test_readme_offline_cpu_command_as_written(pipeline_repo):
    repo = pipeline_repo
    shutil.copy2(PROJECT / "params.yaml", repo.path / "params.yaml")   # the user's params, untouched
    imdb = repo.path / ".corpus" / "imdb"   # a stand-in for the reviews, with their own val split
    write_jsonl(imdb / "train.jsonl.xz", make_docs(500, "train", words=(40, 120)), xz=True)
    write_jsonl(imdb / "val.jsonl.xz", make_docs(150, "val", words=(40, 120)), xz=True)
    repo.commit("the README's starting point")

    command = readme_block("cpu-tiny", "download.source=local")
    argv = shlex.split(command)
    assert argv[:3] == ["dvc", "exp", "run"] and len(command.splitlines()) == 1
    proc = repo.run_dvc(*argv[1:], timeout=900)
    for stage in ("download", "tokenize_shards", "train_speedrun", "evaluate_val", "export_hf"):
        assert f"Running stage '{stage}'" in proc.stdout, proc.stdout + proc.stderr
    train = read_metrics(repo.path / "metrics/train.json")
    ev = read_metrics(repo.path / "metrics/eval.json")
    assert train["profile"] == "cpu-tiny" and train["reached_target"] is False
    assert abs(ev["val_loss"] - train["final_val_loss"]) < 1e-3
    assert (repo.path / "models/hf/model.safetensors").is_file()
