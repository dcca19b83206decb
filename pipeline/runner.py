"""Running stages in a run directory: order, caching, records and the manifest.

Used by the command line and by the ablation (which runs many small pipelines), so neither
imports the other.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from compressor import oserrors, runlayout
from compressor.config import RunConfig
from compressor.errors import UserError
from compressor.preflight import check_model_settings, check_stages_asked
from pipeline.cache import dependents, stage_key, update_manifest, why_rerun
from pipeline.context import RunContext, log
from pipeline.runlock import RunLock
from pipeline.stages import STAGES


def parse_stages(text: str | None, cfg: RunConfig) -> list[str]:
    """Stage names from ``--stages`` (or the config), validated, deduplicated, in pipeline order.

    The config's own list is refused (ConfigError, with the fix) when a setting asks for a stage
    it lacks (:func:`compressor.preflight.check_stages_asked`); an explicit ``--stages`` is taken
    as given.
    """
    names = [s.strip() for s in text.split(",") if s.strip()] if text else list(cfg.stages)
    for name in names:
        if name not in STAGES:
            raise UserError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    if not names:
        raise UserError(f"--stages is empty; give some of: {', '.join(STAGES)}")
    order = list(STAGES)
    names = sorted(dict.fromkeys(names), key=order.index)  # always in pipeline order
    if not text:
        check_stages_asked(cfg, names, order)
    return names


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; carries the signal and the stage it stopped."""

    def __init__(self, signum: int, stage: str | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.stage = stage


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and parents) or raise a one-line UserError saying why not."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; pass a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(oserrors.describe(exc, str(run_dir), resume=False, verb="create")) from None


def remove_temporaries(run_dir: Path, stage: str | None) -> list[Path]:
    """Delete half-written files and folders of ``stage`` (and of the run's own bookkeeping)."""
    found = [p for p in run_dir.glob("*") if runlayout.is_temporary(p)]
    if stage:
        found += [p for p in runlayout.stage_dir(run_dir, stage).rglob("*") if runlayout.is_temporary(p)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    stages: list[str],
    force: set[str] | None = None,
    plan: Callable[[RunContext], dict] | None = None,
) -> dict[str, dict]:
    """Run ``stages`` in order in ``run_dir``, skipping unchanged ones; returns their records.

    Holds the run directory's lock throughout. A stage that fails (OS error, bad input,
    interrupt) leaves no temporary files behind, earlier stages' outputs and the manifest
    stay as they were, and OS errors become one-line UserErrors naming the path. ``plan``
    (a latency target over levers, :mod:`pipeline.frontier.target`) runs under the lock just
    before the prune stage and hands it the chosen stack (``ctx.frontier_choice``). Settings that
    cannot work with the model (:func:`compressor.preflight.check_model_settings`) are refused
    first, before the run directory is touched.
    """
    import torch

    check_model_settings(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = RunContext(cfg, run_dir)
    if not ctx.is_main:  # data-parallel ranks: rank 0 owns the directory and its lock
        return _run_stages(ctx, stages, force, plan)
    make_run_dir(run_dir)
    with RunLock(run_dir, " ".join(["compress-deploy", *sys.argv[1:]])):
        return _run_stages(ctx, stages, force, plan)


def _apply_chosen(ctx: RunContext) -> None:
    """After a latency target over levers chose a stack: later stages use it (and export what it needs)."""
    if not ctx.cfg.prune.target_latency.uses_frontier:
        return
    from compressor.records import chosen_stack
    from pipeline.frontier.grid import apply_stack

    ctx.chosen = chosen_stack(ctx.run_dir)
    ctx.cfg = apply_stack(ctx.cfg, ctx.chosen)


def _run_stages(
    ctx: RunContext, stages: list[str], force: set[str] | None, plan: Callable[[RunContext], dict] | None
) -> dict[str, dict]:
    run_dir = ctx.run_dir
    ctx.claim()
    forced = dependents({n: STAGES[n] for n in stages}, force or set())
    records = {}
    current = None
    try:
        for name in stages:
            current = name
            if name != "prune":
                _apply_chosen(ctx)
            elif plan is not None:
                ctx.frontier_choice = plan(ctx)
            module = STAGES[name]
            key = stage_key(ctx, name, module)
            reason = why_rerun(ctx, name, key, name in forced)
            if reason is None:
                log(name, "cached: config and inputs unchanged, outputs verified")
                records[name] = ctx.record(name).data
                continue
            log(name, f"start ({reason})")
            ctx.stage_key = key["key"]  # e.g. checkpoints are only resumed under the same key
            ctx.forced = name in forced
            began = time.perf_counter()
            result = module.run(ctx)
            seconds = time.perf_counter() - began
            rec = ctx.write_record(name, module.SECTIONS, result, seconds, cache=key)
            if ctx.is_main:
                update_manifest(ctx, name, rec)
            records[name] = rec
            log(name, f"{result.status} in {seconds:.1f} s -> {runlayout.record_path(run_dir, name)}")
    except BaseException as exc:
        if ctx.is_main:
            remove_temporaries(run_dir, current)
        if isinstance(exc, Interrupted):
            exc.stage = current
            raise
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(signal.SIGINT, current) from None
        if isinstance(exc, UserError):
            raise
        os_error = oserrors.as_os_error(exc)
        if os_error is not None:
            where = f"the {current} stage's files in {runlayout.stage_dir(run_dir, current or '')}"
            raise UserError(f"{current} stage: {oserrors.describe(os_error, where)}") from None
        raise
    return records
