"""Where the code runs and how: processes under torchrun, devices, FP8 availability, compilation.

Training and evaluation both build on this module (neither imports the other).
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .errors import SpeedrunError

if TYPE_CHECKING:
    from .model import GPT


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return rank, world, local


def finish_distributed() -> None:
    """Tear the process group down before exit: a gloo group left to interpreter shutdown can
    abort its rank ("terminate called without an active exception") after the work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def training_device(profile: str, local_rank: int) -> torch.device:
    """The CPU for the cpu-tiny profile, else this process's GPU (the gpu profile needs one)."""
    if profile == "cpu-tiny":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SpeedrunError("no CUDA GPU found: the gpu profile needs one. To run on CPU, use the tiny "
                            "test profile: dvc exp run -S train.profile=cpu-tiny")
    return torch.device("cuda", local_rank)


def pick_device(name: str) -> torch.device:
    """evaluate.device (auto | cuda | cpu) -> a device; under torchrun, this process's GPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "cuda" and not torch.cuda.is_available():
        raise SpeedrunError("evaluate.device=cuda but no CUDA GPU found: set evaluate.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, local) if name == "cuda" else torch.device(name)


def fp8_wanted(mode: str, device: torch.device, key: str) -> bool:
    """auto/on/off -> whether to use FP8 here (tensor cores with FP8 need compute capability 8.9+)."""
    if mode == "off" or device.type != "cuda":
        return False
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        if mode == "on":
            raise SpeedrunError(f"train.{key}=on needs compute capability >= 8.9; "
                                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: set train.{key}=auto")
        return False
    return True


def compile_regions(model: GPT) -> None:
    """Compile the block stack, the embedding prelude and the head/loss as regions of their own.

    The whole stack is one graph (model.run_blocks), so inductor fuses across block borders: the
    sums of x0's and the value embeddings' gradients over the blocks that read them, the skip
    adds, and no host gap between blocks. The table lookups stay outside (their backward writes
    .grad itself), and the fused head is a hand-written kernel.
    """
    # Each region compiles one graph per guard case (grad mode for validation, ...). Past dynamo's
    # recompile limit the rest would run EAGER, silently and far slower: raise it, and make a hit
    # an error rather than a quiet fallback.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    model.run_blocks = torch.compile(model.run_blocks, dynamic=False)
    model.embed_inputs = torch.compile(model.embed_inputs, dynamic=False)
    if not model.fused_ce:  # the fused head is a hand-written kernel already
        model.loss = torch.compile(model.loss, dynamic=False)
        model.mtp_loss = torch.compile(model.mtp_loss, dynamic=False)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (0 where it was never imported: nothing
    was compiled, and importing it only to read 0 costs seconds on a CPU-only machine)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    import torch._dynamo.utils as dyn_utils
    return dyn_utils.counters["stats"]["unique_graphs"]
