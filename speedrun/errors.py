"""Errors a user can act on. Stages print them as one line instead of a traceback."""
from __future__ import annotations

import functools
import sys


class SpeedrunError(Exception):
    """A failure with a message that tells the user what to do; printed without traceback."""


class ParamError(SpeedrunError, ValueError):
    """A value in params.yaml has the wrong type or is out of range."""


class DataError(SpeedrunError):
    """Input data (raw files, shards, manifests) is missing, truncated or malformed."""


def stage_main(fn):
    """Decorate a stage's main(): SpeedrunError -> 'error: ...' on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpeedrunError as e:
            code = getattr(e, "exit_code", 2)  # 130 for a run stopped by a signal after saving
            _report(f"{'interrupted' if code == 130 else 'error'}: {e}")
            raise SystemExit(code) from None
        except KeyboardInterrupt:
            _report("interrupted")
            raise SystemExit(130) from None

    return wrapper


def _report(line: str) -> None:
    """One line on stderr, or, for a rank under speedrun.launch, to the launcher (which prints it once)."""
    from .launch import record_rank_error

    if not record_rank_error(line):
        print(line, file=sys.stderr)
