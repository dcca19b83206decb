"""The ``export`` stage: dense and compressed UNets to ONNX (fp32 and fp16)."""

from __future__ import annotations

from compressor import runlayout
from compressor.persist import load_unet
from export.onnx_export import export_unet
from export.parity import quiet_polygraphy
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["export"]
INPUTS = ["prune", "finetune"]
ENVIRONMENT = ["torch", "onnx"]


def key_extra(ctx: RunContext) -> dict:
    """With feature reuse the split level (from the sample section) decides the two passes' graphs."""
    return {"sample.cache_level": ctx.cfg.sample.cache_level} if ctx.cfg.export.feature_reuse else {}


def parts(ctx: RunContext) -> list[str]:
    """The graphs each model exports: the UNet call, plus the two feature-reuse passes if asked."""
    return ["unet", "full", "shallow"] if ctx.cfg.export.feature_reuse else ["unet"]


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/export/{dense,pruned}/unet.{fp32,fp16}.onnx`` (and the passes) and check each."""
    cfg = ctx.cfg.export
    level = ctx.cfg.sample.cache_level
    source, folder = ctx.final_model_dir()
    models = {"dense": ctx.dense_on("cpu"), "pruned": load_unet(folder)[0]}
    quiet_polygraphy()
    files, facts = [], {}
    for model, unet in models.items():
        for precision in cfg.precisions:
            for part in parts(ctx):
                path = runlayout.onnx_path(ctx.run_dir, model, precision, part, level)
                info = export_unet(unet, path, precision, cfg.trace_batch, cfg.fold_constants, part, level)
                name = f"{model} {precision}" + ("" if part == "unet" else f" {part} pass (level {level})")
                log(
                    "export",
                    f"{name}: {info['nodes']} nodes ({info['nodes_exported']} before folding), "
                    f"{info['bytes'] / 1e6:.1f} MB, exported in {info['export_seconds']:.1f} s",
                )
                facts[f"{model}.{precision}" + ("" if part == "unet" else f".{part}")] = info
                files.append(path)
                if info["external_data"]:
                    files.append(path.with_name(path.name + ".data"))
    return StageResult({"files": facts, "compressed_from": source}, files)
