"""DVC stage evaluate_hellaswag: models/final.pt + data/hellaswag/ -> metrics/hellaswag.json.

HellaSwag validation accuracy (acc: lowest total ending loss; acc_norm: lowest mean loss per
token), computed by speedrun.hellaswag with the trainer's own model code, whole items packed into
passes of hellaswag.batch_tokens tokens. `--model models/hf` scores an exported folder instead
(through transformers, one sequence at a time): it must give the checkpoint's numbers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from speedrun.errors import stage_main
from speedrun.hellaswag import HellaSwagParams, evaluate
from speedrun.metrics import HELLASWAG_HEADLINE, write_metrics
from speedrun.params import load_section


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/hellaswag")
    ap.add_argument("--model", default="models/final.pt", help="checkpoint file or exported folder")
    ap.add_argument("--out", default="metrics/hellaswag.json")
    args = ap.parse_args(argv)
    params = load_section("hellaswag", HellaSwagParams, args.params)  # validated before any work
    result = evaluate(params, Path(args.model), Path(args.data))
    out = Path(args.out)
    write_metrics(out, result, HELLASWAG_HEADLINE)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
