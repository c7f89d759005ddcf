"""Several processes for one stage: torchrun underneath, one line on failure on top.

A stage runs in-process for one process (no launcher, so its own one-line error is all a user
sees). For several it starts `torchrun --standalone` on itself; each rank's one-line error is
written to a folder the launcher reads, so that the stage ends with the root cause as its own last
line and exit code, after torchrun's traceback rather than instead of the message.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import SpeedrunError

ERROR_DIR_ENV = "SPEEDRUN_ERROR_DIR"


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def record_rank_error(line: str) -> bool:
    """A failing rank under `torchrun()` leaves its one line for the launcher; False elsewhere."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not under_launcher():
        return False
    Path(folder, f"rank{os.environ.get('RANK', '0')}.txt").write_text(line)
    return True


def torchrun(module: str, nproc: int, argv: list[str]) -> None:
    """Run `python -m module argv` as nproc ranks; raise the first rank's error as ours."""
    with tempfile.TemporaryDirectory(prefix="speedrun-ranks-") as folder:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *argv]
        # its own session: a Ctrl-C reaches torchrun once, through us, and torchrun passes it to
        # each rank (which saves and stops), instead of the terminal signalling every process
        proc = subprocess.Popen(cmd, env={**os.environ, ERROR_DIR_ENV: folder}, start_new_session=True)
        forward = {s: signal.signal(s, lambda sig, _f: proc.send_signal(sig))
                   for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for s, h in forward.items():
                signal.signal(s, h)
        if rc == 0:
            return
        lines = sorted(Path(folder).glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
        first = next((t for t in (p.read_text().strip() for p in lines) if t), "")
        kind, _, cause = first.partition(": ")
        interrupted = kind == "interrupted" or rc in (130, -signal.SIGINT, -signal.SIGTERM)
        err = SpeedrunError(cause or ("stopped by a signal" if interrupted else
                                      f"{nproc} ranks under torchrun exited with code {rc} (its log above)"))
        err.exit_code = 130 if interrupted else 2
        raise err
