"""``dualtune``: the command line. One module per command in ``dualtune.commands``; here the
parser they share, logging, and how each failure reaches the user (one line and exit 2 for a
``UserError``; a signal's stop with its checkpoint; a traceback for anything else: a bug)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from dualtune.backend import frameworks, launched_rank
from dualtune.commands import (
    compare,
    evaluate,
    export,
    predict,
    report,
    run,
    sweep,
    synthetic_data,
    tiny,
    validate,
)
from dualtune.errors import UserError
from dualtune.launch import redirect_worker_output
from dualtune.rundir import RunInterrupted

log = logging.getLogger("dualtune")

COMMANDS = (run, validate, evaluate, predict, export, report, compare, sweep, tiny, synthetic_data)


def build_parser() -> argparse.ArgumentParser:
    names = [f.name for f in frameworks()]
    parser = argparse.ArgumentParser(
        prog="dualtune",
        description="Parameter-efficient fine-tuning of Hugging Face models from one YAML recipe, "
        f"on {' or on '.join(names)}, with the same numbers on each.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also list every trainable tensor")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """``quiet``: a data-parallel process other than 0 (process 0 speaks for the job) only warns."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dualtune: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run R --backend ms a=1`): collect the strays.
    args, extra = parser.parse_known_args(argv)
    # The rest are overrides, checked like the others (`justtext` gets the one-line override error).
    stray = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    # `--resume train.epochs=7`: an override, not a run directory (--resume takes an optional value).
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        args.overrides.append(resume)
        args.resume = True
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rank = launched_rank()
    if rank is not None:
        redirect_worker_output(rank)  # a data-parallel worker whose launcher keeps its log
    _setup_logging(args.verbose, quiet=rank not in (None, 0))
    try:
        return {c.NAME: c.main for c in COMMANDS}[args.command](args)
    except UserError as err:
        print(f"dualtune: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        where = f"; checkpoint {stop.checkpoint}" if stop.checkpoint else ""
        print(f"dualtune: {stop}{where}; continue with the same command and --resume", file=sys.stderr)
        return 128 + stop.signum
    except OSError as err:  # the output's file system: read-only, full, no permission
        if err.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"dualtune: error: {where}{err.strerror or os.strerror(err.errno)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
