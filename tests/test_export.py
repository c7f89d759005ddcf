"""export_hf: the Hugging Face folder loads offline with transformers and computes what our model does."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from speedrun import checkpoint as ckpt
from speedrun.hf_model.modeling_speedrun_gpt import document_window_masks as hf_masks
from speedrun.model import EOT_ID, dense_mask, document_window_masks
from speedrun.metrics import read_metrics
from test_evaluate import clone_run, evaluate, run_stage, stage_args, tiny_run  # noqa: F401 (fixture)

_EXPORTS: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    # nothing here may reach the network; transformers copies remote code under HF_HOME
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))


def export(root: Path, capsys) -> tuple[int, str, str]:
    from stages.export_hf import main

    return run_stage(main, stage_args(root), capsys)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    """The tiny run, evaluated and exported (read-only): returns the run root."""
    if "run" not in _EXPORTS:
        root = clone_run(tiny_run, tmp_path_factory.mktemp("exported"))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
            from stages.evaluate_val import main as ev
            from stages.export_hf import main as ex

            ev(["--shards", str(root / "data/shards"), *stage_args(root)])
            ex(stage_args(root))
        _EXPORTS["run"] = root
    return _EXPORTS["run"]


def project_model(root: Path, max_len: int = 2048):
    state = ckpt.load(root / "models/final.pt")
    state = dict(state, config={**state["config"], "max_seq_len": max_len})
    return ckpt.model_from_checkpoint(state, torch.device("cpu")).eval(), int(state["window_blocks"])


def hf_model(root: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(root / "models/hf"), trust_remote_code=True).eval()


def sample_tokens(root: Path, n: int = 768) -> torch.Tensor:
    """Real validation text (several documents) for the first half, random ids with EOTs after."""
    from speedrun.shards import open_shard

    val = torch.from_numpy(open_shard(root / "data/shards/val_000000.bin")[: n // 2].astype("int64"))
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, 50257, (n - n // 2,), generator=g)
    rnd[torch.randint(0, rnd.numel(), (5,), generator=g)] = EOT_ID
    return torch.cat([val, rnd])


# ----------------------------------------------------------------------------- tests

def test_folder_layout(exported):
    hf = exported / "models/hf"
    names = {p.name for p in hf.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "configuration_speedrun_gpt.py",
            "modeling_speedrun_gpt.py", "vocab.json", "merges.txt", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    assert not list(exported.glob("models/.hf*"))  # no temporary left beside it
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "speedrun_gpt"
    assert config["architectures"] == ["SpeedrunGPTForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_speedrun_gpt.SpeedrunGPTForCausalLM"
    assert config["window_blocks"] == 2 and config["n_layer"] == 2
    for code in ("configuration_speedrun_gpt.py", "modeling_speedrun_gpt.py"):
        text = (hf / code).read_text()
        assert "import speedrun" not in text and "from speedrun" not in text  # self-contained
    card = (hf / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "text-generation"
    ev = read_metrics(exported / "metrics/eval.json")
    results = meta["model-index"][0]["results"][0]["metrics"]
    assert {"type": "loss", "value": ev["val_loss"], "name": "val_loss"} in results
    assert "did NOT reach the target validation loss 3.28" in card
    assert "1 x cpu" in card  # hardware


def test_masks_match_training_semantics():
    """The dense causal+document+window mask equals the trainer's BlockMask expanded to tokens."""
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        T = 128 * int(torch.randint(1, 7, (1,), generator=g))
        t = torch.randint(0, 50257, (T,), generator=g)
        t[torch.randint(0, T, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g)] = EOT_ID
        for wb in (1, 2, 3, 5):
            long_bm, short_bm = document_window_masks(t, torch.tensor(wb, dtype=torch.int32))
            long_d, short_d = hf_masks(t[None], wb, 128, EOT_ID)
            assert torch.equal(dense_mask(long_bm, t), long_d[0, 0])
            assert torch.equal(dense_mask(short_bm, t), short_d[0, 0])


def test_hf_logits_equal_project_logits(exported):
    model, wb = project_model(exported)
    hf = hf_model(exported)
    assert type(hf).__name__ == "SpeedrunGPTForCausalLM"
    tokens = sample_tokens(exported, 768)  # 6 blocks: the 2-block window and documents both bite
    with torch.no_grad():
        ref = model.logits(model.hidden_states(tokens, torch.tensor(wb, dtype=torch.int32)))[0]
        out = hf(tokens[None]).logits[0]
        prefix = hf(tokens[None, :300]).logits[0]  # not a multiple of 128
        batch = hf(torch.stack([tokens[:384], tokens[384:]])).logits
        ref2 = model.logits(model.hidden_states(tokens[384:], torch.tensor(wb, dtype=torch.int32)))[0]
    diff = (ref - out).abs().max().item()
    diff_prefix = (ref[:300] - prefix).abs().max().item()
    diff_batch = max((ref[:384] - batch[0]).abs().max().item(), (ref2 - batch[1]).abs().max().item())
    print(f"max |logit diff| HF vs project: full {diff:.3g}, 300-token prefix {diff_prefix:.3g}, "
          f"batch of 2 {diff_batch:.3g} (logits up to {ref.abs().max():.3g})")
    assert diff < 1e-4 and diff_prefix < 1e-4 and diff_batch < 1e-4


def test_tokenizer_matches_tiktoken(exported):
    from transformers import AutoTokenizer

    from speedrun.tokenizer import get_encoding

    tok = AutoTokenizer.from_pretrained(str(exported / "models/hf"))  # plain call, as users do
    assert tok("Hello world")["input_ids"] == [15496, 995]
    enc = get_encoding()
    for s in ["The river  runs\n\n\tto the sea.", "ünïcödé 🚀 ő  ", " leading space", "123,456.78!?"]:
        assert tok(s)["input_ids"] == enc.encode_ordinary(s), s
        assert tok.decode(enc.encode_ordinary(s)) == s
    assert tok.eos_token_id == EOT_ID and len(tok) == 50257


