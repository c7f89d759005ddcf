"""Learning benchmark: recipe variants trained for the same budget on real text, compared in one call.

    python -m benchmarks.prepare_imdb                       # once, on any machine (CPU is fine)
    python -m benchmarks.learning --variants default,bf16,cap15 [--steps 200] [--out FILE] [--jobs 4]

Every variant runs the real trainer (`speedrun.train.Run`) in its own process on the IMDB shards
(train split for training, the corpus's own val split held out), with the same steps and batch,
and reports validation loss at equal tokens (the common budget) and at equal seconds (each
curve interpolated at the shortest run's training time). Losses on movie reviews are not
comparable with the FineWeb 3.28 target: compare variants with each other only.

With --jobs N, up to N variants compile at once (compilation is host work, minutes per variant)
but still train one at a time, in the order given: each waits until every variant of its group has
finished its warm-up and every one before it has exited, so no timed step shares the GPU with
anything. Only the wall clock shrinks. One bias remains: the first variant to train runs its first
steps slower than the others (about 0.5% of its training time, benchmarks/results/README.md),
which a sequential call does not show. Put a variant whose seconds matter least first.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.switches import apply_switches

# name -> overrides of params.yaml's train section (on top of the benchmark's budget), or of a
# library switch (switches.SWITCHES)
VARIANTS = {
    "default": {},
    "fp8": {"fp8": "on"},
    "cap15": {"logit_cap": 15.0},
    "cooldown60": {"cooldown_frac": 0.6},
    "muon_lr03": {"muon_lr": 0.03},
    "muon_lr04": {"muon_lr": 0.04},
    "muon_lr07": {"muon_lr": 0.07},
    "fp8_head": {"fp8_head": "on"},
    "polar": {"muon_coeffs": "polar-express"},
    "normuon": {"muon_normuon": True},
    "polar_normuon": {"muon_coeffs": "polar-express", "muon_normuon": True},
    "legacy_muon": {"muon_coeffs": "newton-schulz", "muon_normuon": False},   # before NorMuon
    "attn_gate": {"attn_gate": True},
    "cwd": {"muon_weight_decay": 0.25},   # modded-nanogpt's 1.2 at lr 0.023, rescaled to lr 0.05
    # later modded-nanogpt records, at the benchmark's token budget: batch thirds of 1/3, 2/3, 1
    # of 1.5x the budget's batch (mean = the budget's batch) at lr x1, x1.52, x1.73
    "batch_stages": {"batch_tokens": "1.5x", "batch_stages": [1 / 3, 2 / 3, 1.0],
                     "batch_stage_lr": [1.0, 1.52, 1.73]},
    "mtp": {"mtp_weights": [0.5, 0.25]},                 # predict tokens t+2, t+3 early in training
    "bigram": {"bigram_vocab": 5 * 50304},               # hashed bigram embedding in every block
    "records": {"batch_tokens": "1.5x", "batch_stages": [1 / 3, 2 / 3, 1.0],
                "batch_stage_lr": [1.0, 1.52, 1.73], "mtp_weights": [0.5, 0.25], "bigram_vocab": 5 * 50304},
    # the later records' architecture switches (records 49, 40, 55), spelt out in full so a name
    # means the same whatever the defaults; the default is key_offset_only
    "before_arch3": {"key_offset": False, "backout_layer": -1, "ve_gates": False},   # none of the three
    "arch3": {"key_offset": True, "backout_layer": 7, "ve_gates": True},             # all three
    "key_offset_only": {"key_offset": True, "backout_layer": -1, "ve_gates": False},
    "no_key_offset": {"key_offset": False, "backout_layer": 7, "ve_gates": True},
    "no_backout": {"key_offset": True, "backout_layer": -1, "ve_gates": True},
    "no_ve_gates": {"key_offset": True, "backout_layer": 7, "ve_gates": False},
    "ve_gates": {"ve_gates": True},
    # grouped-query attention (the public 4090 recipe uses one k/v head): k/v projections and
    # value embeddings n_head / n_kv_head times narrower
    "gqa3": {"n_kv_head": 3},
    "gqa2": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},   # the default
    "mha": {"n_kv_head": 0},   # one k/v head per query head
    # mha cut to mqa's seconds (40.2 s vs 44.6 s at this budget), schedule complete: equal seconds
    "mha_eqtime_mqa": {"n_kv_head": 0, "steps_frac": 0.90},
    # the default again, later in the same call: the call's own noise, in loss and in seconds
    "default_again": {},
    "exact_tanh": {"fast_tanh": False},
    "unfused_mlp": {"fused_mlp": False},
    "fp8_mlp": {"fp8_mlp": "on"},
    "bf16_mlp": {"fp8_mlp": "off"},
    "fp8_attn": {"fp8_attn": "on"},
    "embed_dense": {"embed_grad": "dense"},     # bf16 nn.Embedding tables (dense backward, bf16 adds)
    # equal seconds with every schedule complete: fewer steps by the measured slowdown (bigram
    # 5x vocab with the current recipe: 551k vs 572k tok/s on the H200)
    "bigram_eqtime": {"bigram_vocab": 5 * 50304, "steps_frac": 0.963},
    "bigram2x_eqtime": {"bigram_vocab": 2 * 50304, "steps_frac": 0.98},
    # the bf16 MLP kernels cut to the FP8 kernels' time (535k vs 555k tok/s on the H100)
    "bf16_mlp_eqtime": {"fp8_mlp": "off", "steps_frac": 0.964},
}


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Turns:
    """File-based turn-taking for variants compiled in parallel and trained one after another.

    Variant i of a group writes `ready_i` when its warm-up is done, then waits for every `ready_j`
    of the group and for `done_j` of every j < i (not only i-1: a crashed variant is done early).
    The parent writes `ready_j` and `done_j` when process j exits, whatever its exit status, so a
    variant that crashes never blocks the others."""

    def __init__(self, folder: Path, index: int, group: int, poll_s: float = 0.2):
        self.folder, self.index, self.group, self.poll_s = Path(folder), index, group, poll_s

    def mark(self, what: str, index: int | None = None) -> None:
        (self.folder / f"{what}_{self.index if index is None else index}").touch()

    def _wait(self, names: list[str]) -> None:
        while not all((self.folder / n).exists() for n in names):
            time.sleep(self.poll_s)

    def wait_for_turn(self) -> None:
        self.mark("ready")
        self._wait([f"ready_{j}" for j in range(self.group)])
        self._wait([f"done_{j}" for j in range(self.index)])


def after_warmup(run, then: Callable[[], None]) -> None:
    """Call `then` after the run's warm-up, outside its compile clock."""
    warmup = run.warmup

    def warmup_then_wait() -> float:
        seconds = warmup()
        then()
        return seconds

    run.warmup = warmup_then_wait


