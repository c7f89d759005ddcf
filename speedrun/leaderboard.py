"""Leaderboard of DVC experiments, from `dvc exp show --json` (DVC 3.x).

That JSON is a list of baseline commits (plus the workspace), each with its params and metrics
under data.params[<file>].data / data.metrics[<file>].data and its experiments under
experiments[].revs[]. Metrics whose value is null are left out by DVC, so a run that missed the
target simply has no time_to_target_s.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

from .errors import SpeedrunError
from .plots import SERIES, VAL_DIR, Curve, curve_from_texts

LIVE_DIR = "metrics/dvclive"


@dataclasses.dataclass
class Row:
    name: str
    rev: str
    params: dict            # flattened: "train.muon_lr" -> 0.05
    train: dict             # metrics/train.json
    eval: dict              # metrics/eval.json
    hellaswag: dict = dataclasses.field(default_factory=dict)   # metrics/hellaswag.json

    @property
    def time_to_target(self) -> float | None:
        v = self.train.get("time_to_target_s")
        return v if self.train.get("reached_target", v is not None) and v is not None else None

    def sort_key(self):
        # reached runs first, fastest first; the rest by how close they came (final loss)
        t = self.time_to_target
        loss = self.final_loss
        return (t is None, t if t is not None else 0.0, loss if loss is not None else math.inf)

    @property
    def final_loss(self) -> float | None:
        v = self.eval.get("val_loss")
        return v if v is not None else self.train.get("final_val_loss")


def run_exp_show(repo: str | Path = ".", all_commits: bool = False) -> list:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        raise SpeedrunError(f"`dvc exp show --json` could not run: {e}") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SpeedrunError(f"`dvc exp show --json` failed in {repo}: {msg}")
    try:
        return json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        raise SpeedrunError("`dvc exp show --json` printed something that is not JSON") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _file_data(section: dict | None, suffix: str) -> dict:
    """The `data` of the params/metrics file whose path ends with `suffix`."""
    for path, entry in (section or {}).items():
        if path.replace("\\", "/").endswith(suffix) and isinstance(entry, dict):
            return entry.get("data") or {}
    return {}


def _row(entry: dict, name: str) -> Row | None:
    data = entry.get("data") or {}
    train = _file_data(data.get("metrics"), "train.json")
    if entry.get("error") or not train:  # failed, queued or never trained: nothing to rank
        return None
    params = {}
    for path, p in (data.get("params") or {}).items():
        params.update(_flatten(p.get("data") or {}))
    metrics = data.get("metrics")
    return Row(name, entry.get("rev", ""), params, train, _file_data(metrics, "eval.json"),
               _file_data(metrics, "hellaswag.json"))


def rows_from_exp_show(exp_show: list, include_workspace: bool = False) -> list[Row]:
    """Every baseline commit and experiment that has training metrics."""
    rows = []
    for base in exp_show:
        rev = base.get("rev", "")
        if rev == "workspace":
            if include_workspace and (r := _row(base, "workspace")):
                rows.append(r)
            continue
        if r := _row(base, base.get("name") or rev[:7]):
            rows.append(r)
        for exp in base.get("experiments") or []:
            for e in exp.get("revs") or []:
                if r := _row(e, e.get("name") or exp.get("name") or e.get("rev", "")[:7]):
                    rows.append(r)
    return rows


def differing_params(rows: list[Row], baseline: dict | None = None) -> list[str]:
    """Param keys whose value is not the same in every row (the ones worth a column). With one
    row, or rows that agree everywhere, the keys where they differ from `baseline` (the commit's
    params.yaml) instead: a lone experiment still shows what its `-S` changed."""
    keys = sorted({k for r in rows for k in r.params})
    differ = [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in rows}) > 1]
    if differ or not baseline:
        return differ
    return [k for k in keys if any(json.dumps(r.params.get(k), sort_keys=True) !=
                                   json.dumps(baseline.get(k), sort_keys=True) for r in rows)]


def baseline_params(exp_show: list) -> dict:
    """The flattened params of the first commit in `dvc exp show --json` output (HEAD's)."""
    for base in exp_show:
        if base.get("rev") != "workspace":
            params = {}
            for p in ((base.get("data") or {}).get("params") or {}).values():
                params.update(_flatten(p.get("data") or {}))
            return params
    return {}


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown_table(rows: list[Row], baseline: dict | None = None) -> str:
    rows = sorted(rows, key=Row.sort_key)
    keys = differing_params(rows, baseline)
    head = ["#", "experiment", "params", "time to target (s)", "tokens to target",
            "final val loss", "HellaSwag acc_norm", "tokens/s", "GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", "---", "---"] + ["---:"] * 5 + ["---"]) + "|"]
    for i, r in enumerate(rows, 1):
        params = ", ".join(f"{k}={r.params.get(k)}" for k in keys) or "params.yaml as committed"
        gpu = r.train.get("gpu") or "—"
        if (r.train.get("world_size") or 1) > 1:
            gpu = f"{r.train['world_size']} x {gpu}"
        cells = [str(i), r.name, params, _num(r.time_to_target, ".1f"),
                 _num(r.train.get("tokens_to_target") if r.time_to_target is not None else None, ","),
                 _num(r.final_loss, ".4f"), _num(r.hellaswag.get("acc_norm"), ".4f"),
                 _num(r.train.get("tokens_per_s"), ",.0f"), gpu]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def curve_of(row: Row, repo: str | Path = ".", live_dir: str = LIVE_DIR) -> Curve:
    """A row's validation curve: the DVCLive TSVs as committed in its git revision (experiments
    are git commits; the TSVs are cache: false outputs, so git holds them), or the workspace."""
    texts = {}
    for key in SERIES:
        rel = f"{live_dir}/{VAL_DIR.as_posix()}/{key}.tsv"
        if row.rev == "workspace":
            p = Path(repo) / rel
            texts[key] = p.read_text() if p.is_file() else None
        else:
            proc = subprocess.run(["git", "show", f"{row.rev}:{rel}"], cwd=repo, capture_output=True,
                                  text=True, timeout=60)
            texts[key] = proc.stdout if proc.returncode == 0 else None
    return curve_from_texts(row.name, texts)
