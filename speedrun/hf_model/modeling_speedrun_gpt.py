"""The speedrun GPT (modded-nanogpt architecture) as a transformers causal LM.

A faithful re-implementation of speedrun/model.py for inference, self-contained so that it runs
from a Hub folder with trust_remote_code=True. Differences from the training code, none of which
changes the numbers:
  * attention runs through SDPA with a dense bool mask built from input_ids (the training code
    uses FlexAttention block masks on GPU; its CPU path uses the same dense pattern as here);
  * rotary tables are computed per forward instead of being buffers, so loading never depends
    on how transformers materialises non-persistent buffers;
  * any sequence length works: the block-level window is computed as if the sequence were padded
    to a multiple of 128 tokens, which cannot change earlier positions (causal attention).
There is no KV cache: generation recomputes the whole sequence every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_speedrun_gpt import SpeedrunGPTConfig


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _select_recent(mask: Tensor, limit: Tensor) -> Tensor:
    """Keep, per query block, the `limit` most recent kv blocks among those set in `mask`."""
    rank = mask.flip(-1).cumsum(-1).flip(-1)  # 1 = most recent set block, 2 = the one before, ...
    return mask & (rank <= limit[..., None])


def document_window_masks(input_ids: Tensor, window_blocks: int, block_size: int, eot: int,
                          attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dense [B, 1, T, T] bool masks (long window, half window) with the training code's semantics.

    Training (speedrun/model.py) lists, per 128-token query block, kv blocks that are "full"
    (earlier blocks lying wholly inside the query block's single document) and "partial" (the
    diagonal block and blocks touching a document boundary), most recent first, and visits at most
    min(full, W - 1) full blocks and min(partial, max(W - full, 1)) partial ones. Inside visited
    blocks attention is causal and document-local (documents start at each <|endoftext|>).
    """
    B, T = input_ids.shape
    n = -(-T // block_size)
    # pad with a non-EOT id: the last block's document range, hence the block pattern, is unchanged
    ids = F.pad(input_ids, (0, n * block_size - T), value=0)
    docs = (ids == eot).cumsum(-1)                         # [B, n*bs] document index per token
    lo = docs.view(B, n, block_size)[..., 0]
    hi = docs.view(B, n, block_size)[..., -1]
    blk = torch.arange(n, device=ids.device)
    causal_any = blk[:, None] >= blk
    causal_all = blk[:, None] > blk
    doc_any = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    doc_all = (lo[:, :, None] == hi[:, None, :]) & (lo[:, None, :] == hi[:, :, None])
    full = causal_all & doc_all                             # [B, q_block, kv_block]
    partial = causal_any & doc_any & ~full
    full_n = full.sum(-1)

    docs = docs[:, :T]
    pos = torch.arange(T, device=ids.device)
    token_rule = (pos[:, None] >= pos) & (docs[:, :, None] == docs[:, None, :])  # [B, T, T]
    if attention_mask is not None:  # padded keys are never attended to
        token_rule = token_rule & attention_mask[:, None, :].bool()
    # a padded query still sees itself, so SDPA never meets an all-masked row (NaN)
    token_rule = token_rule | torch.eye(T, dtype=torch.bool, device=ids.device)

    def expand(wb: int) -> Tensor:
        w = torch.tensor(wb, device=ids.device)
        blocks = (_select_recent(full, torch.clamp(w - 1, min=0).expand_as(full_n))
                  | _select_recent(partial, torch.clamp(w - full_n, min=1)))
        dense = blocks.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :T, :T]
        return (dense & token_rule)[:, None]

    return expand(window_blocks), expand(max(window_blocks // 2, 1))


class CastedLinear(nn.Linear):
    """Linear without bias whose weight is cast to the activation dtype (as in training)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


def rotary(x_BTHD: Tensor) -> Tensor:
    """Half-truncated RoPE (base 1024): half the head dims rotate, the other half carry no position."""
    T, D = x_BTHD.size(-3), x_BTHD.size(-1)
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=D // 4, dtype=torch.float32, device=x_BTHD.device)
    freq = torch.cat([freq, freq.new_zeros(D // 4)])
    theta = torch.outer(torch.arange(T, dtype=torch.float32, device=x_BTHD.device), freq)
    cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHD)


def offset_keys(k: Tensor, input_ids: Tensor, eot: int) -> Tensor:
    """Partial key offset: the position-free dims ([d/4, d/2) and [3d/4, d)) of each key come from
    the previous token's key, except where a document starts (<|endoftext|>). k: [B, T, H, D]."""
    D = k.size(-1)
    prev = torch.cat([k[:, :1], k[:, :-1]], dim=1)
    prev = torch.where((input_ids != eot)[:, :, None, None], prev, k)
    rot = torch.arange(D, device=k.device) % (D // 2) < D // 4
    return torch.where(rot, k, prev)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SpeedrunGPTConfig, key_offset: bool = False, ve_gate: bool = False):
        super().__init__()
        self.n_head, self.head_dim, self.scale = cfg.n_head, cfg.head_dim, cfg.attn_scale
        self.n_kv = getattr(cfg, "n_kv_head", 0) or cfg.n_head
        hdim = cfg.n_head * cfg.head_dim
        if self.n_kv == self.n_head:
            self.qkv_w = nn.Parameter(torch.empty(3, hdim, cfg.model_dim))
        else:  # grouped-query attention: n_kv key/value heads, each read by n_head / n_kv query heads
            self.q_w = nn.Parameter(torch.empty(hdim, cfg.model_dim))
            self.kv_w = nn.Parameter(torch.empty(2, self.n_kv * cfg.head_dim, cfg.model_dim))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.c_proj = CastedLinear(hdim, cfg.model_dim)
        self.gate_dims = cfg.attn_gate_dims
        self.gate = CastedLinear(cfg.attn_gate_dims, cfg.n_head) if cfg.attn_gate else None
        self.key_offset, self.eot = key_offset, cfg.eot_token_id
        self.ve_gate_dims = getattr(cfg, "ve_gate_dims", 12)
        self.ve_gate = CastedLinear(self.ve_gate_dims, self.n_kv) if ve_gate else None

    def forward(self, x: Tensor, ve: Tensor | None, mask: Tensor, input_ids: Tensor) -> Tensor:
        B, T = x.size(0), x.size(1)
        w = (self.qkv_w.flatten(end_dim=1) if self.n_kv == self.n_head
             else torch.cat([self.q_w, self.kv_w.flatten(end_dim=1)]))
        H, D = self.n_head, self.head_dim
        q, k, v = F.linear(x, w.type_as(x)).split([H * D, self.n_kv * D, self.n_kv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, self.n_kv, D), v.view(B, T, self.n_kv, D)
        q, k = rotary(norm(q)), rotary(norm(k))
        if self.key_offset:
            k = offset_keys(k, input_ids, self.eot)
        v = self.lambdas[0] * v
        if ve is not None:
            ve = ve.view_as(v)
            if self.ve_gate is not None:  # per-head gate, 2 * sigmoid, read from the block input
                ve = ve * (2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_dims])))[..., None]
            v = v + self.lambdas[1] * ve
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.n_kv != H).transpose(1, 2)
        if self.gate is not None:  # per-head sigmoid gate read from the block input
            y = y * torch.sigmoid(self.gate(x[..., :self.gate_dims]))[..., None]
        return self.c_proj(y.contiguous().view(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = CastedLinear(dim, 4 * dim)
        self.c_proj = CastedLinear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: SpeedrunGPTConfig, layer: int, long_window: bool):
        super().__init__()
        k = cfg.value_embeds
        has_ve = layer < k or layer >= cfg.n_layer - k
        self.attn = CausalSelfAttention(
            cfg, key_offset=getattr(cfg, "key_offset", False) and long_window,
            ve_gate=getattr(cfg, "ve_gates", False) and has_ve) if layer != cfg.no_attn_layer else None
        self.mlp = MLP(cfg.model_dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask: Tensor, input_ids: Tensor,
                bigram: Tensor | None = None, bigram_lambda: Tensor | None = None) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if bigram is not None:
            x = x + bigram_lambda * bigram
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask, input_ids)
        return x + self.mlp(norm(x))


