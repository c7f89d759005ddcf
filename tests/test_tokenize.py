"""tokenize_shards: shard contents, the validation hold-out, parallel determinism, bad input."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl
from speedrun.download import DownloadParams, download
from speedrun.errors import DataError, ParamError
from speedrun.params import parse_section
from speedrun.shards import file_sha256, load_manifest, open_shard, shard_paths
from speedrun.tokenize import TokenizeParams, tokenize_shards
from speedrun.tokenizer import EOT_ID, encode_document, get_encoding


def tok_params(**kw) -> TokenizeParams:
    return parse_section({"tokenize": kw}, "tokenize", TokenizeParams)


@pytest.fixture
def docs():
    return make_docs(150, "s") + make_docs(120, "t", words=(5, 200))


@pytest.fixture
def raw(tmp_path, docs, monkeypatch):
    """data/raw holding `docs` as the stream (no explicit val split)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "c" / "s.jsonl", docs[:150])
    write_jsonl(tmp_path / "c" / "t.jsonl.xz", docs[150:], xz=True)
    p = parse_section({"download": {"source": "local", "local_globs": ["c/*.jsonl*"],
                                    "docs_per_file": 70}}, "download", DownloadParams)
    download(p, tmp_path / "raw")
    return tmp_path / "raw"


def split_tokens(shards_dir, split) -> np.ndarray:
    return np.concatenate([open_shard(p) for p in shard_paths(shards_dir, split)])


def documents_of(tokens: np.ndarray) -> list[str]:
    """Decode a token stream back into documents: each starts with <|endoftext|>."""
    assert tokens[0] == EOT_ID
    starts = np.flatnonzero(tokens == EOT_ID).tolist() + [len(tokens)]
    enc = get_encoding()
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_shards_hold_every_document_in_order(raw, tmp_path, docs):
    out = tmp_path / "shards"
    m = tokenize_shards(tok_params(shard_tokens=1000, val_tokens=700, workers=2), raw, out)
    everything = np.concatenate([split_tokens(out, "val"), split_tokens(out, "train")])
    assert everything.tolist() == [t for d in docs for t in encode_document(d)]
    for split in ("train", "val"):
        sizes = [e["tokens"] for e in m[split]]
        assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
        assert [e["file"] for e in m[split]] == [f"{split}_{i:06d}.bin" for i in range(len(sizes))]
        assert all(e["sha256"] == file_sha256(out / e["file"]) for e in m[split])
        assert m[f"{split}_tokens"] == sum(sizes) == len(split_tokens(out, split))
    assert (m["encoding"], m["eot"]) == ("gpt2", 50256)
    assert m["documents"] == {"train": len(docs) - m["documents"]["val"], "val": m["documents"]["val"],
                              "skipped_empty": 0, "skipped_undecodable": 0}
    assert m["tokens_per_s"] > 0 and m["mb_per_s"] > 0
    assert load_manifest(out) == m
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [e["file"] for e in m["train"] + m["val"]])


def test_validation_is_whole_documents_from_the_start_and_disjoint(raw, tmp_path, docs):
    out = tmp_path / "shards"
    m = tokenize_shards(tok_params(shard_tokens=500, val_tokens=2000, workers=2), raw, out)
    val, train = documents_of(split_tokens(out, "val")), documents_of(split_tokens(out, "train"))
    assert not set(val) & set(train)  # by content: no document in both splits
    assert val + train == docs
    # the fewest leading documents that reach val_tokens
    lengths = [len(encode_document(d)) for d in val]
    assert sum(lengths) == m["val_tokens"] >= 2000 > sum(lengths[:-1])
    assert m["documents"]["val"] == len(val)
    assert m["val_text_bytes"] == sum(len(d.encode()) for d in val)
    assert m["val_split"] == "first documents of the stream"


