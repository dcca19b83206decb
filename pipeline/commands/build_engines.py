"""``compress-deploy build RUN [build.key=value ...]``: (re)build TensorRT engines from a run's ONNX."""

from __future__ import annotations

from deploy.tensorrt_backend import build_run_engines
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
        engines, _ = build_run_engines(run, cfg.build, lambda m: log("build", m), level, guidance)
    print(f"built {', '.join(engines)} engines in {layout.stage_dir(run, 'build')}")
    return 0
