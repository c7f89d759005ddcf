"""GPT-2 (124M) class model of the speedrun, readable in one sitting.

The architecture is the modded-nanogpt line: rotary embeddings, QK RMS-norm, ReLU^2 MLP, RMS-norm
without gains, zero-initialised output projections, value embeddings mixed into the attention
values (U-net layer pattern), U-net skips with learned weights, a learned mix with the initial
embedding x0 in every block, a smear gate, soft-capped logits and an untied head. Three switches of
later records: a partial key offset, a backout of an early residual before the head, and per-head
gates on the value embeddings (params.yaml turns on the key offset only; all three are off in
GPTConfig's defaults, so that a checkpoint saved before they existed rebuilds the model it was
trained as). Grouped-query attention (n_kv_head; params.yaml: one k/v head, as the public 4090
recipe) shares each key/value head, and narrows the value embeddings, across n_head / n_kv_head
query heads.

Attention runs through FlexAttention over ONE flat sequence per micro-batch (batch size 1): the
block mask keeps it causal, inside each document (documents start at token 50256) and inside a
sliding window. The window is a device tensor, so growing it during training never recompiles.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import embedding
from .embedding import Embedding
from .fp8 import forward_fp8_linear
from .head import mtp_targets, softcap_cross_entropy, softcap_mtp_loss
from .mlp import relu2_mlp

EOT_ID = 50256          # <|endoftext|>: placed before every document by tokenize_shards
BLOCK_SIZE = 128        # FlexAttention block size; windows and sequence lengths are multiples of it
ATTN_SCALE = 0.12       # fixed softmax scale with QK-norm (modded-nanogpt; ~1/sqrt(head_dim) is too soft)
SMEAR_GATE_DIMS = 12    # the smear gate reads this many leading embedding dims
ATTN_GATE_DIMS = 12     # the attention gate reads this many leading dims of the block input
VE_GATE_DIMS = 12       # the value-embedding gates read this many leading dims of the block input
BIGRAM_MULTS = (36313, 27191)   # hash of (token, previous token): products stay below 2^31

# FlexAttention must always run compiled: its eager fallback materialises the full score matrix
# and ignores the BlockMask's block sparsity, i.e. it would silently drop the sliding window.
# Where CUDA is available it is compiled here, before any compiled block traces a call to it; on a
# CPU-only machine (no BlockMask reaches it: CPU attention takes the dense mask) on first call,
# which keeps dynamo and inductor out of every CPU process's imports (~5 s on a slow CI core).
if torch.cuda.is_available():
    _flex_attention = torch.compile(flex_attention, dynamic=False)
else:
    def _flex_attention(*args, **kwargs):
        global _flex_attention
        _flex_attention = torch.compile(flex_attention, dynamic=False)
        return _flex_attention(*args, **kwargs)

@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    model_dim: int = 768
    n_head: int = 6
    head_dim: int = 128
    n_kv_head: int = 0         # key/value heads, each shared by n_head / n_kv_head query heads; 0 = n_head
    value_embeds: int = 3
    no_attn_layer: int = 7
    logit_cap: float = 30.0
    attn_gate: bool = False    # per-head sigmoid gate on the attention output (modded-nanogpt)
    bigram_vocab: int = 0      # rows of the hashed-bigram embedding added in every block; 0 = none
    key_offset: bool = False   # long-window layers' keys carry the previous token's position-free dims
    backout_layer: int = -1    # subtract a learned share of this block's output before the head; -1 = none
    ve_gates: bool = False     # per-head sigmoid gates on the value embeddings (modded-nanogpt)
    max_seq_len: int = 65536   # rotary table length: the longest flat sequence a forward sees

    def validate(self) -> None:
        if self.n_layer % 2:
            raise ValueError("n_layer must be even (U-net skips pair the two halves)")
        if not 0 <= self.value_embeds <= self.n_layer // 2:
            raise ValueError("value_embeds must be in 0..n_layer/2")
        if self.head_dim % 4:
            raise ValueError("head_dim must be a multiple of 4 (half-truncated rotary)")
        if self.bigram_vocab == 1:
            raise ValueError("bigram_vocab must be 0 (off) or >= 2")
        if not -1 <= self.backout_layer < self.n_layer - 1:
            raise ValueError("backout_layer must be -1 (off) or a block before the last")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ValueError("n_kv_head must be 0 (= n_head) or divide n_head")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Linear layer whose fp32 master weight is cast to the activation dtype (bf16 on GPU)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        with torch.no_grad():
            if zero_init:
                self.weight.zero_()
            else:
                bound = math.sqrt(3) * 0.5 * in_features ** -0.5  # std 0.5/sqrt(fan_in)
                self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Half-truncated RoPE: half of the head dims rotate (base 1024), the other half carry no position."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freq)
        self.cos = nn.Buffer(theta.cos(), persistent=False)
        self.sin = nn.Buffer(theta.sin(), persistent=False)

    def forward(self, x_BTHD: Tensor) -> Tensor:
        T = x_BTHD.size(-3)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x_BTHD.float().chunk(2, dim=-1)
        y = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
        return y.type_as(x_BTHD)


def offset_keys(k: Tensor, prev_ok: Tensor) -> Tensor:
    """Partial key offset (modded-nanogpt): the position-free half of each key's dims (the zero-
    frequency rotary dims, [d/4, d/2) and [3d/4, d)) is taken from the previous token's key, so one
    attention layer can match "the token after an earlier copy of mine" (an induction head).
    `prev_ok` [T] is False where a document starts: such a key keeps its own dims, so nothing of
    the previous document leaks in. k: [B, T, H, D] after rotary."""
    D = k.size(-1)
    prev = torch.cat([k[:, :1], k[:, :-1]], dim=1)
    prev = torch.where(prev_ok[None, :, None, None], prev, k)
    rot = torch.arange(D, device=k.device) % (D // 2) < D // 4   # the rotating dims stay
    return torch.where(rot, k, prev)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, key_offset: bool = False, ve_gate: bool = False):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        hdim = cfg.n_head * cfg.head_dim
        bound = math.sqrt(3) * 0.5 * cfg.model_dim ** -0.5
        if self.n_kv == self.n_head:
            # q, k and v weights in one tensor: one matmul, and Muon orthogonalises each 2-D slice alike
            self.qkv_w = nn.Parameter(torch.empty(3, hdim, cfg.model_dim).uniform_(-bound, bound))
        else:
            # grouped-query attention: fewer k/v heads, each read by n_head / n_kv query heads.
            # Muon still orthogonalises q, k and v each on its own; one matmul computes all three
            kv_dim = self.n_kv * cfg.head_dim
            self.q_w = nn.Parameter(torch.empty(hdim, cfg.model_dim).uniform_(-bound, bound))
            self.kv_w = nn.Parameter(torch.empty(2, kv_dim, cfg.model_dim).uniform_(-bound, bound))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of v and the value embedding
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len)
        self.c_proj = CastedLinear(hdim, cfg.model_dim, zero_init=True)
        # lets a head switch itself off per token (a learned "no-op" instead of attending to the
        # first token as an attention sink); zero init = every head at 0.5
        self.gate = CastedLinear(ATTN_GATE_DIMS, cfg.n_head, zero_init=True) if cfg.attn_gate else None
        self.key_offset = key_offset
        # per-head gate on the value embedding, 2 * sigmoid(...): zero init = x1, the ungated model
        self.ve_gate = CastedLinear(VE_GATE_DIMS, self.n_kv, zero_init=True) if ve_gate else None
        self.fp8 = False   # e4m3 operands in the forward of the q/k/v and output projections (fp8.py)

    def qkv_weight(self) -> Tensor:
        """The q, k and v weights as one [(n_head + 2 n_kv) * head_dim, dim] matrix."""
        if self.n_kv == self.n_head:
            return self.qkv_w.flatten(end_dim=1)
        return torch.cat([self.q_w, self.kv_w.flatten(end_dim=1)])

    def forward(self, x: Tensor, ve: Tensor | None, block_mask: BlockMask | Tensor,
                prev_ok: Tensor | None = None) -> Tensor:
        B, T = x.size(0), x.size(1)
        fp8 = self.fp8 and torch.is_grad_enabled()   # training only, as the FP8 MLP and head
        linear = forward_fp8_linear if fp8 else F.linear
        H, D = self.n_head, self.head_dim
        q, k, v = linear(x, self.qkv_weight().type_as(x)).split([H * D, self.n_kv * D, self.n_kv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, self.n_kv, D), v.view(B, T, self.n_kv, D)
        q, k = self.rotary(norm(q)), self.rotary(norm(k))
        if self.key_offset:
            k = offset_keys(k, prev_ok)
        v = self.lambdas[0] * v
        if ve is not None:
            ve = ve.view_as(v)
            if self.ve_gate is not None:
                ve = ve * (2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_DIMS])))[..., None]
            v = v + self.lambdas[1] * ve
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv != H
        if isinstance(block_mask, BlockMask):
            y = _flex_attention(q, k, v, block_mask=block_mask, scale=ATTN_SCALE, enable_gqa=gqa)
        else:  # dense bool mask of the same pattern: CPU (FlexAttention has no CPU backward)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, scale=ATTN_SCALE, enable_gqa=gqa)
        y = y.transpose(1, 2)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x[..., :ATTN_GATE_DIMS]))[..., None]
        y = y.contiguous().view(B, T, self.n_head * self.head_dim)
        return linear(y, self.c_proj.weight.type_as(y))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = CastedLinear(dim, 4 * dim)
        self.c_proj = CastedLinear(4 * dim, dim, zero_init=True)
        self.fused = False   # ReLU^2 inside the matmul kernels (mlp.py); same weights, same function
        self.fp8 = False     # ... with FP8 operands in those kernels (only where fused)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            # FP8 in training only: a validation loss (no autograd) carries no FP8 rounding, as
            # with the FP8 head, so it is the loss of the bf16 model that evaluate/export run
            fp8 = self.fp8 and torch.is_grad_enabled()
            return relu2_mlp(x, self.c_fc.weight.type_as(x), self.c_proj.weight.type_as(x), fp8)
        return self.c_proj(F.relu(self.c_fc(x)).square())


def value_embed_table(cfg: GPTConfig, layer: int) -> int | None:
    """Which value-embedding table feeds `layer`: tables 0..k-1 feed the first k layers and again
    the last k (U-net pattern 012 ... 012); None for the layers in between."""
    k = cfg.value_embeds
    if layer < k:
        return layer
    if layer >= cfg.n_layer - k:
        return layer - (cfg.n_layer - k)
    return None


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int, long_window: bool = False):
        super().__init__()
        has_ve = value_embed_table(cfg, layer) is not None
        self.attn = CausalSelfAttention(cfg, key_offset=cfg.key_offset and long_window,
                                        ve_gate=cfg.ve_gates and has_ve) if layer != cfg.no_attn_layer else None
        self.mlp = MLP(cfg.model_dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # x <- a*x + b*x0

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, block_mask: BlockMask | Tensor,
                skip: Tensor | None = None, skip_weight: Tensor | None = None,
                bigram: Tensor | None = None, bigram_lambda: Tensor | None = None,
                prev_ok: Tensor | None = None) -> Tensor:
        if skip is not None:  # U-net skip, added here so it fuses into the compiled block
            x = x + skip_weight * skip
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if bigram is not None:
            x = x + bigram_lambda * bigram
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, block_mask, prev_ok)
        return x + self.mlp(norm(x))


def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense [q_block, kv_block] bool mask -> (counts, kv indices), most recent kv block first."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.argsort(dim=-1, descending=False, stable=True).flip(-1).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def document_window_masks(tokens: Tensor, window_blocks: Tensor) -> tuple[BlockMask, BlockMask]:
    """Causal, document-local, sliding-window block masks: (long window, half window).

    Built straight from block-level bookkeeping (no dense token-level mask), so it costs
    microseconds. The window counts whole 128-token blocks; `window_blocks` is an int32 device
    tensor and only clamps the block counts, so changing it never triggers a recompile.
    """
    T = tokens.numel()
    n = T // BLOCK_SIZE
    docs = (tokens == EOT_ID).cumsum(0)
    docs_lo = docs.view(n, BLOCK_SIZE)[:, 0].contiguous()
    docs_hi = docs.view(n, BLOCK_SIZE)[:, -1].contiguous()

    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    blk = torch.arange(n, dtype=torch.int32, device=tokens.device)
    causal_any = blk[:, None] >= blk
    causal_all = blk[:, None] > blk
    doc_any = (docs_lo[:, None] <= docs_hi) & (docs_lo <= docs_hi[:, None])
    doc_all = (docs_lo[:, None] == docs_hi) & (docs_lo == docs_hi[:, None])
    any_bm = causal_any & doc_any
    all_bm = causal_all & doc_all
    partial_n, partial_idx = _dense_to_ordered(any_bm & ~all_bm)
    full_n, full_idx = _dense_to_ordered(all_bm)

    def build(wb: Tensor) -> BlockMask:
        return BlockMask.from_kv_blocks(
            torch.clamp_max(partial_n, torch.clamp_min(wb - full_n, 1)), partial_idx,
            torch.clamp_max(full_n, wb - 1), full_idx,
            BLOCK_SIZE=BLOCK_SIZE, mask_mod=doc_causal)

    return build(window_blocks), build(torch.clamp_min(window_blocks // 2, 1))


def dense_mask(block_mask: BlockMask, tokens: Tensor) -> Tensor:
    """Token-level bool mask [T, T] that attends exactly where `block_mask` does.

    FlexAttention visits the kv blocks the BlockMask lists and applies the mask_mod inside them;
    expanding the block pattern to tokens and AND-ing the document-causal rule gives the same set.
    Costs O(T^2): for the CPU profile and for exported models, not for GPU training.
    """
    T = tokens.numel()
    blocks = block_mask.to_dense()[0, 0].bool()
    allowed = blocks.repeat_interleave(BLOCK_SIZE, 0).repeat_interleave(BLOCK_SIZE, 1)[:T, :T]
    docs = (tokens == EOT_ID).cumsum(0)
    pos = torch.arange(T, device=tokens.device)
    return allowed & (pos[:, None] >= pos) & (docs[:, None] == docs)


def bigram_hash(tokens: Tensor, n_rows: int) -> Tensor:
    """Row of the (previous token, token) pair in a bigram table of n_rows (int32 math).

    The first position has no previous token here and gets its own row (n_rows - 1). Pairs
    across a document border hash like any other: the border token 50256 is part of the pair.
    """
    mod = n_rows - 1
    t = tokens.to(torch.int32)
    h = torch.bitwise_xor(BIGRAM_MULTS[0] * t[1:], BIGRAM_MULTS[1] * t[:-1]) % mod
    return torch.cat([t.new_full((1,), mod), h])


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.model_dim)
        self.value_embeds = nn.ModuleList(
            Embedding(cfg.vocab_size, cfg.kv_heads * cfg.head_dim) for _ in range(cfg.value_embeds))
        self.smear_gate = CastedLinear(SMEAR_GATE_DIMS, 1, zero_init=True)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        # long window on layers 0, 4 of each half (mirrored), half window elsewhere: most layers
        # only need local context, and short windows are cheaper
        half = [i % 4 == 0 for i in range(cfg.n_layer // 2)]
        self.long_window = half + half[::-1]
        self.blocks = nn.ModuleList(Block(cfg, i, self.long_window[i]) for i in range(cfg.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        # backout (modded-nanogpt): the final state minus a learned share of an early block's
        # output, which the later layers needed as context but the prediction does not
        self.backout_lambda = nn.Parameter(torch.tensor([0.5])) if cfg.backout_layer >= 0 else None
        if cfg.bigram_vocab:
            # hashed (previous token, token) embedding mixed into every block (modded-nanogpt):
            # zero init, so it starts as a no-op; 5 x vocab rows keep collisions rare
            self.bigram = Embedding(cfg.bigram_vocab, cfg.model_dim)
            nn.init.zeros_(self.bigram.weight)
            self.bigram_lambdas = nn.Parameter(torch.full((cfg.n_layer,), 0.1))
        else:
            self.bigram = self.bigram_lambdas = None
        self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        # execution switches of the head/loss (not architecture: same weights, same function)
        self.fused_ce = True    # Triton soft-capped CE where it can run (see head.py)
        self.fp8_head = False   # FP8 head matmuls (Hopper/Ada)
        self.fast_tanh = False  # approximate tanh instruction in the fused CE's training pass

    def value_embed_per_layer(self, tokens: Tensor) -> list[Tensor | None]:
        """Each layer's value embedding (value_embed_table), every table looked up once."""
        ve = [emb(tokens) for emb in self.value_embeds]
        return [None if (t := value_embed_table(self.cfg, i)) is None else ve[t]
                for i in range(self.cfg.n_layer)]

    @staticmethod
    def attention_masks(tokens: Tensor, window_blocks: Tensor) -> tuple[BlockMask | Tensor, BlockMask | Tensor]:
        """(long, short) window masks of a sequence: BlockMasks on GPU, dense bool masks on CPU."""
        long_bm, short_bm = document_window_masks(tokens, window_blocks)
        if not tokens.is_cuda:
            long_bm, short_bm = dense_mask(long_bm, tokens), dense_mask(short_bm, tokens)
        return long_bm, short_bm

    def hidden_states(self, tokens: Tensor, window_blocks: Tensor, masks: tuple | None = None,
                      independent_starts: Tensor | None = None) -> Tensor:
        """tokens: 1-D int tensor (a multiple of 128 long) -> final normed states [1, T, dim].

        `masks`: this sequence's `attention_masks`, when the caller built them ahead of time.
        `independent_starts` ([T] bool, None in training): positions whose bigram pair must not
        reach back into the sequence before (they take the first position's row), so that
        sequences packed into one pass (scoring, hellaswag.py) compute what each computes alone;
        smear and key offset already stop at every document's <|endoftext|>."""
        long_bm, short_bm = masks if masks is not None else self.attention_masks(tokens, window_blocks)
        # table lookups outside the compiled regions: their backward writes .grad itself (embedding.py)
        x0 = self.embed_inputs(self.embed(tokens), tokens)
        bigram = None
        if self.bigram is not None:
            rows = bigram_hash(tokens, self.cfg.bigram_vocab)
            if independent_starts is not None:
                rows = rows.masked_fill(independent_starts, self.cfg.bigram_vocab - 1)
            bigram = self.bigram(rows)[None]
        prev_ok = tokens != EOT_ID if self.cfg.key_offset else None   # no key offset across documents
        return self.run_blocks(x0, self.value_embed_per_layer(tokens), long_bm, short_bm, prev_ok, bigram)

    def run_blocks(self, x0: Tensor, ve: list[Tensor | None], long_bm: BlockMask | Tensor,
                   short_bm: BlockMask | Tensor, prev_ok: Tensor | None, bigram: Tensor | None) -> Tensor:
        """The block stack, from x0 to the final normed states: one function, so that it compiles
        as one graph (train.compile_regions)."""
        x = x0
        skips, backout = [], None
        half = self.cfg.n_layer // 2
        for i, block in enumerate(self.blocks):
            mask = long_bm if self.long_window[i] else short_bm
            extra = {} if bigram is None else {"bigram": bigram, "bigram_lambda": self.bigram_lambdas[i]}
            if block.attn is not None and block.attn.key_offset:
                extra["prev_ok"] = prev_ok
            if i < half:
                x = block(x, ve[i], x0, mask, **extra)
                skips.append(x)
            else:  # decoder half: the mirrored encoder output joins through a learned weight
                x = block(x, ve[i], x0, mask, skips.pop(), self.skip_weights[i - half], **extra)
            if i == self.cfg.backout_layer:
                backout = x
        if backout is not None:
            x = x - self.backout_lambda.type_as(x) * backout
        return norm(x)

    def embed_inputs(self, x: Tensor, tokens: Tensor) -> Tensor:
        """Token embeddings x [T, dim] -> smear gate, norm: x0 [1, T, dim], the input of every block."""
        # smear gate: add a gated copy of the previous token's embedding (not across documents)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[1:, :SMEAR_GATE_DIMS]))
        gate = gate * (tokens[1:, None] != EOT_ID)
        x = torch.cat([x[:1], x[1:] + gate.type_as(x) * x[:-1]])
        return norm(x[None])

    def logits(self, x: Tensor) -> Tensor:
        cap = self.cfg.logit_cap
        logits = self.lm_head(x).float()
        return cap * torch.tanh(logits / cap)

    def loss(self, x: Tensor, targets: Tensor) -> Tensor:
        return softcap_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets,
                                     self.cfg.logit_cap, fused=self.fused_ce, fp8=self.fp8_head,
                                     fast_tanh=self.fast_tanh)

    def mtp_loss(self, x: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        return softcap_mtp_loss(x.view(-1, x.size(-1)), self.lm_head.weight,
                                mtp_targets(targets, weights.numel()), weights, self.cfg.logit_cap,
                                fused=self.fused_ce, fp8=self.fp8_head, fast_tanh=self.fast_tanh)

    def forward(self, tokens: Tensor, targets: Tensor, window_blocks: Tensor) -> Tensor:
        """Mean cross-entropy of next-token prediction over the flat sequence."""
        return self.loss(self.hidden_states(tokens, window_blocks), targets)

    def train_loss(self, tokens: Tensor, targets: Tensor, window_blocks: Tensor,
                   mtp_weights: Tensor | None, masks: tuple | None = None) -> tuple[Tensor, Tensor]:
        """(objective to minimise, next-token CE to report). With multi-token prediction the
        objective adds weighted CE terms for the tokens after the next (weights: device tensor
        [1 + extra], see schedule.mtp_weights); without it both are the next-token CE."""
        x = self.hidden_states(tokens, window_blocks, masks)
        if mtp_weights is None:
            loss = self.loss(x, targets)
            return loss, loss.detach()
        return self.mtp_loss(x, targets, mtp_weights)


def build_model(cfg: GPTConfig, device: torch.device) -> GPT:
    model = GPT(cfg).to(device)
    if device.type == "cuda":
        # activations start (and stay) bf16. The tables keep fp32 master weights like the linear
        # layers and look up bf16 rows (embedding.py); GRAD_MODE "dense" = bf16 nn.Embedding tables
        for m in model.modules():
            if isinstance(m, Embedding):
                if embedding.GRAD_MODE == "accumulate":
                    m.out_dtype = torch.bfloat16
                else:
                    m.accumulate = False
                    m.bfloat16()
    return model


def param_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Which optimizer owns which parameter: Muon takes the hidden matrices, Adam the rest."""
    # the attention and value-embedding gates are tiny [heads, 12] matrices: Adam with the
    # scalars, not Muon
    hidden = [p for n, p in model.blocks.named_parameters()
              if p.ndim >= 2 and not n.split(".")[-2].endswith("gate")]
    embed = [model.embed.weight, *[e.weight for e in model.value_embeds]]
    if model.bigram is not None:
        embed.append(model.bigram.weight)
    head = [model.lm_head.weight]
    seen = {id(p) for p in hidden + embed + head}
    scalars = [p for p in model.parameters() if id(p) not in seen]
    return {"hidden": hidden, "embed": embed, "head": head, "scalar": scalars}


def matmul_params(model: GPT) -> int:
    """Parameters that cost 6 FLOPs per token in training (everything but the embedding lookups)."""
    tables = [model.embed, *model.value_embeds, *([model.bigram] if model.bigram is not None else [])]
    lookups = sum(t.weight.numel() for t in tables)
    return sum(p.numel() for p in model.parameters()) - lookups


def flops_per_token(cfg: GPTConfig, n_matmul_params: int, mean_window: float) -> float:
    """Training FLOPs per token: 6 per matmul weight plus attention scores and values.

    Attention per layer and token: 2 matmuls (QK^T and AV) of 2*head_dim*n_head FLOPs per key
    seen, ~mean_window/2 keys on average under a causal window, times 3 for forward+backward.
    """
    attn_layers = cfg.n_layer - (1 if 0 <= cfg.no_attn_layer < cfg.n_layer else 0)
    attn = attn_layers * 3 * 2 * 2 * cfg.n_head * cfg.head_dim * (mean_window / 2)
    return 6 * n_matmul_params + attn
