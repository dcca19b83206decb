"""Config section ``frontier``: the lever values the speed-quality frontier measures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.config.fields import Backend, _spec


@dataclass
class FrontierConfig:
    """The speed-quality frontier (``compress-deploy frontier``, and latency targets over levers).

    Every stack of the lever values below is measured: pruning ratio (0 = the dense model,
    else ``prune.ratio`` with the run's criterion and finetune), solver, steps, feature-reuse
    interval and precision. A lever a latency target may not move stays at the run's own
    value (``sample.scheduler``/``sample.steps``, no reuse, fp32; ratio 0 without ``prune``).
    """

    ratios: list[float] = _spec([0.0, 0.25, 0.45], "per-layer pruning ratios (0 = dense)", ge=0.0, lt=1.0)
    schedulers: list[Literal["ddim", "dpmsolver++", "unipc"]] = _spec(
        ["ddim", "dpmsolver++"], "deterministic solvers to try"
    )
    steps: list[int] = _spec([50, 20, 10], "sampler step counts to try", ge=1)
    cache_intervals: list[int] = _spec([1, 2], "feature-reuse intervals to try (1 = off)", ge=1)
    precisions: list[Literal["fp32", "fp16", "int8"]] = _spec(["fp32"], "precisions to try (ONNX files)")
    students: list[int] = _spec(
        [0],
        "few-step students to try (0 = none): per ratio one nested distill_steps run down to the fewest, "
        "each round's student sampled at its own steps (e.g. [0, 8, 4, 2])",
        ge=0,
    )
    backend: Backend = _spec("onnxruntime", "backend the latency is measured on (`frontier --backend`)")
    batch: int = _spec(16, "images per sampler run when timing (`frontier --batch`)", ge=1)
    batches: list[int] | None = _spec(
        None,
        "every batch the stacks are timed at (`frontier --batches 1,4`; default [batch]); speed-ups and "
        "targets read `batch`, the others are shown beside it",
        ge=1,
    )
    targets: list[str] | None = _spec(
        None,
        "latency targets whose choice frontier.md states, e.g. [3x, 10x] or [40ms] (`--target` also "
        "records the first as `chosen`)",
    )
    samples: int | None = _spec(None, "images scored per stack (default: quality.num_samples)", ge=2)
    repeat: int = _spec(3, "timed sampler runs per stack (alternating with the dense reference)", ge=1)
    warmup: int = _spec(1, "untimed sampler runs per stack before timing", ge=0)
    threads: int | None = _spec(
        None, "torch/ONNX Runtime threads of every job and timing (default: bench.threads, else all)", ge=1
    )
    dir: str | None = _spec(
        None,
        "where a latency target over levers measures (default RUN/frontier); runs of one config may "
        "share a folder, e.g. the `frontier` command's, and reuse what is measured there",
    )
