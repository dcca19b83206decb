"""The run directory and what every stage shares: config, device, dense model, data, records."""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from compressor import runlayout
from compressor.artifacts import note_record, sha256_file, write_json
from compressor.config import RunConfig, config_to_dict
from compressor.errors import UserError
from compressor.models import LoadedModel, load_model, resolve_device
from compressor.progress import log  # noqa: F401  (re-exported: stages log through the context)
from compressor.records import Record, final_model_dir, read_record, require_record, run_config_name


@dataclass
class StageResult:
    """What a stage reports: metrics for its record, files it wrote, and its status."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    status: str = "ok"  # ok | skipped
    reason: str = ""


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in (
        "torch",
        "torch-pruning",
        "diffusers",
        "accelerate",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "polygraphy",
        "tensorrt",
        "compress-deploy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.cache
def environment_facts(device: torch.device) -> dict[str, str | None]:
    """What measured results depend on besides config and inputs (memoised per device).

    Library versions, ONNX Runtime's available execution providers, and on CUDA
    the GPU's name and compute capability.
    """
    versions = library_versions()
    ort = versions.get("onnxruntime-gpu") or versions.get("onnxruntime")
    try:
        import onnxruntime

        ort = f"{ort} [{', '.join(onnxruntime.get_available_providers())}]"
    except ImportError:
        pass
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        gpu = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return {
        "torch": versions.get("torch"),
        "onnx": versions.get("onnx"),
        "onnxruntime": ort,
        "polygraphy": versions.get("polygraphy"),
        "tensorrt": versions.get("tensorrt"),
        "gpu": gpu,
    }


class RunContext:
    """A run directory bound to one config; stages read shared inputs through it."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.stage_key = "no-key"
        self.forced = False
        self.chosen: dict | None = None  # the stack a latency target over levers chose (see frontier)
        self.frontier_choice: dict | None = None  # its summary, handed to the prune stage by the sweep

    # -- run directory ------------------------------------------------------------------

    def claim(self) -> None:
        """Create the run directory, or refuse one that belongs to another config."""
        marker = runlayout.run_file(self.run_dir)
        if marker.is_file():
            owner = run_config_name(self.run_dir)
            if owner != self.cfg.name:
                raise UserError(
                    f"run directory {self.run_dir} belongs to config {owner!r}, not {self.cfg.name!r}; "
                    "pass --run-dir with another folder"
                )
        elif self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--run-dir {self.run_dir} is a file; pass a directory")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not marker.is_file():
                write_json(marker, {"config_name": self.cfg.name, "created": time.time()})

    def stage_dir(self, stage: str) -> Path:
        """The folder a stage writes into (created on demand)."""
        path = runlayout.stage_dir(self.run_dir, stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, stage: str) -> Record | None:
        """A stage's completed record (ok or skipped), or None; RecordError when damaged."""
        return read_record(self.run_dir, stage)

    def require(self, stage: str, needed_by: str) -> Record:
        """The ok record of ``stage``; raises RecordError telling the user to run it."""
        return require_record(self.run_dir, stage, needed_by)

    # -- shared inputs ------------------------------------------------------------------

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    @cached_property
    def dense(self) -> LoadedModel:
        """The dense model named by ``model`` (loaded once per process)."""
        loaded = load_model(self.cfg.model, self.cfg.seed)
        loaded.unet.eval()
        return loaded

    def dense_on(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """A private copy of the dense UNet on ``device`` (default: the run's), in eval mode.

        Stages get copies: the cached dense model is never moved or switched to train mode,
        so no stage's result depends on which stage ran before it in the same process.
        """
        import copy

        return copy.deepcopy(self.dense.unet).to(device or self.device).eval()

    def torch_predictor(self, unet: torch.nn.Module):
        """``unet`` as the run's sampler calls it: two passes when ``sample`` reuses features."""
        from compressor.models import as_noise_predictor
        from deploy.runtimes import load_backend

        level = self.cfg.sample.reuse_level
        if level is None:
            return as_noise_predictor(unet)
        return load_backend("torch", unet=unet, device=self.device, cache_level=level).predict

    def sample_images(
        self,
        predict,
        num_images: int,
        steps: int,
        variant=None,
        student: tuple[dict, int] | None = None,
        start: int = 0,
        *,
        desc: str | None = None,
    ) -> torch.Tensor:
        """``num_images`` images from the run's seeds with its sampler (``sample`` section) at ``steps``.

        ``start``: skip that many seeds (image ``i`` comes from seed ``sample.seed + start + i``), so
        samples drawn in chunks equal those drawn at once.

        ``desc``: show a progress bar in images with this label (e.g. ``[quality] dense``; see
        :func:`compressor.progress.progress_bar`); None: no bar.

        ``variant`` (a :class:`~compressor.config.SamplerVariant`): that solver, step count and
        reuse interval instead (the chosen stack of a latency target over levers). ``student``
        (:func:`compressor.persist.student_sampling`): a few-step student's DDIM at its own steps.
        """
        from compressor.progress import progress_bar
        from compressor.sampling import generate, make_scheduler

        s = self.cfg.sample
        scheduler, interval, sched_cfg = s.scheduler, s.cache_interval, self.dense.scheduler_config
        if variant is not None:
            scheduler, steps, interval = variant.scheduler, variant.steps, variant.cache_interval
        if student is not None:
            scheduler, interval, (sched_cfg, steps) = "ddim", 1, student
        with progress_bar(num_images, desc or "", "image", disable=desc is None) as bar:
            return generate(
                predict,
                make_scheduler(scheduler, sched_cfg),
                self.image_shape(),
                num_images,
                steps,
                s.eta,
                s.seed + start,
                s.batch_size,
                self.device,
                on_batch=bar.update,
                cache_interval=interval,
                cache_schedule=s.cache_schedule,
            )

    def frechet_features(self):
        """The Frechet feature extractor and its metric name (``fd_digits`` or ``fid``).

        ``quality.feature``: the digits feature network for digits data, else Inception
        (2048-d, by name: :func:`compressor.quality.frechet_distance` loads it).
        """
        kind = self.cfg.quality.feature
        if kind == "auto":
            kind = "digits" if self.cfg.data.source == "digits" else "inception"
        if kind == "digits":
            from compressor.features import NUM_FEATURES, load_digits_features
            from compressor.quality import FeatureAdapter

            return FeatureAdapter(load_digits_features(), 1, NUM_FEATURES), "fd_digits"
        return 2048, "fid"

    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.dense.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @cached_property
    def dataset(self):
        """The training images, shaped for the dense model."""
        from compressor.data import load_dataset

        c, h, _ = self.image_shape()
        return load_dataset(self.cfg.data, c, h)

    def noise_scheduler(self):
        """The training (DDPM) scheduler of the dense model."""
        from compressor.sampling import make_scheduler

        return make_scheduler("ddpm", self.dense.scheduler_config)

    def final_model_dir(self) -> tuple[str, Path]:
        """The newest compressed model of this run (see :func:`compressor.records.final_model_dir`)."""
        return final_model_dir(self.run_dir)

    def write_record(
        self, stage: str, sections: list[str], result: StageResult, seconds: float, cache: dict | None = None
    ) -> dict:
        """Write ``RUN/<stage>/record.json`` (atomically), list its sha256 in the run's manifest (the
        readers refuse a record edited afterwards) and return it."""
        cfg = config_to_dict(self.cfg)
        artifacts = {}
        for p in result.artifacts:
            p = Path(p)
            if p.is_file():
                artifacts[str(p.relative_to(self.run_dir))] = {
                    "sha256": sha256_file(p),
                    "bytes": p.stat().st_size,
                }
        rec = {
            "stage": stage,
            "status": result.status,
            "reason": result.reason,
            "config": {s: cfg[s] for s in sections if s in cfg},
            "metrics": result.metrics,
            "artifacts": artifacts,
            "versions": library_versions(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cache": cache or {},
        }
        if self.is_main:
            path = runlayout.record_path(self.run_dir, stage)
            write_json(path, rec)
            note_record(self.run_dir, path)
        return rec
