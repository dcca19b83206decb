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


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/export/{dense,pruned}/unet.{fp32,fp16}.onnx`` and check each file."""
    cfg = ctx.cfg.export
    source, folder = ctx.final_model_dir()
    models = {"dense": ctx.dense_on("cpu"), "pruned": load_unet(folder)[0]}
    quiet_polygraphy()
    files, facts = [], {}
    for model, unet in models.items():
        for precision in cfg.precisions:
            path = runlayout.onnx_path(ctx.run_dir, model, precision)
            info = export_unet(unet, path, precision, cfg.trace_batch, cfg.fold_constants)
            log(
                "export",
                f"{model} {precision}: {info['nodes']} nodes ({info['nodes_exported']} before folding), "
                f"{info['bytes'] / 1e6:.1f} MB, exported in {info['export_seconds']:.1f} s",
            )
            facts[f"{model}.{precision}"] = info
            files.append(path)
            if info["external_data"]:
                files.append(path.with_name(path.name + ".data"))
    return StageResult({"files": facts, "compressed_from": source}, files)
