"""The GPT of modded-nanogpt's track-1 record #89 (2026-07-17), readable in one sitting.

Eleven layers of width 768, six heads of 128. What each layer does is fixed by the recipe:

    layer  attention                                  value embedding   extra
    0      paired heads, short window                 -                 x0 + bigram injected before it
    1      short, XSA                                 table 0 (gated)
    2      paired heads, short                        table 1 (gated)
    3      long window + key offset, XSA, gate        -                 output kept (cache 3)
    4      short, XSA                                 -                 post gates made from its input
    5      paired heads, short                        -
    6      none: adds a gated copy of cache 3         -
    7      short, XSA                                 -                 output kept (cache 7)
    8      short, reads cache 7                       table 2 (gated)
    9      paired heads, short, reads cache 7         table 3 (gated)   its input kept (cache 9)
    10     long + key offset, reads cache 7, DC, gate table 4 (MUDD)    MUDD mixes caches in

Every layer adds x0 (the normed smeared embedding) and the hashed-bigram embedding with
per-token weights from the gates (mudd.py), and scales its residual and branch outputs by
learned per-layer lambdas. After the last layer a second MUDD adds the caches back, then the
head (loss.py). Weights live in banks, one per optimizer treatment (optimizer.py): Q and K per
head pair and layer (`qk_bank`), V and O per layer (`vo_bank`), the MLPs (`mlp_bank`, a 12th
unused layer as the record has it). Parameter names, shapes, dtypes, initialisation and the
order of random draws are the record's, so `torch.manual_seed(s)` gives both the same weights.

Attention is attention.py (FlexAttention with document and window masks), DC is dc.py, the MLP
mlp.py (FP8 forward in training on a GPU), the rotary yarn.py. `hidden_states` is one function
of tensors, so it compiles into one graph; the head's loss runs outside it (a Triton kernel).
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mudd import (GATE_COEFS, HIDDEN, MUDD_COEFS, MUDD_SCALE, POST_ATTN_GATE, POST_DC,
                   POST_GATE_LAYER, POST_INJECT, POST_SKIP, POST_XSA, PRE_ATTN_GATE, PRE_INJECT,
                   PRE_XSA, coefficient_mlp, gate_bias_init, kaiming_rows, mudd_bias_init)
from .attention import Masks, attend, flex_kernel_options, xsa
from .bigram import sign_ids, sign_table
from .dc import dc_correct, dc_weights
from .lookup import lookup
from .loss import eval_losses, rescale, train_losses
from .mlp import ACT_HEADROOM, E4M3_MAX, FP8State, relu2_mlp
from .yarn import Yarn, rotary

NUM_LAYERS = 11
NUM_HEADS = 6
SKIP_LAYER = 6                       # no attention
PAIRED = (0, 2, 5, 9)                # paired-head attention
XSA = (1, 3, 4, 7)
LONG = (3, 10)                       # long window (and key offset); the rest short
ATTN_GATE = (3, 10)
DC_LAYER = 10
CACHED = (3, 7)                      # outputs kept for later layers
READS_CACHE_7 = (8, 9, 10)           # attention input is norm(cache 7), not the stream
VALUE_EMBED = {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}   # layer -> value-embedding table
SMEAR_DIMS = 12                      # the smear gate reads this many embedding dims
VE_GATE_DIMS = 6                     # ... the value-embedding gates this many of x and of ve
GRAD_SCALE = 1 / 8                   # the record's per-micro-batch loss scale (1 / 8 accumulation steps)


@dataclasses.dataclass
class RecordConfig:
    vocab_size: int = 50304
    model_dim: int = 768
    head_dim: int = 128
    bigram_vocab: int = 377280       # 50304 * 15 // 2 rows of the hashed bigram table
    bigram_sign_rows: int = 8192
    max_seq_len: int = 262144        # rotary table rows: the longest micro-batch (validation's)

    def validate(self) -> None:
        if self.model_dim != NUM_HEADS * self.head_dim:
            raise ValueError(f"model_dim must be {NUM_HEADS} x head_dim (the record's six heads)")
        if self.head_dim % 4:
            raise ValueError("head_dim must be a multiple of 4")
        if self.bigram_vocab < 2 or self.bigram_sign_rows < 1:
            raise ValueError("bigram_vocab must be >= 2 and bigram_sign_rows >= 1")


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class TransposedHead(nn.Module):
    """The head's weight, stored [dim, vocab] (the record's layout: faster gradient accumulation)."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, vocab, dtype=torch.bfloat16))