def test_hf_generate_matches_project_greedy(exported):
    """transformers' generate() (no cache) continues a prompt exactly like our own greedy loop."""
    from speedrun.generate import from_checkpoint, generate_ids

    prompt = "Model data and the river"
    gen = from_checkpoint(exported / "models/final.pt", torch.device("cpu"), 256)
    ours = list(generate_ids(gen, prompt, 12, 0.0, 0, 0, torch.device("cpu")))
    hf = hf_model(exported)
    ids = torch.tensor([[EOT_ID, *gen.encode(prompt)]])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    theirs = out[0, ids.shape[1]:].tolist()
    assert theirs[:len(ours)] == ours and len(ours) > 0


def test_export_replaces_previous_folder_atomically(exported, tmp_path, capsys):
    root = clone_run(exported, tmp_path / "run")
    (root / "models/hf").mkdir()
    (root / "models/hf/stale.txt").write_text("old export")
    code, out, err = export(root, capsys)
    assert code == 0, err
    assert not (root / "models/hf/stale.txt").exists()
    assert (root / "models/hf/model.safetensors").is_file()
    assert [p.name for p in (root / "models").iterdir() if p.name.startswith(".")] == []
    assert oct((root / "models/hf").stat().st_mode & 0o777) != oct(0o700)  # not a private temp dir
    # a failing export (weights of another shape) leaves the previous folder as it was
    state = torch.load(root / "models/final.pt", weights_only=True)
    state["config"]["n_head"] = 4
    torch.save(state, root / "models/final.pt")
    before = sorted(p.name for p in (root / "models/hf").iterdir())
    code, _, err = export(root, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "weights do not match" in err
    assert sorted(p.name for p in (root / "models/hf").iterdir()) == before
    assert [p.name for p in (root / "models").iterdir() if p.name.startswith(".")] == []


def test_export_bad_inputs(tmp_path, capsys):
    root = tmp_path / "nowhere"
    root.mkdir()
    (root / "params.yaml").write_text("export: {license: mit}\n")
    code, _, err = export(root, capsys)  # no models/ at all
    assert code == 2 and err.strip().count("\n") == 0 and "final.pt not found" in err
    (root / "params.yaml").write_text("export: {push: true, repo_id: ''}\n")
    code, _, err = export(root, capsys)
    assert code == 2 and "export.repo_id is empty" in err
    (root / "params.yaml").write_text("export: {repo_id: 'not a repo id'}\n")
    code, _, err = export(root, capsys)
    assert code == 2 and "export.repo_id" in err and not os.path.exists(root / "models/hf")


# switch -> (GPTConfig overrides, how to undo its effect on the trained model)
ARCH_SWITCHES = {
    "attn_gate": ({"attn_gate": True}, lambda m: m.blocks[0].attn.gate.weight.zero_()),
    "bigram": ({"bigram_vocab": 997}, lambda m: m.bigram.weight.zero_()),
    "key_offset": ({"key_offset": True}, lambda m: setattr(m.blocks[0].attn, "key_offset", False)),
    "backout": ({"backout_layer": 0}, lambda m: m.backout_lambda.zero_()),
    "ve_gates": ({"ve_gates": True}, lambda m: m.blocks[1].attn.ve_gate.weight.zero_()),
    # grouped-query attention (one k/v head for both query heads) with its narrower value
    # embeddings and gates; undone by zeroing the value half of the shared k/v weight
    "gqa": ({"n_kv_head": 1, "ve_gates": True}, lambda m: m.blocks[0].attn.kv_w[1].zero_()),
}


@pytest.mark.parametrize("switch", list(ARCH_SWITCHES))
def test_architecture_switches_export_and_match(switch):
    """The architecture switches of params.yaml (per-head attention gates, hashed bigram
    embedding, partial key offset, backout, value-embedding gates): the HF code must apply each
    exactly as the trainer's model does (weights set non-zero so they matter), and the weights
    must load without leftovers."""
    from speedrun.export import checked_state_dict, hf_config
    from speedrun.hf_model.modeling_speedrun_gpt import SpeedrunGPTForCausalLM
    from speedrun.model import GPT, GPTConfig

    torch.manual_seed(0)
    extra, undo = ARCH_SWITCHES[switch]
    cfg = GPTConfig(n_layer=2, model_dim=64, n_head=2, head_dim=32, value_embeds=1, no_attn_layer=-1,
                    max_seq_len=512, **extra)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    state = ckpt.final_model_state(model, {"window_blocks": 2})
    hf = SpeedrunGPTForCausalLM(hf_config(state)).eval()
    missing, unexpected = hf.load_state_dict(checked_state_dict(state, "gated"), strict=False)
    assert not unexpected and all("rotary" in k or "cos" in k or "sin" in k for k in missing), (missing, unexpected)
    tokens = torch.randint(0, 50257, (384,), generator=torch.Generator().manual_seed(2))
    tokens[[100, 250]] = EOT_ID
    with torch.no_grad():
        ref = model.logits(model.hidden_states(tokens, torch.tensor(2, dtype=torch.int32)))[0]
        out = hf(tokens[None]).logits[0]
        undo(model)   # the switch does change the output
        without = model.logits(model.hidden_states(tokens, torch.tensor(2, dtype=torch.int32)))[0]
    assert (ref - out).abs().max().item() < 1e-4
    assert (ref - without).abs().max().item() > 1e-2
