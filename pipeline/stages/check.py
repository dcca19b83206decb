"""The ``check`` stage: acceptance gates over the run's records (non-zero exit on failure)."""

from __future__ import annotations

from pipeline.acceptance import FAIL, INCONCLUSIVE, PASS, evaluate_run, verdict
from pipeline.context import RunContext, StageResult, log
from rundir.records import verify_records

SECTIONS = ["acceptance", "prune"]
INPUTS = ["bench", "parity", "quality"]


def run(ctx: RunContext) -> StageResult:
    """Evaluate ``acceptance``; the record's status is ``failed`` when any gate fails, else
    ``inconclusive`` when a quality gate's interval straddles its limit.

    The records the gates read (and the artifacts they list) are verified against their hashes
    first (RecordError, one line naming the file, when one differs). ``metrics.overrides`` is
    empty: the stage gates with the run's own config (``compress-deploy check RUN key=value`` names
    its overrides beside its verdict, from :func:`rundir.records.limit_overrides`).
    """
    if not verify_records(ctx.run_dir, ["prune", *INPUTS]):
        log("check", "the run's manifest predates record hashes; its records are not verified")
    checks = evaluate_run(ctx.run_dir, ctx.cfg.acceptance, ctx.cfg.prune.target_latency)
    for c in checks:
        log("check", c.line())
    failed = [c.name for c in checks if c.outcome == FAIL]
    unsure = [c.name for c in checks if c.outcome == INCONCLUSIVE]
    result = verdict(checks)
    metrics = {
        "checks": [c.__dict__ for c in checks],
        "passed": result == PASS,
        "failed": failed,
        "inconclusive": unsure,
        "verdict": result,
        "overrides": [],
    }
    if not checks:
        log("check", "no acceptance limits configured")
    status = {FAIL: "failed", INCONCLUSIVE: "inconclusive"}.get(result, "ok")
    return StageResult(metrics, status=status, reason=", ".join(failed or unsure))
