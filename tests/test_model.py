"""Attention masks: causal, inside one document (token 50256 starts a document), inside the window.

The CPU path (dense_mask, also used by exported models) is checked against a token-level reference
built independently here; the model itself is checked by perturbing tokens it must not see.
"""
from __future__ import annotations

import pytest
import torch

from speedrun.model import BLOCK_SIZE, EOT_ID, GPT, GPTConfig, dense_mask, document_window_masks

T = 4 * BLOCK_SIZE


def _tokens(eot_positions, seed=0) -> torch.Tensor:
    toks = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(seed))
    toks[list(eot_positions)] = EOT_ID
    return toks


def _reference(tokens: torch.Tensor, window_blocks: int) -> torch.Tensor:
    """allowed[i, j]: j <= i, same document, and j's block within the last `window_blocks` blocks."""
    docs = torch.cumsum(tokens == EOT_ID, 0)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j <= i) & (docs[:, None] == docs[None, :]) & (j // BLOCK_SIZE > i // BLOCK_SIZE - window_blocks)


# document layouts: one document; borders inside blocks; a border exactly on a block start;
# a document of one token; EOT at the very start of every block
LAYOUTS = [[], [0, 100, 300], [0, 128, 129, 400], [5, 6, 7, 250, 383, 384], [0, 128, 256, 384]]


@pytest.mark.parametrize("eots", LAYOUTS)
@pytest.mark.parametrize("wb", [1, 2, 3, 4, 6])
def test_dense_mask_is_causal_document_local_windowed(eots, wb):
    tokens = _tokens(eots)
    long_bm, short_bm = document_window_masks(tokens, torch.tensor(wb, dtype=torch.int32))
    for bm, w in ((long_bm, wb), (short_bm, max(wb // 2, 1))):
        got = dense_mask(bm, tokens)
        assert got.shape == (T, T) and got.dtype == torch.bool
        want = _reference(tokens, w)
        bad = (got != want).nonzero()
        assert len(bad) == 0, f"window {w}: {len(bad)} wrong entries, first (q, kv) = {bad[:5].tolist()}"
        assert got.diagonal().all()  # every token sees itself: no empty softmax row


# the later records' architecture switches, all on (both layers of this model have long windows)
RECORD_SWITCHES = dict(key_offset=True, backout_layer=0, ve_gates=True)


def _random_model(**switches) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, model_dim=64, n_head=2, head_dim=32, value_embeds=1,
                          no_attn_layer=-1, max_seq_len=T, **switches))
    with torch.no_grad():  # zero-initialised projections and gates would hide any leak
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("switches", [{}, RECORD_SWITCHES], ids=["default", "record_switches"])
def test_model_does_not_see_the_future_other_documents_or_beyond_the_window(switches):
    model = _random_model(**switches)
    eots = [0, 200, 300]
    tokens = _tokens(eots, seed=1)
    wb = torch.tensor(2, dtype=torch.int32)
    base = model.hidden_states(tokens, wb)[0]

    def changed(pos: int) -> torch.Tensor:
        t = tokens.clone()
        t[pos] = (t[pos] + 17) % 50000
        diff = (model.hidden_states(t, wb)[0] - base).abs().amax(dim=-1)
        return diff > 1e-5

    # causal: a change at 250 moves nothing before it, but does move later tokens of its document
    d = changed(250)
    assert not d[:250].any() and d[250] and d[251:300].any()
    # document-local: token 250 is in document [200, 300): tokens from 300 on do not see it
    assert not d[300:].any()
    # a change in the first document is invisible to the others
    d = changed(150)
    assert not d[200:].any() and d[150:200].any()
    # window: 2 blocks for layer 0 and 1 (both long-window layers here); token 511 (block 3) sees
    # blocks 2..3 only. Its document starts at 300 (block 2): change token 310 (block 2) -> seen;
    # shrink the window to 1 block -> not seen (the smear gate only reaches the previous token)
    assert changed(310)[511]
    wb.fill_(1)
    base = model.hidden_states(tokens, wb)[0]
    assert not changed(310)[511] and changed(390)[511]


@torch.no_grad()
@pytest.mark.parametrize("switches", [{}, RECORD_SWITCHES], ids=["default", "record_switches"])
def test_eot_starts_a_document_and_blocks_the_smear_gate(switches):
    """The EOT token belongs to the document it starts: it sees nothing before it, even the
    previous token through the smear gate or the key offset."""
    model = _random_model(**switches)
    tokens = _tokens([0, 200], seed=2)
    wb = torch.tensor(4, dtype=torch.int32)
    base = model.hidden_states(tokens, wb)[0]
    t = tokens.clone()
    t[199] = (t[199] + 5) % 50000
    diff = (model.hidden_states(t, wb)[0] - base).abs().amax(dim=-1)
    assert diff[199] > 1e-5 and not (diff[200:] > 1e-5).any()


@torch.no_grad()
def test_masks_built_ahead_give_the_same_loss_and_belong_to_their_sequence():
    """The trainer builds micro-batch i+1's masks before micro-batch i's backward: passing them in
    must equal building them inside, and another sequence's masks must change the result."""
    model = _random_model()
    tokens, other = _tokens([0, 200, 300], seed=1), _tokens([0, 100], seed=2)
    targets, wb = tokens.roll(-1), torch.tensor(2, dtype=torch.int32)
    inside = model.train_loss(tokens, targets, wb, None)[0]
    ahead = model.train_loss(tokens, targets, wb, None, model.attention_masks(tokens, wb))[0]
    wrong = model.train_loss(tokens, targets, wb, None, model.attention_masks(other, wb))[0]
    assert torch.equal(inside, ahead) and not torch.allclose(inside, wrong)


def test_key_offset_takes_the_previous_keys_position_free_dims_within_a_document():
    from speedrun.model import offset_keys

    T_, D = 6, 16
    k = torch.randn(1, T_, 2, D)
    prev_ok = torch.tensor([True, True, True, False, True, True])   # a document starts at 3
    out = offset_keys(k, prev_ok)
    rot = [*range(0, 4), *range(8, 12)]        # rotary pairs (d, d + D/2) for the first D/4 dims
    still = [*range(4, 8), *range(12, 16)]     # zero-frequency dims: no position of their own
    assert torch.equal(out[..., rot], k[..., rot])
    for t in range(T_):
        src = t - 1 if t > 0 and prev_ok[t] else t
        assert torch.equal(out[0, t][..., still], k[0, src][..., still]), t


def test_record_switches_add_small_adam_parameters_and_start_as_the_plain_model():
    """ve gates start at x1 (2 * sigmoid(0)) and belong to Adam, like the attention gates; the
    backout share is a scalar. With gates and backout zeroed, the model equals the plain one."""
    from speedrun.model import param_groups

    plain = _random_model()
    model = _random_model(backout_layer=0, ve_gates=True)
    gates = [n for n, _ in model.named_parameters() if "ve_gate" in n]
    assert gates == ["blocks.0.attn.ve_gate.weight", "blocks.1.attn.ve_gate.weight"]
    groups = param_groups(model)
    hidden = {id(p) for p in groups["hidden"]}
    assert all(id(model.get_parameter(n)) not in hidden for n in gates)
    assert model.backout_lambda.shape == (1,) and any(p is model.backout_lambda for p in groups["scalar"])
    assert len(groups["hidden"]) == len(param_groups(plain)["hidden"])
    with torch.no_grad():
        model.load_state_dict(plain.state_dict(), strict=False)
        for n in gates:
            model.get_parameter(n).zero_()
        model.backout_lambda.zero_()
    tokens, wb = _tokens([0, 200]), torch.tensor(2, dtype=torch.int32)
    with torch.no_grad():
        assert torch.allclose(model.hidden_states(tokens, wb), plain.hidden_states(tokens, wb), atol=1e-6)
        model.backout_lambda.fill_(0.5)
        assert not torch.allclose(model.hidden_states(tokens, wb), plain.hidden_states(tokens, wb), atol=1e-3)


def test_grouped_query_attention_is_attention_with_shared_key_value_heads():
    """n_kv_head < n_head: query head h reads key/value head h // (n_head / n_kv_head). The same
    model with every k/v head (and its value-embedding columns and gate) copied out to its query
    heads as plain multi-head attention must give the same states, and fewer parameters learn."""
    def build(n_kv):
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=2, model_dim=64, n_head=4, head_dim=16, n_kv_head=n_kv, value_embeds=1,
                             no_attn_layer=-1, max_seq_len=T, key_offset=True, ve_gates=True)).eval()

    gqa, mha = build(2), build(0)
    with torch.no_grad():
        for p in gqa.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        shared = {n: p for n, p in gqa.state_dict().items() if n in mha.state_dict()
                  and p.shape == mha.state_dict()[n].shape}
        mha.load_state_dict(shared, strict=False)
        for a, b in zip(gqa.blocks, mha.blocks):
            k, v = a.attn.kv_w.view(2, 2, 16, 64).repeat_interleave(2, dim=1).view(2, 64, 64)
            b.attn.qkv_w.copy_(torch.stack([a.attn.q_w, k, v]))
            b.attn.ve_gate.weight.copy_(a.attn.ve_gate.weight.repeat_interleave(2, dim=0))
        mha.value_embeds[0].weight.copy_(
            gqa.value_embeds[0].weight.view(-1, 2, 16).repeat_interleave(2, dim=1).flatten(1))
    assert gqa.blocks[0].attn.kv_w.shape == (2, 32, 64) and gqa.value_embeds[0].weight.shape[1] == 32
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())
    tokens, wb = _tokens([0, 200, 300]), torch.tensor(2, dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(gqa.hidden_states(tokens, wb), mha.hidden_states(tokens, wb),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4).validate()
