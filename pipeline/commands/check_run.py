"""``compress-deploy check RUN [acceptance.key=value ...]``: a run's acceptance gates.

Exit 0 pass, 3 a gate failed, 4 no gate failed but a quality gate is inconclusive. Before deciding,
the records the gates read (and the artifacts they list) are checked against the hashes written
beside them; a limit set unlike the run's own config is named beside the verdict. Writes nothing.
"""

from __future__ import annotations

import sys

from compressor.errors import UserError
from pipeline.acceptance import EXIT_FAIL, EXIT_INCONCLUSIVE, FAIL, INCONCLUSIVE, PASS, evaluate_run, verdict
from pipeline.commands.args import run_settings
from rundir.records import limit_overrides, read_record, verify_records

# the records the gates read (prune: the latency target the run pruned for)
GATE_INPUTS = ("prune", "bench", "parity", "quality")


def override_text(overrides: list[dict]) -> str:
    """``acceptance.max_fd_ratio overridden on the command line: 1.6 (the run's config: 1.5); ...``."""

    def shown(value) -> str:
        return "null (off)" if value is None else str(value)

    def was(o: dict) -> str:
        recorded = o.get("recorded", True)
        return f"the run's config: {shown(o['run'])}" if recorded else "the run recorded no limits"

    return "; ".join(
        f"{o['key']} overridden on the command line: {shown(o['now'])} ({was(o)})" for o in overrides
    )


def main(argv: list[str]) -> int:
    """Print every gate and the verdict (the run's latency target included); exit 3 if any gate
    fails, 4 if none fails but a quality gate is inconclusive (its interval straddles the limit).

    Raises UserError (exit 2) when the run has nothing to gate, or when a record the gates read,
    or an artifact it lists, is damaged or differs from its hash (naming the file)."""
    run, cfg = run_settings("check", "acceptance", argv, "Acceptance gates of a run.")
    if not any(read_record(run, s) for s in ("bench", "parity", "quality")):
        raise UserError(f"{run} has no bench, parity or quality records; run the pipeline first")
    if not verify_records(run, GATE_INPUTS):
        print(f"note: {run}'s manifest predates record hashes; its records are not verified", file=sys.stderr)
    overrides = override_text(limit_overrides(run, cfg.acceptance))
    checks = evaluate_run(run, cfg.acceptance, cfg.prune.target_latency)
    if not checks:
        print("no acceptance limits configured (set acceptance.* in the config or as overrides)")
        if overrides:
            print(overrides)
        return 0
    for c in checks:
        print(c.line())
    result = verdict(checks)
    named = [c.name for c in checks if c.outcome == result]
    line = f"acceptance: {result.upper()}" + (f" ({', '.join(named)})" if result != PASS else "")
    print(line + (f"; {overrides}" if overrides else ""))
    return {FAIL: EXIT_FAIL, INCONCLUSIVE: EXIT_INCONCLUSIVE}.get(result, 0)
