"""Download stage: raw documents -> data/raw/*.parquet (one `text` column) + manifest.json.

Documents come from a Hub dataset streamed with `datasets` (FineWeb-Edu / FineWeb sample-10BT)
or from local files (offline). They are written in stream order, `docs_per_file` per parquet file,
each file atomically; after every file the manifest records how many source records it consumed.
That makes the stage resumable: a restart keeps the complete files and skips exactly the records
they hold (`dataset.skip(n)` on the Hub, by count locally), so no document is lost or duplicated.

Files: `part_NNNNNN.parquet` hold the document stream (tokenize_shards holds out its first documents
for validation); `val_NNNNNN.parquet` hold the documents of `local_val_globs`, a split the corpus
ships itself, which tokenize_shards then uses as validation exactly.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import lzma
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .atomic import atomic_path, remove_stale_temporaries, write_json
from .errors import DataError, ParamError, SpeedrunError
from .params import param

# Hub datasets by source name: (repo id, config name)
HUB_SOURCES = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
}
LOCAL_SUFFIXES = (".jsonl", ".jsonl.xz", ".parquet", ".txt")

# The budget is estimated from UTF-8 bytes, not counted: tokenizing here would make the download
# CPU-bound. English web text runs about 4.2-4.6 bytes per GPT-2 token (the IMDB corpus in
# shared/corpora: 4.4); 4.8 deliberately over-states it, so the estimate under-counts tokens and
# the download errs towards more data. tokenize_shards reports the exact counts.
BYTES_PER_TOKEN = 4.8
HUB_PROBE_TIMEOUT_S = 5.0
ROW_GROUP_DOCS = 1000  # documents buffered in memory before they go to the parquet file
MANIFEST = "manifest.json"
SPLIT_PREFIX = {"val": "val", "stream": "part"}  # split name -> file name prefix
# Params that decide which documents are downloaded, per kind of source: if one differs from the
# manifest's, the files on disk belong to another corpus and the download starts over.
# (max_tokens and docs_per_file are not among them: a larger budget continues, a smaller one
# keeps what is there, and the file size only changes how the same stream is cut.)
IDENTITY_KEYS = {"local": ("source", "local_globs", "local_val_globs", "text_field"),
                 "hub": ("source", "revision", "text_field")}


def _source_check(value: str) -> str | None:
    return None if value in (*HUB_SOURCES, "local") else f"must be one of {[*HUB_SOURCES, 'local']}"


@dataclasses.dataclass
class DownloadParams:
    source: str = param("fineweb-edu", check=_source_check)
    local_globs: list[str] = param([])
    local_val_globs: list[str] = param([])
    text_field: str = param("text", check=lambda v: None if v else "must not be empty")
    revision: str = param("main", check=lambda v: None if v else "must not be empty")
    max_tokens: int = param(1_100_000_000, gt=0)
    docs_per_file: int = param(100_000, gt=0)

    def validate(self) -> None:
        if self.source == "local" and not self.local_globs:
            raise ParamError("params.yaml: download.local_globs must list at least one glob "
                             "when download.source is local")
        if self.source != "local" and (self.local_globs or self.local_val_globs):
            raise ParamError("params.yaml: download.local_globs / download.local_val_globs are "
                             f"only read when download.source is local (it is {self.source!r})")


# ---------------------------------------------------------------------------------------------
# Records: what a source yields, one per source document. A str is a document's text; None an
# empty/missing text; bytes a text that is not valid UTF-8. Skipped records still count towards
# the resume offset, since `skip(n)` counts source records, not kept documents.

def _local_files(globs: list[str], key: str) -> list[Path]:
    """Files matched by `globs`, each glob's matches sorted, in glob order, without repeats."""
    files: dict[Path, None] = {}
    for pattern in globs:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"download.{key}: {pattern!r} matches no file "
                            f"(globs are relative to {os.getcwd()})")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                continue
            if not p.name.endswith(LOCAL_SUFFIXES):
                raise DataError(f"{p}: unsupported file type (download.{key} may match "
                                f"{', '.join(LOCAL_SUFFIXES)})")
            files.setdefault(p, None)
    if not files:
        raise DataError(f"download.{key} matches only directories: {globs}")
    return list(files)


def _jsonl_records(path: Path, text_field: str) -> Iterator:
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank line: formatting, not a record
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                yield line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DataError(f"{path}:{lineno}: no {text_field!r} field "
                                "(set download.text_field)")
            yield _as_text(obj[text_field], f"{path}:{lineno}")


