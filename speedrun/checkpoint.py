"""Checkpoints: plain dicts of tensors and numbers, written atomically, loaded with weights_only=True.

Nothing here unpickles arbitrary objects: configs travel as dicts, RNG states as tensors.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import DataError
from .model import GPT, GPTConfig

FORMAT = 1


def save(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found (run the train_speedrun stage first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-object files all land here
        raise DataError(f"checkpoint {path} cannot be loaded safely: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise DataError(f"checkpoint {path} is not a speedrun checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without compile/fp8 wrappers' prefixes; fp8 layers keep plain `weight` names.
    No copies: torch.save writes the live tensors, so a save needs no extra GPU memory."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def final_model_state(model: GPT, extra: dict) -> dict:
    return {"format": FORMAT, "config": dataclasses.asdict(model.cfg),
            "model": {k: v.cpu() for k, v in model_state(model).items()}, **extra}


def model_from_checkpoint(state: dict, device: torch.device, path: str = "checkpoint") -> GPT:
    """Rebuild the model a checkpoint was trained as; a mismatching state dict is a clear error."""
    from .model import build_model

    try:
        cfg = GPTConfig(**state["config"])
    except TypeError as e:
        raise DataError(f"{path}: model config not understood ({e})") from None
    model = build_model(cfg, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise DataError(f"{path}: weights do not match its config ({first})") from None
    return model
