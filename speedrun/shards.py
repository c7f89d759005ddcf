"""Token shards in the llm.c / modded-nanogpt format, and the manifest that lists them.

A shard is a header of HEADER_INTS little-endian int32 (MAGIC, VERSION, token count, then zeros)
followed by that many little-endian uint16 token ids. Keeping exactly this public format means our
shards load in llm.c / modded-nanogpt and theirs (e.g. `fineweb_train_000001.bin`) load here.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
MANIFEST = "manifest.json"
SPLITS = ("train", "val")

_TOKEN_DTYPE = np.dtype("<u2")  # == np.uint16 on every little-endian machine we run on
_MAX_TOKENS = 2**31 - 1          # the count is an int32 in the header


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` as one shard, atomically (a crash leaves no file a reader would trust)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size > _MAX_TOKENS:
        raise ValueError(f"{tokens.size} tokens do not fit one shard (at most {_MAX_TOKENS})")
    if tokens.dtype != _TOKEN_DTYPE and tokens.size:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= 2**16:
            raise DataError(f"{path}: token id {hi if hi >= 2**16 else lo} does not fit uint16 "
                            "(the shard format holds ids 0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(_TOKEN_DTYPE, copy=False).tobytes())


def read_header(path: str | os.PathLike) -> int:
    """Validate the shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if header.size < HEADER_INTS:
        raise DataError(f"{path}: truncated shard: expected at least {HEADER_BYTES} bytes of "
                        f"header, file has {size}")
    if header[0] != MAGIC:
        raise DataError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise DataError(f"{path}: expected {expected} bytes (header says {n} tokens), "
                        f"file has {size}")
    return n


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a validated shard's tokens (uint16, read-only, no copy)."""
    n = read_header(path)
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(shards_dir: str | os.PathLike) -> dict:
    """The manifest written by the tokenize_shards stage (DataError if missing or malformed)."""
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: run `dvc repro tokenize_shards` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable or not valid JSON ({e}); "
                        "re-run `dvc repro -f tokenize_shards`") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(manifest.get(s), list) and all(isinstance(e, dict) and "file" in e
                                                      for e in manifest[s]) for s in SPLITS):
        raise DataError(f"{path} lacks the 'train'/'val' shard lists; "
                        "re-run `dvc repro -f tokenize_shards`")
    return manifest


def shard_paths(shards_dir: str | os.PathLike, split: str) -> list[Path]:
    """The split's shards in order: from manifest.json, or (foreign shards from llm.c /
    modded-nanogpt, no manifest) every `*{split}*.bin` in the directory, sorted by name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shards_dir = Path(shards_dir)
    if (shards_dir / MANIFEST).exists():
        paths = [shards_dir / e["file"] for e in load_manifest(shards_dir)[split]]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{shards_dir / MANIFEST} lists {split} shards that are missing: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    else:
        paths = sorted(shards_dir.glob(f"*{split}*.bin"))
    if not paths:
        raise DataError(f"no {split} shards in {shards_dir} (neither {MANIFEST} nor *{split}*.bin)")
    return paths


def _scan(path: Path, sha256: str | None, vocab_size: int) -> tuple[str | None, int | None]:
    """One pass over a shard: its sha256 and the position of its first id >= vocab_size."""
    n = read_header(path)
    h = hashlib.sha256()
    bad_at, seen = None, 0
    with open(path, "rb") as f:
        h.update(f.read(HEADER_BYTES))
        while chunk := f.read(1 << 24):   # an even size: chunks never split a token
            h.update(chunk)               # hashlib and numpy release the GIL: shards scan in parallel
            ids = np.frombuffer(chunk, dtype=_TOKEN_DTYPE)
            if bad_at is None and ids.size and int(ids.max()) >= vocab_size:
                bad_at = seen + int(np.argmax(ids >= vocab_size))
            seen += ids.size
    assert seen == n
    return (h.hexdigest() if sha256 else None), bad_at


def verify_shards(shards_dir: str | os.PathLike, vocab_size: int, log=None) -> None:
    """Before training: each shard's bytes are those tokenize_shards wrote (the manifest's sha256),
    and every token id indexes the embedding (< vocab_size). DataError naming the first bad shard.

    Reads every byte once, shards in parallel; a memory-mapped loader would otherwise train on a
    flipped byte silently, or fail on a bad id deep into the run with an unnamed IndexError."""
    shards_dir = Path(shards_dir)
    has_manifest = (shards_dir / MANIFEST).exists()
    manifest = load_manifest(shards_dir) if has_manifest else None
    jobs = []
    for split in SPLITS:
        entries = {e["file"]: e.get("sha256") for e in manifest[split]} if manifest else {}
        jobs += [(p, entries.get(p.name)) for p in shard_paths(shards_dir, split)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda job: _scan(job[0], job[1], vocab_size), jobs))
    for (path, want), (got, bad_at) in zip(jobs, results):
        if want and got != want:
            raise DataError(f"{path}: contents differ from {MANIFEST} (sha256 {got[:12]}..., listed "
                            f"{want[:12]}...): the shard changed after tokenize_shards wrote it; "
                            "re-run `dvc repro -f tokenize_shards`")
        if bad_at is not None:
            ids = open_shard(path)
            raise DataError(f"{path}: token {bad_at:,} has id {int(ids[bad_at])}, outside the vocabulary "
                            f"of {vocab_size} rows: a corrupted shard or another tokenizer's; "
                            "re-run `dvc repro -f tokenize_shards`")
    if log:
        gb = sum(p.stat().st_size for p, _ in jobs) / 1e9
        checked = "sha256 and token ids" if has_manifest else "token ids (no manifest: no sha256)"
        log(f"shards verified ({checked}): {len(jobs)} files, {gb:.2f} GB in {time.perf_counter() - t0:.1f}s")
