"""The pipeline's stages, in run order. One literal mapping: name -> module with ``run`` and ``SECTIONS``."""

from __future__ import annotations

from types import ModuleType

from pipeline.stages import (
    bench,
    build,
    check,
    distill_steps,
    export_onnx,
    finetune,
    parity,
    prune,
    quality,
    report,
    samples,
    train,
)

STAGES: dict[str, ModuleType] = {
    "train": train,
    "prune": prune,
    "finetune": finetune,
    "distill_steps": distill_steps,
    "samples": samples,
    "export": export_onnx,
    "build": build,
    "quality": quality,
    "parity": parity,
    "bench": bench,
    "check": check,
    "report": report,
}
