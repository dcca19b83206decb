"""A latency target over levers (``prune.target_latency.levers`` beyond ``prune``): a sweep around the
run, not a stage inside it.

:func:`run_with_target` is how the command line runs a config. Without such a target it is the
ordinary pipeline. With one, choosing the stack is one step before the stages that use it, under the
run's lock: when the prune stage is to run, :func:`choose_stack` measures the frontier of the free
levers (in ``RUN/frontier``, or ``frontier.dir`` whose measurements runs of one config may share;
every measurement is cached by content), chooses by the within-noise rule (:func:`~pipeline.
frontier.choice.choose`) and writes ``RUN/frontier/frontier.json`` (``chosen``); otherwise the
choice the prune stage recorded (``target.frontier``) is read back. The run then receives the
choice as an explicit, typed input (:class:`~compressor.stack.StackChoice`, ``ctx.stack`` in the
stages) and a config settled once, before its first stage (:func:`~pipeline.frontier.grid.
apply_stack`: export adds the stack's precision and reuse passes, a student stack sets
``distill_steps.target_steps``): the prune stage prunes at the chosen ratio, quality samples with
the stack's sampler, bench times it, ``check`` gates it. Stages that come before the prune stage
(``train``: the dense model the frontier measures) run first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from compressor.config import RunConfig
from compressor.errors import UserError
from compressor.preflight import check_model_settings
from compressor.stack import Stack, StackChoice
from pipeline.context import RunContext, log
from pipeline.frontier.choice import choose
from pipeline.frontier.grid import apply_stack, lever_grid, spec_from_config
from pipeline.frontier.measure import measure
from pipeline.frontier.tables import choice_text, write
from pipeline.runlock import RunLock
from pipeline.runner import make_run_dir, run_pipeline
from rundir import layout
from rundir.records import stack_choice


def choose_stack(cfg: RunConfig, run_dir: Path) -> StackChoice:
    """Measure the frontier the run's target may search, choose its stack, write ``RUN/frontier``;
    the choice, whose summary the prune record keeps as ``target.frontier``. UserError when no
    stack meets the target."""
    lat = cfg.prune.target_latency
    levers = list(lat.levers)
    out = layout.frontier_dir(run_dir)
    where = Path(cfg.frontier.dir) if cfg.frontier.dir else out
    threads = lat.threads or cfg.frontier.threads or cfg.bench.threads
    spec = spec_from_config(cfg, where, lever_grid(cfg, levers), backend=lat.backend, batch=lat.batch,
                            threads=threads)  # fmt: skip
    found = measure(spec)
    found["measured_in"] = str(where)
    chosen = choose(found["points"], lat.speedup, lat.ms, lat.margin,
                    max_increase=cfg.acceptance.max_fd_increase,
                    min_adherence_ratio=cfg.acceptance.min_adherence_ratio)  # fmt: skip
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
    summary = {
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
    return StackChoice(Stack.from_dict(chosen["stack"]), summary)


def run_with_target(
    cfg: RunConfig, run_dir: Path, stages: list[str], force: set[str] | None = None
) -> dict[str, dict]:
    """Run ``stages``; with a latency target over levers, choose the stack first and run the stages
    with it (see the module's docstring). Returns the stages' records."""
    lat = cfg.prune.target_latency
    if not lat.uses_frontier:
        return run_pipeline(cfg, run_dir, stages, force)
    if "prune" in stages and "student" in lat.levers and "distill_steps" not in stages:
        # the chosen stack may be a few-step student: the run must be able to train it (the stage
        # skips itself when the choice is not a student)
        at = stages.index("finetune") + 1 if "finetune" in stages else stages.index("prune") + 1
        stages = [*stages[:at], "distill_steps", *stages[at:]]
    before = stages[: stages.index("prune")] if "prune" in stages else []
    check_model_settings(cfg, stages=stages)  # before the run directory is touched
    make_run_dir(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # data-parallel ranks: rank 0 holds the lock
    with RunLock(run_dir, " ".join(["compress-deploy", *sys.argv[1:]])) if main else contextlib.nullcontext():
        RunContext(cfg, run_dir).claim()  # refuse another config's run directory before measuring
        records = run_pipeline(cfg, run_dir, before, force) if before else {}
        choice = choose_stack(cfg, run_dir) if "prune" in stages else stack_choice(run_dir)
        settled = apply_stack(cfg, choice.stack) if choice else cfg
        records.update(run_pipeline(settled, run_dir, stages[len(before) :], force, choice))
    return records
