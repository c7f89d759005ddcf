"""HellaSwag (Zellers et al. 2019) validation accuracy of a trained model.

Each item is a context and four endings, one of them right. As in llm.c and modded-nanogpt, every
ending is scored by the model's cross-entropy on the ending's tokens given the context, and

    acc       picks the ending with the lowest total loss,
    acc_norm  the lowest mean loss per token (length-normalised: the figure usually quoted;
              GPT-2 124M scores about 0.29-0.31 on the 10,042 validation items).

The context is the item's `ctx` and the ending " " + ending (with its leading space, as llm.c
tokenizes it). Unlike llm.c, each sequence starts with <|endoftext|>: every training document did,
and a model that never saw a text without it scores worse (generate.py prepends it likewise).

The file is `hellaswag_val.jsonl` from the dataset's GitHub repository, fetched by the
download_hellaswag stage into data/hellaswag/ (or copied there from `hellaswag.local`), with
its sha256 recorded and, when `hellaswag.sha256` is set, checked. A malformed line is skipped,
counted and named in the metrics; a file with no item at all is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import math
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .atomic import atomic_path, write_json
from .errors import DataError, ParamError, SpeedrunError
from .params import multiple_of, param

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"
MANIFEST = "manifest.json"
ENDINGS = 4
CONNECT_TIMEOUT_S = 20.0     # to reach the server (DNS included); reads then time out alike
NAMED_MALFORMED = 20         # malformed lines named in the metrics (all are counted)
# tokens per forward pass when hellaswag.batch_tokens is 0 (or the longest item, if longer): a GPU
# takes many items at once; on the CPU attention masks are dense, so time per token grows with
# the pass (cpu-tiny record model: 3.2k tokens/s at 512, 2.7k at 1024, 2.0k at 2048, one core)
AUTO_BATCH_TOKENS = {"cuda": 32768, "cpu": 1024}


def _sha256_check(value: str) -> str | None:
    ok = value == "" or (len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value))
    return None if ok else "must be empty or 64 hex digits"


@dataclasses.dataclass
class HellaSwagParams:
    source: str = param("url", choices=["url", "local", "off"])
    local: str = param("")
    sha256: str = param("", check=_sha256_check)
    max_items: int = param(0, ge=0)
    batch_tokens: int = param(0, ge=0, check=multiple_of(128))
    device: str = param("auto", choices=["auto", "cpu", "cuda"])

    def validate(self) -> None:
        if self.source == "local" and not self.local.strip():
            raise ParamError("params.yaml: hellaswag.source is local but hellaswag.local is empty: set it "
                             f"to the path of a copy of {FILE_NAME}")


# ----------------------------------------------------------------------------- the file

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def offline_hint(reason: str) -> str:
    return (f"cannot download {FILE_NAME} from {URL} ({reason}); offline? copy the file to this "
            "machine and set hellaswag.source=local and hellaswag.local=PATH (or hellaswag.source=off)")


def _open_url(url: str, timeout: float):
    """urlopen bounded in time as a whole (its own timeout does not cover the DNS lookup)."""
    outcome: dict = {}

    def attempt():
        try:
            outcome["response"] = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as e:
            outcome["error"] = f"HTTP {e.code} {e.reason}"
        except Exception as e:  # noqa: BLE001 - any failure to connect means: no file from there
            outcome["error"] = str(getattr(e, "reason", None) or e) or type(e).__name__

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 1)
    if "response" not in outcome:
        raise DataError(offline_hint(outcome.get("error", f"no answer in {timeout:.0f} s")))
    return outcome["response"]


def download(url: str, target: Path, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Stream url to target (atomically) with a progress bar on stderr."""
    response = _open_url(url, timeout)
    total = int(response.headers.get("Content-Length") or 0) or None
    try:
        with response, atomic_path(target) as tmp, open(tmp, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=FILE_NAME,
                file=sys.stderr, mininterval=0.5) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))
            if total is not None and bar.n != total:
                raise OSError(f"{bar.n:,} of {total:,} bytes arrived")
    except (OSError, http.client.HTTPException) as e:   # lost mid-way: the temporary file is gone
        raise DataError(offline_hint(f"interrupted: {e}")) from None


