"""DVC stage train_speedrun: params.yaml[train, record] + data/shards -> models/, metrics/train.json.

`train.recipe` picks the recipe: `record` (the default: record #89's math, speedrun/record/) or
`classic` (the previous recipe, speedrun/model.py). With `train.nproc` > 1 it starts itself under
`torchrun --standalone` (speedrun.launch); it also runs unchanged under a torchrun of the user's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speedrun.errors import stage_main
from speedrun.launch import torchrun, under_launcher
from speedrun.params import load_yaml, parse_section
from speedrun.runtime import finish_distributed
from speedrun.train import Paths, Run, TrainParams


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--models", default="models")
    ap.add_argument("--metrics", default="metrics")
    args = ap.parse_args(argv)
    raw = load_yaml(args.params)
    params = parse_section(raw, "train", TrainParams)
    if params.nproc > 1 and not under_launcher():
        return torchrun("stages.train_speedrun", params.nproc, sys.argv[1:] if argv is None else list(argv))
    models, metrics = Path(args.models), Path(args.metrics)
    paths = Paths(shards=Path(args.shards), checkpoints=models / "checkpoints", final=models / "final.pt",
                  metrics=metrics / "train.json", live=metrics / "dvclive")
    try:
        if params.recipe == "record":
            from speedrun.record.trainer import RecordParams, RecordRun

            RecordRun(params, parse_section(raw, "record", RecordParams), paths).run()
        else:
            Run(params, paths).run()
    finally:
        finish_distributed()


if __name__ == "__main__":
    main()