class RecordGPT(nn.Module):
    def __init__(self, cfg: RecordConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, V, H, hd = cfg.model_dim, cfg.vocab_size, NUM_HEADS, cfg.head_dim
        self.register_buffer("prefix_table", torch.full((V,), -1, dtype=torch.int64), persistent=False)
        # --- embeddings and head (tied at init: the embedding is the head's transpose) ---------
        self.lm_head = TransposedHead(D, V)
        nn.init.normal_(self.lm_head.weight, mean=0, std=0.005)
        self.embed = nn.Embedding(V, D)
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head.weight.T)
        # --- attention: value embeddings, their gates, Q/K and V/O banks -----------------------
        self.value_embeds = nn.Parameter(0.01 * torch.randn(5 * V, D, dtype=torch.bfloat16))
        self.ve_gate_bank = nn.Parameter(torch.zeros(5, H, 2 * VE_GATE_DIMS))
        n_attn = NUM_LAYERS - 1
        self.qk_bank = nn.Parameter(torch.empty(n_attn * 2 * (H // 2), 2 * hd, D))   # per head pair
        self.vo_bank = nn.Parameter(torch.empty(n_attn * 2, D, D))
        bound = 3 ** 0.5 * 0.5 * D ** -0.5
        with torch.no_grad():
            self.qk_bank.uniform_(-bound, bound)
            self.vo_bank.uniform_(-bound, bound)
        # --- MLPs: [layer, (up, down), hidden, dim]; down starts at zero ----------------------
        self.mlp_bank = nn.Parameter(torch.empty(NUM_LAYERS + 1, 2, 4 * D, D))
        with torch.no_grad():
            self.mlp_bank[:, 0].uniform_(-bound, bound)
            self.mlp_bank[:, 1].zero_()
        for name in ("_mlp_down_act_scales", "_mlp_down_proj_scales", "_mlp_down_proj_next_scales"):
            self.register_buffer(name, torch.ones(NUM_LAYERS + 1))   # FP8 history (mlp.py)
        # --- smear gate, bigram table, lambdas ------------------------------------------------
        self.smear_gate = nn.Linear(SMEAR_DIMS, 1, bias=False)
        nn.init.zeros_(self.smear_gate.weight)
        self.bigram_embed = nn.Embedding(cfg.bigram_vocab, D)
        nn.init.zeros_(self.bigram_embed.weight)
        self.register_buffer("bigram_sign_table", sign_table(cfg.bigram_sign_rows, D))
        self.post_lambdas = nn.Parameter(torch.ones(NUM_LAYERS, 2))
        self.resid_lambdas = nn.Parameter(torch.full((NUM_LAYERS, 2), 1.1 ** 0.5))
        # per layer (q/k/v scale, output scale), then the smear weight and the skip logit
        self.scalars = nn.Parameter(torch.cat([
            *[torch.tensor([0.5, 1.0]) for _ in range(NUM_LAYERS)], torch.zeros(1), -1.5 * torch.ones(1)]))
        # --- MUDD and gates (mudd.py) ---------------------------------------------------------
        self.mudd_w1 = nn.Parameter(torch.empty(2, HIDDEN, D))
        kaiming_rows(self.mudd_w1)
        self.mudd_w2 = nn.Parameter(torch.zeros(2, MUDD_COEFS[0], HIDDEN))
        self.mudd_b2 = nn.Parameter(mudd_bias_init())
        self._mudd_gate_scale = nn.Parameter(torch.tensor(0.1))
        self.mudd_gate_w1 = nn.Parameter(torch.empty(2, HIDDEN, D))
        self.mudd_gate_w2 = nn.Parameter(torch.zeros(2, GATE_COEFS[1], HIDDEN))
        kaiming_rows(self.mudd_gate_w1)
        self.mudd_gate_b2 = nn.Parameter(gate_bias_init())
        # execution state, not weights: rotary tables, windows, FP8 copies (attach())
        self.fp8: FP8State | None = None
        self.flex_options: dict | None = None   # FlexAttention tiles for the GPU (attach)

    # ----------------------------------------------------------------------------- set-up
    def attach(self, device: torch.device, fp8: bool) -> "RecordGPT":
        """Move to `device` with the record's dtypes (bf16 matrices and tables; fp32 lambdas,
        scalars, gate scale) and make the execution state: rotary tables, window tensors, FP8."""
        self.to(device)
        self.cast_to_record_dtypes()
        return self.make_execution_state(device, fp8)

    FP32_PARAMS = ("scalars", "post_lambdas", "resid_lambdas", "_mudd_gate_scale")

    def cast_to_record_dtypes(self) -> None:
        for name, p in self.named_parameters():
            want = torch.float32 if name in self.FP32_PARAMS else torch.bfloat16
            if p.dtype != want:
                p.data = p.data.to(want)
        if self.bigram_sign_table.dtype != torch.bfloat16:
            self.bigram_sign_table = self.bigram_sign_table.bfloat16()

    def make_execution_state(self, device: torch.device, fp8: bool) -> "RecordGPT":
        # each layer's FP8 scale 16 bytes apart: cuBLAS takes only 16-byte aligned scale pointers,
        # and a layer's scale is passed as a one-element slice of these buffers
        for name in ("_mlp_down_act_scales", "_mlp_down_proj_scales", "_mlp_down_proj_next_scales"):
            old = self._buffers[name]
            padded = torch.zeros(old.numel(), 4, dtype=torch.float32, device=device)
            padded[:, 0] = old
            self._buffers[name] = padded[:, 0]
        hd, rows = self.cfg.head_dim, self.cfg.max_seq_len
        self.flex_options = flex_kernel_options(
            torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
        self.yarn = Yarn(hd, rows, paired=False, device=device)
        self.yarn_paired = Yarn(hd, rows, paired=True, device=device)
        for name, t in (("rot_cos", self.yarn.cos), ("rot_sin", self.yarn.sin),
                        ("rot_cos_paired", self.yarn_paired.cos), ("rot_sin_paired", self.yarn_paired.sin)):
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("attn_scale", torch.tensor(self.yarn.attn_scale, device=device), persistent=False)
        self.register_buffer("short_window", torch.tensor(128, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("long_window", torch.tensor(384, dtype=torch.int32, device=device), persistent=False)
        self.fp8 = FP8State(NUM_LAYERS + 1, 4 * self.cfg.model_dim, self.cfg.model_dim, device) if fp8 else None
        self.refresh_fp8(bootstrap=True)
        return self

    def set_rotary(self, long_window_history: list[int]) -> None:
        """The YaRN state after the given long windows (schedule.long_window_history)."""
        for y in (self.yarn, self.yarn_paired):
            y.replay(long_window_history)
        assert self.yarn.attn_scale == self.yarn_paired.attn_scale
        self.attn_scale.fill_(self.yarn.attn_scale)

    def set_windows(self, short: int, long: int) -> None:
        self.short_window.fill_(short)
        self.long_window.fill_(long)

    def fill_prefix_table(self) -> None:
        # imported here: inference (an exported folder carries these modules) needs no vocabulary
        prefix = importlib.import_module(".prefix", __package__)
        self.prefix_table.copy_(prefix.prefix_table(self.cfg.vocab_size))

    @torch.no_grad()
    def refresh_fp8(self, bootstrap: bool) -> None:
        """Re-quantize the MLP weights after an optimizer step (mlp.py)."""
        if self.fp8 is not None:
            self.fp8.refresh(self.mlp_bank, self._mlp_down_proj_scales, self._mlp_down_proj_next_scales, bootstrap)

    @torch.no_grad()
    def restore_fp8(self) -> None:
        """The FP8 copies a checkpoint's weights were trained with (no new scales)."""
        if self.fp8 is not None:
            self.fp8.quantize_up(self.mlp_bank)
            self.fp8.requantize_down(self.mlp_bank[:, 1], self._mlp_down_proj_scales)

    def masks(self, cu_seqlens: Tensor, T: int) -> Masks:
        wanted = (("short", False), ("long", False), ("short", True))
        return Masks(cu_seqlens, T, {"short": self.short_window, "long": self.long_window},
                     self.attn_scale, wanted)

    # ----------------------------------------------------------------------------- forward
    def attention(self, i: int, x: Tensor, qkvo: Tensor, lambdas: Tensor, aux_v: Tensor | None,
                  xsa_logit: Tensor | None, gate: Tensor | None, dc: tuple | None,
                  mask, doc: Tensor, independent_starts: Tensor | None = None,
                  rotary_tables: tuple[Tensor, ...] | None = None) -> Tensor:
        B, T, D = x.shape
        H, hd = NUM_HEADS, self.cfg.head_dim
        cos, sin, cos_paired, sin_paired = rotary_tables or (
            self.rot_cos, self.rot_sin, self.rot_cos_paired, self.rot_sin_paired)
        q, k, v = F.linear(x, lambdas[0] * qkvo[:3 * D].type_as(x)).view(B, T, 3 * H, hd).chunk(3, dim=-2)
        q, k = norm(q), norm(k)
        if i not in PAIRED:
            q, k = rotary(q, cos, sin), rotary(k, cos, sin)
            if i in LONG:   # key offset: the position-free dims come from the previous token
                shifted = torch.cat([k[:, :1, :, hd // 2:], k[:, :-1, :, hd // 2:]], 1)
                if independent_starts is not None:   # ... except where a sequence starts (as at 0)
                    shifted = torch.where(independent_starts[None, :, None, None], k[..., hd // 2:], shifted)
                k = torch.cat([k[..., :hd // 2], shifted], -1)
            if aux_v is not None:
                v = v + aux_v.view_as(v)
        else:   # every token twice, two heads per sequence (attention.py)
            q, k = q.reshape(B, T, H // 2, 2 * hd), k.reshape(B, T, H // 2, 2 * hd)
            v = v.reshape(B, 2 * T, H // 2, hd)
            q = rotary(q, cos_paired, sin_paired).view(B, 2 * T, H // 2, hd)
            k = rotary(k, cos_paired, sin_paired).view(B, 2 * T, H // 2, hd)
            if aux_v is not None:
                v = v + aux_v.view_as(v)
        y = attend(q, k, v, mask, self.attn_scale, self.flex_options)
        if dc is not None:
            y = dc_correct(y, q, k, v, *dc_weights(x, *dc), doc, self.attn_scale)
        y = y.reshape(B, T, H, hd)
        if xsa_logit is not None and i not in PAIRED:
            y = xsa(y, v, xsa_logit)
        if gate is not None:
            y = y * gate.type_as(y).view(B, T, H, 1)
        y = y.contiguous().view(B, T, H * hd)
        return F.linear(y, lambdas[1] * qkvo[3 * D:].type_as(y))

    def table_rows(self, inputs: Tensor, bigram_inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The table lookups of a micro-batch: (token embeddings [T, dim], the five value
        embeddings [5, T, dim], bigram embeddings [T, dim]). Outside the compiled graph in
        training, so that their gradients go straight into the tables' .grad (lookup.py)."""
        V = self.cfg.vocab_size
        first_rows = torch.arange(0, 5 * V, V, device=inputs.device, dtype=inputs.dtype)
        ve_ids = inputs[None] + first_rows[:, None]   # the rows of the five tables in value_embeds
        # the record indexes value_embeds (its backward adds position by position in bf16) and
        # looks the other two up through nn.Embedding (fp32 sums): lookup.py
        return (lookup(self.embed.weight, inputs), lookup(self.value_embeds, ve_ids, in_order=True),
                lookup(self.bigram_embed.weight, bigram_inputs))

    def hidden_states(self, inputs: Tensor, bigram_inputs: Tensor, mask_short, mask_long,
                      mask_paired, doc: Tensor, fp8: bool, independent_starts: Tensor | None = None) -> Tensor:
        """inputs, bigram_inputs [T] int32 -> the final normed state [T, dim]: the table lookups,
        then hidden_from_rows."""
        return self.hidden_from_rows(inputs, *self.table_rows(inputs, bigram_inputs), mask_short, mask_long,
                                     mask_paired, doc, fp8, independent_starts)

    def hidden_from_rows(self, inputs: Tensor, embedded: Tensor, ve: Tensor, bigram_rows: Tensor, mask_short,
                         mask_long, mask_paired, doc: Tensor, fp8: bool,
                         independent_starts: Tensor | None = None) -> Tensor:
        """inputs [T] int32 and their table rows (table_rows) -> the final normed state [T, dim].

        The record lets neighbouring documents touch: a document's first position still takes
        the smear, the bigram sign and (long layers) the key offset from the position before it,
        and rotary positions count from the micro-batch's start. `independent_starts` ([T] bool,
        None in training and validation) marks positions where a sequence starts as at position
        0: nothing comes from the position before, and rotary positions restart there (the bf16
        tables round differently at other rows). Sequences packed into one forward pass
        (scoring, continuation_loss.py) then compute what each computes alone; the caller also
        gives each its own bigram ids (bigram.bigram_ids per sequence)."""
        cfg, H, hd = self.cfg, NUM_HEADS, self.cfg.head_dim
        D, L = cfg.model_dim, NUM_LAYERS
        masks = {i: mask_paired if i in PAIRED else (mask_long if i in LONG else mask_short)
                 for i in range(L) if i != SKIP_LAYER}
        sa_lambdas = self.scalars[:2 * L].view(-1, 2)
        smear_lambda, skip_lambda = self.scalars[2 * L], self.scalars[2 * L + 1]
        resid_attn, resid_mlp = self.resid_lambdas[:, 0].bfloat16().unbind(0), self.resid_lambdas[:, 1].bfloat16().unbind(0)
        post_attn, post_mlp = self.post_lambdas[:, 0].bfloat16().unbind(0), self.post_lambdas[:, 1].bfloat16().unbind(0)
        ve_gates = self.ve_gate_bank.unbind(0)
        n_attn = L - 1
        qk = self.qk_bank.view(n_attn, -1, D)
        vo = self.vo_bank.view(n_attn, 2, D, D).flatten(1, 2)
        attn_weights = torch.cat([qk, vo], dim=1).unbind(0)            # per layer [q; k; v; o]
        mlp_w = self.mlp_bank.flatten(0, 1).unbind(0)                   # up0, down0, up1, ...

        rotary_tables = None
        if independent_starts is not None:
            pos = torch.arange(inputs.numel(), device=inputs.device)
            since_start = pos - torch.where(independent_starts, pos, 0).cummax(0).values
            rotary_tables = tuple(t[since_start] for t in (self.rot_cos, self.rot_sin,
                                                            self.rot_cos_paired, self.rot_sin_paired))
        x = embedded
        sign_rows = sign_ids(inputs, cfg.bigram_sign_rows)
        if independent_starts is not None:
            sign_rows = sign_rows.masked_fill(independent_starts, 0)
        signs = self.bigram_sign_table[sign_rows]
        x0_bigram = (bigram_rows * signs)[None]                          # [1, T, D]
        # smear: each token's embedding takes a gated share of the previous token's
        smear = smear_lambda * torch.sigmoid(self.smear_gate(x[1:, :SMEAR_DIMS]))
        if independent_starts is not None:
            smear = smear.masked_fill(independent_starts[1:, None], 0)
        x = torch.cat([x[:1], x[1:] + smear * x[:-1]])
        x = x0 = norm(x[None])

        def gates(g, xsa_slices, gate_slices, inject):
            xs = {layer: g[..., s] for layer, s in xsa_slices.items()}
            ag = {layer: g[..., s] for layer, s in gate_slices.items()}
            inj = {layer: (g[..., o:o + 1], g[..., o + 1:o + 2]) for layer, o in inject.items()}
            return xs, ag, inj

        xsa_alpha, attn_gate, inject = gates(self._gate(x0, 0), PRE_XSA, PRE_ATTN_GATE, PRE_INJECT)
        x = x0 + x0_bigram * inject[0][1]
        cache = {0: x}
        dc, skip_gate, amaxes = None, None, []
        for i in range(L):
            mu = None
            if i == POST_GATE_LAYER:
                g = self._gate(x, 1)
                xs, ag, inj = gates(g, POST_XSA, POST_ATTN_GATE, POST_INJECT)
                xsa_alpha.update(xs), attn_gate.update(ag), inject.update(inj)
                skip_gate = g[..., POST_SKIP:POST_SKIP + 1]
                dc = (g[..., POST_DC[0]], g[..., POST_DC[1]])
            if i == SKIP_LAYER:
                x = x + torch.sigmoid(skip_lambda) * skip_gate * cache[3]
            else:
                attn_in = norm(cache[7] if i in READS_CACHE_7 else x)
                B, T = attn_in.shape[:2]
                if i == L - 1:   # MUDD: mix the caches into the values and the residual
                    cache[9] = x
                    mu = self._mudd(x, 0)
                    v_mudd = (mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x).view(B, T, H, hd)
                    x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
                    ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(H // 2, dim=-1).unsqueeze(-1)
                    aux_v = (ve_gate * ve[VALUE_EMBED[i]].view(B, T, H, hd) + v_mudd).view(B, T, -1)
                elif i in VALUE_EMBED:   # gate g(x[:6], ve[:6]), 2 * sigmoid: x1 at init
                    e = ve[VALUE_EMBED[i]]
                    gate_in = torch.cat([attn_in[..., :VE_GATE_DIMS], e[None, ..., :VE_GATE_DIMS]], dim=-1)
                    g = 2 * torch.sigmoid(F.linear(gate_in, ve_gates[VALUE_EMBED[i]])).view(B, T, H, 1)
                    aux_v = (g * e.view(B, T, H, hd)).view(B, T, -1)
                else:
                    aux_v = None
                y = self.attention(i, attn_in, attn_weights[i - (i > SKIP_LAYER)], sa_lambdas[i], aux_v,
                                   xsa_alpha.get(i) if i in XSA else None,
                                   attn_gate.get(i) if i in ATTN_GATE else None,
                                   dc if i == DC_LAYER else None, masks[i], doc, independent_starts,
                                   rotary_tables)
                if mu is not None:
                    x = mu[8] * x + mu[9] * y + mu[10] * cache[0] + mu[11] * x0_bigram
                else:
                    x = resid_attn[i] * x + post_attn[i] * y + x0 * inject[i][0]
                    if i != 0:
                        x = x + x0_bigram * inject[i][1]
            # MLP
            normed = norm(x)
            f8 = None
            if fp8:
                f = self.fp8
                f8 = (f.w1[i], f.w1_scales[i:i + 1], f.w2[i], self._mlp_down_proj_scales[i:i + 1],
                      self._mlp_down_act_scales[i:i + 1])
            out, amax = relu2_mlp(normed, mlp_w[2 * i], mlp_w[2 * i + 1], f8)
            amaxes.append(amax)
            if mu is not None:
                x = mu[12] * x + mu[13] * out
            else:
                x = resid_mlp[i] * x + post_mlp[i] * out
            if i in CACHED:
                cache[i] = x
        if fp8:   # the next forward's activation scales (delayed scaling); no autograd history may
            # reach the buffer, or the next step's graph would hang on to this one's
            new = torch.stack(amaxes).detach().clamp(min=1e-12) * (ACT_HEADROOM / E4M3_MAX)
            with torch.no_grad():
                self._mlp_down_act_scales[:L].copy_(new)
        mu = self._mudd(x, 1)
        ve_layer1 = ve[VALUE_EMBED[1]][None].to(x.dtype)
        x = x + mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * cache[9] + mu[3] * ve_layer1 + mu[4] * cache[3]
        return norm(x).view(-1, D)

    def _gate(self, x: Tensor, which: int) -> Tensor:
        n = GATE_COEFS[which]
        return coefficient_mlp(x, self.mudd_gate_w1[which], self.mudd_gate_w2[which, :n],
                                    self.mudd_gate_b2[which, :n], self._mudd_gate_scale.type_as(x))

    def _mudd(self, x: Tensor, which: int) -> tuple[Tensor, ...]:
        n = MUDD_COEFS[which]
        out = coefficient_mlp(x, self.mudd_w1[which], self.mudd_w2[which, :n],
                                   self.mudd_b2[which, :n], MUDD_SCALE)
        return out.split(1, dim=-1)

    # ----------------------------------------------------------------------------- losses
    def train_losses(self, hidden: Tensor, targets: Tensor, mtp_weights: Tensor, prefix_weight: Tensor,
                     fp8: bool) -> Tensor:
        """Per-position training losses; the objective is their sum times GRAD_SCALE."""
        return train_losses(hidden, self.lm_head.weight, targets, mtp_weights, self.prefix_table[targets],
                            prefix_weight, GRAD_SCALE, fp8)

    def eval_losses(self, hidden: Tensor, targets: Tensor) -> Tensor:
        return eval_losses(hidden, self.lm_head.weight, targets)

    @torch.no_grad()
    def sequence_logits(self, ids: Tensor) -> Tensor:
        """ids [T] of any length (documents start at <|endoftext|>) -> rescaled logits [T, vocab],
        fp32, with the windows and rotary state set on the model (set_windows / set_rotary).
        On a GPU the sequence is padded at its end to whole 128-token blocks (FlexAttention's
        unit); causal attention keeps the padding out of every real position."""
        from .bigram import bigram_ids

        T = ids.numel()
        pad = -T % 128 if ids.is_cuda else 0
        x = torch.cat([ids.to(torch.int32), ids.new_zeros(pad, dtype=torch.int32)])
        n = x.numel()
        starts = (x[1:] == 50256).nonzero()[:, 0].to(torch.int32) + 1
        cu = torch.cat([x.new_zeros(1), starts, x.new_full((1,), n)]).to(torch.int32)
        bg = torch.from_numpy(bigram_ids(x.cpu().numpy(), self.cfg.bigram_vocab)).to(x.device)
        m = self.masks(cu, n)
        h = self.hidden_states(x, bg, m[("short", False)], m[("long", False)], m[("short", True)], m.doc, False)
        return self.logits(h[:T])

    def logits(self, hidden: Tensor) -> Tensor:
        """Rescaled logits z in (0, 23), fp32: what validation scores and generation samples."""
        return rescale(hidden @ self.lm_head.weight).float()


def compile_hidden_states(model: RecordGPT):
    """model.hidden_states with everything after the table lookups compiled into one graph. The
    lookups stay eager: in training their backward writes the tables' .grad itself (lookup.py),
    which a compiled graph cannot trace."""
    from_rows = torch.compile(model.hidden_from_rows, dynamic=False, fullgraph=True)

    def hidden_states(inputs: Tensor, bigram_inputs: Tensor, *rest, **options) -> Tensor:
        return from_rows(inputs, *model.table_rows(inputs, bigram_inputs), *rest, **options)
    return hidden_states


def build(cfg: RecordConfig, device: torch.device, fp8: bool, seed: int | None = None) -> RecordGPT:
    """The record's model: drawn on the CPU (so a seed gives the record's weights), then moved."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("cpu"):
        model = RecordGPT(cfg)
    return model.attach(device, fp8)


def param_count(model: RecordGPT) -> tuple[int, int]:
    """(all parameters, parameters in matmuls: everything but the table lookups)."""
    total = sum(p.numel() for p in model.parameters())
    tables = model.embed.weight.numel() + model.value_embeds.numel() + model.bigram_embed.weight.numel()
    unused = model.mlp_bank[NUM_LAYERS].numel()
    return total, total - tables - unused


def flops_per_token(model: RecordGPT, mean_window: float) -> float:
    """Training FLOPs per token: 6 per matmul weight, plus the attention scores and values."""
    _, n = param_count(model)
    attn_layers = NUM_LAYERS - 1
    attn = attn_layers * 3 * 2 * 2 * model.cfg.model_dim * (mean_window / 2)
    return 6 * n + attn
