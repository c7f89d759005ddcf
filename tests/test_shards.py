"""The shard format: our writer/reader against the public llm.c / modded-nanogpt layout."""
import array
import json
import struct
import sys

import numpy as np
import pytest

from speedrun.errors import DataError
from speedrun.shards import (HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, load_manifest, open_shard,
                             read_header, shard_paths, write_shard)


def build_shard_by_hand(path, tokens, magic=MAGIC, version=VERSION, count=None):
    """The format as documented: 256 little-endian int32 (magic, version, count, zeros), then
    little-endian uint16 tokens. Deliberately does not use speedrun.shards."""
    header = struct.pack("<256i", magic, version, len(tokens) if count is None else count,
                         *([0] * 253))
    payload = array.array("H", tokens)
    if sys.byteorder != "little":
        payload.byteswap()
    path.write_bytes(header + payload.tobytes())
    return path


def independent_read(path):
    """A reader written from the format description only."""
    with open(path, "rb") as f:
        header = struct.unpack("<256i", f.read(1024))
        tokens = np.fromfile(f, dtype="<u2")
    return header, tokens


def test_constants():
    assert (MAGIC, VERSION, HEADER_INTS, HEADER_BYTES) == (20240520, 1, 256, 1024)


def test_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=10_000).astype(np.int64)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens)
    assert read_header(path) == len(tokens)
    m = open_shard(path)
    assert isinstance(m, np.memmap) and m.dtype == np.uint16 and m.shape == (len(tokens),)
    np.testing.assert_array_equal(m, tokens)
    assert not m.flags.writeable
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_hand_built_shard_is_read(tmp_path):
    tokens = [50256, 15496, 995, 0, 65535, 1, 2, 3]
    path = build_shard_by_hand(tmp_path / "fineweb_train_000001.bin", tokens)
    assert read_header(path) == len(tokens)
    assert open_shard(path).tolist() == tokens


def test_writer_output_parsed_by_independent_reader(tmp_path):
    tokens = np.arange(0, 60000, 7, dtype=np.uint16)
    path = tmp_path / "val_000000.bin"
    write_shard(path, tokens)
    header, read = independent_read(path)
    assert header[:3] == (20240520, 1, len(tokens)) and not any(header[3:])
    np.testing.assert_array_equal(read, tokens)
    # and byte-for-byte what the hand-built reference produces
    assert path.read_bytes() == build_shard_by_hand(tmp_path / "ref.bin", tokens.tolist()).read_bytes()


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", np.array([], dtype=np.uint16))
    assert read_header(tmp_path / "e.bin") == 0 and len(open_shard(tmp_path / "e.bin")) == 0


@pytest.mark.parametrize("bad", [65536, -1])
def test_ids_must_fit_uint16(tmp_path, bad):
    with pytest.raises(DataError, match="does not fit uint16"):
        write_shard(tmp_path / "x.bin", np.array([1, bad, 2]))
    assert not list(tmp_path.iterdir())


