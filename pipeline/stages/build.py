"""The ``build`` stage (and ``compress-deploy build RUN``): TensorRT engines from ONNX files."""

from __future__ import annotations

from pathlib import Path

from compressor import runlayout
from compressor.config import BuildConfig
from compressor.errors import ArtifactError
from deploy import tensorrt_backend
from deploy.engines import Profile
from export.onnx_export import check_onnx, onnx_sample_shape
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["build", "device"]
INPUTS = ["export"]
ENVIRONMENT = ["tensorrt", "gpu"]


def build_engines(run_dir: Path, cfg: BuildConfig) -> StageResult:
    """Build dense and pruned engines from ``RUN/export``; needs only the ONNX files."""
    profile = Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    profile.validate()
    tensorrt_backend.require_tensorrt()
    source = cfg.precision  # strongly typed on 10 and 11: the engine's precision is the ONNX file's
    cache = runlayout.timing_cache(run_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    engines, files = {}, []
    for model in ("dense", "pruned"):
        src = runlayout.onnx_path(run_dir, model, source)
        if not src.is_file():
            raise ArtifactError(
                f"{src} not found; run the export stage (with export.precisions incl. {source})"
            )
        check_onnx(src)
        dst = runlayout.engine_path(run_dir, model)
        log(
            "build", f"{model}: {src.name} -> {dst} ({cfg.precision}, batch {cfg.min_batch}..{cfg.max_batch})"
        )
        manifest = tensorrt_backend.build_engine(
            src,
            dst,
            profile,
            onnx_sample_shape(src),
            cfg.precision,
            cfg.workspace_gib,
            cfg.optimization_level,
            cache,
            model,
        )
        log("build", f"{model}: built in {manifest['build_seconds']:.1f} s")
        engines[model] = manifest
        files += [dst, dst.with_name(dst.name + ".json")]
    return StageResult({"engines": engines}, files + [cache])


def run(ctx: RunContext) -> StageResult:
    """Build the engines; reports itself skipped (with the reason) where TensorRT cannot run."""
    cfg = ctx.cfg.build
    Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch).validate()
    reason = tensorrt_backend.unavailable_reason()
    if reason:
        log("build", f"skipped: {reason}")
        return StageResult({"engines": {}}, status="skipped", reason=reason)
    ctx.require("export", "build")
    return build_engines(ctx.run_dir, cfg)
