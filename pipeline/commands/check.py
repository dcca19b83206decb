"""``compress-deploy check RUN [acceptance.key=value ...]``: a run's acceptance gates, exit 3 on failure."""

from __future__ import annotations

from compressor.errors import UserError
from compressor.records import read_record
from pipeline.acceptance import evaluate_run
from pipeline.commands.args import run_settings


def main(argv: list[str]) -> int:
    """Print every gate and the verdict (the run's latency target included); exit 3 if any fails."""
    run, cfg = run_settings("check", "acceptance", argv, "Acceptance gates of a run.")
    if not any(read_record(run, s) for s in ("bench", "parity", "quality")):
        raise UserError(f"{run} has no bench, parity or quality records; run the pipeline first")
    checks = evaluate_run(run, cfg.acceptance, cfg.prune.target_latency)
    if not checks:
        print("no acceptance limits configured (set acceptance.* in the config or as overrides)")
        return 0
    for c in checks:
        print(c.line())
    failed = [c.name for c in checks if not c.passed]
    print(f"acceptance: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 3 if failed else 0