def test_explicit_validation_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_docs, val_docs = make_docs(200, "train"), make_docs(40, "val")
    write_jsonl(tmp_path / "train.jsonl.xz", train_docs, xz=True)
    write_jsonl(tmp_path / "val.jsonl.xz", val_docs, xz=True)
    p = parse_section({"download": {"source": "local", "local_globs": ["train.jsonl.xz"],
                                    "local_val_globs": ["val.jsonl.xz"], "docs_per_file": 30}},
                      "download", DownloadParams)
    download(p, tmp_path / "raw")
    m = tokenize_shards(tok_params(shard_tokens=3000, val_tokens=100), tmp_path / "raw",
                        tmp_path / "shards")
    assert documents_of(split_tokens(tmp_path / "shards", "val")) == val_docs  # exactly that split
    assert documents_of(split_tokens(tmp_path / "shards", "train")) == train_docs
    assert m["val_split"] == "local_val_globs" and m["documents"]["val"] == 40
    # a corpus's own split is used whole even when smaller than tokenize.val_tokens (which sizes
    # held-out splits): the README's offline command works without lowering it
    m = tokenize_shards(tok_params(val_tokens=1_000_000), tmp_path / "raw", tmp_path / "shards2")
    assert documents_of(split_tokens(tmp_path / "shards2", "val")) == val_docs
    assert m["documents"]["val"] == 40


def test_workers_do_not_change_the_shards(raw, tmp_path):
    m1 = tokenize_shards(tok_params(shard_tokens=777, val_tokens=900, workers=1), raw, tmp_path / "one")
    m2 = tokenize_shards(tok_params(shard_tokens=777, val_tokens=900, workers=2), raw, tmp_path / "two")
    assert m1["train"] == m2["train"] and m1["val"] == m2["val"]


def test_corpus_too_small_leaves_nothing_a_reader_trusts(raw, tmp_path, docs):
    out = tmp_path / "shards"
    tokenize_shards(tok_params(shard_tokens=1000, val_tokens=500), raw, out)  # an earlier good run
    with pytest.raises(DataError, match=r"corpus too small: all documents hold [\d,]+ tokens in 270 "
                                        r"documents, fewer than tokenize.val_tokens=10,000,000"):
        tokenize_shards(tok_params(val_tokens=10_000_000), raw, out)
    with pytest.raises(DataError, match="no train shards"):
        shard_paths(out, "train")  # neither the old run's shards nor this run's partial ones
    total = sum(len(encode_document(d)) for d in docs)
    with pytest.raises(DataError, match="no training documents left after holding out"):
        tokenize_shards(tok_params(val_tokens=total), raw, out)


def test_restart_clears_leftovers(raw, tmp_path):
    out = tmp_path / "shards"
    (out / ".incomplete").mkdir(parents=True)
    (out / ".incomplete" / "train_000000.bin").write_bytes(b"partial")
    (out / ".train_000001.bin.abc.tmp").write_bytes(b"partial")
    (out / "train_000042.bin").write_bytes(b"old run")
    m = tokenize_shards(tok_params(shard_tokens=100_000, val_tokens=500), raw, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_000000.bin",
                                                     "val_000000.bin"]
    assert m["train"][0]["file"] == "train_000000.bin"


def test_missing_or_corrupt_raw(tmp_path, raw):
    with pytest.raises(DataError, match=r"manifest.json not found: run `dvc repro download` first"):
        tokenize_shards(tok_params(), tmp_path / "nowhere", tmp_path / "shards")
    part = raw / "part_000001.parquet"
    part.write_bytes(part.read_bytes()[:200])
    with pytest.raises(DataError, match=r"part_000001.parquet: unreadable raw file"):
        tokenize_shards(tok_params(val_tokens=100), raw, tmp_path / "shards")
    pq.write_table(pq.read_table(raw / "part_000000.parquet").slice(0, 5), raw / "part_000001.parquet")
    with pytest.raises(DataError, match=r"part_000001.parquet: 5 documents, the download manifest says 70"):
        tokenize_shards(tok_params(val_tokens=100), raw, tmp_path / "shards")


@pytest.mark.parametrize("raw_params, message", [
    ({"shard_tokens": 0}, "tokenize.shard_tokens must be > 0"),
    ({"shard_tokens": 2**31}, "tokenize.shard_tokens must be <= 2147483647"),
    ({"val_tokens": -5}, "tokenize.val_tokens must be > 0"),
    ({"workers": -1}, "tokenize.workers must be >= 0"),
])
def test_param_validation(raw_params, message):
    with pytest.raises(ParamError, match=message):
        tok_params(**raw_params)
