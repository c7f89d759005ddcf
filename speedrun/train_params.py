"""params.yaml's `train` section: its keys and checks, and what the cpu-tiny profile makes of them.

Both recipes read the section's run control (profile, processes, seed, validation, checkpoints,
compile, warm-up); the classic recipe's model, batch and optimizer keys are read by
speedrun/train.py alone (the record recipe's own keys: the `record` section, speedrun/record/).
"""
from __future__ import annotations

import dataclasses

from .errors import ParamError
from .model import BLOCK_SIZE, GPTConfig
from .params import multiple_of, param
from .schedule import BatchSchedule


@dataclasses.dataclass
class TrainParams:
    recipe: str = param("record", choices=["record", "classic"])
    profile: str = param("gpu", choices=["gpu", "cpu-tiny"])
    nproc: int = param(1, ge=1, le=8)
    seed: int = param(1337, ge=0)
    vocab_size: int = param(50304, ge=50257)
    n_layer: int = param(12, ge=2, check=lambda v: None if v % 2 == 0 else "must be even")
    model_dim: int = param(768, ge=16)
    n_head: int = param(6, ge=1)
    head_dim: int = param(128, ge=8, check=lambda v: None if v % 4 == 0 else "must be a multiple of 4")
    n_kv_head: int = param(1, ge=0)
    value_embeds: int = param(3, ge=0)
    no_attn_layer: int = param(7, ge=-1)
    logit_cap: float = param(30.0, gt=0)
    attn_gate: bool = param(False)
    bigram_vocab: int = param(0, ge=0, check=lambda v: None if v != 1 else "must be 0 (off) or >= 2")
    key_offset: bool = param(True)
    backout_layer: int = param(-1, ge=-1)
    ve_gates: bool = param(False)
    batch_tokens: int = param(524288, ge=BLOCK_SIZE)
    micro_batch_tokens: int = param(32768, ge=BLOCK_SIZE, check=multiple_of(BLOCK_SIZE))
    batch_stages: list[float] = param([1.0], gt=0, le=1)
    batch_stage_lr: list[float] = param([1.0], gt=0)
    steps: int = param(1400, ge=1)
    window_start: int = param(256, ge=BLOCK_SIZE, check=multiple_of(BLOCK_SIZE))
    window_end: int = param(1792, ge=BLOCK_SIZE, check=multiple_of(BLOCK_SIZE))
    muon_lr: float = param(0.05, gt=0)
    muon_momentum_start: float = param(0.85, ge=0, lt=1)
    muon_momentum_end: float = param(0.95, ge=0, lt=1)
    muon_momentum_warmup: int = param(300, ge=0)
    muon_ns_steps: int = param(5, ge=1, le=20)
    muon_coeffs: str = param("polar-express", choices=["newton-schulz", "polar-express"])
    muon_normuon: bool = param(True)
    muon_weight_decay: float = param(0.0, ge=0)
    embed_lr: float = param(0.6, gt=0)
    head_lr: float = param(0.008, gt=0)
    scalar_lr: float = param(0.04, gt=0)
    adam_beta1: float = param(0.8, ge=0, lt=1)
    adam_beta2: float = param(0.95, ge=0, lt=1)
    mtp_weights: list[float] = param([], ge=0)
    cooldown_frac: float = param(0.4, ge=0, le=1)
    final_lr_frac: float = param(0.1, ge=0, le=1)
    val_every: int = param(125, ge=0)
    val_tokens: int = param(10485760, ge=BLOCK_SIZE)
    target_val_loss: float = param(3.28, gt=0)
    ckpt_every: int = param(200, ge=0)
    compile: bool = param(True)
    fp8: str = param("off", choices=["auto", "on", "off"])
    fp8_head: str = param("auto", choices=["auto", "on", "off"])
    fused_ce: bool = param(True)
    fused_mlp: bool = param(True)
    fp8_mlp: str = param("auto", choices=["auto", "on", "off"])
    fp8_attn: str = param("off", choices=["auto", "on", "off"])
    fast_tanh: bool = param(True)
    warmup_steps: int = param(3, ge=0)

    def validate(self) -> None:
        p = effective(self)
        if p.batch_tokens % p.micro_batch_tokens:
            raise ParamError(f"params.yaml: train.batch_tokens ({p.batch_tokens}) must be a multiple "
                             f"of train.micro_batch_tokens ({p.micro_batch_tokens})")
        if p.val_tokens % p.micro_batch_tokens:
            raise ParamError(f"params.yaml: train.val_tokens ({p.val_tokens}) must be a multiple "
                             f"of train.micro_batch_tokens ({p.micro_batch_tokens})")
        if p.value_embeds > p.n_layer // 2:
            raise ParamError(f"params.yaml: train.value_embeds must be <= n_layer/2 ({p.n_layer // 2})")
        if p.n_kv_head and p.n_head % p.n_kv_head:
            raise ParamError(f"params.yaml: train.n_kv_head ({p.n_kv_head}) must divide train.n_head "
                             f"({p.n_head}); 0 = one key/value head per query head")
        if p.backout_layer >= p.n_layer - 1:
            raise ParamError(f"params.yaml: train.backout_layer must be -1 (off) or a block before the "
                             f"last (0..{p.n_layer - 2}), got {p.backout_layer}")
        if p.window_end < p.window_start:
            raise ParamError("params.yaml: train.window_end must be >= train.window_start")
        if not p.batch_stages:
            raise ParamError("params.yaml: train.batch_stages must list at least one fraction ([1.0]: constant)")
        if p.batch_stage_lr and len(p.batch_stage_lr) != len(p.batch_stages):
            raise ParamError(f"params.yaml: train.batch_stage_lr needs one multiplier per batch stage "
                             f"({len(p.batch_stages)}), got {len(p.batch_stage_lr)}; [] = x1 for every stage")
        if len(p.batch_stages) > p.steps:
            raise ParamError("params.yaml: train.batch_stages has more stages than train.steps")
        if len(p.mtp_weights) > 3:
            raise ParamError("params.yaml: train.mtp_weights takes at most 3 extra targets")


