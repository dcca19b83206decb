"""``compress-deploy``: run pipeline stages from a YAML config, or a command on a config or a run.

    compress-deploy CONFIG [key=value ...] [--stages a,b] [--run-dir DIR] [--force STAGE]
    compress-deploy COMMAND ... [options]      (COMMAND: see pipeline/commands/COMMANDS)
    compress-deploy --version

Exit codes (:data:`EXIT_CODES`, listed in ``--help``): 0 success, 1 internal failure, 2 bad
input (one line on stderr), 3 acceptance checks failed, 4 none failed but a quality gate is
inconclusive, 128 + N interrupted by signal N.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from compressor import oserrors
from compressor.config import load_config
from compressor.errors import UserError
from pipeline.acceptance import EXIT_FAIL, EXIT_INCONCLUSIVE
from pipeline.commands import COMMANDS, SUMMARIES
from pipeline.commands.args import CommandParser, config_args
from pipeline.frontier.target import run_with_target
from pipeline.runner import Interrupted, parse_stages
from pipeline.stages import STAGES
from pipeline.summary import closing_lines
from rundir import layout
from rundir.records import INCONCLUSIVE

EXIT_USER, EXIT_INTERNAL = 2, 1
EXIT_CODES = {
    "0": "success: every acceptance gate passed (or none is set)",
    str(EXIT_INTERNAL): "internal failure, with a traceback to report",
    str(EXIT_USER): "bad input (config, flag, path, record: one line on stderr); verify: a file differs",
    str(EXIT_FAIL): "an acceptance gate failed",
    str(EXIT_INCONCLUSIVE): "no gate failed, but a quality gate's interval straddles its limit",
    "130, 143": "interrupted by SIGINT, SIGTERM; rerun the same command to resume",
}
"""Every exit status a command may end with, as ``--help`` lists them."""


def package_version() -> str:
    """This package's version: the installed distribution's, else ``pyproject.toml``'s (a bare checkout)."""
    from importlib import metadata

    try:
        return metadata.version("compress-deploy")
    except metadata.PackageNotFoundError:
        import tomllib

        try:
            pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _epilog() -> str:
    """The commands (what each takes and does) and the exit codes, for ``--help``."""
    width = max(len(f"{name} {takes}") for name, (takes, _) in SUMMARIES.items())
    lines = ["commands (compress-deploy COMMAND --help for each one's arguments):"]
    lines += [f"  {f'{name} {takes}':<{width}}  {what}" for name, (takes, what) in SUMMARIES.items()]
    lines += ["", "exit codes:"]
    width = max(map(len, EXIT_CODES))
    lines += [f"  {code:<{width}}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "\n".join(lines)


def _main_run(argv: list[str]) -> int:
    parser = CommandParser(
        prog="compress-deploy",
        usage="%(prog)s CONFIG [key=value ...] [--stages STAGES] [--run-dir DIR] [--force STAGE]\n"
        "       %(prog)s COMMAND ... (one of the commands below)\n"
        "       %(prog)s --version",
        description="Prune, finetune, export, deploy and validate a diffusion UNet: run the pipeline's\n"
        "stages on a config, or one of the commands below on a config or a finished run.",
        epilog=_epilog(),
    )
    config_args(parser)
    parser.add_argument(
        "--stages",
        help=f"comma-separated stages to run, of: {', '.join(STAGES)} (default: the config's stages)",
    )
    parser.add_argument(
        "--run-dir", type=Path, metavar="DIR", help="run directory (default: runs/<config name>)"
    )
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="rerun STAGE and its dependents even where cached; repeatable (default: none)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
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
    sys.stdout.write(closing_lines(run_dir, cfg, args.config, args.overrides, list(records)))
    failed = [name for name, rec in records.items() if rec["status"] == "failed"]
    if failed:
        print(
            f"acceptance failed: {records[failed[0]]['reason']} (see {layout.report_dir(run_dir)})",
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
        return EXIT_USER
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        stage = getattr(exc, "stage", None)
        where = f" during the {stage} stage" if stage else ""
        name = signal.Signals(signum).name
        print(f"interrupted by {name}{where}; rerun the same command to resume", file=sys.stderr)
        return 128 + int(signum)
    except OSError as exc:
        print(f"error: {oserrors.describe(exc, 'a file', resume=False)}", file=sys.stderr)
        return EXIT_USER
    except SystemExit as exc:  # argparse: --help, --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USER
    except Exception:  # noqa: BLE001 - internal failure: show the traceback, exit 1
        traceback.print_exc()
        print("internal error: please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
