"""Running stages in a run directory: order, caching, records and the manifest.

Used by the command line and by the ablation (which runs many small pipelines), so neither
imports the other.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from compressor import oserrors
from compressor.config import RunConfig
from compressor.errors import UserError
from compressor.preflight import check_model_settings, check_stages_asked
from compressor.stack import StackChoice
from pipeline.cache import dependents, stage_key, update_manifest, why_rerun
from pipeline.context import RunContext, StageCall, log
from pipeline.runlock import RunLock
from pipeline.stages import STAGES
from rundir import layout


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
    found = [p for p in run_dir.glob("*") if layout.is_temporary(p)]
    if stage:
        found += [p for p in layout.stage_dir(run_dir, stage).rglob("*") if layout.is_temporary(p)]
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
    choice: StackChoice | None = None,
) -> dict[str, dict]:
    """Run ``stages`` in order in ``run_dir``, skipping unchanged ones; returns their records.

    Holds the run directory's lock throughout (re-entrant: a caller that holds it already, such as
    the sweep around a run with a latency target over levers, keeps it). A stage that fails (OS
    error, bad input, interrupt) leaves no temporary files behind, earlier stages' outputs and the
    manifest stay as they were, and OS errors become one-line UserErrors naming the path.
    ``choice``: the stack a latency target over levers chose (:mod:`pipeline.frontier.target`),
    which the stages read as ``ctx.stack``; ``cfg`` is used as given for every stage. Settings that
    cannot work with the model (:func:`compressor.preflight.check_model_settings`) are refused
    first, before the run directory is touched.
    """
    check_model_settings(cfg, stages=stages)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = RunContext(cfg, run_dir, choice)
    if not ctx.is_main:  # data-parallel ranks: rank 0 owns the directory and its lock
        return _run_stages(ctx, stages, force)
    make_run_dir(run_dir)
    with RunLock(run_dir, " ".join(["compress-deploy", *sys.argv[1:]])):
        return _run_stages(ctx, stages, force)


def _run_stages(ctx: RunContext, stages: list[str], force: set[str] | None) -> dict[str, dict]:
    run_dir = ctx.run_dir
    ctx.claim()
    forced = dependents({n: STAGES[n] for n in stages}, force or set())
    records = {}
    current = None
    try:
        for name in stages:
            current = name
            module = STAGES[name]
            key = stage_key(ctx, name, module)
            reason = why_rerun(ctx, name, key, name in forced)
            if reason is None:
                log(name, "cached: config and inputs unchanged, outputs verified")
                records[name] = ctx.record(name).data
                continue
            log(name, f"start ({reason})")
            began = time.perf_counter()
            result = module.run(ctx.at_stage(StageCall(name, key["key"], name in forced)))
            seconds = time.perf_counter() - began
            rec = ctx.write_record(name, module.SECTIONS, result, seconds, cache=key)
            if ctx.is_main:
                update_manifest(ctx, name, rec)
            records[name] = rec
            log(name, f"{result.status} in {seconds:.1f} s -> {layout.record_path(run_dir, name)}")
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
            where = f"the {current} stage's files in {layout.stage_dir(run_dir, current or '')}"
            raise UserError(f"{current} stage: {oserrors.describe(os_error, where)}") from None
        raise
    return records
