"""continuation_loss: ending losses of many sequences packed into one forward pass of the trainer's
own model (both recipes) equal those of one pass per sequence; a sequence does not see the one
packed before it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from speedrun import checkpoint as ckpt
from speedrun.continuation_loss import CheckpointScorer, Continuation, ending_losses
from speedrun.model import EOT_ID, GPT, GPTConfig
from speedrun.record.model import RecordConfig, build

CPU = torch.device("cpu")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights away from their (often zero) init, so that smear, gates, bigram tables, key
    offset and every other path changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.3 if p.ndim < 2 else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def record_state() -> dict:
    cfg = RecordConfig(model_dim=48, head_dim=8, bigram_vocab=512, max_seq_len=512)
    model = build(cfg, CPU, fp8=False, seed=0)
    _randomize(model, 1)
    return {"format": ckpt.FORMAT, "recipe": "record", "config": dataclasses.asdict(cfg),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "step": 7,
            "windows": [256, 384], "rotary_history": [256, 384]}


def classic_state() -> dict:
    cfg = GPTConfig(n_layer=2, model_dim=64, n_head=2, head_dim=32, value_embeds=1, no_attn_layer=-1,
                    max_seq_len=512, bigram_vocab=997, key_offset=True, attn_gate=True)
    model = GPT(cfg)
    _randomize(model, 2)
    return ckpt.final_model_state(model, {"window_blocks": 2, "step": 5})


STATES = {"record": record_state, "classic": classic_state}


def random_continuations(n: int, seed: int) -> list[Continuation]:
    g = np.random.default_rng(seed)
    return [Continuation((EOT_ID, *g.integers(0, 50257, g.integers(3, 60)).tolist()),
                         tuple(g.integers(0, 50257, g.integers(1, 25)).tolist())) for _ in range(n)]


def one_sequence_losses(scorer: CheckpointScorer, c: Continuation) -> torch.Tensor:
    """The straightforward way: one forward pass of this sequence alone."""
    ids = torch.tensor(c.tokens)
    if scorer.recipe == "record":
        return ending_losses(scorer.model.sequence_logits(ids), c)
    padded = torch.nn.functional.pad(ids, (0, -ids.numel() % 128))   # the model takes whole blocks
    return ending_losses(scorer.model.logits(scorer.model.hidden_states(padded, scorer.window))[0], c)



@pytest.mark.parametrize("recipe", ["record", "classic"])
def test_packed_sequences_do_not_see_each_other(recipe):
    """A sequence's losses do not depend on the sequence packed before it, to the bit. Without
    independent_starts they would: the record's smear, bigram sign and key offset, and the
    classic bigram table, read the position before each document's first token."""
    scorer = CheckpointScorer(STATES[recipe](), CPU, 512, recipe)
    first, *rest = random_continuations(5, seed=3)
    other = Continuation(first.context, tuple((t + 1) % 50257 for t in first.ending))   # same length
    assert sum(len(c) for c in (first, *rest)) <= 512
    after_first, after_other = scorer.losses([first, *rest])[1:], scorer.losses([other, *rest])[1:]
    assert all(torch.equal(a, b) for a, b in zip(after_first, after_other))

    hidden = scorer.model.hidden_states
    scorer.model.hidden_states = lambda *a, independent_starts=None, **k: hidden(*a, **k)   # the leak back
    try:
        after_first, after_other = scorer.losses([first, *rest])[1], scorer.losses([other, *rest])[1]
    finally:
        del scorer.model.hidden_states
    assert not torch.equal(after_first, after_other)


@pytest.mark.parametrize("recipe", ["record", "classic"])
def test_packed_pass_equals_one_sequence_at_a_time(recipe):
    """Many sequences in one pass score what each scores in a forward pass of its own (up to
    the rounding of other matrix shapes: the record's bf16 logits, 0.0625 apart in (8, 16), would
    show a flip as a jump)."""
    scorer = CheckpointScorer(STATES[recipe](), CPU, 1024, recipe)
    batch = random_continuations(9, seed=4)
    assert 300 < sum(len(c) for c in batch) <= 1024
    with torch.no_grad():
        packed = torch.cat(scorer.losses(batch))
        alone = torch.cat([one_sequence_losses(scorer, c) for c in batch])
    assert packed.shape == (sum(len(c.ending) for c in batch),)
    diff = (packed - alone).abs()
    print(f"{recipe}: |packed - alone| mean {diff.mean():.2e}, max {diff.max():.3g} over {diff.numel()} tokens")
    assert diff.max() < (2e-3 if recipe == "record" else 1e-5)
