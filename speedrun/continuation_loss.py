"""The loss of a continuation given its context: per-token cross-entropy of the continuation's
tokens, for many (context, continuation) sequences at once.

Two scorers compute it. `CheckpointScorer` runs the trainer's own model of a models/final.pt
(either recipe) and packs whole sequences, each its own document, into one flat forward pass of
exactly `batch_tokens` tokens (one shape: FlexAttention on a GPU compiles once), padded at its end.
Packing must not change a sequence's numbers: the attention masks keep documents apart, and the
models' `independent_starts` stop the few per-token features that read the position before
(smear, key offset, bigram pair) at each sequence's start. Scored alone or packed, a sequence
gets the same losses (tests/test_hellaswag.py checks it against one forward per sequence), up to
the rounding of rotary tables at other positions. `FolderScorer` runs an exported Hugging Face
folder (models/hf), one sequence per call, as a user of that folder would.

Every sequence starts with <|endoftext|>, as every training document does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .errors import DataError
from .model import BLOCK_SIZE, EOT_ID

LOGIT_ROWS = 4096   # rows of [rows, vocab] fp32 logits made at a time (4096 x 50304 x 4 B = 0.8 GB)


@dataclasses.dataclass(frozen=True)
class Continuation:
    context: tuple[int, ...]      # starts with <|endoftext|>
    ending: tuple[int, ...]       # the tokens whose loss is measured (at least one)

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.context + self.ending

    def __len__(self) -> int:
        return len(self.context) + len(self.ending)


def losses_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of rows of logits [N, vocab] against targets [N]."""
    return F.cross_entropy(logits.float(), targets.long(), reduction="none")


def ending_losses(sequence_logits: torch.Tensor, c: Continuation) -> torch.Tensor:
    """The ending's per-token losses from the logits [len(c), vocab] of one whole sequence: the
    logits at position t predict token t + 1."""
    n, k = len(c), len(c.ending)
    targets = torch.tensor(c.ending, device=sequence_logits.device)
    return losses_from_logits(sequence_logits[n - k - 1:n - 1], targets).cpu()


def _check(c: Continuation) -> None:
    if not c.context or c.context[0] != EOT_ID or not c.ending:
        raise ValueError("a continuation needs a context starting with <|endoftext|> and >= 1 ending token")


class CheckpointScorer:
    """The model of a final.pt state, sequences packed into passes of `batch_tokens` tokens."""

    def __init__(self, state: dict, device: torch.device, batch_tokens: int, path: str = "checkpoint"):
        if batch_tokens <= 0 or batch_tokens % BLOCK_SIZE:
            raise ValueError(f"batch_tokens must be a positive multiple of {BLOCK_SIZE}")
        self.device, self.capacity = device, batch_tokens
        self.recipe = state.get("recipe", "classic")
        if self.recipe == "record":
            from .record.evaluate import model_from_state

            # rotary tables are not weights: rows for the whole pass (same values where they overlap)
            rows = max(int(state["config"]["max_seq_len"]), batch_tokens)
            self.model = model_from_state(state, device, path, rows=rows)
        else:
            state = dict(state, config={**state["config"], "max_seq_len": max(
                int(state["config"].get("max_seq_len", 0)), batch_tokens)})
            self.model = ckpt.model_from_checkpoint(state, device, path).eval()
            self.window = torch.tensor(int(state["window_blocks"]), dtype=torch.int32, device=device)

    @torch.no_grad()
    def losses(self, batch: list[Continuation]) -> list[torch.Tensor]:
        """Each continuation's per-token ending losses (fp32, on the CPU), from one forward pass."""
        for c in batch:
            _check(c)
        lengths = [len(c) for c in batch]
        used, T = sum(lengths), self.capacity
        if used > T:
            raise ValueError(f"{used} tokens do not fit into one pass of {T}")
        offsets = np.cumsum([0, *lengths])
        flat = np.zeros(T, dtype=np.int64)          # the padding after `used` is token 0, not EOT
        starts = np.zeros(T, dtype=bool)
        for c, o in zip(batch, offsets):
            flat[o:o + len(c)] = c.tokens
            starts[o] = True
        if used < T:
            starts[used] = True                        # the padding is a sequence of its own
        hidden = self._hidden(flat, offsets, used, starts)
        # only the rows that predict ending tokens become logits
        rows, targets = [], []
        for c, o in zip(batch, offsets):
            n, k = len(c), len(c.ending)
            rows.append(np.arange(o + n - k - 1, o + n - 1))
            targets.append(flat[o + n - k:o + n])
        rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
        targets_t = torch.from_numpy(np.concatenate(targets)).to(self.device)
        chunks = []
        for i in range(0, rows_t.numel(), LOGIT_ROWS):
            logits = self.model.logits(hidden[rows_t[i:i + LOGIT_ROWS]])
            chunks.append(losses_from_logits(logits, targets_t[i:i + LOGIT_ROWS]))
        return list(torch.cat(chunks).cpu().split([len(c.ending) for c in batch]))

    def _hidden(self, flat: np.ndarray, offsets: np.ndarray, used: int, starts: np.ndarray) -> torch.Tensor:
        """Final normed states [T, dim] of the packed pass."""
        dev, T = self.device, flat.size
        tokens = torch.from_numpy(flat).to(dev)
        independent = torch.from_numpy(starts).to(dev)
        if self.recipe != "record":
            # documents are found at <|endoftext|> (each sequence starts with one; the padding
            # joins the last, behind it in causal order)
            return self.model.hidden_states(tokens, self.window, independent_starts=independent)[0]
        from .record.bigram import bigram_ids

        m = self.model
        bounds = [*offsets.tolist(), *([T] if used < T else [])]
        # bigram ids per sequence: each begins as a micro-batch's first position does
        bigram = np.concatenate([bigram_ids(flat[a:b], m.cfg.bigram_vocab) for a, b in zip(bounds, bounds[1:])])
        cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
        x = tokens.to(torch.int32)
        masks = m.masks(cu, T)
        return m.hidden_states(x, torch.from_numpy(bigram).to(dev), masks[("short", False)],
                               masks[("long", False)], masks[("short", True)], masks.doc, False,
                               independent_starts=independent)


class FolderScorer:
    """An exported folder (models/hf) through transformers, one sequence per forward pass."""

    capacity = None   # no packing: any number of sequences per call

    def __init__(self, path: str | Path, device: torch.device):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise DataError(f"{path} is not an exported model folder (no config.json): run "
                            "`dvc repro export_hf` or give models/final.pt")
        from transformers import AutoModelForCausalLM

        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                              dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot load the exported model ({str(e).splitlines()[0]})") from None
        self.device = device
        self.recipe = getattr(self.model.config, "model_type", "exported")

    @torch.no_grad()
    def losses(self, batch: list[Continuation]) -> list[torch.Tensor]:
        out = []
        for c in batch:
            _check(c)
            ids = torch.tensor([c.tokens], device=self.device)
            out.append(ending_losses(self.model(ids).logits[0], c))
        return out
