"""Rank all DVC experiments by time to the target validation loss (runs that missed it last).

    python -m stages.leaderboard                    # markdown table from `dvc exp show --json`
    python -m stages.leaderboard --plot metrics/leaderboard.png   # plus their validation curves
    python -m stages.leaderboard --json exps.json   # from saved `dvc exp show --json` output
    python -m stages.leaderboard --live runA/metrics/dvclive runB/metrics/dvclive --plot cmp.png
                                                    # overlay DVCLive directories, no DVC needed

Not a DVC stage: it reads every experiment, so it belongs outside any one of them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from speedrun.errors import SpeedrunError, stage_main
from speedrun.leaderboard import Row, baseline_params, curve_of, markdown_table, rows_from_exp_show, run_exp_show
from speedrun.plots import plot_curves, read_curve


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", help="the DVC repo (default: here)")
    ap.add_argument("--json", help="read `dvc exp show --json` output from this file instead of running it")
    ap.add_argument("--all-commits", action="store_true", help="experiments of all commits, not only HEAD's")
    ap.add_argument("--workspace", action="store_true", help="rank the workspace too (a copy of the last run)")
    ap.add_argument("--plot", help="write the validation curves of the ranked runs to this PNG")
    ap.add_argument("--live", nargs="+", help="DVCLive directories to overlay (with --plot); skips DVC")
    args = ap.parse_args(argv)

    if args.live:
        if not args.plot:
            raise SpeedrunError("--live needs --plot OUT.png")
        missing = [d for d in args.live if not Path(d).is_dir()]
        if missing:
            raise SpeedrunError(f"DVCLive directory {missing[0]} not found")
        png = plot_curves([read_curve(d) for d in args.live], args.plot, title="validation loss")
        print(f"wrote {png}")
        return

    if args.json:
        try:
            data = json.loads(Path(args.json).read_text())
        except (OSError, ValueError) as e:
            raise SpeedrunError(f"{args.json}: cannot read `dvc exp show --json` output ({e})") from None
    else:
        data = run_exp_show(args.repo, args.all_commits)
    rows = sorted(rows_from_exp_show(data, include_workspace=args.workspace), key=Row.sort_key)
    if not rows:
        raise SpeedrunError("no experiment with metrics/train.json yet: run `dvc exp run` first")
    print(markdown_table(rows, baseline_params(data)))
    if args.plot:
        targets = {r.params.get("train.target_val_loss", r.train.get("target")) for r in rows} - {None}
        png = plot_curves([curve_of(r, args.repo) for r in rows], args.plot,
                          target=targets.pop() if len(targets) == 1 else None,
                          title="validation loss of the ranked experiments")
        print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
