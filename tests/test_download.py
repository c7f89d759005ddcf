"""The download stage on local files: formats, bad input, budget, resume, and offline Hub errors."""
import json
import lzma
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import speedrun.download as dl
from conftest import PROJECT, make_docs, write_jsonl
from speedrun.download import DownloadParams, download, load_raw_manifest
from speedrun.errors import DataError, ParamError, SpeedrunError
from speedrun.params import parse_section


def params(**kw) -> DownloadParams:
    return parse_section({"download": {"source": "local", **kw}}, "download", DownloadParams)


def raw_docs(raw_dir, split=None) -> list[str]:
    """Every document in data/raw, in manifest order (what tokenize_shards reads)."""
    m = load_raw_manifest(raw_dir)
    return [t for f in m["files"] if split in (None, f["split"])
            for t in pq.read_table(raw_dir / f["file"])["text"].to_pylist()]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A mixed local corpus in tmp_path/corpus; the cwd is tmp_path, as DVC's is the repo root."""
    monkeypatch.chdir(tmp_path)
    c = tmp_path / "corpus"
    docs = {"a": make_docs(130, "a"), "b": make_docs(90, "b"), "c": make_docs(40, "c")}
    write_jsonl(c / "a.jsonl", docs["a"])
    write_jsonl(c / "b.jsonl.xz", docs["b"], xz=True)
    pq.write_table(pa.table({"body": docs["c"], "id": list(range(40))}), c / "c.parquet")
    (c / "txt").mkdir()
    for i in range(3):
        (c / "txt" / f"{i}.txt").write_text(f"text file {i}\nsecond line\n")
    expected = docs["a"] + docs["b"] + [f"text file {i}\nsecond line\n" for i in range(3)]
    return c, expected, docs


GLOBS = ["corpus/*.jsonl", "corpus/*.jsonl.xz", "corpus/txt/*.txt"]


def test_local_formats_in_order(corpus, tmp_path):
    _, expected, docs = corpus
    m = download(params(local_globs=GLOBS, docs_per_file=50), tmp_path / "raw")
    assert raw_docs(tmp_path / "raw") == expected
    assert [f["file"] for f in m["files"]] == [f"part_{i:06d}.parquet" for i in range(5)]
    assert [f["documents"] for f in m["files"]] == [50, 50, 50, 50, 23]
    assert m["documents"] == len(expected) and m["complete"] and m["exhausted"]["stream"]
    assert m["bytes"] == sum(len(t.encode()) for t in expected)
    assert m["source"] == "local" and m["local_globs"] == GLOBS
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text()) == m
    # parquet with another column name
    m = download(params(local_globs=["corpus/c.parquet"], text_field="body"), tmp_path / "raw2")
    assert raw_docs(tmp_path / "raw2") == docs["c"]