def fetch(p: HellaSwagParams, out_dir: str | Path, log=print) -> dict:
    """Put the validation file into out_dir (download, or copy of hellaswag.local) and write
    out_dir/manifest.json: where it came from, its size and sha256. With source=off only the
    manifest is written (the evaluation then records that it was skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / FILE_NAME
    if p.source == "off":
        target.unlink(missing_ok=True)
        manifest = {"source": "off"}
        write_json(out_dir / MANIFEST, manifest)
        log("hellaswag.source is off: no file fetched, the evaluation will be skipped")
        return manifest
    if p.source == "local":
        src = Path(p.local).expanduser()
        if not src.is_file():
            raise DataError(f"hellaswag.local: {src} not found (a copy of {FILE_NAME}, relative to the repo root)")
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        origin = str(p.local)
    else:
        download(URL, target)
        origin = URL
    size = target.stat().st_size
    if size == 0:
        target.unlink()
        raise DataError(f"{origin} is an empty file: no HellaSwag items to score")
    digest = sha256_of(target)
    if p.sha256 and digest != p.sha256.lower():
        target.unlink()
        raise DataError(f"{origin}: sha256 {digest} differs from hellaswag.sha256 {p.sha256.lower()} "
                        "(another or a damaged file)")
    manifest = {"source": p.source, "origin": origin, "file": FILE_NAME, "bytes": size, "sha256": digest,
                "sha256_checked": bool(p.sha256)}
    write_json(out_dir / MANIFEST, manifest)
    log(f"{target}: {size:,} bytes from {origin}, sha256 {digest} "
        + ("(matches hellaswag.sha256)" if p.sha256 else "(unchecked: set hellaswag.sha256 to it to check it)"))
    return manifest


# ----------------------------------------------------------------------------- items

@dataclasses.dataclass(frozen=True)
class Item:
    line: int                  # 1-based line of the file
    context: str
    endings: tuple[str, ...]   # ENDINGS of them
    label: int                 # index of the right ending


def parse_item(text: str, line: int) -> Item:
    """One line of the file; ValueError naming what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise ValueError("no ctx text")
    if not isinstance(endings, list) or len(endings) != ENDINGS:
        raise ValueError(f"endings is not a list of {ENDINGS}")
    if not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError("an ending is not a non-empty string")
    if isinstance(label, str) and label.strip().isdigit():   # the Hub's copy writes labels as text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < ENDINGS:
        raise ValueError(f"label is not one of 0..{ENDINGS - 1}")
    return Item(line, ctx, tuple(endings), label)


