"""Load a finished run's sampler on any backend: the small Python API users serve with.

from deploy.sampler import load_sampler
sampler = load_sampler("runs/demo", backend="onnxruntime")
images = sampler(num_images=16, steps=50, seed=0)   # (N, C, H, W) in [0, 1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor import runlayout
from compressor.errors import ArtifactError
from compressor.models import NoisePredictor
from compressor.sampling import generate, make_scheduler
from deploy.runtimes import check_backend_name, onnxruntime_backend, torch_backend

MODEL_STAGES = ("finetune", "prune")


@dataclass
class Sampler:
    """A noise predictor plus what the sampling loop needs; call it to generate images."""

    predict: NoisePredictor
    scheduler_config: dict
    image_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)
    device: str = "cpu"

    def __call__(
        self,
        num_images: int = 16,
        steps: int = 50,
        seed: int = 0,
        eta: float = 0.0,
        scheduler: str = "ddim",
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Images from seeds ``seed .. seed + num_images - 1``."""
        sched = make_scheduler(scheduler, self.scheduler_config)
        return generate(
            self.predict, sched, self.image_shape, num_images, steps, eta, seed, batch_size, self.device
        )


def _model_folder(run_dir: Path) -> Path:
    for stage in MODEL_STAGES:
        folder = runlayout.model_dir(run_dir, stage)
        if runlayout.record_path(run_dir, stage).is_file() and (folder / "unet.json").is_file():
            return folder
    raise ArtifactError(
        f"{run_dir} holds no compressed model (no prune or finetune output); run "
        "`compress-deploy CONFIG --stages prune` first"
    )


def load_sampler(
    run_dir: str | Path, backend: str = "torch", model: str = "pruned", device: str = "cpu"
) -> Sampler:
    """The sampler of a finished run: ``model`` is pruned (finetuned if run) or dense."""
    from compressor.persist import load_unet, read_plan

    check_backend_name(backend)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} not found; pass the folder a run wrote")
    folder = _model_folder(run_dir)
    plan = read_plan(folder)
    sched_cfg = plan.get("scheduler_config")
    if not sched_cfg:
        raise ArtifactError(f"{folder / 'unet.json'} has no scheduler config; rerun the prune stage")
    cfg = plan["unet_config"]
    size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    shape = (cfg["in_channels"], size, size)
    if backend == "torch":
        if model == "dense":
            unet = _dense_unet(run_dir)
        else:
            unet = load_unet(folder)[0]
        b = torch_backend(unet, torch.device(device))
    elif backend == "onnxruntime":
        path = runlayout.onnx_path(run_dir, model, "fp32")
        if not path.is_file():
            raise ArtifactError(f"{path} not found; run `compress-deploy CONFIG --stages export` first")
        b = onnxruntime_backend(path)
    else:
        from deploy import tensorrt_backend

        b = tensorrt_backend.engine_backend(run_dir, model)
    return Sampler(b.predict, sched_cfg, shape, {"backend": backend, "model": model, **b.info}, device)


def _dense_unet(run_dir: Path):
    from compressor.config import ModelConfig
    from compressor.models import load_model

    rec = json.loads(runlayout.record_path(run_dir, "prune").read_text())
    model_cfg = ModelConfig(**rec["config"]["model"])
    return load_model(model_cfg, rec["config"].get("seed", 0)).unet