def _parquet_records(path: Path, text_field: str) -> Iterator:
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: "
                        f"{', '.join(pf.schema_arrow.names)}; set download.text_field)")
    for batch in pf.iter_batches(columns=[text_field], batch_size=ROW_GROUP_DOCS):
        for value in batch.column(0).to_pylist():
            yield _as_text(value, str(path))


def _as_text(value, where: str):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    raise DataError(f"{where}: text field holds {type(value).__name__}, not a string")


def _txt_record(path: Path):
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return data


def local_records(files: list[Path], text_field: str) -> Iterator:
    """Every record of `files`, in order; corrupt files raise DataError naming the file."""
    for path in files:
        try:
            if path.name.endswith(".txt"):
                yield _txt_record(path)
            elif path.name.endswith(".parquet"):
                yield from _parquet_records(path, text_field)
            else:
                yield from _jsonl_records(path, text_field)
        except (EOFError, lzma.LZMAError) as e:
            raise DataError(f"{path}: corrupt or truncated xz file ({e})") from None
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else e!r})") from None


def offline_hint(repo_id: str, reason: str) -> str:
    return (f"cannot reach the Hugging Face Hub for {repo_id} ({reason}); offline? "
            "set download.source=local and download.local_globs=[...]")


def check_hub_reachable(repo_id: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail in seconds, not after `datasets`' retries, when the Hub cannot be reached."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            raise SpeedrunError(offline_hint(repo_id, f"{var}={os.environ[var]} is set"))
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/datasets/{repo_id}"
    outcome: dict = {}

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
            outcome["ok"] = True
        except urllib.error.HTTPError:
            outcome["ok"] = True  # the server answered; `datasets` reports auth / 404 itself
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            reason = getattr(e, "reason", None) or e
            outcome["error"] = f"{endpoint}: {reason}"

    # A thread bounds the whole probe, DNS lookup included (urlopen's timeout does not cover it).
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    if not outcome.get("ok"):
        raise SpeedrunError(offline_hint(
            repo_id, outcome.get("error", f"{endpoint}: no answer in {timeout:.0f}s")))


def open_hub(source: str, text_field: str, revision: str, skip: int) -> Iterator:
    """Records of a Hub dataset from record `skip` on. Reachability and dataset setup are checked
    here, eagerly, so an offline machine gets one line before any progress bar."""
    repo_id, config = HUB_SOURCES[source]
    check_hub_reachable(repo_id)
    import datasets  # slow import, and only needed here

    try:
        ds = datasets.load_dataset(repo_id, config, split="train", streaming=True,
                                   revision=revision)
        it = iter(ds.select_columns([text_field]).skip(skip))
    except Exception as e:  # noqa: BLE001 - setup failures are network/Hub problems
        raise SpeedrunError(f"cannot open {repo_id} ({config}, revision {revision}): "
                            f"{_one_line(e)}; check download.revision, or if offline set "
                            "download.source=local and download.local_globs=[...]") from None
    return _hub_records(it, repo_id, text_field, skip)


def _hub_records(it: Iterator, repo_id: str, text_field: str, n: int) -> Iterator:
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - only the dataset's own iteration is wrapped
            raise SpeedrunError(f"streaming {repo_id} failed at record {n}: {_one_line(e)}; "
                                "complete files are kept: re-run to resume") from None
        n += 1
        yield _as_text(row.get(text_field), f"{repo_id} record {n}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Progress: the manifest lists complete files only; totals are derived from that list, so a file
# that was written but not yet recorded (crash in between) is simply written again.

def _identity(p: DownloadParams) -> dict:
    keys = IDENTITY_KEYS["local" if p.source == "local" else "hub"]
    return {k: getattr(p, k) for k in keys}


def _fresh_manifest(p: DownloadParams) -> dict:
    dataset = HUB_SOURCES.get(p.source)
    return {
        **_identity(p),
        "dataset": dataset and dataset[0],  # Hub repo id; None for local files
        "config": dataset and dataset[1],
        "bytes_per_token_estimate": BYTES_PER_TOKEN,
        "files": [],
        "exhausted": {"val": not p.local_val_globs, "stream": False},
    }


def _totals(m: dict) -> dict:
    keys = ("records", "documents", "bytes", "skipped_empty", "skipped_undecodable")
    t = {k: sum(f[k] for f in m["files"]) for k in keys}
    t["estimated_tokens"] = _estimate(t["bytes"], t["documents"])
    return t


def _estimate(text_bytes: int, documents: int) -> int:
    return int(text_bytes / BYTES_PER_TOKEN) + documents  # + one <|endoftext|> per document


def _save(raw_dir: Path, m: dict, params: DownloadParams) -> None:
    t = _totals(m)
    m.update(documents=t["documents"], bytes=t["bytes"], estimated_tokens=t["estimated_tokens"],
             skipped_empty=t["skipped_empty"], skipped_undecodable=t["skipped_undecodable"],
             max_tokens=params.max_tokens, complete=_is_complete(m, params))
    write_json(raw_dir / MANIFEST, m)


def _is_complete(m: dict, p: DownloadParams) -> bool:
    stream_done = m["exhausted"]["stream"] or _totals(m)["estimated_tokens"] >= p.max_tokens
    return m["exhausted"]["val"] and stream_done


_ENTRY_KEYS = {"file", "split", "records", "documents", "bytes", "skipped_empty",
               "skipped_undecodable"}


def load_raw_manifest(raw_dir: str | os.PathLike) -> dict:
    path = Path(raw_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict) or not isinstance(m.get("files"), list) or not all(
                isinstance(f, dict) and _ENTRY_KEYS <= f.keys() for f in m["files"]):
            raise ValueError("no valid 'files' list")
        if not isinstance(m.get("exhausted"), dict) or set(m["exhausted"]) != set(SPLIT_PREFIX):
            raise ValueError("no valid 'exhausted' record")
        return m
    except FileNotFoundError:
        raise DataError(f"{path} not found: run `dvc repro download` first") from None
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path} is corrupt ({e}); delete {raw_dir} and re-run the download") from None


def _resume_state(raw_dir: Path, p: DownloadParams) -> dict:
    """The manifest to continue from; stale, unrecorded or foreign files are removed."""
    removed = remove_stale_temporaries(raw_dir)
    if removed:
        print(f"removed {removed} temporary file(s) of an interrupted download")
    start_over = None
    if (raw_dir / MANIFEST).exists():
        try:
            m = load_raw_manifest(raw_dir)
        except DataError as e:
            start_over = str(e).split(";")[0]
        else:
            changed = [k for k, v in _identity(p).items() if m.get(k) != v]
            bad = [f["file"] for f in m["files"] if not _file_ok(raw_dir / f["file"], f)]
            if changed:
                start_over = "download params changed (" + ", ".join(
                    f"{k}: {m.get(k)!r} -> {getattr(p, k)!r}" for k in changed) + ")"
            elif bad:
                start_over = f"{bad[0]} listed in {MANIFEST} is missing or damaged"
            else:
                listed = {f["file"] for f in m["files"]}
                for f in sorted(raw_dir.glob("*.parquet")):
                    if f.name not in listed:  # renamed into place, then interrupted
                        print(f"removing {f.name}: written but not recorded before an interruption")
                        f.unlink()
                return m
    old = [*raw_dir.glob("*.parquet"), raw_dir / MANIFEST]
    if start_over:
        print(f"{start_over}: starting over in {raw_dir}")
    elif any(f.exists() for f in old):
        print(f"no usable {MANIFEST} in {raw_dir}: starting over")
    for f in old:
        f.unlink(missing_ok=True)
    return _fresh_manifest(p)


def _file_ok(path: Path, entry: dict) -> bool:
    try:
        return pq.ParquetFile(path).metadata.num_rows == entry["documents"]
    except Exception:  # noqa: BLE001 - missing, truncated or not parquet: all mean "redo"
        return False


# ---------------------------------------------------------------------------------------------

def _classify(record) -> tuple[str, bytes | None]:
    """('ok', utf8) for a document, ('empty'|'undecodable', None) for a skipped record."""
    if isinstance(record, bytes):
        return "undecodable", None
    if record is None or not record.strip():
        return "empty", None
    try:
        return "ok", record.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
        return "undecodable", None


_SCHEMA = pa.schema([("text", pa.string())])


def _write_file(path: Path, first, records: Iterator, m: dict, p: DownloadParams,
                split: str, bar: tqdm) -> tuple[dict, bool]:
    """Write records (starting with `first`) into one parquet file until it holds docs_per_file
    documents, the budget is met (stream split only) or records run out. Returns the file's
    manifest entry and whether the records ran out."""
    entry = {"file": path.name, "split": split, "records": 0, "documents": 0, "bytes": 0,
             "skipped_empty": 0, "skipped_undecodable": 0}
    base = _totals(m)
    exhausted = False
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, _SCHEMA, compression="zstd") as writer:
            texts: list[str] = []
            pending_bytes = 0

            def flush():
                nonlocal pending_bytes
                if texts:
                    writer.write_table(pa.table({"text": texts}, schema=_SCHEMA))
                    bar.update(int(pending_bytes / BYTES_PER_TOKEN) + len(texts))
                    texts.clear()
                    pending_bytes = 0

            record = first
            while True:
                entry["records"] += 1
                kind, utf8 = _classify(record)
                if kind == "ok":
                    texts.append(record)
                    entry["documents"] += 1
                    entry["bytes"] += len(utf8)
                    pending_bytes += len(utf8)
                    if len(texts) >= ROW_GROUP_DOCS:
                        flush()
                else:
                    entry[f"skipped_{kind}"] += 1
                if entry["documents"] >= p.docs_per_file:
                    break
                if split == "stream" and _estimate(base["bytes"] + entry["bytes"],
                                                   base["documents"] + entry["documents"]) >= p.max_tokens:
                    break
                record = next(records, _END)
                if record is _END:
                    exhausted = True
                    break
            flush()
    return entry, exhausted


