"""The ``build`` stage: TensorRT engines from the run's ONNX files (``compress-deploy build RUN`` too).

A conditional model's run builds its three graphs: the dense and compressed UNets with their
conditioning (a profile of UNet rows, twice the images under ``sample.guidance_scale`` > 1) and the
shared text encoder and VAE decoder (``RUN/build/shared/``): :func:`deploy.engine_info.run_graphs`.
Engines over a range of image sizes (``build.sizes`` other than the model's side) are built from the
UNets and VAE decoder exported again with dynamic height and width (``RUN/build/graphs/``,
:mod:`export.sized_graphs`).
"""

from __future__ import annotations

from pathlib import Path

from compressor.errors import ArtifactError
from compressor.persist import load_unet
from deploy import tensorrt_backend
from deploy.engine_info import check_sizes, conditioned_unet, run_graphs, sized_graphs_needed
from export.sized_graphs import export_run_sized_graphs
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["build", "device"]
INPUTS = ["export"]
ENVIRONMENT = ["tensorrt", "gpu"]


def reuse_level(ctx: RunContext) -> int | None:
    """The split level whose feature-reuse passes the export wrote (None: none exported)."""
    return ctx.cfg.sample.cache_level if ctx.cfg.export.feature_reuse else None


def key_extra(ctx: RunContext) -> dict:
    """A conditioned UNet graph's engines are profiled over guided rows: the guidance scale (nothing for
    an unconditional model, whose key is as before; read from the exported graph, no model loaded)."""
    if not conditioned_unet(ctx.run_dir, ctx.cfg.build.precision):
        return {}
    return {"sample.guidance_scale": ctx.cfg.sample.guidance_scale}


def run(ctx: RunContext) -> StageResult:
    """Build the engines; reports itself skipped (with the reason) where TensorRT cannot run."""
    cfg = ctx.cfg.build
    cfg.check_shapes()
    check_sizes(ctx.run_dir, cfg)  # refused here too where TensorRT cannot run
    reason = tensorrt_backend.unavailable_reason()
    if reason:
        log("build", f"skipped: {reason}")
        return StageResult({"engines": {}, **planned(ctx)}, status="skipped", reason=reason)
    ctx.require("export", "build")
    sized = export_sized(ctx)
    engines, files = tensorrt_backend.build_run_engines(
        ctx.run_dir, cfg, lambda m: log("build", m), reuse_level(ctx), ctx.cfg.sample.guidance_scale
    )
    return StageResult({"engines": engines}, sized + files)


def planned(ctx: RunContext) -> dict:
    """A conditioned run's build skipped here: ``{"planned": {key: ...}}``, every engine it would build
    with its profile, profile shapes and workspace limit (sizes and memory unknown until built); {} for an
    unconditional run (its record as before) or one whose graphs are not all there yet."""
    cfg = ctx.cfg.build
    if not conditioned_unet(ctx.run_dir, cfg.precision):
        return {}
    try:
        graphs = run_graphs(ctx.run_dir, cfg, reuse_level(ctx), ctx.cfg.sample.guidance_scale)
    except ArtifactError:
        return {}
    workspace = int(cfg.workspace_gib * (1 << 30))
    return {
        "planned": {
            g.key: {
                "onnx": str(g.onnx.relative_to(ctx.run_dir)),
                "engine": str(g.engine.relative_to(ctx.run_dir)),
                "precision": g.precision,
                "profile": g.profile.record(),
                **tensorrt_backend.engine_facts(g.profile, g.profile.shapes(g.inputs), None, workspace, None),
            }
            for g in graphs
        }
    }


def export_sized(ctx: RunContext) -> list[Path]:
    """The UNets and VAE decoder exported with dynamic height and width when ``build.sizes`` asks for
    sides other than the model's (:func:`deploy.engine_info.sized_graphs_needed`); the files written."""
    cfg = ctx.cfg.build
    if not sized_graphs_needed(ctx.run_dir, cfg):
        return []
    log("build", f"build.sizes {cfg.sizes}: the UNets and VAE decoder exported with dynamic height and width")
    unets = {"dense": ctx.dense_on("cpu"), "pruned": load_unet(ctx.final_model_dir()[1])[0]}
    spec = ctx.dense.spec if ctx.dense.conditioning != "none" else None
    return export_run_sized_graphs(ctx.run_dir, cfg.precision, unets, spec, ctx.dense.vae)
