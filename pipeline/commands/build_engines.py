"""``compress-deploy build RUN [build.key=value ...]``: (re)build TensorRT engines from a run's ONNX."""

from __future__ import annotations

from deploy.engine_info import sized_graphs_needed
from deploy.runtimes import load_run_model, load_run_unet
from deploy.tensorrt_backend import build_run_engines, require_tensorrt
from export.sized_graphs import export_run_sized_graphs
from pipeline.commands.args import run_settings
from pipeline.context import log
from pipeline.runlock import RunLock
from rundir import layout


def main(argv: list[str]) -> int:
    """Build the run's engines (the UNets; a conditional model's shared graphs too) under its lock."""
    run, cfg = run_settings("build", "build", argv, "Build TensorRT engines from a run's ONNX files.")
    with RunLock(run, " ".join(["compress-deploy build", *argv])):
        level = cfg.sample.cache_level if cfg.export.feature_reuse else None
        guidance = cfg.sample.guidance_scale
        require_tensorrt()
        if sized_graphs_needed(run, cfg.build):  # build.sizes beyond the model's side: graphs of any side
            log(
                "build",
                f"build.sizes {cfg.build.sizes}: the UNets and VAE decoder exported with dynamic size",
            )
            dense = load_run_model(run)
            unets = {"dense": dense.unet, "pruned": load_run_unet(run, "pruned")}
            spec = dense.spec if dense.conditioning != "none" else None
            export_run_sized_graphs(run, cfg.build.precision, unets, spec, dense.vae)
        engines, _ = build_run_engines(run, cfg.build, lambda m: log("build", m), level, guidance)
    print(f"built {', '.join(engines)} engines in {layout.stage_dir(run, 'build')}")
    return 0
