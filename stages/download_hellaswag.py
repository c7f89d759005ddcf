"""DVC stage download_hellaswag: params.yaml `hellaswag` -> data/hellaswag/ (hellaswag_val.jsonl + manifest.json).

The HellaSwag validation file is downloaded from the dataset's GitHub repository (or copied from
hellaswag.local), its sha256 recorded and, when hellaswag.sha256 is set, checked. DVC runs this
stage again only when those params change, so the file is fetched once.
"""
from __future__ import annotations

import argparse

from speedrun.errors import stage_main
from speedrun.hellaswag import HellaSwagParams, fetch
from speedrun.params import load_section


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/hellaswag")
    args = ap.parse_args(argv)
    params = load_section("hellaswag", HellaSwagParams, args.params)  # validated before any work
    fetch(params, args.out)


if __name__ == "__main__":
    main()
