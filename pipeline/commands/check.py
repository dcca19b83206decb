"""``compress-deploy check RUN [acceptance.key=value ...]``: a run's acceptance gates.

Exit 0 pass, 3 a gate failed, 4 no gate failed but a quality gate is inconclusive.
"""

from __future__ import annotations

from compressor.errors import UserError
from compressor.records import read_record
from pipeline.acceptance import EXIT_FAIL, EXIT_INCONCLUSIVE, FAIL, INCONCLUSIVE, PASS, evaluate_run, verdict
from pipeline.commands.args import run_settings


def main(argv: list[str]) -> int:
    """Print every gate and the verdict (the run's latency target included); exit 3 if any gate
    fails, 4 if none fails but a quality gate is inconclusive (its interval straddles the limit)."""
    run, cfg = run_settings("check", "acceptance", argv, "Acceptance gates of a run.")
    if not any(read_record(run, s) for s in ("bench", "parity", "quality")):
        raise UserError(f"{run} has no bench, parity or quality records; run the pipeline first")
    checks = evaluate_run(run, cfg.acceptance, cfg.prune.target_latency)
    if not checks:
        print("no acceptance limits configured (set acceptance.* in the config or as overrides)")
        return 0
    for c in checks:
        print(c.line())
    result = verdict(checks)
    named = [c.name for c in checks if c.outcome == result]
    print(f"acceptance: {result.upper()}" + (f" ({', '.join(named)})" if result != PASS else ""))
    return {FAIL: EXIT_FAIL, INCONCLUSIVE: EXIT_INCONCLUSIVE}.get(result, 0)
