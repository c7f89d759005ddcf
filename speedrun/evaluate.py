"""Validation cross-entropy over a fixed number of held-out tokens.

The trainer and the evaluate_val stage both call `evaluate_loss`, so their numbers agree when the
model, the tokens and the window are the same.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint as ckpt
from .errors import DataError, ParamError
from .loader import TokenStream, validation_chunks
from .model import BLOCK_SIZE
from .params import load_yaml, multiple_of, param, parse_section
from .runtime import compile_regions, pick_device
from .shards import MANIFEST, load_manifest, shard_paths
from .train_params import TrainParams


@torch.no_grad()
def evaluate_loss(model, stream: TokenStream, n_tokens: int, micro_tokens: int,
                  window_blocks: torch.Tensor, device: torch.device,
                  rank: int = 0, world: int = 1, progress=None) -> float:
    """Mean next-token cross-entropy over stream[0 : n_tokens] (targets up to n_tokens + 1).

    Every micro-batch holds micro_tokens predictions, so the mean of micro-batch means is the
    token mean. Losses accumulate on the device: one host sync at the end.
    """
    if n_tokens % micro_tokens:
        raise ValueError(f"val_tokens ({n_tokens}) must be a multiple of the micro-batch ({micro_tokens})")
    starts = validation_chunks(n_tokens, micro_tokens, rank, world)
    total = torch.zeros((), device=device, dtype=torch.float64)
    buf = np.empty(micro_tokens + 1, dtype=np.int32)
    for s in starts:
        toks = torch.from_numpy(stream.read(s, micro_tokens + 1, out=buf)).to(device, non_blocking=False)
        total += model(toks[:-1], toks[1:].long(), window_blocks).double()
        if progress is not None:
            progress(micro_tokens)
    count = torch.tensor(float(len(starts)), device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count).item()


# ----------------------------------------------------------------------------- the stage's work


@dataclasses.dataclass
class EvaluateParams:
    val_tokens: int = param(0, ge=0)                 # 0: the run's own (what its last validation used)
    micro_batch_tokens: int = param(0, ge=0, check=multiple_of(BLOCK_SIZE))   # 0: the run's own
    device: str = param("auto", choices=["auto", "cpu", "cuda"])
    compile: bool = param(True)

    def validate(self) -> None:   # against the run's sizes once its checkpoint is read (resolve)
        if self.val_tokens and self.micro_batch_tokens and self.val_tokens % self.micro_batch_tokens:
            raise ParamError(f"params.yaml: evaluate.val_tokens ({self.val_tokens}) must be a multiple "
                             f"of evaluate.micro_batch_tokens ({self.micro_batch_tokens})")

    def resolve(self, state: dict) -> "EvaluateParams":
        """0 = the run's own value (the checkpoint's validation tokens and micro-batch)."""
        micro = self.micro_batch_tokens or int(state.get("val_chunk_tokens") or state.get("micro_batch_tokens") or 0)
        val = self.val_tokens or int(state.get("val_tokens") or 0)
        if not micro or not val:
            raise ParamError("params.yaml: this checkpoint does not record its validation size: set "
                             "evaluate.val_tokens and evaluate.micro_batch_tokens")
        if val % micro:
            raise ParamError(f"params.yaml: evaluate.val_tokens ({val:,}) must be a multiple of the "
                             f"evaluation micro-batch ({micro:,})")
        return dataclasses.replace(self, val_tokens=val, micro_batch_tokens=micro)


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
        from .metrics import read_metrics

        return read_metrics(train_json).get("target")
    except (OSError, ValueError):
        return None


def evaluate(p: EvaluateParams, final: Path, shards: Path, target: float | None, log=print,
             rank: int = 0, world: int = 1) -> dict:
    state = ckpt.load(final)
    p = p.resolve(state)
    device = pick_device(p.device)
    # this rank's share of the tokens; the bar moves as chunks are queued (a GPU keeps pace: each
    # chunk's copy to the device waits for it)
    bar = tqdm(total=p.val_tokens // world, unit="tok", unit_scale=True, desc="evaluate", leave=False,
               disable=rank != 0, mininterval=1.0, file=sys.stderr)
    stream = TokenStream(shard_paths(shards, "val"))
    manifest = load_manifest(shards) if (shards / MANIFEST).exists() else None
    if state.get("recipe") == "record":
        # the trainer's validation: the record's chunks (their size is part of the result), its windows
        from .record.evaluate import evaluate_loss as record_loss, model_from_state

        micro = p.micro_batch_tokens
        if p.val_tokens % (micro * world):
            raise ParamError(f"params.yaml: evaluate.val_tokens ({p.val_tokens:,}) must be a multiple of the "
                             f"run's validation chunk ({micro:,}) x processes ({world})")
        if len(stream) < p.val_tokens + 2:
            raise DataError(f"validation shards in {shards} hold {len(stream):,} tokens, fewer than "
                            f"evaluate.val_tokens + 2 ({p.val_tokens + 2:,}): lower evaluate.val_tokens")
        model = model_from_state(state, device, str(final), rows=max(micro, int(state["config"]["max_seq_len"])))
        window_tokens = int(state["windows"][1])
        t0 = time.perf_counter()
        loss = record_loss(model, shards, p.val_tokens, micro, device, device.type == "cuda" and p.compile,
                           rank, world, progress=lambda _n: bar.update(micro))
        same_setup = p.val_tokens == state.get("val_tokens") and micro == state.get("val_chunk_tokens")
    else:
        # rotary tables are sized to the trainer's micro-batch; they are not weights, so a longer
        # evaluation micro-batch only needs a longer table (same values for the shared positions)
        state = dict(state, config={**state["config"], "max_seq_len": max(
            int(state["config"].get("max_seq_len", 0)), p.micro_batch_tokens)})
        model = ckpt.model_from_checkpoint(state, device, str(final)).eval()
        if device.type == "cuda" and p.compile:
            compile_regions(model)  # the trainer's compiled regions: same kernels, a short cold compile
        if len(stream) < p.val_tokens + 1:
            raise DataError(f"validation shards in {shards} hold {len(stream):,} tokens, fewer than "
                            f"evaluate.val_tokens + 1 ({p.val_tokens + 1:,}): lower evaluate.val_tokens")
        window = torch.tensor(int(state["window_blocks"]), dtype=torch.int32, device=device)
        micro, window_tokens = p.micro_batch_tokens, int(state["window_blocks"]) * BLOCK_SIZE
        t0 = time.perf_counter()
        loss = evaluate_loss(model, stream, p.val_tokens, p.micro_batch_tokens, window, device, rank, world,
                             progress=bar.update)
        same_setup = (p.val_tokens == state.get("val_tokens")
                      and p.micro_batch_tokens == state.get("micro_batch_tokens"))
    runtime = time.perf_counter() - t0  # .item() inside synchronised the device
    bar.close()
    metrics = {
        "val_loss": round(loss, 6),
        "perplexity": round(math.exp(loss), 4) if loss < 700 else None,
        "tokens_evaluated": p.val_tokens,
        **bits_per_byte(loss, p.val_tokens, manifest),
        "target_val_loss": target,
        "meets_target": None if target is None else bool(loss <= target),
        "runtime_s": round(runtime, 3),
        "tokens_per_s": round(p.val_tokens / runtime, 1) if runtime > 0 else None,
        "window_tokens": window_tokens,
        "micro_batch_tokens": micro,
        "recipe": state.get("recipe", "classic"),
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
