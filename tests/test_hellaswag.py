"""HellaSwag: the file (download, local copy, sha256, bad lines, no network), accuracy from the
losses, the stages' outputs for both recipes, the exported folder's scores against the
checkpoint's, and the model card. (Packing itself: test_continuation_loss.py.)"""
from __future__ import annotations

import io
import json
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_hellaswag_items, write_jsonl
from speedrun import checkpoint as ckpt
from speedrun import hellaswag as hs
from speedrun.continuation_loss import CheckpointScorer, Continuation, FolderScorer
from speedrun.model import EOT_ID
from speedrun.metrics import read_metrics
from test_continuation_loss import STATES, one_sequence_losses
from test_evaluate import run_stage

CPU = torch.device("cpu")
_MODELS: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    # transformers copies an exported folder's remote code under HF_HOME; nothing may go online
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))


def run_root(recipe: str, tmp_path_factory) -> Path:
    """A run folder with models/final.pt (random weights), its metrics and models/hf (read-only)."""
    if recipe not in _MODELS:
        from speedrun.export import ExportParams, export_folder

        root = tmp_path_factory.mktemp(f"hellaswag-{recipe}")
        (root / "models").mkdir()
        ckpt.save(root / "models/final.pt", STATES[recipe]())
        (root / "metrics").mkdir()
        (root / "metrics/train.json").write_text(json.dumps({"target": 3.28, "gpu": "cpu"}))
        (root / "metrics/eval.json").write_text(json.dumps({"val_loss": 10.5}))
        (root / "metrics/hellaswag.json").write_text(json.dumps({"acc": 0.25, "acc_norm": 0.3, "items": 8}))
        export_folder(root / "models/final.pt", root / "metrics/train.json", root / "metrics/eval.json",
                      root / "models/hf", ExportParams(), root / "metrics/hellaswag.json")
        _MODELS[recipe] = root
    return _MODELS[recipe]


