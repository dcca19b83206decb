"""The ``check`` stage: acceptance gates over the run's records (non-zero exit on failure)."""

from __future__ import annotations

from pipeline.acceptance import evaluate_run
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["acceptance", "prune"]
INPUTS = ["bench", "parity", "quality"]


def run(ctx: RunContext) -> StageResult:
    """Evaluate ``acceptance``; the record's status is ``failed`` when any gate fails."""
    checks = evaluate_run(ctx.run_dir, ctx.cfg.acceptance, ctx.cfg.prune.target_latency)
    for c in checks:
        log("check", c.line())
    failed = [c.name for c in checks if not c.passed]
    metrics = {"checks": [c.__dict__ for c in checks], "passed": not failed, "failed": failed}
    if not checks:
        log("check", "no acceptance limits configured")
    return StageResult(metrics, status="failed" if failed else "ok", reason=", ".join(failed))
