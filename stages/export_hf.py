"""DVC stage export_hf: models/final.pt + metrics -> models/hf/ (a Hugging Face model folder),
then, if export.push is true, an upload of that folder to the Hub repo export.repo_id.

The folder is written before the token is looked for: DVC deletes a stage's outputs before it
runs, so failing first would leave no models/hf at all (the export takes seconds). The token comes
from HF_TOKEN or `hf auth login`, never from params.yaml.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from speedrun.errors import stage_main
from speedrun.export import ExportParams, export_folder, folder_summary
from speedrun.params import load_section


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models")
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--out", default=None, help="output folder (default: <models>/hf)")
    args = ap.parse_args(argv)
    params = load_section("export", ExportParams, args.params)  # validated before any work
    models, metrics = Path(args.models), Path(args.metrics)
    out = Path(args.out) if args.out else models / "hf"
    export_folder(models / "final.pt", metrics / "train.json", metrics / "eval.json", out, params,
                  metrics / "hellaswag.json")
    print(f"exported {folder_summary(out)}")
    if params.push:
        from speedrun.hub import push_folder, resolve_token

        url = push_folder(out, params.repo_id, params.private, resolve_token())
        print(f"pushed to {params.repo_id} ({'private' if params.private else 'public'}): {url}")


if __name__ == "__main__":
    main()