def read_items(path: str | Path, max_items: int = 0) -> tuple[list[Item], list[dict]]:
    """The first max_items (0: all) well-formed items of the file, and the malformed lines met
    on the way ({line, reason}); blank lines are neither."""
    path = Path(path)
    items, malformed = [], []
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, text in enumerate(f, 1):
                if max_items and len(items) == max_items:
                    break
                if not text.strip():
                    continue
                try:
                    items.append(parse_item(text, n))
                except ValueError as e:
                    malformed.append({"line": n, "reason": str(e)})
    except FileNotFoundError:
        raise DataError(f"{path} not found (run the download_hellaswag stage first)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not items:
        if malformed:
            first = malformed[0]
            raise DataError(f"{path}: none of its {len(malformed)} non-blank lines is a HellaSwag item "
                            f"(line {first['line']}: {first['reason']})")
        raise DataError(f"{path} is empty: no HellaSwag items to score")
    return items, malformed


def continuations(item: Item, encode) -> list:
    """The item's ENDINGS sequences: <|endoftext|> + ctx, then " " + ending."""
    from .continuation_loss import Continuation
    from .model import EOT_ID

    context = (EOT_ID, *encode(item.context))
    return [Continuation(context, tuple(encode(" " + e))) for e in item.endings]


# ----------------------------------------------------------------------------- scoring

def batches(encoded: list[list], capacity: int | None, lines: list[int] | None = None) -> list[list[int]]:
    """Item indices per forward pass: whole items (all their endings), in order, as many as fit
    into `capacity` tokens (None: one item per pass)."""
    out, current, used = [], [], 0
    for i, seqs in enumerate(encoded):
        n = sum(len(c) for c in seqs)
        if capacity is not None and n > capacity:
            where = f"line {lines[i]}" if lines else f"item {i + 1}"
            raise ParamError(f"params.yaml: the HellaSwag item of {where} needs {n} tokens, more than a "
                             f"pass of hellaswag.batch_tokens ({capacity}): raise it")
        if current and (capacity is None or used + n > capacity):
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        out.append(current)
    return out


def score(encoded: list[list], scorer, progress=None, lines: list[int] | None = None) -> torch.Tensor:
    """[items, ENDINGS, 2] float64: each ending's total loss and its token count."""
    result = torch.zeros(len(encoded), ENDINGS, 2, dtype=torch.float64)
    for group in batches(encoded, scorer.capacity, lines):
        losses = scorer.losses([c for i in group for c in encoded[i]])
        for j, i in enumerate(group):
            for e in range(ENDINGS):
                per_token = losses[j * ENDINGS + e]
                result[i, e, 0] = per_token.double().sum()
                result[i, e, 1] = per_token.numel()
        if progress is not None:
            progress(len(group))
    return result


def accuracies(result: torch.Tensor, labels: list[int]) -> dict:
    """acc (lowest total loss) and acc_norm (lowest mean loss per token); ties go to the first."""
    label = torch.tensor(labels)
    total, count = result[..., 0], result[..., 1]
    correct = int((total.argmin(-1) == label).sum())
    correct_norm = int(((total / count).argmin(-1) == label).sum())
    n = len(labels)
    return {"acc": round(correct / n, 6), "acc_norm": round(correct_norm / n, 6),
            "correct": correct, "correct_norm": correct_norm}


def skipped_metrics() -> dict:
    return {"source": "off", "acc": None, "acc_norm": None, "items": 0,
            "note": "not evaluated: hellaswag.source is off"}


def evaluate(p: HellaSwagParams, model: Path, data_dir: Path, log=print) -> dict:
    """Score a checkpoint (models/final.pt) or an exported folder (models/hf) on the file."""
    from .continuation_loss import CheckpointScorer, FolderScorer
    from .evaluate import pick_device
    from .tokenizer import get_encoding

    manifest_path = data_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{manifest_path} not found (run the download_hellaswag stage first)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path} is unreadable ({e})") from None
    if manifest.get("source") == "off":
        log("hellaswag.source is off: HellaSwag not evaluated")
        return skipped_metrics()
    items, malformed = read_items(data_dir / FILE_NAME, p.max_items)
    device = pick_device(p.device)
    encode = get_encoding().encode_ordinary
    encoded = [continuations(it, encode) for it in items]
    if model.is_dir():
        scorer = FolderScorer(model, device)
        recipe, step = scorer.recipe, None   # the folder's model_type; it keeps no step
    else:
        state = ckpt.load(model)
        longest = max(sum(len(c) for c in seqs) for seqs in encoded)
        batch_tokens = p.batch_tokens or max(AUTO_BATCH_TOKENS[device.type], -(-longest // 128) * 128)
        scorer = CheckpointScorer(state, device, batch_tokens, str(model))
        recipe, step = state.get("recipe", "classic"), state.get("step")
    bar = tqdm(total=len(items), unit="item", desc="hellaswag", leave=False, file=sys.stderr, mininterval=1.0)
    t0 = time.perf_counter()
    result = score(encoded, scorer, progress=bar.update, lines=[it.line for it in items])
    runtime = time.perf_counter() - t0   # the losses came back to the CPU: the device is done
    bar.close()
    metrics = {
        **accuracies(result, [it.label for it in items]),
        "items": len(items),
        "malformed_lines": len(malformed),
        "malformed": malformed[:NAMED_MALFORMED],   # the first ones, by line number and reason
        "runtime_s": round(runtime, 3),
        "items_per_s": round(len(items) / runtime, 2) if runtime > 0 else None,
        "mean_ending_loss": round(float((result[..., 0].sum() / result[..., 1].sum())), 6),
        "max_items": p.max_items,
        "source": manifest.get("source"),
        "sha256": manifest.get("sha256"),
        "sha256_checked": manifest.get("sha256_checked"),
        "model": str(model),
        "recipe": recipe,
        "step": step,
        "batch_tokens": scorer.capacity,
        "device": device.type,
    }
    if not math.isfinite(metrics["mean_ending_loss"]):
        raise SpeedrunError(f"{model}: the losses are not finite (a broken checkpoint?)")
    log(f"HellaSwag acc_norm {metrics['acc_norm']:.4f} | acc {metrics['acc']:.4f} | {len(items):,} items"
        + (f" ({len(malformed)} malformed lines skipped)" if malformed else "")
        + f" in {runtime:.1f}s on {device.type}")
    return metrics