_END = object()


def _fill_split(split: str, records: Iterator, raw_dir: Path, m: dict, p: DownloadParams,
                bar: tqdm) -> None:
    prefix = SPLIT_PREFIX[split]
    index = sum(f["split"] == split for f in m["files"])
    while not m["exhausted"][split]:
        if split == "stream" and _totals(m)["estimated_tokens"] >= p.max_tokens:
            return
        first = next(records, _END)
        if first is _END:  # ran out exactly at a file boundary
            m["exhausted"][split] = True
            _save(raw_dir, m, p)
            return
        path = raw_dir / f"{prefix}_{index:06d}.parquet"
        entry, exhausted = _write_file(path, first, records, m, p, split, bar)
        # The file is complete on disk; recording it is what makes it count on a restart.
        m["files"].append(entry)
        m["exhausted"][split] = exhausted
        _save(raw_dir, m, p)
        index += 1


def _skip(records: Iterable, n: int) -> Iterator:
    it = iter(records)
    for _ in range(n):
        if next(it, _END) is _END:
            raise DataError(f"the source holds fewer records than the {n} already downloaded; "
                            "did the local files change? delete data/raw and re-run")
    return it


def download(p: DownloadParams, raw_dir: str | os.PathLike = "data/raw") -> dict:
    """Bring `raw_dir` up to date with `p`, resuming a previous run; returns the manifest."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    m = _resume_state(raw_dir, p)
    t = _totals(m)
    if _is_complete(m, p):
        _save(raw_dir, m, p)  # records a changed max_tokens; the files stay as they are
        print(f"{raw_dir} is complete: {t['documents']:,} documents, ~{t['estimated_tokens']:,} "
              "tokens; nothing to do")
        return m
    if t["records"]:
        print(f"resuming: {len(m['files'])} complete file(s), {t['documents']:,} documents kept")
    done = {s: sum(f["records"] for f in m["files"] if f["split"] == s) for s in SPLIT_PREFIX}
    # Open every source before the progress bar starts, so setup errors come as one line.
    if p.source == "local":
        val_files = _local_files(p.local_val_globs, "local_val_globs") if p.local_val_globs else []
        files = _local_files(p.local_globs, "local_globs")
        both = set(val_files) & set(files)
        if both:
            raise DataError(f"{sorted(both)[0]} is matched by both download.local_globs and "
                            "download.local_val_globs; a document must be in one split only")
        val_records = (iter(()) if m["exhausted"]["val"] else
                       _skip(local_records(val_files, p.text_field), done["val"]))
        records = _skip(local_records(files, p.text_field), done["stream"])
    else:
        val_records = iter(())
        records = open_hub(p.source, p.text_field, p.revision, done["stream"])
    with tqdm(total=p.max_tokens, initial=min(t["estimated_tokens"], p.max_tokens), unit="tok",
              unit_scale=True, desc=f"download {p.source} (est. tokens)", dynamic_ncols=True) as bar:
        _fill_split("val", val_records, raw_dir, m, p, bar)
        _fill_split("stream", records, raw_dir, m, p, bar)
    t = _totals(m)
    print(f"downloaded {t['documents']:,} documents, {t['bytes'] / 1e6:,.1f} MB of text, "
          f"~{t['estimated_tokens']:,} tokens (est.) into {raw_dir}; skipped "
          f"{t['skipped_empty']} empty and {t['skipped_undecodable']} undecodable records")
    return m