class SpeedrunGPTPreTrainedModel(PreTrainedModel):
    config_class = SpeedrunGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # only for weights a checkpoint does not provide (e.g. from_config); training has its own init
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)


class SpeedrunGPTForCausalLM(SpeedrunGPTPreTrainedModel, GenerationMixin):
    """Parameter names equal those of speedrun.model.GPT: the training state dict loads unchanged."""

    def __init__(self, config: SpeedrunGPTConfig):
        super().__init__(config)
        cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.value_embeds = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, (getattr(cfg, "n_kv_head", 0) or cfg.n_head) * cfg.head_dim)
            for _ in range(cfg.value_embeds))
        self.smear_gate = CastedLinear(cfg.smear_gate_dims, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        # long window on layers 0, 4, ... of each half (mirrored), half window elsewhere
        half = [i % 4 == 0 for i in range(cfg.n_layer // 2)]
        self.long_window = half + half[::-1]
        self.blocks = nn.ModuleList(Block(cfg, i, self.long_window[i]) for i in range(cfg.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        self.backout_layer = getattr(cfg, "backout_layer", -1)
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if self.backout_layer >= 0 else None
        bigram_vocab = getattr(cfg, "bigram_vocab", 0)
        if bigram_vocab:
            self.bigram = nn.Embedding(bigram_vocab, cfg.model_dim)
            self.bigram_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        else:
            self.bigram = self.bigram_lambdas = None
        self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        cfg = self.config
        long_mask, short_mask = document_window_masks(input_ids, cfg.window_blocks, cfg.block_size,
                                                      cfg.eot_token_id, attention_mask)
        x = self.embed(input_ids)
        # smear gate: add a gated copy of the previous token's embedding (never across documents)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :cfg.smear_gate_dims]))
        gate = gate * (input_ids[:, 1:, None] != cfg.eot_token_id)
        x = torch.cat([x[:, :1], x[:, 1:] + gate.type_as(x) * x[:, :-1]], dim=1)
        x = x0 = norm(x)
        ve = [emb(input_ids) for emb in self.value_embeds]
        ve = ve + [None] * (cfg.n_layer - 2 * len(ve)) + ve
        bigram = None
        if self.bigram is not None:
            # row of (previous token, token); the first position has its own row (the last)
            mod = cfg.bigram_vocab - 1
            t = input_ids.to(torch.int32)
            h = torch.bitwise_xor(cfg.bigram_mults[0] * t[:, 1:], cfg.bigram_mults[1] * t[:, :-1]) % mod
            bigram = self.bigram(torch.cat([torch.full_like(t[:, :1], mod), h], dim=1))
        skips, half, backout = [], cfg.n_layer // 2, None
        for i, block in enumerate(self.blocks):
            if i >= half:  # decoder half: add the mirrored encoder output (U-net)
                x = x + self.skip_weights[i - half] * skips.pop()
            extra = {} if bigram is None else {"bigram": bigram, "bigram_lambda": self.bigram_lambdas[i]}
            x = block(x, ve[i], x0, long_mask if self.long_window[i] else short_mask, input_ids, **extra)
            if i < half:
                skips.append(x)
            if i == self.backout_layer:
                backout = x
        if backout is not None:  # backout: minus a learned share of an early block's output
            x = x - self.backout_lambda.type_as(x) * backout
        return norm(x)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs) -> CausalLMOutput:
        if input_ids is None:
            raise ValueError("SpeedrunGPTForCausalLM needs input_ids (the masks derive from them)")
        cap = self.config.logit_cap
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask)).float()
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # the usual HF convention: labels are inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # no cache: the full sequence goes through the model at every step
        return {"input_ids": input_ids, "attention_mask": attention_mask}
