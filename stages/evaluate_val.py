"""DVC stage evaluate_val: models/final.pt + data/shards (val) -> metrics/eval.json, metrics/val_curve.png.

The loss is computed by speedrun.evaluate.evaluate_loss, the trainer's own validation, over the
first `evaluate.val_tokens` held-out tokens with the final attention window: with the trainer's
val_tokens and micro-batch it reproduces the run's last validation. Runs unchanged under torchrun.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from speedrun.errors import stage_main
from speedrun.evaluate import EvaluateParams, evaluate, target_loss
from speedrun.metrics import EVAL_HEADLINE, write_metrics
from speedrun.params import load_section
from speedrun.plots import plot_curves, read_curve
from speedrun.runtime import finish_distributed, init_distributed


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--models", default="models")
    ap.add_argument("--metrics", default="metrics")
    args = ap.parse_args(argv)
    params = load_section("evaluate", EvaluateParams, args.params)  # validated before any work
    metrics_dir = Path(args.metrics)
    target = target_loss(Path(args.params), metrics_dir / "train.json")
    rank, world, _ = init_distributed()  # under torchrun the ranks split the validation tokens
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        result = evaluate(params, Path(args.models) / "final.pt", Path(args.shards), target, log,
                          rank, world)
    finally:
        finish_distributed()
    if rank != 0:
        return
    write_metrics(metrics_dir / "eval.json", result, EVAL_HEADLINE)
    png = plot_curves([read_curve(metrics_dir / "dvclive", label="validation (trainer)")],
                      metrics_dir / "val_curve.png", target=target,
                      title=f"validation loss (final {result['val_loss']:.4f})")
    print(f"wrote {metrics_dir / 'eval.json'} and {png}")


if __name__ == "__main__":
    main()
