"""Build shards of the real-text IMDB corpus for the learning benchmarks, with the pipeline's own code.

    python -m benchmarks.prepare_imdb [--corpus ../shared/corpora/imdb] [--out .corpus/imdb] [--pack 896]

train.jsonl.xz -> training shards, val.jsonl.xz -> the held-out split (whole reviews). The output
folder is git-ignored; carry it to a GPU machine (about 60 MB).

`--pack N` first joins consecutive reviews (a blank line between them) into documents of at most
N tokens. Movie reviews average ~290 tokens; the record's loader cuts documents at 896 tokens in
its first stage and caps a 16,384-token micro-batch at 63 documents, so its differential checks
(benchmarks/reference.py) train on reviews packed to 896.
"""
from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

from speedrun.download import DownloadParams, download
from speedrun.tokenize import TokenizeParams, tokenize_shards


def pack_reviews(texts: list[str], max_tokens: int) -> list[str]:
    """Consecutive reviews joined by blank lines into documents of at most max_tokens tokens
    (counting the document's <|endoftext|>); a longer review stays a document of its own."""
    from speedrun.tokenizer import get_encoding

    enc = get_encoding()
    sep = len(enc.encode_ordinary("\n\n"))
    docs, cur, size = [], [], 1
    for text in texts:
        n = len(enc.encode_ordinary(text))
        if cur and size + sep + n > max_tokens:
            docs.append("\n\n".join(cur))
            cur, size = [], 1
        size += n + (sep if cur else 0)
        cur.append(text)
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _read(path: Path) -> list[str]:
    with lzma.open(path, "rt") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _write(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="../shared/corpora/imdb")
    ap.add_argument("--out", default=".corpus/imdb")
    ap.add_argument("--val-tokens", type=int, default=1_048_576)
    ap.add_argument("--pack", type=int, default=0, help="join reviews into documents of at most this many tokens")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000,
                    help="tokens per shard (the record's loader needs at least two training shards)")
    args = ap.parse_args()
    corpus, out = Path(args.corpus).resolve(), Path(args.out)
    train, val = corpus / "train.jsonl.xz", corpus / "val.jsonl.xz"
    if args.pack:
        train = _write(out / "packed" / "train.jsonl.xz", pack_reviews(_read(train), args.pack)).resolve()
        val = _write(out / "packed" / "val.jsonl.xz", pack_reviews(_read(val), args.pack)).resolve()
    download(DownloadParams(source="local", local_globs=[str(train)], local_val_globs=[str(val)],
                            max_tokens=10**10), out / "raw")
    m = tokenize_shards(TokenizeParams(shard_tokens=args.shard_tokens, val_tokens=args.val_tokens),
                        out / "raw", out / "shards")
    print(f"train {m['train_tokens']:,} tokens, val {m['val_tokens']:,} tokens -> {out / 'shards'}")


if __name__ == "__main__":
    main()