def test_truncated_shard(tmp_path):
    path = build_shard_by_hand(tmp_path / "train_000003.bin", list(range(100)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError) as e:
        open_shard(path)
    assert str(path) in str(e.value)
    assert "expected 1224 bytes (header says 100 tokens), file has 1214" in str(e.value)


def test_truncated_header(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(struct.pack("<3i", MAGIC, VERSION, 5))
    with pytest.raises(DataError, match=r"t\.bin: truncated shard: expected at least 1024 bytes.*has 12"):
        read_header(path)


def test_wrong_magic_and_version(tmp_path):
    bad_magic = build_shard_by_hand(tmp_path / "m.bin", [1, 2], magic=20240801)
    with pytest.raises(DataError, match=r"m\.bin: not a token shard \(magic 20240801, expected 20240520\)"):
        read_header(bad_magic)
    bad_version = build_shard_by_hand(tmp_path / "v.bin", [1, 2], version=2)
    with pytest.raises(DataError, match=r"v\.bin: unsupported shard version 2"):
        open_shard(bad_version)


def test_missing_shard(tmp_path):
    with pytest.raises(DataError, match="shard not found"):
        open_shard(tmp_path / "nope.bin")


def test_manifest_and_paths(tmp_path):
    for name in ("train_000000.bin", "train_000001.bin", "val_000000.bin"):
        write_shard(tmp_path / name, np.arange(10))
    manifest = {"train": [{"file": "train_000001.bin"}, {"file": "train_000000.bin"}],
                "val": [{"file": "val_000000.bin"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(tmp_path)["val"] == manifest["val"]
    # the manifest's order, not the names'
    assert [p.name for p in shard_paths(tmp_path, "train")] == ["train_000001.bin", "train_000000.bin"]
    assert shard_paths(tmp_path, "val") == [tmp_path / "val_000000.bin"]
    with pytest.raises(ValueError):
        shard_paths(tmp_path, "test")
    (tmp_path / "val_000000.bin").unlink()
    with pytest.raises(DataError, match="missing: val_000000.bin"):
        shard_paths(tmp_path, "val")


def test_foreign_shards_without_manifest(tmp_path):
    # as downloaded from modded-nanogpt's cached_fineweb10B.py
    for name in ("fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        build_shard_by_hand(tmp_path / name, [1, 2, 3])
    assert [p.name for p in shard_paths(tmp_path, "train")] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in shard_paths(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    with pytest.raises(DataError, match="not found: run `dvc repro tokenize_shards`"):
        load_manifest(tmp_path)


def test_no_shards(tmp_path):
    with pytest.raises(DataError, match=r"no train shards in .* \(neither manifest.json nor \*train\*.bin\)"):
        shard_paths(tmp_path, "train")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"train": []}), json.dumps([1, 2])])
def test_corrupt_manifest(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DataError, match="manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="manifest.json"):
        shard_paths(tmp_path, "train")


def _dataset(tmp_path, ids_train, ids_val):
    """Shards and a manifest as tokenize_shards writes them."""
    from speedrun.shards import file_sha256, write_shard
    entries = {}
    for split, ids in (("train", ids_train), ("val", ids_val)):
        path = tmp_path / f"{split}_000000.bin"
        write_shard(path, np.asarray(ids, dtype=np.uint16))
        entries[split] = [{"file": path.name, "tokens": len(ids), "sha256": file_sha256(path)}]
    (tmp_path / "manifest.json").write_text(json.dumps(entries))
    return tmp_path


def test_verify_shards_passes_clean_data_and_says_what_it_checked(tmp_path):
    from speedrun.shards import verify_shards
    d = _dataset(tmp_path, np.arange(50_000) % 50257, [1, 2, 3])
    said = []
    verify_shards(d, 50304, log=said.append)
    assert "sha256 and token ids" in said[0] and "2 files" in said[0]


def test_verify_shards_names_a_shard_whose_bytes_changed(tmp_path):
    from speedrun.shards import verify_shards
    d = _dataset(tmp_path, np.arange(1000) % 50257, [1, 2, 3])
    raw = bytearray((d / "train_000000.bin").read_bytes())
    raw[HEADER_BYTES + 2 * 500] ^= 0x01            # still a valid id: only the hash can tell
    (d / "train_000000.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_000000\.bin: contents differ from manifest\.json"):
        verify_shards(d, 50304)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_verify_shards_names_the_first_id_outside_the_vocabulary(tmp_path, with_manifest):
    from speedrun.shards import verify_shards
    ids = np.arange(3000) % 50257
    ids[1234], ids[2000] = 60000, 65535
    d = _dataset(tmp_path, [5, 6], ids)            # the validation split is checked too
    if not with_manifest:                          # foreign shards: ids only
        (d / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"val_000000\.bin: token 1,234 has id 60000, outside the vocabulary of 50304"):
        verify_shards(d, 50304)
