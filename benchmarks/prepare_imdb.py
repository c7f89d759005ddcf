"""Build shards of the real-text IMDB corpus for the learning benchmark, with the pipeline's own code.

    python -m benchmarks.prepare_imdb [--corpus ../shared/corpora/imdb] [--out .corpus/imdb]

train.jsonl.xz -> training shards, val.jsonl.xz -> the held-out split (whole reviews). The output
folder is git-ignored; carry it to a GPU machine (about 60 MB).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from speedrun.download import DownloadParams, download
from speedrun.tokenize import TokenizeParams, tokenize_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="../shared/corpora/imdb")
    ap.add_argument("--out", default=".corpus/imdb")
    ap.add_argument("--val-tokens", type=int, default=1_048_576)
    args = ap.parse_args()
    corpus, out = Path(args.corpus).resolve(), Path(args.out)
    download(DownloadParams(source="local", local_globs=[str(corpus / "train.jsonl.xz")],
                            local_val_globs=[str(corpus / "val.jsonl.xz")], max_tokens=10**10),
             out / "raw")
    m = tokenize_shards(TokenizeParams(shard_tokens=100_000_000, val_tokens=args.val_tokens),
                        out / "raw", out / "shards")
    print(f"train {m['train_tokens']:,} tokens, val {m['val_tokens']:,} tokens -> {out / 'shards'}")


if __name__ == "__main__":
    main()
