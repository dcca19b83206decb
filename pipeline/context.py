"""The run directory and what every stage shares: config, device, dense model, data, records."""

from __future__ import annotations

import copy
import functools
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor.conditional_batches import PixelConditions
from compressor.conditioned_data import ConditionedImages, load_conditioned_dataset
from compressor.config import RunConfig, config_to_dict
from compressor.data import TensorImages, load_dataset
from compressor.encoded_cache import encode_dataset
from compressor.errors import UserError
from compressor.features import NUM_FEATURES, load_digits_features
from compressor.guidance import model_decoder
from compressor.image_quality import FeatureAdapter
from compressor.models import DiffusionModel, as_noise_predictor, load_model, resolve_device
from compressor.preflight import check_model_supported, stages_refusing
from compressor.progress import (
    log,  # noqa: F401  (re-exported: stages log through the context)
    progress_bar,
)
from compressor.prompts import PromptSet, run_prompts
from compressor.sampling import generate, make_scheduler
from compressor.stack import Stack, StackChoice
from deploy.runtimes import load_backend
from rundir import layout
from rundir.artifacts import note_record, sha256_file, write_json
from rundir.records import Record, final_model_dir, read_record, require_record, run_config_name


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
        "transformers",
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


@dataclass(frozen=True)
class StageCall:
    """The stage a context is bound to while it runs: its name, its cache key (checkpoints are resumed
    only under the same key) and whether ``--force`` asked for it (a forced run starts afresh)."""

    name: str
    key: str
    forced: bool = False


