"""``compress-deploy``: run pipeline stages from a YAML config, or act on a finished run.

    compress-deploy CONFIG [key=value ...] [--stages a,b] [--run-dir DIR]
    compress-deploy COMMAND ... [options]      (COMMAND: see pipeline/commands/COMMANDS)

Exit codes: 0 success, 2 user error (one line on stderr), 1 internal failure,
3 acceptance checks failed, 4 none failed but a quality gate is inconclusive.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from compressor import oserrors, runlayout
from compressor.config import load_config
from compressor.errors import UserError
from compressor.records import INCONCLUSIVE
from pipeline.acceptance import EXIT_FAIL, EXIT_INCONCLUSIVE
from pipeline.commands import COMMANDS
from pipeline.commands.args import CommandParser
from pipeline.frontier.target import run_with_target
from pipeline.runner import Interrupted, parse_stages
from pipeline.stages import STAGES


def _main_run(argv: list[str]) -> int:
    parser = CommandParser(
        prog="compress-deploy",
        description="Prune, finetune, export, deploy and validate a diffusion UNet.",
        epilog=f"commands on a finished run: {', '.join(COMMANDS)}",
    )
    parser.add_argument("config", help="YAML config (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prune.ratio=0.3")
    parser.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    parser.add_argument("--run-dir", type=Path, help="run directory (default runs/<config name>)")
    parser.add_argument(
        "--force", action="append", default=[], metavar="STAGE", help="rerun STAGE and its dependents"
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit among the flags
    cfg = load_config(args.config, args.overrides)
    stages = parse_stages(args.stages, cfg)
    force = set(parse_stages(",".join(args.force), cfg)) if args.force else set()
    distributed = {"train", "finetune"}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and set(stages) - distributed:
        raise UserError(
            f"under accelerate/torchrun only the {', '.join(sorted(distributed))} stages run data-parallel; "
            "pass --stages finetune (run the other stages in a single process)"
        )
    run_dir = args.run_dir or Path("runs") / cfg.name
    records = run_with_target(cfg, run_dir, stages, force)
    failed = [name for name, rec in records.items() if rec["status"] == "failed"]
    if failed:
        print(
            f"acceptance failed: {records[failed[0]]['reason']} (see {runlayout.report_dir(run_dir)})",
            file=sys.stderr,
        )
        return EXIT_FAIL
    unsure = [name for name, rec in records.items() if rec["status"] == INCONCLUSIVE]
    if unsure:
        print(
            f"acceptance inconclusive: {records[unsure[0]]['reason']} (an interval straddles its limit; "
            f"see `compress-deploy check {run_dir}`)",
            file=sys.stderr,
        )
        return EXIT_INCONCLUSIVE
    return 0


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point; maps user errors to exit 2 with one line, crashes to exit 1.

    SIGINT and SIGTERM end the run with one line naming the interrupted stage and exit
    128 + the signal number (130, 143); the stage's temporary files are removed first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        return _dispatch(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dispatch(argv: list[str]) -> int:
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]].main(argv[1:])
        if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
            if not Path(argv[0]).exists():
                raise UserError(
                    f"{argv[0]!r} is neither a command ({', '.join(COMMANDS)}) nor a YAML config file"
                )
        return _main_run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        stage = getattr(exc, "stage", None)
        where = f" during the {stage} stage" if stage else ""
        name = signal.Signals(signum).name
        print(f"interrupted by {name}{where}; rerun the same command to resume", file=sys.stderr)
        return 128 + int(signum)
    except OSError as exc:
        print(f"error: {oserrors.describe(exc, 'a file', resume=False)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    except Exception:  # noqa: BLE001 - internal failure: show the traceback, exit 1
        traceback.print_exc()
        print("internal error: please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
