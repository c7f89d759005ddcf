"""tokenize_shards stage: data/raw/*.parquet -> data/shards/{train,val}_NNNNNN.bin + manifest.json.

Every document becomes <|endoftext|> followed by its GPT-2 tokens. Validation is held out by whole
documents: the documents of download.local_val_globs when the corpus ships its own split, else the
first documents of the stream until they hold at least `val_tokens`. Documents are tokenized in
worker processes, in order, so the shards are the same for any number of workers.

Shards are written into data/shards/.incomplete/ and moved into place, followed by the manifest,
only once the run succeeds: an interrupted run leaves nothing a reader would take for output.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .atomic import remove_stale_temporaries, write_json
from .download import load_raw_manifest
from .errors import DataError
from .params import param
from .shards import HEADER_BYTES, MAGIC, MANIFEST, VERSION, file_sha256, write_shard
from .tokenizer import EOT_ID, encode_document, get_encoding

BATCH_DOCS = 256  # documents per worker task: big enough to amortize IPC, small for even load
STAGING = ".incomplete"


@dataclasses.dataclass
class TokenizeParams:
    shard_tokens: int = param(100_000_000, gt=0, le=2**31 - 1)  # int32 count in the shard header
    val_tokens: int = param(10_485_760, gt=0)
    workers: int = param(0, ge=0)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / container CPU limits
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------

def raw_batches(raw_dir: Path, raw_manifest: dict) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) batches of the raw documents: the val files first, then the stream."""
    files = sorted(raw_manifest["files"], key=lambda f: f["split"] != "val")  # stable
    for entry in files:
        path = raw_dir / entry["file"]
        try:
            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows != entry["documents"]:
                raise DataError(f"{path}: {pf.metadata.num_rows} documents, the download "
                                f"manifest says {entry['documents']}; re-run the download stage")
            for batch in pf.iter_batches(batch_size=BATCH_DOCS, columns=["text"]):
                # download never writes empty documents; foreign raw files might
                yield entry["split"], [t for t in batch.column(0).to_pylist() if t and t.strip()]
        except (pa.ArrowException, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else repr(e)
            raise DataError(f"{path}: unreadable raw file ({msg}); re-run the download stage") from None


def encode_batch(task: tuple[str, list[str]]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(split, texts) -> (split, all tokens, tokens per document, UTF-8 bytes per document)."""
    split, texts = task
    ids: list[int] = []
    n_tokens = np.empty(len(texts), dtype=np.int64)
    n_bytes = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        doc = encode_document(text)
        ids.extend(doc)
        n_tokens[i] = len(doc)
        n_bytes[i] = len(text.encode("utf-8"))
    return split, np.array(ids, dtype=np.uint16), n_tokens, n_bytes


@contextlib.contextmanager
def ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator[Iterator]:
    """fn over tasks in `workers` processes, results in task order. Like Pool.imap, except that
    imap reads its whole input ahead (here: the corpus into memory); this keeps 2 tasks per
    worker in flight."""
    if workers <= 1:
        yield map(fn, tasks)
        return
    # fork: workers inherit the loaded encoding. The pool forks here, before this process has
    # read any parquet, so no pyarrow thread state is copied into the children.
    with mp.get_context("fork").Pool(workers) as pool:
        def results():
            pending: collections.deque = collections.deque()
            for task in tasks:
                pending.append(pool.apply_async(fn, (task,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield results()


class ShardWriter:
    """Cuts a token stream into shards of `shard_tokens` (the last one shorter)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.chunks: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0  # written and buffered
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        while len(ids):
            take = ids[:self.shard_tokens - self.buffered]
            self.chunks.append(take)
            self.buffered += len(take)
            ids = ids[len(take):]
            if self.buffered == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        path = self.directory / f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(path, np.concatenate(self.chunks))
        self.shards.append({"file": path.name, "tokens": self.buffered, "sha256": file_sha256(path)})
        self.chunks, self.buffered = [], 0


def _docs_to_fill(n_tokens: np.ndarray, need: int) -> int:
    """How many leading documents it takes to add at least `need` tokens (all if too few)."""
    k = int(np.searchsorted(np.cumsum(n_tokens), need, side="left")) + 1
    return min(k, len(n_tokens))


def _too_small(what: str, val_tokens: int, val_docs: int, p: TokenizeParams) -> DataError:
    return DataError(f"corpus too small: {what} hold {val_tokens:,} tokens in {val_docs:,} "
                     f"documents, fewer than tokenize.val_tokens={p.val_tokens:,}; lower "
                     "tokenize.val_tokens (and train.val_tokens / evaluate.val_tokens to match) "
                     "or download more text")


def _clear_outputs(shards_dir: Path) -> None:
    # The manifest goes first: no moment where it lists shards of a different run.
    (shards_dir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(shards_dir / STAGING, ignore_errors=True)
    remove_stale_temporaries(shards_dir)
    for f in [*shards_dir.glob("train_*.bin"), *shards_dir.glob("val_*.bin")]:
        f.unlink()


def tokenize_shards(p: TokenizeParams, raw_dir: str | os.PathLike = "data/raw",
                    shards_dir: str | os.PathLike = "data/shards") -> dict:
    """Tokenize every raw document into shards; returns the shards manifest."""
    raw_dir, shards_dir = Path(raw_dir), Path(shards_dir)
    raw = load_raw_manifest(raw_dir)
    if not raw.get("complete"):
        print(f"warning: {raw_dir} holds an incomplete download; tokenizing what is there")
    explicit_val = any(f["split"] == "val" for f in raw["files"])
    shards_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(shards_dir)
    staging = shards_dir / STAGING
    staging.mkdir()
    workers = p.workers or available_cpus()
    get_encoding()  # load (offline) before the workers fork, so they inherit it

    writers = {s: ShardWriter(staging, s, p.shard_tokens) for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    val_bytes = text_bytes = 0
    what = "the documents of download.local_val_globs" if explicit_val else "all documents"
    start = time.perf_counter()
    with ordered_map(encode_batch, raw_batches(raw_dir, raw), workers) as results, \
            tqdm(total=raw.get("bytes"), unit="B", unit_scale=True, dynamic_ncols=True,
                 desc=f"tokenize ({workers} workers)") as bar:
        for split, ids, n_tokens, n_bytes in results:
            if split == "val":
                k = len(n_tokens)
            else:
                need = 0 if explicit_val else p.val_tokens - writers["val"].tokens
                k = _docs_to_fill(n_tokens, need) if need > 0 else 0
            cut = int(n_tokens[:k].sum())
            writers["val"].add(ids[:cut])
            writers["train"].add(ids[cut:])
            docs["val"] += k
            docs["train"] += len(n_tokens) - k
            val_bytes += int(n_bytes[:k].sum())
            text_bytes += int(n_bytes.sum())
            bar.update(int(n_bytes.sum()))
    if explicit_val:
        # the corpus's own split, whatever its size: the trainer and evaluate_val validate on as
        # much of it as fills whole chunks (tokenize.val_tokens sizes a held-out split only)
        if writers["val"].tokens == 0:
            raise DataError(f"{what} hold no tokens: check download.local_val_globs")
        if writers["val"].tokens < p.val_tokens:
            print(f"validation split: the {writers['val'].tokens:,} tokens of {what.split(' of ')[1]} "
                  f"(fewer than tokenize.val_tokens={p.val_tokens:,}, which sizes held-out splits only)")
    elif writers["val"].tokens < p.val_tokens:
        raise _too_small(what, writers["val"].tokens, docs["val"], p)
    if writers["train"].tokens == 0:
        raise DataError(f"corpus too small: no training documents left after holding out "
                        f"{writers['val'].tokens:,} validation tokens; lower tokenize.val_tokens "
                        "or download more text")
    for w in writers.values():
        w.flush()
    seconds = time.perf_counter() - start

    for w in writers.values():
        for shard in w.shards:
            os.replace(staging / shard["file"], shards_dir / shard["file"])
    staging.rmdir()
    tokens = writers["train"].tokens + writers["val"].tokens
    manifest = {
        "encoding": "gpt2",
        "eot": EOT_ID,
        "format": {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES,
                   "dtype": "uint16"},
        "train": writers["train"].shards,
        "val": writers["val"].shards,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "val_text_bytes": val_bytes,
        "text_bytes": text_bytes,
        "val_split": "local_val_globs" if explicit_val else "first documents of the stream",
        "documents": {"train": docs["train"], "val": docs["val"],
                      "skipped_empty": raw.get("skipped_empty", 0),
                      "skipped_undecodable": raw.get("skipped_undecodable", 0)},
        "source": {k: raw[k] for k in ("source", "dataset", "config", "revision", "local_globs",
                                      "local_val_globs", "text_field") if k in raw},
        "shard_tokens": p.shard_tokens,
        "workers": workers,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
        "mb_per_s": round(text_bytes / 1e6 / seconds, 3),
    }
    write_json(shards_dir / MANIFEST, manifest)  # last: its presence means the shards are complete
    print(f"tokenized {docs['train'] + docs['val']:,} documents ({text_bytes / 1e6:,.1f} MB) "
          f"into {manifest['train_tokens']:,} train + {manifest['val_tokens']:,} val tokens "
          f"in {seconds:.1f}s with {workers} workers: {manifest['mb_per_s']:.2f} MB/s, "
          f"{manifest['tokens_per_s']:,} tokens/s")
    return manifest