class RunContext:
    """A run directory bound to one config; stages read shared inputs through it.

    Everything a stage reads is fixed before the first stage runs: the config, the run directory
    and ``choice``, the stack a latency target over levers chose (``None`` otherwise; see
    :mod:`pipeline.frontier.target`). The runner hands each stage this context bound to its call
    (:meth:`at_stage`); the loaded model, data and device are shared between those bindings.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, choice: StackChoice | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.choice = choice
        self.call: StageCall | None = None
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self._memo: dict[str, Any] = {}  # shared by every stage binding (copy.copy keeps the dict)

    @property
    def stack(self) -> Stack | None:
        """The stack the run's compressed model is sampled, exported and timed with, when a latency
        target over levers chose one; None when the config's own settings apply."""
        return self.choice.stack if self.choice else None

    def at_stage(self, call: StageCall) -> RunContext:
        """This context bound to one stage call (same config, choice and loaded inputs)."""
        bound = copy.copy(self)
        bound.call = call
        return bound

    def _memoised(self, name: str, make):
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    # -- run directory ------------------------------------------------------------------

    def claim(self) -> None:
        """Create the run directory, or refuse one that belongs to another config."""
        marker = layout.run_file(self.run_dir)
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
        path = layout.stage_dir(self.run_dir, stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, stage: str) -> Record | None:
        """A stage's completed record (ok or skipped), or None; RecordError when damaged."""
        return read_record(self.run_dir, stage)

    def require(self, stage: str, needed_by: str) -> Record:
        """The ok record of ``stage``; raises RecordError telling the user to run it."""
        return require_record(self.run_dir, stage, needed_by)

    # -- shared inputs ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device the config names (``auto``: CUDA when present)."""
        return self._memoised("device", lambda: resolve_device(self.cfg.device))

    @property
    def dense(self) -> DiffusionModel:
        """The dense model named by ``model`` (loaded once per process): its description, components
        and denoiser. A model the stage would get wrong (conditioning, latents) is refused here too,
        for models whose configs preflight could not read (a hub id); a stage of
        :data:`compressor.preflight.CONDITIONAL_STAGES` takes a conditioned one."""

        def load() -> DiffusionModel:
            loaded = load_model(self.cfg.model, self.cfg.seed)
            loaded.unet.eval()
            for frozen in (loaded.vae, loaded.text_encoder):  # kept as they are, used where sampling runs
                if frozen is not None:
                    frozen.to(self.device).eval().requires_grad_(False)
            return loaded

        dense = self._memoised("dense", load)
        stage = [self.call.name] if self.call else []
        if not stage or stages_refusing(dense.spec, stage):
            where = f"stage {self.call.name}" if self.call else "the pipeline's stages"
            check_model_supported(dense.spec, self.cfg.model.name, where)
        return dense

    def dense_on(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """A private copy of the dense UNet on ``device`` (default: the run's), in eval mode.

        Stages get copies: the cached dense model is never moved or switched to train mode,
        so no stage's result depends on which stage ran before it in the same process.
        """
        return copy.deepcopy(self.dense.unet).to(device or self.device).eval()

    def torch_predictor(self, unet: torch.nn.Module):
        """``unet`` as the run's sampler calls it: two passes when ``sample`` reuses features."""

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
        prompts: PromptSet | None = None,
    ) -> torch.Tensor:
        """``num_images`` images from the run's seeds with its sampler (``sample`` section) at ``steps``.

        ``start``: skip that many seeds (image ``i`` comes from seed ``sample.seed + start + i``), so
        samples drawn in chunks equal those drawn at once.

        ``desc``: show a progress bar in images with this label (e.g. ``[quality] dense``; see
        :func:`compressor.progress.progress_bar`); None: no bar.

        ``variant`` (a :class:`~compressor.config.SamplerVariant`): that solver, step count and
        reuse interval instead (the chosen stack of a latency target over levers). ``student``
        (:func:`compressor.persist.student_sampling`): a few-step student's DDIM at its own steps.

        A conditional model samples image ``i`` with its prompt (:attr:`prompts`, ``prompts`` to
        override) under ``sample.guidance_scale``, and a latent one decodes with the dense model's VAE:
        the images are always pixels in [0, 1]. A few-step student of a guided model (``student``'s
        scheduler config holds ``distilled_guidance_scale``) is sampled on the conditional half alone,
        one UNet call a step at the images' batch: the loop reads that from its schedule
        (:func:`compressor.guidance.sampled_guidance`).
        """

        s = self.cfg.sample
        scheduler, interval, sched_cfg = s.scheduler, s.cache_interval, self.dense.scheduler_config
        if variant is not None:
            scheduler, steps, interval = variant.scheduler, variant.steps, variant.cache_interval
        if student is not None:
            scheduler, interval, (sched_cfg, steps) = "ddim", 1, student
        conditional = {}
        if self.dense.conditioning != "none":
            prompts = prompts or self.prompts
            conditional = {
                "conditioning": prompts.conditioning(self.dense, num_images, start, self.device),
                "guidance_scale": s.guidance_scale,
            }
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
                decode=model_decoder(self.dense),
                **conditional,
            )

    @property
    def prompts(self) -> PromptSet:
        """The prompts (or class labels) a conditional model's images cycle through
        (:func:`compressor.prompts.run_prompts`); UserError for an unconditional model."""
        dense = self.dense
        if dense.conditioning == "none":
            raise UserError(f"model {self.cfg.model.name} is unconditional: it takes no prompts")
        return self._memoised(
            "prompts",
            lambda: run_prompts(
                self.cfg.sample, self.cfg.data, dense.conditioning, dense.image_shape, dense.num_classes
            ),
        )

    def timing_inputs(self, batch: int) -> dict:
        """What a latency probe of the dense model needs beside the UNet
        (:func:`deploy.latency.latency_timer`): nothing for an unconditional model; for a
        conditional one its description (the inputs its graphs take) and the conditioning of
        ``batch`` images from the run's prompts."""
        dense = self.dense
        if dense.conditioning == "none":
            return {}
        return {"spec": dense.spec, "conditioning": self.prompts.conditioning(dense, batch, 0, self.device)}

    @property
    def conditioned_data(self):
        """A conditioned model's training data as the denoiser takes it: the dataset encoded once by
        the dense model's VAE and text encoder (:func:`compressor.encoded_cache.encode_dataset`,
        cached in ``RUN/encoded/``), latents for a latent model, else the pixels beside their
        conditions (:class:`compressor.conditional_batches.PixelConditions`)."""

        def make():
            dense = self.dense
            c, h, _ = dense.image_shape
            if dense.conditioning == "none":  # an unconditional latent model: its images alone
                data = ConditionedImages(self.dataset, "none")  # type: ignore[arg-type]
            else:
                data = load_conditioned_dataset(self.cfg.data, c, h, dense.conditioning, dense.num_classes)
            stage = self.call.name if self.call else "run"
            encoded = encode_dataset(dense, data, self.cfg.data, self.run_dir, log=lambda m: log(stage, m))
            return encoded if dense.latent else PixelConditions(data.images, encoded)

        return self._memoised("conditioned_data", make)

    @property
    def training_data(self):
        """What the denoiser trains on: the images (an unconditional pixel model), their latents (an
        unconditional latent model: :attr:`conditioned_data`'s, a :class:`~compressor.data.TensorImages`)
        or the conditioned samples (:attr:`conditioned_data`)."""
        dense = self.dense
        if dense.conditioning != "none":
            return self.conditioned_data
        if dense.latent:
            return self._memoised("latents", lambda: TensorImages(self.conditioned_data.latents, "latents"))
        return self.dataset

    def frechet_features(self):
        """The Frechet feature extractor and its metric name (``fd_digits`` or ``fid``).

        ``quality.feature``: the digits feature network for digits data, else Inception
        (2048-d, by name: :func:`compressor.image_quality.frechet_distance` loads it).
        """
        kind = self.cfg.quality.feature
        if kind == "auto":
            kind = "digits" if self.cfg.data.source == "digits" else "inception"
        if kind == "digits":
            return FeatureAdapter(load_digits_features(), 1, NUM_FEATURES), "fd_digits"
        return 2048, "fid"

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the sampler draws and the training images take: the dense model's denoiser input
        (``DiffusionModel.sample_shape``), the image itself for the pixel-space models the stages run."""
        return self.dense.sample_shape

    @property
    def dataset(self):
        """The training images (pixels), shaped as the dense model's images (decoded, for a latent model)."""

        c, h, _ = self.dense.image_shape
        return self._memoised("dataset", lambda: load_dataset(self.cfg.data, c, h))

    def noise_scheduler(self):
        """The training (DDPM) scheduler of the dense model."""

        return make_scheduler("ddpm", self.dense.scheduler_config)

    def final_model_dir(self) -> tuple[str, Path]:
        """The newest compressed model of this run (see :func:`rundir.records.final_model_dir`)."""
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
            path = layout.record_path(self.run_dir, stage)
            write_json(path, rec)
            note_record(self.run_dir, path)
        return rec
