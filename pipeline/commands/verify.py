"""``compress-deploy verify RUN``: re-hash every artifact against the run's manifest."""

from __future__ import annotations

import sys

from compressor.errors import UserError
from pipeline.commands.args import CommandParser, run_arg
from rundir import layout
from rundir.artifacts import verify_run


def main(argv: list[str]) -> int:
    """One line per missing, changed or extra file; exit 2 when any."""
    parser = CommandParser(prog="compress-deploy verify", description="Verify a run's artifacts.")
    run_arg(parser)
    args = parser.parse_args(argv)
    manifest = layout.manifest_path(args.run)
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; pass a run directory written by compress-deploy")
    report = verify_run(args.run)
    for kind, paths in report.items():
        for rel in paths:
            print(f"{kind.upper():8} {rel}")
    bad = sum(len(v) for v in report.values())
    if bad:
        print(
            f"error: {bad} artifact(s) missing, changed or extra in {args.run}; rerun the stages that wrote "
            "them with --force STAGE",
            file=sys.stderr,
        )
        return 2
    print(f"all artifacts in {args.run} match {manifest.name}")
    return 0
