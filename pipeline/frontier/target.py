"""A latency target over levers (``prune.target_latency.levers`` beyond ``prune``): a sweep around the
run, not a stage inside it.

:func:`run_with_target` is how the command line runs a config. Without such a target it is the
ordinary pipeline. With one, and when the prune stage is to run, the pipeline is started with
:func:`choose_stack` as its plan: under the run's lock, before the prune stage, the frontier of the
free levers is measured (in ``RUN/frontier``, or ``frontier.dir`` whose measurements runs of one
config may share), the stack is chosen by the within-noise rule (:func:`~pipeline.frontier.choice.
choose`) and written to ``RUN/frontier/frontier.json`` (``chosen``). The prune stage then only
prunes, at the chosen ratio (its record keeps the choice as ``target.frontier``), and the later
stages use the chosen stack (the runner applies it: export adds its precision and reuse passes,
quality samples with its sampler, bench times it, ``check`` gates it).
"""

from __future__ import annotations

from pathlib import Path

from compressor import runlayout
from compressor.config import RunConfig
from compressor.errors import UserError
from pipeline.context import RunContext, log
from pipeline.frontier.choice import choose
from pipeline.frontier.grid import lever_grid, spec_from_config
from pipeline.frontier.measure import measure
from pipeline.frontier.tables import choice_text, write
from pipeline.runner import run_pipeline


def choose_stack(ctx: RunContext) -> dict:
    """Measure the frontier the run's target may search, choose its stack, write ``RUN/frontier``;
    the summary the prune record keeps as ``target.frontier``. UserError when no stack meets it."""
    cfg = ctx.cfg
    lat = cfg.prune.target_latency
    levers = list(lat.levers)
    out = runlayout.frontier_dir(ctx.run_dir)
    where = Path(cfg.frontier.dir) if cfg.frontier.dir else out
    threads = lat.threads or cfg.frontier.threads or cfg.bench.threads
    spec = spec_from_config(cfg, where, lever_grid(cfg, levers), backend=lat.backend, batch=lat.batch,
                            threads=threads)  # fmt: skip
    found = measure(spec)
    found["measured_in"] = str(where)
    chosen = choose(found["points"], lat.speedup, lat.ms, lat.margin,
                    max_increase=cfg.acceptance.max_fd_increase)  # fmt: skip
    found.update(target=lat.goal(), levers=levers, chosen=chosen)
    write(found, out)
    if chosen is None:
        fastest = max(found["points"], key=lambda p: p["speedup"])
        raise UserError(
            f"prune.target_latency: {lat.goal()} (sampler, {lat.backend}, batch {lat.batch}) is not "
            f"reachable with levers {', '.join(levers)}: the fastest measured stack is "
            f"{fastest['label']} at {fastest['speedup']:.2f}x; widen frontier.* or lower the target "
            f"(see {out / 'frontier.md'})"
        )
    shown = choice_text(chosen, lat.goal(), found["metric"]).replace("**", "")
    log("prune", f"frontier: {len(found['points'])} stacks measured; {shown}")
    return {
        "target": lat.goal(),
        "levers": levers,
        "backend": lat.backend,
        "batch": lat.batch,
        "margin": lat.margin,
        "reference": found["reference"],
        "stacks": len(found["points"]),
        "measured_in": str(where),
        "chosen": chosen,
    }


def run_with_target(
    cfg: RunConfig, run_dir: Path, stages: list[str], force: set[str] | None = None
) -> dict[str, dict]:
    """Run ``stages``; with a latency target over levers, measure and choose the stack first (see the
    module's docstring). Returns the stages' records."""
    if cfg.prune.target_latency.uses_frontier and "prune" in stages:
        if "student" in cfg.prune.target_latency.levers and "distill_steps" not in stages:
            # the chosen stack may be a few-step student: the run must be able to train it (the stage
            # skips itself when the choice is not a student)
            at = stages.index("finetune") + 1 if "finetune" in stages else stages.index("prune") + 1
            stages = [*stages[:at], "distill_steps", *stages[at:]]
        return run_pipeline(cfg, run_dir, stages, force, plan=choose_stack)
    return run_pipeline(cfg, run_dir, stages, force)