def run_variant(name: str, args) -> dict:
    from speedrun.params import load_section
    from speedrun.train import Paths, Run, TrainParams

    base = load_section("train", TrainParams, args.params)
    budget = dict(steps=args.steps, batch_tokens=args.batch_tokens, micro_batch_tokens=args.micro_tokens,
                  val_tokens=args.val_tokens, val_every=max(1, args.steps // args.evals), ckpt_every=0,
                  muon_momentum_warmup=min(base.muon_momentum_warmup, args.steps // 2))
    overrides = apply_switches(VARIANTS[name])
    if overrides.get("batch_tokens") == "1.5x":   # stages whose mean is the budget's batch
        overrides["batch_tokens"] = args.batch_tokens * 3 // 2
    if "steps_frac" in overrides:   # a shorter run, schedule (cooldown) complete
        overrides["steps"] = round(args.steps * overrides.pop("steps_frac"))
    p = dataclasses.replace(base, **{**budget, **overrides})
    tmp = Path(tempfile.mkdtemp())
    run = Run(p, Paths(Path(args.shards), tmp / "ckpt", tmp / "final.pt", tmp / "train.json", None),
              log=lambda msg, **_: progress(f"{name}: {msg}"))
    if args.turns:
        turns = Turns(Path(args.turns), args.turn_index, args.turn_group)

        def wait() -> None:
            progress(f"{name}: warm-up done, waiting for its turn")
            turns.wait_for_turn()

        after_warmup(run, wait)
    metrics = run.run()
    return {"variant": name, "overrides": VARIANTS[name], "budget": budget, "metrics": metrics,
            "val_history": run.val_history}


def interp_at_seconds(history: list[dict], seconds: float) -> float:
    t = [h["train_time_s"] for h in history]
    v = [h["val_loss"] for h in history]
    return float(np.interp(seconds, t, v))


def summarize(rows: list[dict]) -> tuple[list[dict], str]:
    ok = [r for r in rows if "val_history" in r]
    if not ok:
        return [], "no variant finished"
    t_common = min(r["val_history"][-1]["train_time_s"] for r in ok)
    out, lines = [], [f"| variant | val loss @ {ok[0]['val_history'][-1]['tokens']:,} tokens "
                      f"| val loss @ {t_common:.1f} s | train s | tok/s | compile s |",
                      "|---|---|---|---|---|---|"]
    for r in ok:
        m = r["metrics"]
        at_s = interp_at_seconds(r["val_history"], t_common)
        out.append({"variant": r["variant"], "val_loss_equal_tokens": m["final_val_loss"],
                    "val_loss_equal_seconds": round(at_s, 4), "seconds_common": round(t_common, 2)})
        lines.append(f"| {r['variant']} | {m['final_val_loss']:.4f} | {at_s:.4f} | {m['train_time_s']:.1f} "
                     f"| {m['tokens_per_s'] / 1e3:.0f}k | {m['compile_time_s']:.0f} |")
    return out, "\n".join(lines)


def plot(rows: list[dict], out: str) -> str:
    """Overlay the variants' validation curves (loss vs training seconds and vs tokens)."""
    from speedrun.plots import Curve, plot_curves

    curves = [Curve(r["variant"], [h["step"] for h in r["val_history"]],
                    [h["val_loss"] for h in r["val_history"]],
                    [h["train_time_s"] for h in r["val_history"]],
                    [h["tokens"] for h in r["val_history"]]) for r in rows if "val_history" in r]
    return str(plot_curves(curves, out, target=None, title="IMDB learning benchmark (same budget)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,fp8")
    ap.add_argument("--shards", default=".corpus/imdb/shards")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-tokens", type=int, default=131072)
    ap.add_argument("--micro-tokens", type=int, default=16384)
    ap.add_argument("--val-tokens", type=int, default=1048576)
    ap.add_argument("--evals", type=int, default=8, help="validations per run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG of the overlaid validation curves")
    ap.add_argument("--replot", default=None, help="only draw --plot from an earlier --out JSON")
    ap.add_argument("--jobs", type=int, default=1,
                    help="variants compiling at once (each ~20 GiB of GPU memory); training stays one at a time")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--turns", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--turn-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--turn-group", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    if args.replot:
        print(plot(json.loads(Path(args.replot).read_text())["results"], args.plot))
        return
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    shared = [a for k, v in vars(args).items()
              if k not in ("one", "variants", "out", "plot", "replot", "jobs", "turns", "turn_index", "turn_group")
              for a in (f"--{k.replace('_', '-')}", str(v))]
    rows = []
    for start in range(0, len(names), args.jobs):
        group = names[start:start + args.jobs]
        # after every variant: a call cut by its time limit keeps what finished
        rows += run_group(group, shared, parallel=args.jobs > 1,
                          on_finish=lambda done: save(args, rows + done) if args.out else None)
    summary, text = summarize(rows)
    print(text)
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        save(args, rows)


def save(args, rows: list[dict]) -> None:
    from speedrun.atomic import write_json

    write_json(args.out, {"benchmark": "learning", "corpus": args.shards, "results": rows,
                          "summary": summarize(rows)[0]})


def run_group(group: list[str], shared: list[str], parallel: bool,
              on_finish: Callable[[list[dict]], None] = lambda done: None) -> list[dict]:
    """Each variant in a process of its own; in parallel, they take turns to train (Turns).
    `on_finish` gets the group's finished rows, in order, whenever a variant ends."""
    turns = Path(tempfile.mkdtemp(prefix="turns-")) if parallel else None
    procs = []
    for i, name in enumerate(group):
        cmd = [sys.executable, "-m", "benchmarks.learning", "--one", name] + shared
        if turns:
            cmd += ["--turns", str(turns), "--turn-index", str(i), "--turn-group", str(len(group))]
        out = tempfile.TemporaryFile(mode="w+")
        procs.append((name, subprocess.Popen(cmd, stdout=out, text=True, env=os.environ), out))
        if not turns:
            procs[-1][1].wait()
    rows, left = {}, set(range(len(group)))
    while left:
        for i in sorted(left):
            name, proc, out = procs[i]
            if proc.poll() is None:
                continue
            if turns:   # unblock the others even if this one crashed before its turn
                for what in ("ready", "done"):
                    Turns(turns, i, len(group)).mark(what)
            out.seek(0)
            lines = out.read().strip().splitlines()
            rows[i] = (json.loads(lines[-1]) if proc.returncode == 0 and lines
                       else {"variant": name, "error": f"exit code {proc.returncode} (see the log above)"})
            print(json.dumps({k: v for k, v in rows[i].items() if k != "val_history"}), flush=True)
            left.discard(i)
            on_finish([rows[j] for j in sorted(rows)])
        time.sleep(0.5)
    return [rows[i] for i in range(len(group))]


if __name__ == "__main__":
    main()
