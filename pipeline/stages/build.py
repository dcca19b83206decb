"""The ``build`` stage: TensorRT engines from the run's ONNX files (``compress-deploy build RUN`` too)."""

from __future__ import annotations

from deploy import tensorrt_backend
from deploy.engine_info import Profile
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["build", "device"]
INPUTS = ["export"]
ENVIRONMENT = ["tensorrt", "gpu"]


def reuse_level(ctx: RunContext) -> int | None:
    """The split level whose feature-reuse passes the export wrote (None: none exported)."""
    return ctx.cfg.sample.cache_level if ctx.cfg.export.feature_reuse else None


def run(ctx: RunContext) -> StageResult:
    """Build the engines; reports itself skipped (with the reason) where TensorRT cannot run."""
    cfg = ctx.cfg.build
    Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch).validate()
    reason = tensorrt_backend.unavailable_reason()
    if reason:
        log("build", f"skipped: {reason}")
        return StageResult({"engines": {}}, status="skipped", reason=reason)
    ctx.require("export", "build")
    engines, files = tensorrt_backend.build_run_engines(
        ctx.run_dir, cfg, lambda m: log("build", m), reuse_level(ctx)
    )
    return StageResult({"engines": engines}, files)
