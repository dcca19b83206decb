"""The ``export`` stage: dense and compressed UNets to ONNX (fp32 and fp16).

A conditional model's UNet graphs take its conditioning too (``encoder_hidden_states`` and/or
``class_labels``, from the model's description), and the pipeline's other graphs are exported once,
shared by both UNets (``RUN/export/shared/``): the text encoder of a text-conditioned model and the
VAE decoder of a latent one, in each precision but int8 (only the UNet is quantized). Its int8 UNet
is calibrated on the guided sampler's inputs with the run's prompts (``sample.guidance_scale``), and
its feature-reuse passes (``export.feature_reuse``) take the conditioning inputs after ``timestep``.
"""

from __future__ import annotations

from compressor.guidance import distilled_scale, sampled_guidance
from compressor.persist import load_unet, student_sampling
from compressor.sampling import make_scheduler
from export.compare import quiet_polygraphy
from export.onnx_export import export_unet
from export.pipeline_graphs import TEXT_ENCODER, VAE_DECODER, export_text_encoder, export_vae_decoder
from export.quantize import calibration_inputs, quantize_unet
from pipeline.context import RunContext, StageCall, StageResult, log
from rundir import layout

SECTIONS = ["export"]
INPUTS = ["prune", "finetune", "distill_steps"]
ENVIRONMENT = ["torch", "onnx"]
# what a conditional model's int8 calibration reads besides sample.seed: the prompts and the guidance
PROMPT_KEYS = ("prompts", "prompt_file", "negative_prompt", "guidance_scale")
LABELS = {TEXT_ENCODER: "text encoder", VAE_DECODER: "VAE decoder"}


def key_extra(ctx: RunContext) -> dict:
    """Settings of other sections the files depend on: the split level, the calibration seeds (and a
    conditional model's prompts and guidance scale)."""
    extra = {"sample.cache_level": ctx.cfg.sample.cache_level} if ctx.cfg.export.feature_reuse else {}
    if "int8" in ctx.cfg.export.precisions:
        extra["sample.seed"] = ctx.cfg.sample.seed
        if ctx.at_stage(StageCall("export", "")).dense.conditioning != "none":  # loaded once, shared
            extra.update({f"sample.{k}": getattr(ctx.cfg.sample, k) for k in PROMPT_KEYS})
            extra.update(
                {"data.source": ctx.cfg.data.source, "data.prompt_template": ctx.cfg.data.prompt_template}
            )
    return extra


def parts(ctx: RunContext) -> list[str]:
    """The graphs each model exports: the UNet call, plus the two feature-reuse passes if asked."""
    return ["unet", "full", "shallow"] if ctx.cfg.export.feature_reuse else ["unet"]


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/export/{dense,pruned}/unet.{fp32,fp16}.onnx`` (and the passes, or a conditional
    model's shared text encoder and VAE decoder graphs) and check each."""
    cfg = ctx.cfg.export
    level = ctx.cfg.sample.cache_level
    source, folder = ctx.final_model_dir()
    models = {"dense": ctx.dense_on("cpu"), "pruned": load_unet(folder)[0]}
    spec = ctx.dense.spec if ctx.dense.conditioning != "none" else None
    quiet_polygraphy()
    files, facts = [], {}
    for model, unet in models.items():
        for precision in [p for p in cfg.precisions if p != "int8"]:
            for part in parts(ctx):
                path = layout.onnx_path(ctx.run_dir, model, precision, part, level)
                info = export_unet(
                    unet, path, precision, cfg.trace_batch, cfg.fold_constants, part, level, spec
                )
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
    if spec is not None:
        shared_facts, shared_files = _export_shared(ctx)
        facts.update(shared_facts)
        files += shared_files
    return StageResult({"files": facts, "compressed_from": source}, files)


def _export_shared(ctx: RunContext) -> tuple[dict, list]:
    """The text encoder (text models) and VAE decoder (latent models) graphs, once for both UNets, in
    each of ``export.precisions`` but int8: ``RUN/export/shared/<graph>.<precision>.onnx``."""
    dense = ctx.dense
    graphs = ([TEXT_ENCODER] if dense.conditioning == "text" else []) + (
        [VAE_DECODER] if dense.latent else []
    )
    facts, files = {}, []
    for precision in [p for p in ctx.cfg.export.precisions if p != "int8"]:
        for graph in graphs:
            path = layout.shared_onnx_path(ctx.run_dir, graph, precision)
            if graph == TEXT_ENCODER:
                info = export_text_encoder(dense.text_encoder, path, dense.spec.tokens, precision)
            else:
                info = export_vae_decoder(dense.vae, path, precision, latent_shape=dense.sample_shape)
            log(
                "export",
                f"{LABELS[graph]} {precision} (shared): {info['nodes']} nodes "
                f"({info['nodes_exported']} before folding), {info['bytes'] / 1e6:.1f} MB, "
                f"exported in {info['export_seconds']:.1f} s",
            )
            facts[f"{graph}.{precision}"] = {**info, "path": path.relative_to(path.parents[1]).as_posix()}
            files.append(path)
            if info["external_data"]:
                files.append(path.with_name(path.name + ".data"))
    return facts, files


def _quantize(ctx: RunContext, model: str, unet, student: tuple[dict, int] | None = None) -> dict:
    """``unet.int8.onnx`` from the fp32 export, calibrated on the model's own sampler trajectory
    (a few-step student's: its DDIM grid at its steps; a conditional model's: guided, with the run's
    prompts)."""
    cfg = ctx.cfg.export
    sched_cfg, steps = student or (ctx.dense.scheduler_config, cfg.calibration_steps)
    guided = {}
    if ctx.dense.conditioning != "none":
        guided = {
            "conditioning": ctx.prompts.conditioning(ctx.dense, cfg.calibration_images, 0, "cpu"),
            "guidance_scale": ctx.cfg.sample.guidance_scale,
        }
    feeds = calibration_inputs(
        unet, make_scheduler("ddim", sched_cfg), ctx.image_shape(), cfg.calibration_images, steps,
        ctx.cfg.sample.seed, **guided,
    )  # fmt: skip
    path = layout.onnx_path(ctx.run_dir, model, "int8")
    info = quantize_unet(layout.onnx_path(ctx.run_dir, model, "fp32"), path, feeds)
    if guided:  # what the trajectory was: a conditional model's record says so (unconditional: as before)
        scheduler = make_scheduler("ddim", sched_cfg)
        scale = sampled_guidance(scheduler, guided["guidance_scale"])
        info["calibration"] = {
            "sampler": f"ddim:{steps}",
            "images": cfg.calibration_images,
            "guidance_scale": scale,
            "unet_batch": "2x" if scale > 1 else "1x",
            "distilled_guidance_scale": distilled_scale(scheduler),
            "prompts": len(set(ctx.prompts.for_images(cfg.calibration_images, 0))),
        }
    log(
        "export",
        f"{model} int8: {info['dequantize_nodes']} Q/DQ pairs, calibrated on {info['calibration_inputs']} "
        f"inputs at {len(info['calibration_timesteps'])} timesteps, {info['export_seconds']:.1f} s",
    )
    return info
