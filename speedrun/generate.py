"""Text generation from models/final.pt or from an exported folder (models/hf/).

Both sources go through the same loop (same prompt handling, same sampling, same seed use), so a
checkpoint and its export give the same continuation. Every training document began with
<|endoftext|>, so the prompt is prefixed with it. There is no KV cache: each new token recomputes
the sequence (quadratic, fine for the lengths a CLI demo generates).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import checkpoint as ckpt
from .errors import DataError, SpeedrunError
from .export import TEXT_VOCAB  # ids from here up are padding rows of the embedding: never generated
from .model import BLOCK_SIZE, EOT_ID


@dataclasses.dataclass
class Generator:
    """A loaded model: next-token logits for a 1-D id sequence, plus its tokenizer."""
    source: str
    next_logits: Callable[[torch.Tensor], torch.Tensor]   # ids [T] -> logits [vocab] at position T-1
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


def _round_up(n: int) -> int:
    return -(-n // BLOCK_SIZE) * BLOCK_SIZE


def from_checkpoint(path: Path, device: torch.device, max_len: int) -> Generator:
    from .tokenizer import get_encoding

    state = ckpt.load(path)
    if state.get("recipe") == "record":
        from .record.evaluate import model_from_state

        rmodel = model_from_state(state, device, str(path), rows=max(int(state["config"]["max_seq_len"]),
                                                                     _round_up(max_len)))
        enc = get_encoding()
        return Generator(str(path), lambda ids: rmodel.sequence_logits(ids)[-1], enc.encode_ordinary, enc.decode)
    # rotary tables are sized by max_seq_len (a non-persistent buffer): make room for the text
    state = dict(state, config={**state["config"],
                                "max_seq_len": max(state["config"].get("max_seq_len", 0), _round_up(max_len))})
    model = ckpt.model_from_checkpoint(state, device, str(path)).eval()
    window = torch.tensor(int(state["window_blocks"]), dtype=torch.int32, device=device)
    enc = get_encoding()

    @torch.no_grad()
    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        # the model takes multiples of 128 tokens: pad the end with a non-EOT id; causal attention
        # keeps the pads from affecting position T-1, and no EOT means no new document boundary
        T = ids.numel()
        padded = torch.nn.functional.pad(ids, (0, _round_up(T) - T), value=0)
        return model.logits(model.hidden_states(padded, window))[0, T - 1]

    return Generator(str(path), next_logits, enc.encode_ordinary, enc.decode)


def from_folder(path: Path, device: torch.device) -> Generator:
    if not (path / "config.json").is_file():
        raise DataError(f"{path} is not an exported model folder (no config.json): run "
                        "`dvc repro export_hf` or give models/final.pt")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                     dtype=torch.float32).to(device).eval()
        # trust_remote_code only skips transformers' question about the folder's config code
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load the exported model ({str(e).splitlines()[0]})") from None

    @torch.no_grad()
    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids[None].to(device)).logits[0, -1]

    def encode(text: str) -> list[int]:
        # like tiktoken's encode_ordinary: '<|endoftext|>' typed in a prompt is text, not a boundary
        return tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    return Generator(str(path), next_logits, encode, lambda ids: tok.decode(ids))


def load(path: str | Path, device: torch.device, max_len: int = 1024) -> Generator:
    """A checkpoint file (models/final.pt) or an exported folder (models/hf)."""
    path = Path(path)
    if path.is_dir():
        return from_folder(path, device)
    if path.is_file():
        return from_checkpoint(path, device, max_len)
    raise SpeedrunError(f"model {path} not found: give a checkpoint (models/final.pt, from "
                        "`dvc repro train_speedrun`) or an exported folder (models/hf, from "
                        "`dvc repro export_hf`)")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int,
                rng: torch.Generator) -> int:
    """Greedy for temperature 0 or top_k 1; else softmax(logits/T) over the top_k (0: all)."""
    logits = logits[:TEXT_VOCAB].float().cpu()
    if temperature <= 0 or top_k == 1:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))


def generate_ids(gen: Generator, prompt: str, max_new_tokens: int, temperature: float,
                 top_k: int, seed: int, device: torch.device) -> Iterator[int]:
    """Yield new token ids one at a time; stops at <|endoftext|> (not yielded) or the budget."""
    rng = torch.Generator().manual_seed(seed)
    ids = torch.tensor([EOT_ID, *gen.encode(prompt)], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(gen.next_logits(ids), temperature, top_k, rng)
        if nxt == EOT_ID:  # the model ended the document
            return
        yield nxt
        ids = torch.cat([ids, ids.new_tensor([nxt])])


def stream_text(gen: Generator, ids: Iterator[int]) -> Iterator[str]:
    """Decoded text pieces as tokens arrive. A character split over several byte-level tokens
    is held back until it is complete, so no replacement character is printed mid-stream."""
    out: list[int] = []
    shown = ""
    for t in ids:
        out.append(t)
        text = gen.decode(out)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    text = gen.decode(out)
    if len(text) > len(shown):  # a genuinely invalid tail: show it as decoded
        yield text[len(shown):]
