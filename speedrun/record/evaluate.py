"""Held-out loss of a record-recipe checkpoint, computed as the trainer's validation computes it:
the record's contiguous chunks (documents cut at chunk edges), the final windows (the long one
widened to `final_long_window` blocks, no YaRN step for that), the bf16 head and its rescale."""
from __future__ import annotations

import torch

from ..errors import DataError
from ..shards import shard_paths
from .loader import ValidationChunks
from .model import RecordConfig, RecordGPT, build


def model_from_state(state: dict, device: torch.device, path: str = "checkpoint", rows: int | None = None) -> RecordGPT:
    """The record model of a final.pt state (rotary state and windows as it was validated)."""
    try:
        cfg = RecordConfig(**{**state["config"], **({"max_seq_len": rows} if rows else {})})
    except TypeError as e:
        raise DataError(f"{path}: model config not understood ({e})") from None
    model = build(cfg, device, fp8=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise DataError(f"{path}: weights do not match its config ({(lines[1] if len(lines) > 1 else lines[0]).strip()})") from None
    model.set_rotary(list(state["rotary_history"]))
    model.set_windows(*state["windows"])
    return model.eval()


@torch.no_grad()
def evaluate_loss(model: RecordGPT, shards, n_tokens: int, chunk: int, device: torch.device,
                  compile: bool, rank: int = 0, world: int = 1, progress=None) -> float:
    hidden = torch.compile(model.hidden_states, dynamic=False, fullgraph=True) if compile else model.hidden_states
    chunks = ValidationChunks(shard_paths(shards, "val"), model.cfg.bigram_vocab, rank, world)
    total = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for mb in chunks(n_tokens, chunk):
        x, y, bg, cu = (torch.from_numpy(a).to(device) for a in (mb.inputs, mb.targets, mb.bigram, mb.cu_seqlens))
        m = model.masks(cu, x.numel())
        h = hidden(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, False)
        total += model.eval_losses(h, y).double().mean()
        n += 1
        if progress is not None:
            progress(n)
    count = torch.tensor(float(n), device=device, dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count).item()
