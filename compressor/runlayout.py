"""Where everything lives in a run directory: the one module that knows the layout.

Every stage, command and backend asks here for paths inside ``RUN/`` instead of joining
them by hand, so a layout change is one edit. It sits in the bottom layer (pure paths, no
imports of the rest) so that ``deploy/`` can read finished runs without importing the
pipeline.

    RUN/run.json                          which config the run belongs to
    RUN/manifest.json                     every artifact's hash (``compress-deploy verify``)
    RUN/.lock                             held while a process writes into the run
    RUN/<stage>/record.json               what a stage did (config, metrics, artifacts, versions)
    RUN/prune/model/                      the pruned UNet (safetensors + plan JSON + probes)
    RUN/finetune/model/, model-raw/       the finetuned UNet (EMA) and its raw weights
    RUN/finetune/checkpoints/<key>/       resumable checkpoints, keyed by the stage's cache key
    RUN/export/<dense|pruned>/unet.<precision>.onnx
    RUN/build/<dense|pruned>/unet.plan    TensorRT engines (+ .json manifests), build/timing.cache
    RUN/samples/grid.png, RUN/quality/samples.safetensors, RUN/report/report.{md,html}
"""

from __future__ import annotations

from pathlib import Path

RUN_FILE = "run.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
RECORD = "record.json"
MODELS = ("dense", "pruned")


def stage_dir(run: Path, stage: str) -> Path:
    """``RUN/<stage>``."""
    return Path(run) / stage


def record_path(run: Path, stage: str) -> Path:
    """``RUN/<stage>/record.json``."""
    return stage_dir(run, stage) / RECORD


def model_dir(run: Path, stage: str, raw: bool = False) -> Path:
    """The saved UNet a stage wrote (``prune`` or ``finetune``; ``raw``: finetune's non-EMA copy)."""
    return stage_dir(run, stage) / ("model-raw" if raw else "model")


def checkpoints_dir(run: Path) -> Path:
    """Finetune checkpoints."""
    return stage_dir(run, "finetune") / "checkpoints"


def onnx_path(run: Path, model: str, precision: str) -> Path:
    """The exported ONNX of ``model`` (dense|pruned) at ``precision`` (fp32|fp16)."""
    return stage_dir(run, "export") / model / f"unet.{precision}.onnx"


def engine_path(run: Path, model: str) -> Path:
    """The TensorRT engine of ``model`` (dense|pruned)."""
    return stage_dir(run, "build") / model / "unet.plan"


def timing_cache(run: Path) -> Path:
    """TensorRT's timing cache, shared by the run's engine builds."""
    return stage_dir(run, "build") / "timing.cache"


def samples_grid(run: Path) -> Path:
    """The dense-vs-compressed sample grid."""
    return stage_dir(run, "samples") / "grid.png"


def quality_samples(run: Path) -> Path:
    """Every model's quality samples."""
    return stage_dir(run, "quality") / "samples.safetensors"


def report_dir(run: Path) -> Path:
    """The report's folder (report.md, report.html, plots)."""
    return stage_dir(run, "report")


def run_file(run: Path) -> Path:
    """``RUN/run.json``."""
    return Path(run) / RUN_FILE


def manifest_path(run: Path) -> Path:
    """``RUN/manifest.json``."""
    return Path(run) / MANIFEST


def lock_path(run: Path) -> Path:
    """``RUN/.lock``."""
    return Path(run) / LOCK_FILE


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a half-written file or folder (atomic writes use these names)."""
    name = path.name
    return name.endswith(".tmp") or ".tmp." in name or name.startswith(".tmp-")