def test_empty_and_undecodable_are_skipped_and_counted(corpus, tmp_path):
    c, _, _ = corpus
    lines = [b'{"text": "good one"}', b'{"text": ""}', b'{"text": "   \\n "}', b'{"text": null}',
             b'{"text": "caf\xe9 latin-1"}',          # not UTF-8
             b'{"text": "lone \\ud800 surrogate"}',   # valid JSON, not encodable as UTF-8
             b"", b'{"text": "good two"}']
    (c / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (c / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    (c / "empty.txt").write_text("")
    m = download(params(local_globs=["corpus/mixed.jsonl", "corpus/*.txt"]), tmp_path / "raw")
    assert raw_docs(tmp_path / "raw") == ["good one", "good two"]
    assert (m["skipped_empty"], m["skipped_undecodable"]) == (4, 3)


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": "oops"\n', r"bad\.jsonl:2: not valid JSON"),
    (b'{"text": "fine"}\n{"body": "x"}\n', r"bad\.jsonl:2: no 'text' field \(set download.text_field\)"),
    (b'{"text": 12}\n', r"bad\.jsonl:1: text field holds int"),
])
def test_corrupt_jsonl(corpus, tmp_path, content, message):
    (corpus[0] / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        download(params(local_globs=["corpus/bad.jsonl"]), tmp_path / "raw")
    assert not list((tmp_path / "raw").glob("*.parquet"))  # nothing half-written kept


def test_corrupt_files(corpus, tmp_path):
    c = corpus[0]
    data = lzma.compress(b'{"text": "x"}\n' * 1000)
    (c / "trunc.jsonl.xz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.jsonl\.xz: corrupt or truncated xz"):
        download(params(local_globs=["corpus/trunc.jsonl.xz"]), tmp_path / "r1")
    (c / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: unreadable"):
        download(params(local_globs=["corpus/junk.parquet"]), tmp_path / "r2")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text' \(columns: body, id"):
        download(params(local_globs=["corpus/c.parquet"]), tmp_path / "r3")


def test_bad_globs(corpus, tmp_path):
    with pytest.raises(DataError, match=r"download.local_globs: 'corpus/\*.csv' matches no file"):
        download(params(local_globs=["corpus/*.jsonl", "corpus/*.csv"]), tmp_path / "raw")
    (corpus[0] / "notes.md").write_text("# hi")
    with pytest.raises(DataError, match=r"notes\.md: unsupported file type"):
        download(params(local_globs=["corpus/*"]), tmp_path / "raw")
    with pytest.raises(DataError, match="matched by both download.local_globs and download.local_val_globs"):
        download(params(local_globs=["corpus/*.jsonl"], local_val_globs=["corpus/a.jsonl"]),
                 tmp_path / "raw")


@pytest.mark.parametrize("raw, message", [
    ({"source": "local"}, "download.local_globs must list at least one glob"),
    ({"source": "hub"}, r"download.source must be one of \['fineweb-edu', 'fineweb', 'local'\]"),
    ({"source": "fineweb", "local_globs": ["x"]}, "only read when download.source is local"),
    ({"max_tokens": 0}, "download.max_tokens must be > 0"),
    ({"docs_per_file": "many"}, "download.docs_per_file must be an integer"),
    ({"local_val_globs": "val.jsonl"}, "download.local_val_globs must be a list"),
    ({"sources": "local"}, "unknown key download.sources"),
])
def test_param_validation(raw, message):
    with pytest.raises(ParamError, match=message):
        parse_section({"download": raw}, "download", DownloadParams)


def test_explicit_val_split(corpus, tmp_path):
    _, _, docs = corpus
    p = params(local_globs=["corpus/b.jsonl.xz"], local_val_globs=["corpus/a.jsonl"],
               docs_per_file=100)
    m = download(p, tmp_path / "raw")
    assert raw_docs(tmp_path / "raw", "val") == docs["a"]
    assert raw_docs(tmp_path / "raw", "stream") == docs["b"]
    assert [f["file"] for f in m["files"]] == ["val_000000.parquet", "val_000001.parquet",
                                               "part_000000.parquet"]


def test_budget_stops_early_and_a_larger_one_continues(corpus, tmp_path):
    _, expected, _ = corpus
    raw = tmp_path / "raw"
    m = download(params(local_globs=GLOBS, docs_per_file=40, max_tokens=1000), raw)
    n = m["documents"]
    assert m["complete"] and not m["exhausted"]["stream"] and 0 < n < len(expected)
    assert m["estimated_tokens"] >= 1000
    assert raw_docs(raw) == expected[:n]
    # the first document that reaches the budget is the last one taken
    assert dl._estimate(m["bytes"] - len(expected[n - 1].encode()), n - 1) < 1000
    m = download(params(local_globs=GLOBS, docs_per_file=40, max_tokens=10**9), raw)
    assert raw_docs(raw) == expected and m["exhausted"]["stream"]


def test_complete_rerun_is_a_noop(corpus, tmp_path, capsys):
    raw = tmp_path / "raw"
    download(params(local_globs=GLOBS, docs_per_file=50), raw)
    before = {p.name: p.stat().st_mtime_ns for p in raw.glob("*.parquet")}
    capsys.readouterr()
    t = time.perf_counter()
    download(params(local_globs=GLOBS, docs_per_file=50), raw)
    assert time.perf_counter() - t < 2
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in raw.glob("*.parquet")} == before


def test_changed_content_params_start_over(corpus, tmp_path, capsys):
    _, _, docs = corpus
    raw = tmp_path / "raw"
    download(params(local_globs=["corpus/a.jsonl"]), raw)
    capsys.readouterr()
    download(params(local_globs=["corpus/b.jsonl.xz"]), raw)
    assert "download params changed (local_globs: ['corpus/a.jsonl'] -> ['corpus/b.jsonl.xz'])" \
        ": starting over" in capsys.readouterr().out
    assert raw_docs(raw) == docs["b"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash", ["mid_file", "after_rename_before_manifest", "kill_leftovers"])
def test_resume_after_interruption(corpus, tmp_path, monkeypatch, crash, capsys):
    """Interrupt the download, re-run it: every document exactly once, in order."""
    _, expected, _ = corpus
    raw = tmp_path / "raw"
    p = params(local_globs=GLOBS, docs_per_file=30)
    with monkeypatch.context() as patch:
        if crash == "mid_file":  # the source dies on record 100: files 0-2 complete, 3 partial
            real = dl.local_records

            def dying(files, field):
                for i, r in enumerate(real(files, field)):
                    if i == 100:
                        raise Crash
                    yield r
            patch.setattr(dl, "local_records", dying)
        else:  # killed right after the 4th file was renamed into place, before it was recorded
            real_save, calls = dl._save, []

            def dying_save(*a):
                calls.append(1)
                if len(calls) == 4:
                    raise Crash
                real_save(*a)
            patch.setattr(dl, "_save", dying_save)
        with pytest.raises(Crash):
            download(p, raw)
    m = load_raw_manifest(raw)
    assert len(m["files"]) == 3 and not m["complete"]
    if crash == "kill_leftovers":  # what SIGKILL mid-write leaves: a temporary and no manifest entry
        (raw / ".part_000004.parquet.x1y2.tmp").write_bytes(b"half a parquet")
    capsys.readouterr()
    download(p, raw)
    out = capsys.readouterr().out
    assert "resuming: 3 complete file(s), 90 documents kept" in out
    if crash != "mid_file":
        assert "removing part_000003.parquet: written but not recorded" in out
    assert raw_docs(raw) == expected
    assert not list(raw.glob(".*"))


class FakeStream:
    """Stands in for a streaming IterableDataset: records, select_columns, skip."""

    def __init__(self, rows, fail_at=None):
        self.rows, self.fail_at, self.skipped = rows, fail_at, 0

    def select_columns(self, cols):
        return self

    def skip(self, n):
        self.skipped = n
        return self

    def __iter__(self):
        for i, row in enumerate(self.rows[self.skipped:], self.skipped):
            if i == self.fail_at:
                raise ConnectionError("Read timed out.\nmore detail")
            yield row


def test_hub_stream_resumes_with_skip(tmp_path, monkeypatch, capsys):
    rows = [{"text": t} for t in make_docs(100, "hub")] + [{"text": ""}, {"text": None}]
    streams = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(repo, name, split, streaming, revision):
            assert (repo, name, split, streaming, revision) == (
                "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True, "v1.2")
            streams.append(FakeStream(rows, fail_at=None if streams else 45))
            return streams[-1]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.setattr(dl, "check_hub_reachable", lambda repo_id: None)
    p = parse_section({"download": {"revision": "v1.2", "docs_per_file": 20}}, "download", DownloadParams)
    with pytest.raises(SpeedrunError, match=r"streaming HuggingFaceFW/fineweb-edu failed at record "
                                            r"45: ConnectionError: Read timed out.; complete files "
                                            r"are kept: re-run to resume$"):
        download(p, tmp_path / "raw")
    m = download(p, tmp_path / "raw")
    assert streams[1].skipped == 40  # two complete files of 20
    assert raw_docs(tmp_path / "raw") == [r["text"] for r in rows[:100]]
    assert m["skipped_empty"] == 2
    assert (m["dataset"], m["config"], m["revision"]) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "v1.2")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env, source, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "fineweb-edu", "HF_HUB_OFFLINE=1 is set"),
    ({"HF_DATASETS_OFFLINE": "1"}, "fineweb", "HF_DATASETS_OFFLINE=1 is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, "fineweb-edu", "http://127.0.0.1:{port}: "),
])
def test_offline_hub_fails_fast_with_one_line(tmp_path, env, source, reason):
    port = _closed_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    reason = reason.format(port=port)
    (tmp_path / "params.yaml").write_text(f"download:\n  source: {source}\n")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env, PYTHONPATH=str(PROJECT))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 2 and elapsed < 8, (elapsed, proc.stderr)
    repo = "HuggingFaceFW/fineweb-edu" if source == "fineweb-edu" else "HuggingFaceFW/fineweb"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot reach the Hugging Face Hub for {repo} ({reason}")
    assert lines[0].endswith("offline? set download.source=local and download.local_globs=[...]")


def test_stage_reports_bad_params_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("download:\n  source: local\n")
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == ("error: params.yaml: download.local_globs must list at least one glob "
                           "when download.source is local\n")


def test_sigkilled_download_resumes(tmp_path):
    """A real kill -9 mid-file. The source is a FIFO the test feeds, so the kill lands at a known
    point: 3 files complete, the 4th half-written as a temporary."""
    docs = make_docs(300, "k")
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in docs]
    (tmp_path / "c").mkdir()
    fifo = tmp_path / "c" / "stream.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "params.yaml").write_text(
        "download:\n  source: local\n  local_globs: [c/*.jsonl]\n  docs_per_file: 50\n")
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    stage = [sys.executable, "-m", "stages.download"]
    proc = subprocess.Popen(stage, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    raw = tmp_path / "data" / "raw"
    try:
        with open(fifo, "wb") as f:  # blocks until the stage opens the file
            f.writelines(lines[:170])
            f.flush()
            deadline = time.monotonic() + 30
            while not ((raw / "manifest.json").exists()
                       and len(load_raw_manifest(raw)["files"]) == 3 and list(raw.glob(".*.tmp"))):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            proc.kill()
            proc.wait()
    except BrokenPipeError:
        pass
    fifo.unlink()
    (tmp_path / "c" / "stream.jsonl").write_bytes(b"".join(lines))
    out = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "resuming: 3 complete file(s), 150 documents kept" in out.stdout
    assert raw_docs(raw) == docs
    assert not list(raw.glob(".*"))
