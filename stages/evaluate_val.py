"""DVC stage evaluate_val: models/final.pt + data/shards (val) -> metrics/eval.json, metrics/val_curve.png.

The loss is computed by speedrun.evaluate.evaluate_loss, the trainer's own validation, over the
first `evaluate.val_tokens` held-out tokens with the final attention window: with the trainer's
val_tokens and micro-batch it reproduces the run's last validation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from speedrun import checkpoint as ckpt
from speedrun.atomic import write_json
from speedrun.errors import DataError, ParamError, SpeedrunError, stage_main
from speedrun.evaluate import evaluate_loss
from speedrun.loader import TokenStream
from speedrun.model import BLOCK_SIZE
from speedrun.params import load_section, load_yaml, param, parse_section
from speedrun.plots import plot_curves, read_curve
from speedrun.shards import MANIFEST, load_manifest, shard_paths
from speedrun.train import TrainParams, compile_regions


def _multiple_of_block(v) -> str | None:
    return None if v % BLOCK_SIZE == 0 else f"must be a multiple of {BLOCK_SIZE}"


@dataclasses.dataclass
class EvaluateParams:
    val_tokens: int = param(10485760, ge=BLOCK_SIZE)
    micro_batch_tokens: int = param(16384, ge=BLOCK_SIZE, check=_multiple_of_block)
    device: str = param("auto", choices=["auto", "cpu", "cuda"])
    compile: bool = param(True)

    def validate(self) -> None:
        if self.val_tokens % self.micro_batch_tokens:
            raise ParamError(f"params.yaml: evaluate.val_tokens ({self.val_tokens}) must be a multiple "
                             f"of evaluate.micro_batch_tokens ({self.micro_batch_tokens})")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SpeedrunError("evaluate.device=cuda but no CUDA GPU found: set evaluate.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def bits_per_byte(loss: float, n: int, manifest: dict | None) -> dict:
    """bpb = loss/ln2 * tokens/bytes. Evaluating n tokens predicts val tokens 1..n; the first val
    token is a document's <|endoftext|>, which has no text bytes, so n = val_tokens - 1 covers all
    of val_text_bytes exactly. Fewer tokens get their bytes pro rata (marked as an estimate)."""
    total = (manifest or {}).get("val_tokens")
    text_bytes = (manifest or {}).get("val_text_bytes")
    if not total or total < 2 or not text_bytes:
        return {"bits_per_byte": None,
                "bits_per_byte_note": "shards manifest lacks val_tokens/val_text_bytes"}
    covered = min(n / (total - 1), 1.0)
    n_bytes = text_bytes * covered
    return {"bits_per_byte": round(loss / math.log(2) * n / n_bytes, 6),
            "bytes_evaluated": round(n_bytes), "bytes_estimated_pro_rata": covered < 1.0,
            "val_split_tokens": total}


def target_loss(params_path: Path, train_json: Path) -> float | None:
    """train.target_val_loss from params.yaml (what the run is judged by now), else the run's own."""
    raw = load_yaml(params_path)
    if "train" in raw:
        return parse_section(raw, "train", TrainParams).target_val_loss
    try:
        return json.loads(train_json.read_text()).get("target")
    except (OSError, ValueError):
        return None


def evaluate(p: EvaluateParams, final: Path, shards: Path, target: float | None, log=print) -> dict:
    state = ckpt.load(final)
    device = pick_device(p.device)
    # rotary tables are sized to the trainer's micro-batch; they are not weights, so a longer
    # evaluation micro-batch only needs a longer table (same values for the shared positions)
    state = dict(state, config={**state["config"], "max_seq_len": max(
        int(state["config"].get("max_seq_len", 0)), p.micro_batch_tokens)})
    model = ckpt.model_from_checkpoint(state, device, str(final)).eval()
    if device.type == "cuda" and p.compile:
        compile_regions(model)  # the trainer's compiled regions: same kernels, a short cold compile

    stream = TokenStream(shard_paths(shards, "val"))
    if len(stream) < p.val_tokens + 1:
        raise DataError(f"validation shards in {shards} hold {len(stream):,} tokens, fewer than "
                        f"evaluate.val_tokens + 1 ({p.val_tokens + 1:,}): lower evaluate.val_tokens")
    manifest = load_manifest(shards) if (shards / MANIFEST).exists() else None
    window = torch.tensor(int(state["window_blocks"]), dtype=torch.int32, device=device)

    t0 = time.perf_counter()
    loss = evaluate_loss(model, stream, p.val_tokens, p.micro_batch_tokens, window, device)
    runtime = time.perf_counter() - t0  # .item() inside synchronised the device
    same_setup = (p.val_tokens == state.get("val_tokens")
                  and p.micro_batch_tokens == state.get("micro_batch_tokens"))
    metrics = {
        "val_loss": round(loss, 6),
        "perplexity": round(math.exp(loss), 4) if loss < 700 else None,
        "tokens_evaluated": p.val_tokens,
        **bits_per_byte(loss, p.val_tokens, manifest),
        "target_val_loss": target,
        "meets_target": None if target is None else bool(loss <= target),
        "runtime_s": round(runtime, 3),
        "tokens_per_s": round(p.val_tokens / runtime, 1) if runtime > 0 else None,
        "window_tokens": int(state["window_blocks"]) * BLOCK_SIZE,
        "micro_batch_tokens": p.micro_batch_tokens,
        "step": state.get("step"),
        # the trainer's last validation, and whether it used the same tokens and chunking (then
        # both numbers must agree: a mismatch means the checkpoint or data changed)
        "train_final_val_loss": state.get("val_loss"),
        "same_setup_as_training": same_setup,
        "device": device.type,
    }
    verdict = "" if target is None else (" <= " if metrics["meets_target"] else " > ") + f"target {target}"
    log(f"val_loss {loss:.4f}{verdict} | perplexity {metrics['perplexity']} | "
        f"bits/byte {metrics['bits_per_byte']} | {p.val_tokens:,} tokens in {runtime:.1f}s on {device.type}"
        + (f" | trainer's last validation {state.get('val_loss')}" if same_setup else ""))
    return metrics


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--models", default="models")
    ap.add_argument("--metrics", default="metrics")
    args = ap.parse_args(argv)
    params = load_section("evaluate", EvaluateParams, args.params)  # validated before any work
    metrics_dir = Path(args.metrics)
    target = target_loss(Path(args.params), metrics_dir / "train.json")
    result = evaluate(params, Path(args.models) / "final.pt", Path(args.shards), target)
    write_json(metrics_dir / "eval.json", result)
    png = plot_curves([read_curve(metrics_dir / "dvclive", label="validation (trainer)")],
                      metrics_dir / "val_curve.png", target=target,
                      title=f"validation loss (final {result['val_loss']:.4f})")
    print(f"wrote {metrics_dir / 'eval.json'} and {png}")


if __name__ == "__main__":
    main()
