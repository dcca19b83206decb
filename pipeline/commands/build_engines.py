"""``compress-deploy build RUN [build.key=value ...]``: (re)build TensorRT engines from a run's ONNX."""

from __future__ import annotations

from pathlib import Path

from deploy.engine_info import sized_graphs_needed
from deploy.runtimes import load_run_model, load_run_unet
from deploy.sampler import run_guidance_scale
from deploy.tensorrt_backend import build_run_engines, require_tensorrt
from export.sized_graphs import export_run_sized_graphs
from pipeline.commands.args import run_settings
from pipeline.context import log
from pipeline.runlock import RunLock
from rundir import layout
from rundir.artifacts import read_manifest, sha256_file, write_json


def main(argv: list[str]) -> int:
    """Build the run's engines (the UNets; a conditional model's shared graphs too) under its lock."""
    run, cfg = run_settings("build", "build", argv, "Build TensorRT engines from a run's ONNX files.")
    with RunLock(run, " ".join(["compress-deploy build", *argv])):
        level = cfg.sample.cache_level if cfg.export.feature_reuse else None
        guidance = run_guidance_scale(run)  # the run's sample.guidance_scale (a guided UNet: x2 rows)
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
        engines, files = build_run_engines(run, cfg.build, lambda m: log("build", m), level, guidance)
        relist(run, files)
    print(f"built {', '.join(engines)} engines in {layout.stage_dir(run, 'build')}")
    return 0


def relist(run: Path, files: list[Path]) -> None:
    """Give rebuilt files the manifest entries' new hashes where the build stage listed them, so that
    loading an engine this command rebuilt is not refused as tampered (the stages reading the build
    record see its artifacts changed and rerun)."""
    manifest = read_manifest(run)
    listed = manifest.get("artifacts", {})
    for path in files:
        rel = str(Path(path).resolve().relative_to(Path(run).resolve()))
        if rel in listed:
            listed[rel] = {**listed[rel], "sha256": sha256_file(path), "bytes": Path(path).stat().st_size}
    write_json(layout.manifest_path(run), manifest)