# The tiny CPU profile: same code path, a model small enough to train in seconds on a laptop CPU.
CPU_TINY = dict(n_layer=2, model_dim=64, n_head=2, head_dim=32, value_embeds=1, no_attn_layer=-1,
                batch_tokens=1024, micro_batch_tokens=256, window_start=128, window_end=256,
                compile=False, fp8="off", fp8_head="off", fp8_mlp="off", fp8_attn="off",
                warmup_steps=0)
# ...and its run length and validation size, where params.yaml leaves the GPU run's (a full
# validation split is minutes of CPU per pass): both recipes; an explicit value is kept
CPU_TINY_RUN = dict(steps=20, val_tokens=8192)


def tiny_run_sizes(p: TrainParams) -> TrainParams:
    """cpu-tiny: CPU_TINY_RUN's steps and validation size for the keys params.yaml leaves at default."""
    if p.profile != "cpu-tiny":
        return p
    default = TrainParams()
    return dataclasses.replace(p, **{k: v for k, v in CPU_TINY_RUN.items() if getattr(p, k) == getattr(default, k)})


def effective(p: TrainParams) -> TrainParams:
    """The parameters a run trains with: under cpu-tiny, CPU_TINY replaces params.yaml's."""
    if p.profile != "cpu-tiny":
        return p
    # the tiny model has 2 blocks: a backout (if on) takes the first one's output
    return tiny_run_sizes(dataclasses.replace(p, **CPU_TINY,
                                              backout_layer=min(p.backout_layer, CPU_TINY["n_layer"] - 2)))


def batch_schedule(p: TrainParams, world: int = 1) -> BatchSchedule:
    """Tokens per step over the run; every stage a whole number of micro-batches on each process."""
    s = BatchSchedule(p.steps, p.batch_tokens, p.batch_stages, p.batch_stage_lr, p.micro_batch_tokens * world)
    if min(s.tokens_per_stage) == 0:
        raise ParamError(f"params.yaml: train.batch_stages {p.batch_stages} of {p.batch_tokens:,} tokens leaves "
                         f"a stage with no whole micro-batch of {p.micro_batch_tokens:,} x {world} process(es)")
    return s


def model_config(p: TrainParams) -> GPTConfig:
    return GPTConfig(vocab_size=p.vocab_size, n_layer=p.n_layer, model_dim=p.model_dim,
                     n_head=p.n_head, head_dim=p.head_dim, n_kv_head=p.n_kv_head, value_embeds=p.value_embeds,
                     no_attn_layer=p.no_attn_layer, logit_cap=p.logit_cap, attn_gate=p.attn_gate,
                     bigram_vocab=p.bigram_vocab, key_offset=p.key_offset, backout_layer=p.backout_layer,
                     ve_gates=p.ve_gates, max_seq_len=p.micro_batch_tokens)