def write_file(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def params_file(root: Path, **values) -> Path:
    (root / "params.yaml").write_text(yaml.safe_dump({"hellaswag": values}))
    return root / "params.yaml"


def download_stage(root: Path, capsys, **values) -> tuple[int, str, str]:
    from stages.download_hellaswag import main

    return run_stage(main, ["--params", str(params_file(root, **values)), "--out", str(root / "data/hellaswag")],
                     capsys)


def evaluate_stage(root: Path, capsys, model: Path, **values) -> tuple[int, str, str]:
    from stages.evaluate_hellaswag import main

    return run_stage(main, ["--params", str(params_file(root, **values)), "--data", str(root / "data/hellaswag"),
                            "--model", str(model), "--out", str(root / "metrics/hellaswag.json")], capsys)


# ----------------------------------------------------------------------------- scoring

def test_accuracy_counts_total_loss_and_mean_loss():
    # item 0: ending 1 has the lowest total, ending 2 the lowest mean (a long ending); label 2
    result = torch.tensor([[[9.0, 3], [4.0, 1], [10.0, 10], [8.0, 2]],
                           [[1.0, 1], [5.0, 1], [5.0, 1], [5.0, 1]]], dtype=torch.float64)
    assert hs.accuracies(result, [2, 0]) == {"acc": 0.5, "acc_norm": 1.0, "correct": 1, "correct_norm": 2}


def test_items_are_packed_whole_and_too_long_an_item_is_a_param_error():
    items = [[Continuation((EOT_ID,) * 10, (1,) * 5)] * 4 for _ in range(5)]   # 60 tokens each
    assert hs.batches(items, 128) == [[0, 1], [2, 3], [4]]
    assert hs.batches(items, None) == [[0], [1], [2], [3], [4]]
    with pytest.raises(hs.ParamError, match="line 9 needs 60 tokens.*hellaswag.batch_tokens"):
        hs.batches(items, 32, lines=[9, 10, 12, 13, 14])


# ----------------------------------------------------------------------------- the file

def test_malformed_lines_are_counted_named_and_skipped(tmp_path):
    good = [json.dumps(it) for it in make_hellaswag_items(5)]
    bad_label = dict(make_hellaswag_items(1)[0], label=4)
    three = dict(make_hellaswag_items(1)[0], endings=["a.", "b.", "c."])
    text_label = dict(make_hellaswag_items(1)[0], label="2")   # the Hub's copy writes labels as text
    path = write_file(tmp_path / "h.jsonl", [good[0], "{not json", good[1], "", json.dumps(bad_label),
                                             json.dumps(three), "[1, 2]", json.dumps(text_label), good[2]])
    items, malformed = hs.read_items(path)
    assert [it.line for it in items] == [1, 3, 8, 9] and items[2].label == 2
    assert [m["line"] for m in malformed] == [2, 5, 6, 7]
    assert "not JSON" in malformed[0]["reason"] and "label" in malformed[1]["reason"]
    assert "endings" in malformed[2]["reason"] and "object" in malformed[3]["reason"]
    items, malformed = hs.read_items(path, max_items=2)   # stops reading there
    assert [it.line for it in items] == [1, 3] and [m["line"] for m in malformed] == [2]


def test_local_source_copies_and_records_the_sha256(tmp_path, capsys):
    src = write_jsonl(tmp_path / "copy/hellaswag_val.jsonl", make_hellaswag_items(3))
    code, out, err = download_stage(tmp_path, capsys, source="local", local=str(src))
    assert code == 0, err
    manifest = json.loads((tmp_path / "data/hellaswag/manifest.json").read_text())
    digest = hs.sha256_of(src)
    assert manifest["sha256"] == digest and not manifest["sha256_checked"] and digest in out
    assert (tmp_path / "data/hellaswag/hellaswag_val.jsonl").read_bytes() == src.read_bytes()
    code, _, err = download_stage(tmp_path, capsys, source="local", local=str(src), sha256=digest.upper())
    assert code == 0 and json.loads((tmp_path / "data/hellaswag/manifest.json").read_text())["sha256_checked"]
    code, _, err = download_stage(tmp_path, capsys, source="local", local=str(src), sha256="0" * 64)
    assert code == 2 and err.count("\n") == 1 and "differs from hellaswag.sha256" in err
    assert not (tmp_path / "data/hellaswag/hellaswag_val.jsonl").exists()   # a wrong file is not kept


def test_download_streams_the_url_into_data(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "server/hellaswag_val.jsonl", make_hellaswag_items(40))
    monkeypatch.setattr(hs, "URL", src.as_uri())   # urllib reads file:// as it reads https://
    code, out, err = download_stage(tmp_path, capsys, source="url")
    assert code == 0, err
    assert (tmp_path / "data/hellaswag/hellaswag_val.jsonl").read_bytes() == src.read_bytes()
    manifest = json.loads((tmp_path / "data/hellaswag/manifest.json").read_text())
    assert manifest["origin"] == src.as_uri() and manifest["bytes"] == src.stat().st_size
    assert "hellaswag_val.jsonl" in err   # the progress bar


def test_no_network_is_one_line_naming_the_local_param(tmp_path, capsys, monkeypatch):
    def unreachable(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hs.urllib.request, "urlopen", unreachable)
    code, _, err = download_stage(tmp_path, capsys, source="url")
    assert code == 2 and err.count("\n") == 1, err
    assert "name resolution" in err and "hellaswag.source=local and hellaswag.local=PATH" in err
    assert not (tmp_path / "data/hellaswag/hellaswag_val.jsonl").exists()


def test_a_download_cut_short_keeps_no_file(tmp_path, capsys, monkeypatch):
    class CutShort(io.BytesIO):   # the server promised more bytes than arrive
        headers = {"Content-Length": "5000"}

    monkeypatch.setattr(hs.urllib.request, "urlopen", lambda *a, **k: CutShort(b'{"ctx": "a"}\n' * 10))
    code, _, err = download_stage(tmp_path, capsys, source="url")
    last = err.strip().splitlines()[-1]   # after the progress bar, one line
    assert code == 2 and last.startswith("error: ") and "130 of 5,000 bytes arrived" in last, err
    assert not list((tmp_path / "data/hellaswag").iterdir())   # neither the file nor a temporary


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_is_one_clear_error(tmp_path, capsys, content):
    src = tmp_path / "empty.jsonl"
    src.write_text(content)
    code, _, err = download_stage(tmp_path, capsys, source="local", local=str(src))
    if content == "":   # caught where it arrives
        assert code == 2 and err.count("\n") == 1 and "empty file" in err
        return
    assert code == 0, err
    code, _, err = evaluate_stage(tmp_path, capsys, tmp_path / "no-model.pt")
    assert code == 2 and err.count("\n") == 1 and "is empty: no HellaSwag items" in err


def test_param_errors(tmp_path, capsys):
    code, _, err = download_stage(tmp_path, capsys, source="local")
    assert code == 2 and err.count("\n") == 1 and "hellaswag.local is empty" in err
    code, _, err = download_stage(tmp_path, capsys, source="local", local=str(tmp_path / "nope.jsonl"))
    assert code == 2 and "hellaswag.local" in err and "not found" in err
    code, _, err = download_stage(tmp_path, capsys, sha256="abc")
    assert code == 2 and "hellaswag.sha256 must be empty or 64 hex digits" in err
    code, _, err = download_stage(tmp_path, capsys, batch_tokens=100)
    assert code == 2 and "hellaswag.batch_tokens must be a multiple of 128" in err


def test_source_off_skips_the_evaluation(tmp_path, capsys):
    code, _, err = download_stage(tmp_path, capsys, source="off")
    assert code == 0, err
    code, _, err = evaluate_stage(tmp_path, capsys, tmp_path / "no-model.pt", source="off")
    assert code == 0, err
    m = read_metrics(tmp_path / "metrics/hellaswag.json")
    assert m["acc_norm"] is None and m["items"] == 0 and "off" in m["note"]


# ----------------------------------------------------------------------------- stage and export

@pytest.mark.parametrize("recipe", ["record", "classic"])
def test_stage_metrics_and_the_export_scores_the_same(recipe, tmp_path, tmp_path_factory, capsys):
    """The stage's metrics on a small file with a bad line; the exported folder, run by
    transformers one sequence at a time, gives the checkpoint's numbers; the card carries them."""
    run = run_root(recipe, tmp_path_factory)
    lines = [json.dumps(it) for it in make_hellaswag_items(6, seed=4)]
    src = write_file(tmp_path / "h.jsonl", lines[:3] + ['{"ctx": "no endings", "label": 0}'] + lines[3:])
    assert download_stage(tmp_path, capsys, source="local", local=str(src))[0] == 0
    values = dict(source="local", local=str(src), batch_tokens=1024, device="cpu")
    code, out, err = evaluate_stage(tmp_path, capsys, run / "models/final.pt", **values)
    assert code == 0, err
    m = read_metrics(tmp_path / "metrics/hellaswag.json")
    assert m["items"] == 6 and m["malformed_lines"] == 1 and m["malformed"][0]["line"] == 4
    assert 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1 and m["runtime_s"] > 0
    assert m["recipe"] == recipe and m["batch_tokens"] == 1024 and m["device"] == "cpu"
    assert m["sha256"] == hs.sha256_of(src) and "HellaSwag acc_norm" in out

    # the same items through the exported folder (transformers, one sequence per call): the
    # checkpoint's losses sequence by sequence (the record's folder runs its very code: to the
    # bit), and the packed pass's up to rounding, hence the same accuracies
    from speedrun.tokenizer import get_encoding
    items, _ = hs.read_items(src)
    encoded = [hs.continuations(it, get_encoding().encode_ordinary) for it in items]
    checkpoint = CheckpointScorer(ckpt.load(run / "models/final.pt"), CPU, 1024)
    folder = FolderScorer(run / "models/hf", CPU)
    for c in encoded[0]:
        alone, exported = one_sequence_losses(checkpoint, c), folder.losses([c])[0]
        assert torch.equal(alone, exported) if recipe == "record" else torch.allclose(alone, exported, atol=1e-5)
    packed, exported = hs.score(encoded, checkpoint), hs.score(encoded, folder)
    assert torch.equal(packed[..., 1], exported[..., 1])
    assert (packed[..., 0] - exported[..., 0]).abs().max() < (2e-3 if recipe == "record" else 1e-4)
    labels = [it.label for it in items]
    assert hs.accuracies(exported, labels) == hs.accuracies(packed, labels)
    assert (m["acc"], m["acc_norm"]) == (hs.accuracies(packed, labels)["acc"], hs.accuracies(packed, labels)["acc_norm"])
    # ... and the stage takes the folder too
    code, _, err = evaluate_stage(tmp_path, capsys, run / "models/hf", **values, max_items=2)
    assert code == 0, err
    via_folder = read_metrics(tmp_path / "metrics/hellaswag.json")
    assert via_folder["items"] == 2 and via_folder["model"] == str(run / "models/hf")

    card = (run / "models/hf/README.md").read_text()
    results = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    swag = [r for r in results if r["dataset"]["name"] == "HellaSwag"]
    assert swag and {"type": "acc_norm", "value": 0.3, "name": "acc_norm"} in swag[0]["metrics"]
    assert "| HellaSwag acc_norm / acc | 0.3000 / 0.2500 (8 items) |" in card
