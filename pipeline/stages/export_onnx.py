"""The ``export`` stage: dense and compressed UNets to ONNX (fp32 and fp16)."""

from __future__ import annotations

from compressor.persist import load_unet, student_sampling
from compressor.sampling import make_scheduler
from export.compare import quiet_polygraphy
from export.onnx_export import export_unet
from export.quantize import calibration_inputs, quantize_unet
from pipeline.context import RunContext, StageResult, log
from rundir import layout

SECTIONS = ["export"]
INPUTS = ["prune", "finetune", "distill_steps"]
ENVIRONMENT = ["torch", "onnx"]


def key_extra(ctx: RunContext) -> dict:
    """Settings of other sections the files depend on: the split level, the calibration seeds."""
    extra = {"sample.cache_level": ctx.cfg.sample.cache_level} if ctx.cfg.export.feature_reuse else {}
    if "int8" in ctx.cfg.export.precisions:
        extra["sample.seed"] = ctx.cfg.sample.seed
    return extra


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
        for precision in [p for p in cfg.precisions if p != "int8"]:
            for part in parts(ctx):
                path = layout.onnx_path(ctx.run_dir, model, precision, part, level)
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
        if "int8" in cfg.precisions:
            student = student_sampling(folder) if model == "pruned" and source == "distill_steps" else None
            facts[f"{model}.int8"] = _quantize(ctx, model, unet, student)
            files.append(layout.onnx_path(ctx.run_dir, model, "int8"))
    return StageResult({"files": facts, "compressed_from": source}, files)


def _quantize(ctx: RunContext, model: str, unet, student: tuple[dict, int] | None = None) -> dict:
    """``unet.int8.onnx`` from the fp32 export, calibrated on the model's own sampler trajectory
    (a few-step student's: its DDIM grid at its steps)."""
    cfg = ctx.cfg.export
    sched_cfg, steps = student or (ctx.dense.scheduler_config, cfg.calibration_steps)
    feeds = calibration_inputs(
        unet, make_scheduler("ddim", sched_cfg), ctx.image_shape(), cfg.calibration_images, steps,
        ctx.cfg.sample.seed,
    )  # fmt: skip
    path = layout.onnx_path(ctx.run_dir, model, "int8")
    info = quantize_unet(layout.onnx_path(ctx.run_dir, model, "fp32"), path, feeds)
    log(
        "export",
        f"{model} int8: {info['dequantize_nodes']} Q/DQ pairs, calibrated on {info['calibration_inputs']} "
        f"inputs at {len(info['calibration_timesteps'])} timesteps, {info['export_seconds']:.1f} s",
    )
    return info
