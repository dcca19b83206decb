"""Typed, validated run configuration.

A YAML file loads into :class:`RunConfig`. Every field is declared once, here, with
its type, default and allowed range; unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` naming the dotted key. Command-line ``key=value``
overrides are parsed as YAML scalars and go through the same validation.

Long because every key of every section is declared here once, with its type, default, range
and help (the one place defaults live); the validators are generic and short, and splitting
the sections across files would only scatter what a user looks up.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from compressor.errors import ConfigError
from compressor.stack import SamplerVariant


def _spec(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with a docstring and range checks (ge, gt, le, lt)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


DEFAULT_STAGES = (
    "prune",
    "finetune",
    "distill_steps",
    "samples",
    "export",
    "build",
    "quality",
    "parity",
    "bench",
    "check",
    "report",
)


BACKENDS = ("torch", "onnxruntime", "tensorrt")  # the backend registry's names (deploy/runtimes.py)
Backend = Literal["torch", "onnxruntime", "tensorrt"]
Scheduler = Literal["ddim", "ddpm", "dpmsolver++", "unipc"]


@dataclass
class ModelConfig:
    """Which UNet to compress."""

    name: str = _spec("digits-ddpm", "local diffusers folder, hub id, or shipped name")
    init: Literal["pretrained", "random"] = _spec("pretrained", "pretrained weights or random")
    sample_size: int | None = _spec(None, "override the model's sample size", ge=4)


@dataclass
class DataConfig:
    """Training images (Taylor pass, finetuning, Frechet reference)."""

    source: str = _spec("digits", "'digits' or a folder of PNG/JPEG images")
    max_images: int | None = _spec(None, "use at most this many images", ge=1)
    max_image_pixels: int = _spec(
        50_000_000, "refuse images larger than this many pixels (decompression bombs)", ge=1
    )


@dataclass
class LatencyTarget:
    """A measured-latency pruning target: the mildest pruning that reaches it on a backend."""

    backend: Backend = _spec(
        "onnxruntime", "backend the latency is measured on (torch: eager fp32 on the run's device)"
    )
    batch: int = _spec(1, "batch size of the timed calls", ge=1)
    what: Literal["unet", "sampler"] = _spec(
        "unet", "one UNet call, or the whole sampler at bench.sampler_steps"
    )
    speedup: float | None = _spec(None, "wanted speed-up over dense (e.g. 1.5)", gt=1.0)
    ms: float | None = _spec(None, "wanted latency of the pruned model in milliseconds", gt=0.0)
    margin: float = _spec(
        0.03, "noise margin: a trial passes at speedup x (1 + margin), or ms x (1 - margin)", ge=0.0, lt=0.5
    )
    warmup: int = _spec(2, "untimed calls per model per trial", ge=0)
    repeat: int = _spec(10, "timed calls per model per trial (medians are compared)", ge=3)
    threads: int | None = _spec(None, "CPU threads while timing (match bench.threads)", ge=1)
    levers: list[Literal["prune", "steps", "scheduler", "cache", "precision", "student"]] = _spec(
        ["prune"],
        "what may move to meet the target: prune alone (the pruning search), or any of prune, steps, "
        "scheduler, cache, precision, student (the best-quality stack of the measured frontier, see "
        "`frontier`; student: a few-step student of frontier.students)",
    )

    @property
    def uses_frontier(self) -> bool:
        """True when levers besides pruning may meet the target (the frontier search)."""
        return self.active and list(self.levers) != ["prune"]

    @property
    def active(self) -> bool:
        """True when a speed-up or a latency is asked for."""
        return self.speedup is not None or self.ms is not None

    def goal(self) -> str:
        """E.g. '1.5x faster than dense' or 'at most 12 ms'."""
        if self.speedup is not None:
            return f"{self.speedup:g}x faster than dense"
        return f"at most {self.ms:g} ms"

    def met(self, speedup: float, ms: float, margin: float | None = None) -> bool:
        """Whether a measured (speed-up, ms) reaches the goal, with ``margin`` (default: self.margin)."""
        m = self.margin if margin is None else margin
        if self.speedup is not None:
            return speedup >= self.speedup * (1 + m)
        return ms <= self.ms * (1 - m)  # type: ignore[operator]


@dataclass
class PruneConfig:
    """Structural pruning (Diff-Pruning and the paper's baselines)."""

    method: Literal["diff-pruning", "taylor", "magnitude", "random", "reinit"] = _spec(
        "diff-pruning", "importance criterion"
    )
    ratio: float | None = _spec(None, "per-layer channel pruning ratio", ge=0.0, lt=1.0)
    target_macs: float | None = _spec(None, "fraction of dense MACs to keep", gt=0.0, le=1.0)
    target_params: float | None = _spec(None, "fraction of dense params to keep", gt=0.0, le=1.0)
    target_latency: LatencyTarget = field(default_factory=LatencyTarget)
    search: Literal["uniform", "fine", "latency"] = _spec(
        "uniform",
        "target search: uniform-width ratios only, bisect finer between them, or (with a latency "
        "target) a ratio per resolution level keeping the most importance per measured millisecond",
    )
    threshold: float = _spec(0.05, "Diff-Pruning loss threshold T", ge=0.0, lt=1.0)
    timestep_stride: int = _spec(1, "use every k-th timestep in the Taylor pass (paper: 1)", ge=1)
    max_timesteps: int | None = _spec(None, "cap on timesteps evaluated", ge=1)
    batch_size: int = _spec(128, "images in the Taylor batch, drawn shuffled with the run's seed", ge=1)
    norm: Literal[1, 2] = _spec(2, "p of the magnitude criterion")
    eval_batch: int = _spec(
        16, "held-out images (never in the Taylor batch) for the loss before/after pruning; 0 skips", ge=0
    )
    round_to: int | None = _spec(None, "round kept channels to a multiple", ge=1)
    group_selection: Literal["shared", "independent"] = _spec(
        "independent",
        "GroupNorm-coupled layers: each group picks its own channels (independent, the paper's code) "
        "or all groups drop the same in-group positions (shared, torch-pruning 1.6)",
    )
    taylor_score: Literal["abs", "squared"] = _spec(
        "abs", "per-channel Taylor score: sum |w*g| or sum (w*g)^2 (the paper's code)"
    )
    group_reduction: Literal["mean", "sum"] = _spec(
        "sum", "how the scores of coupled layers combine (same ranking under local pruning)"
    )
    diagnose: bool = _spec(
        False, "per-timestep diagnostic: L_t/L_max, gradient norm, half-batch gradient cosine"
    )

    def require_target(self) -> None:
        """Raise ConfigError unless a pruning target is set (the prune stage needs one)."""
        if not self.targets():
            raise ConfigError(
                "prune: no pruning target; set one of prune.ratio, prune.target_macs, prune.target_params, "
                "prune.target_latency.speedup, prune.target_latency.ms"
            )

    def targets(self) -> list[str]:
        """The pruning targets that are set (dotted names)."""
        names = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k) is not None]
        lat = self.target_latency
        return names + [f"target_latency.{k}" for k in ("speedup", "ms") if getattr(lat, k) is not None]


@dataclass
class DistillConfig:
    """The dense model as teacher in the finetune (on by default; off when both weights are 0).

    The loss is ``weight_task`` x the plain denoising loss + ``weight_output`` x MSE(student
    noise, teacher noise) + ``weight_features`` x the mean over ``feature_points`` of the relative
    MSE (over the teacher output's mean square) of the student's block output, projected by a
    learned 1x1 convolution where widths differ, against the teacher's. The teacher is frozen,
    in eval mode, without gradients; each process holds its own copy. Projections are trained
    with the student and saved in its checkpoints (so a resume is exact), never in the model.
    The defaults (output and feature weights 1) come from the demo's budget sweep (README).
    """

    weight_task: float = _spec(1.0, "weight of the plain denoising loss", ge=0.0)
    weight_output: float = _spec(1.0, "weight of the MSE between student and teacher noise", ge=0.0)
    weight_features: float = _spec(1.0, "weight of the block-output matching loss", ge=0.0)
    feature_points: list[str] = _spec(
        ["mid", "up"], "blocks whose outputs are matched: down.I, mid, up.I, or down/up for all of a kind"
    )

    @property
    def active(self) -> bool:
        """True when the teacher is used (an output or feature weight above 0)."""
        return self.weight_output > 0 or self.weight_features > 0


@dataclass
class FinetuneConfig:
    """Finetuning after pruning (epsilon-prediction DDPM loss)."""

    steps: int = _spec(200, "optimizer steps", ge=0)
    batch_size: int = _spec(64, "global batch size", ge=1)
    lr: float = _spec(2e-4, "peak learning rate", gt=0.0)
    optimizer: Literal["adam", "adamw"] = _spec("adam", "optimizer")
    weight_decay: float = _spec(0.0, "weight decay", ge=0.0)
    warmup_steps: int = _spec(0, "linear learning-rate warm-up steps", ge=0)
    schedule: Literal["constant", "cosine", "linear"] = _spec("constant", "lr after warm-up")
    grad_clip: float = _spec(1.0, "max gradient norm (0 disables)", ge=0.0)
    ema_decay: float = _spec(0.9999, "EMA decay", ge=0.0, lt=1.0)
    ema_warmup: bool = _spec(True, "EMA warm-up: decay grows from 0 to ema_decay")
    ema_power: float = _spec(0.75, "EMA warm-up power (diffusers EMAModel)", gt=0.0)
    grad_accum: int = _spec(1, "gradient accumulation steps", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = _spec("no", "autocast on GPU")
    checkpoint_every: int = _spec(100, "steps between checkpoints", ge=1)
    log_every: int = _spec(10, "steps between loss log rows", ge=1)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class StepDistillConfig:
    """Step distillation (stage ``distill_steps``): train the run's model to take few steps.

    Progressive distillation (Salimans and Ho 2022): the dense model sampled with DDIM at
    ``start_steps`` is the first teacher; each round trains a student whose one DDIM step
    matches two of its teacher's, halving the steps, until ``target_steps``; each round's
    student (EMA weights) teaches the next. Off while ``target_steps`` is null.
    """

    target_steps: int | None = _spec(
        None, "the student's sampling steps (null: off); must divide the training timesteps (8, 4, 2)", ge=1
    )
    method: Literal["progressive"] = _spec(
        "progressive", "recipe: progressive distillation (each round halves the steps)"
    )
    start_steps: int = _spec(32, "the dense teacher's DDIM steps: target_steps x 2^k, k >= 1", ge=2)
    student: Literal["final", "dense"] = _spec(
        "final", "the student starts from the run's compressed model (final) or from the dense one"
    )
    prediction_type: Literal["epsilon", "v_prediction"] = _spec(
        "epsilon", "what the student predicts (saved in its scheduler config; every sampler honours it)"
    )
    steps_per_round: int = _spec(150, "optimizer steps per round", ge=1)
    batch_size: int = _spec(64, "global batch size", ge=1)
    lr: float = _spec(2e-4, "learning rate (constant after warm-up)", gt=0.0)
    warmup_steps: int = _spec(10, "linear warm-up steps of each round", ge=0)
    ema_decay: float = _spec(
        0.995, "EMA decay of each round's student (the next round's teacher)", ge=0.0, lt=1.0
    )
    grad_clip: float = _spec(1.0, "max gradient norm (0 disables)", ge=0.0)
    grad_accum: int = _spec(1, "gradient accumulation steps", ge=1)
    checkpoint_every: int = _spec(50, "steps between checkpoints (a resume restarts mid-round)", ge=1)
    log_every: int = _spec(10, "steps between loss log rows", ge=1)

    @property
    def active(self) -> bool:
        """True when a student is asked for (``target_steps`` set)."""
        return self.target_steps is not None

    def round_steps(self) -> list[int]:
        """The student's steps after each round, e.g. [16, 8, 4] from 32 to 4."""
        out, n = [], self.start_steps
        while self.target_steps is not None and n > self.target_steps:
            n //= 2
            out.append(n)
        return out


@dataclass
class SampleConfig:
    """Image generation (grids, quality, sampler benchmarks)."""

    scheduler: Scheduler = _spec("ddim", "sampling scheduler")
    steps: int = _spec(50, "sampling steps", ge=1)
    eta: float = _spec(0.0, "DDIM eta", ge=0.0, le=1.0)
    num_images: int = _spec(16, "images in the grid", ge=1)
    batch_size: int = _spec(64, "images per UNet call", ge=1)
    seed: int = _spec(0, "first noise seed (image i uses seed + i)", ge=0)
    cache_interval: int = _spec(
        1, "feature reuse (DeepCache): a full UNet pass every N steps, shallow passes between; 1 = off", ge=1
    )
    cache_level: int = _spec(
        0, "feature reuse boundary: the skip branch of this level (0 = shallowest)", ge=0
    )
    cache_schedule: Literal["uniform", "quadratic"] = _spec(
        "uniform", "which steps run the full pass: every N-th, or as many spaced denser early"
    )
    precision: Literal["fp32", "fp16", "int8"] = _spec(
        "fp32", "sampler precision: the torch dtype, or which exported ONNX file runs (int8: ONNX only)"
    )

    @property
    def reuse_level(self) -> int | None:
        """The feature-reuse split level when reuse is on (``cache_interval`` > 1), else None."""
        return self.cache_level if self.cache_interval > 1 else None


@dataclass
class QualityConfig:
    """Consistency (SSIM/PSNR vs dense) and Frechet distance of generated samples."""

    num_samples: int | Literal["auto"] = _spec(
        256, "images generated per model; auto: in chunks until every quality gate is decided", ge=2
    )
    max_samples: int = _spec(4096, "num_samples auto: the most images drawn per model", ge=2)
    chunk_samples: int = _spec(1024, "num_samples auto: images added per model at each look", ge=2)
    steps: int | None = _spec(None, "sampling steps (default: sample.steps)", ge=1)
    feature: Literal["auto", "digits", "inception"] = _spec(
        "auto", "Frechet features: digits (demo network), inception (FID); auto picks by data"
    )
    inception_weights: str | None = _spec(None, "local Inception weights file for offline FID")
    require_fid: bool = _spec(False, "fail (instead of recording unavailable) when FID cannot run")
    num_reference: int | None = _spec(None, "reference images (default: all)", ge=2)
    backend: Backend = _spec(
        "torch", "backend sampling the dense and final model (tensorrt: the engines, on GPU)"
    )
    compare_raw: bool = _spec(True, "also score the finetune's raw (non-EMA) weights")
    compare_pruned: bool = _spec(
        True, "also score the pruned model before finetuning (what the finetune recovered)"
    )
    interval_level: float = _spec(
        0.95, "level of every quality figure's interval (paired over seeds)", gt=0.0, lt=1.0
    )
    interval_method: Literal["jackknife", "bootstrap"] = _spec(
        "jackknife", "replicates behind the intervals, paired over seeds (see docs/quality.md)"
    )
    resamples: int = _spec(
        1000, "replicates per interval: jackknife groups (one seed each up to this count) or bootstrap draws",
        ge=20,
    )  # fmt: skip

    @property
    def fixed_samples(self) -> int:
        """The image count of a figure scored once (sweeps, the frontier): ``num_samples``, or with
        ``auto`` the first look's ``chunk_samples``."""
        return self.num_samples if isinstance(self.num_samples, int) else self.chunk_samples


@dataclass
class ExportConfig:
    """ONNX export of the dense and the compressed UNet."""

    precisions: list[Literal["fp32", "fp16", "int8"]] = _spec(
        ["fp32", "fp16"], "ONNX variants to write (int8: QDQ, quantized from fp32 with calibration)"
    )
    calibration_images: int = _spec(8, "int8: images whose sampler trajectory calibrates the ranges", ge=1)
    calibration_steps: int = _spec(20, "int8: DDIM steps of that trajectory (every step is one input)", ge=1)
    trace_batch: int = _spec(2, "batch size of the tracing input (the batch axis stays dynamic)", ge=1)
    fold_constants: bool = _spec(True, "constant folding with Polygraphy")
    feature_reuse: bool = _spec(
        False, "also export the full and shallow passes of feature reuse, split at sample.cache_level"
    )


@dataclass
class ParityConfig:
    """ONNX Runtime vs PyTorch parity; a breach fails the stage."""

    batches: list[int] = _spec([1, 8], "batch sizes compared", ge=1)
    timesteps: list[int] = _spec([0, 250, 500, 750, 999], "timesteps compared", ge=0)
    atol_fp32: float = _spec(1e-4, "absolute tolerance, fp32 ONNX vs fp32 torch", ge=0.0)
    rtol_fp32: float = _spec(1e-4, "relative tolerance, fp32", ge=0.0)
    atol_fp16: float = _spec(2e-2, "absolute tolerance, fp16 ONNX vs fp32 torch", ge=0.0)
    rtol_fp16: float = _spec(2e-2, "relative tolerance, fp16", ge=0.0)
    sampler_images: int = _spec(4, "images in the sampler-level comparison", ge=1)
    sampler_steps: int = _spec(20, "DDIM steps in the sampler-level comparison", ge=1)
    min_psnr_fp32: float = _spec(40.0, "minimum sampler PSNR (dB), fp32", ge=0.0)
    min_psnr_fp16: float = _spec(30.0, "minimum sampler PSNR (dB), fp16", ge=0.0)
    median_abs_int8: float = _spec(
        0.05, "int8: maximum median abs error per call vs fp32 torch, on sampler-trajectory inputs", gt=0.0
    )
    min_psnr_int8: float = _spec(25.0, "minimum sampler PSNR (dB), int8", ge=0.0)


@dataclass
class BenchConfig:
    """Latency of one UNet call and of the whole sampler, dense vs compressed."""

    backends: list[Backend] = _spec(
        ["torch", "onnxruntime"], "backends to time (unavailable ones are reported as skipped)"
    )
    batch_sizes: list[int] = _spec([1, 16], "batch sizes", ge=1)
    sampler_steps: int = _spec(20, "DDIM steps of the timed sampler", ge=1)
    sampler_batch_sizes: list[int] | None = _spec(None, "sampler batch sizes (default: batch_sizes)", ge=1)
    warmup: int = _spec(3, "untimed warm-up calls", ge=0)
    repeat: int = _spec(20, "timed UNet calls per model", ge=1)
    sampler_repeat: int = _spec(3, "timed sampler runs per model", ge=1)
    threads: int | None = _spec(None, "CPU threads for torch and ONNX Runtime (default: all)", ge=1)
    torch_compile: bool = _spec(False, "on CUDA also time torch.compile'd fp16 (minutes of warm-up)")
    variants: list[str] | None = _spec(
        None,
        "timed samplers as SCHEDULER:STEPS[:CACHE_INTERVAL] (e.g. [ddim:50, dpmsolver++:10:3]); "
        "default: DDIM at sampler_steps",
    )

    def sampler_variants(self) -> list[SamplerVariant]:
        """The timed samplers, the default (DDIM at ``sampler_steps``) when none are listed."""
        if not self.variants:
            return [SamplerVariant("ddim", self.sampler_steps)]
        return [SamplerVariant.parse(v, f"bench.variants[{i}]") for i, v in enumerate(self.variants)]


@dataclass
class BuildConfig:
    """TensorRT engines for the dense and the compressed UNet (GPU hosts)."""

    precision: Literal["fp16", "fp32", "int8"] = _spec(
        "fp16", "engine precision (the ONNX file it is built from; int8: the QDQ file, explicit quantization)"
    )
    min_batch: int = _spec(1, "optimisation profile: smallest batch", ge=1)
    opt_batch: int = _spec(8, "optimisation profile: batch tuned for", ge=1)
    max_batch: int = _spec(64, "optimisation profile: largest batch", ge=1)
    workspace_gib: float = _spec(8.0, "builder workspace limit (GiB)", gt=0.0)
    optimization_level: int = _spec(3, "builder optimisation level", ge=0, le=5)
    cuda_graphs: bool = _spec(True, "also benchmark with CUDA graphs (static shapes)")


@dataclass
class AcceptanceConfig:
    """Release gates; a limit left null is not checked."""

    backend: Literal[
        "torch",
        "torch-fp16",
        "torch-bf16",
        "torch-fp16+cudagraph",
        "torch-fp16+compile",
        "onnxruntime",
        "onnxruntime-int8",
        "tensorrt",
        "tensorrt+cudagraph",
    ] = _spec("onnxruntime", "bench variant the latency gates read (GPU hosts: torch-fp16+cudagraph, ...)")
    batch: int = _spec(1, "batch size the latency gates read", ge=1)
    max_unet_ms: float | None = _spec(None, "max median latency of one compressed UNet call (ms)", gt=0.0)
    max_image_ms: float | None = _spec(None, "max compressed sampler latency per image (ms)", gt=0.0)
    min_speedup: float | None = _spec(None, "min UNet-call speed-up vs dense", gt=0.0)
    min_sampler_speedup: float | None = _spec(None, "min sampler speed-up vs dense", gt=0.0)
    max_parity_error: float | None = _spec(None, "max abs error, fp32 ONNX vs torch", gt=0.0)
    min_ssim: float | None = _spec(None, "min SSIM vs dense samples", ge=0.0, le=1.0)
    max_fd_ratio: float | None = _spec(
        None, "max FD-infinity of compressed / dense (undecided when dense's interval reaches 0)", gt=0.0
    )
    max_fd_increase: float | None = _spec(
        None, "max FD-infinity of compressed - dense, in the Frechet feature's units", gt=0.0
    )
    max_kid_increase: float | None = _spec(None, "max KID of compressed - dense (unbiased at any N)", gt=0.0)
    variant: str | None = _spec(
        None, "bench sampler variant the sampler gates read (SCHEDULER:STEPS[:INTERVAL]; default: the first)"
    )


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


@dataclass
class ServeConfig:
    """``compress-deploy serve`` / ``triton-repo`` settings (command-line flags, validated like config)."""

    backend: Backend = _spec("onnxruntime", "in-process backend of the unet model")
    model: Literal["pruned", "dense"] = _spec("pruned", "which model to serve")
    host: str = _spec("127.0.0.1", "address Triton listens on (HTTP, gRPC, metrics)")
    http_port: int = _spec(8000, "HTTP/REST port", ge=1, le=65535)
    grpc_port: int = _spec(8001, "gRPC port", ge=1, le=65535)
    metrics_port: int = _spec(8002, "Prometheus metrics port", ge=1, le=65535)
    max_batch: int = _spec(16, "largest batch the dynamic batcher forms", ge=1)
    max_queue_delay_us: int = _spec(2000, "how long a request may wait for a batch (us)", ge=0)
    max_steps: int = _spec(1000, "largest `steps` a request may ask", ge=1)
    default_steps: int = _spec(50, "steps when a request gives none", ge=1)
    scheduler: Scheduler = _spec("ddim", "sampling scheduler")
    instances: int = _spec(1, "model instances (instance_group count)", ge=1)
    threads: int | None = _spec(None, "CPU threads of the in-process UNet backend (default: all)", ge=1)
    startup_timeout: float = _spec(300.0, "seconds to wait for the server to be ready", gt=0.0)


@dataclass
class RunConfig:
    """The whole run: one section per pipeline concern."""

    name: str = _spec("run", "run name (default: the config file's stem)")
    seed: int = _spec(0, "global seed", ge=0)
    device: Literal["auto", "cpu", "cuda"] = _spec("auto", "torch device")
    threads: int | None = _spec(None, "torch CPU threads", ge=1)
    stages: list[str] = _spec(list(DEFAULT_STAGES), "stages run when --stages is not given")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill_steps: StepDistillConfig = field(default_factory=StepDistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)

    def check(self) -> None:
        """Cross-field rules that single-field checks cannot express."""
        variants = [str(v) for v in self.bench.sampler_variants()]  # each parsed, errors name the entry
        if "int8" in self.export.precisions and "fp32" not in self.export.precisions:
            raise ConfigError("export.precisions: int8 is quantized from the fp32 export; list fp32 too")
        if self.acceptance.variant is not None:
            wanted = str(SamplerVariant.parse(self.acceptance.variant, "acceptance.variant"))
            if wanted not in variants:
                raise ConfigError(
                    f"acceptance.variant={self.acceptance.variant}: bench does not time it; add it to "
                    f"bench.variants (now {', '.join(variants)})"
                )
        d = self.finetune.distill
        if d.weight_task + d.weight_output + d.weight_features == 0:
            raise ConfigError(
                "finetune.distill: weight_task, weight_output and weight_features are all 0, so the "
                "finetune has no loss; set weight_task=1 (the plain loss) or a distillation weight"
            )
        self._check_distill_steps()
        targets = self.prune.targets()
        b = self.build
        if not b.min_batch <= b.opt_batch <= b.max_batch:
            raise ConfigError(
                "build: need min_batch <= opt_batch <= max_batch, got "
                f"{b.min_batch}/{b.opt_batch}/{b.max_batch}"
            )
        if self.prune.search == "latency" and not self.prune.target_latency.active:
            raise ConfigError(
                "prune.search=latency allocates channels under a measured latency target; set "
                "prune.target_latency.speedup or prune.target_latency.ms (and prune.target_macs=null)"
            )
        lat = self.prune.target_latency
        if lat.uses_frontier and lat.what != "sampler":
            raise ConfigError(
                f"prune.target_latency.levers={list(lat.levers)}: steps, solver, reuse and precision act on "
                "the whole sampler; set prune.target_latency.what=sampler"
            )
        if lat.uses_frontier and self.prune.search == "latency":
            raise ConfigError(
                "prune.target_latency.levers: the frontier picks the pruning ratio among frontier.ratios; "
                "use prune.search=uniform (or levers: [prune] for the per-level latency search)"
            )
        if len(targets) > 1:
            extra = " ".join(f"prune.{k}=null" for k in targets[1:])
            raise ConfigError(
                f"prune: {', '.join('prune.' + k for k in targets)} are all set; give exactly one "
                f"(e.g. add `{extra}`)"
            )

    def _check_distill_steps(self) -> None:
        """``distill_steps``: start_steps = target_steps x 2^k (k >= 1)."""
        d = self.distill_steps
        if d.target_steps is None:
            return
        n = d.start_steps
        while n > d.target_steps and n % 2 == 0:
            n //= 2
        if n != d.target_steps or d.start_steps == d.target_steps:
            raise ConfigError(
                f"distill_steps.start_steps={d.start_steps} must be distill_steps.target_steps="
                f"{d.target_steps} times a power of two (each round halves the steps), e.g. "
                f"start_steps={d.target_steps * 8}"
            )


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _range_text(meta: dict) -> str:
    lo = "[" if "ge" in meta else "(" if "gt" in meta else None
    hi = "]" if "le" in meta else ")" if "lt" in meta else None
    lo_v = meta.get("ge", meta.get("gt"))
    hi_v = meta.get("le", meta.get("lt"))
    if lo and hi:
        return f" in {lo}{lo_v}, {hi_v}{hi}"
    if lo:
        return f" {'>=' if lo == '[' else '>'} {lo_v}"
    if hi:
        return f" {'<=' if hi == ']' else '<'} {hi_v}"
    return ""


def _coerce(value: Any, tp: Any, key: str, meta: dict) -> Any:
    """Check ``value`` against annotation ``tp`` and the range in ``meta``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        literals = [a for a in inner if typing.get_origin(a) is Literal]
        if literals and any(value in typing.get_args(a) for a in literals):  # e.g. num_samples: auto
            return value
        if literals and isinstance(value, str):
            plain = " or ".join(_describe(a) for a in inner if a not in literals) + _range_text(meta)
            named = ", ".join(repr(v) for a in literals for v in typing.get_args(a))
            raise ConfigError(f"{key}: expected {plain} or {named}, got {value!r}")
        return _coerce(value, inner[0], key, meta)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str) and value != ""
    if not ok:
        rng = _range_text(meta)
        raise ConfigError(f"{key}: expected {_describe(tp)}{rng}, got {value!r}")
    bad = (
        ("ge" in meta and value < meta["ge"])
        or ("gt" in meta and value <= meta["gt"])
        or ("le" in meta and value > meta["le"])
        or ("lt" in meta and value >= meta["lt"])
    )
    if bad:
        raise ConfigError(f"{key}: expected {_describe(tp)}{_range_text(meta)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where}{unknown[0]}: unknown key; known keys here: {known}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key, dict(f.metadata))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``dotted.key=value`` override; the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. prune.ratio=0.3")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p.isidentifier() for p in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted config key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
    ):
        raise ConfigError(f"override {text!r}: only scalars and flat lists ([a, b]) can be overridden")
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw config mapping with ``key=value`` overrides applied."""
    out = _deepcopy_mapping(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy_mapping(data: dict) -> dict:
    return {k: _deepcopy_mapping(v) if isinstance(v, dict) else v for k, v in data.items()}


def prune_target_overrides(ratio: float | None = None, target_macs: float | None = None) -> list[str]:
    """The overrides that make a config prune at one ``ratio`` (or to one ``target_macs``) and
    nothing else: every other pruning target nulled, no latency target; at ratio 0 (nothing
    removed) the magnitude criterion, which needs no importance pass. The one place a sweep, the
    frontier or the prune stage sets a pruning target."""
    if (ratio is None) == (target_macs is None):
        raise ValueError("prune_target_overrides: give exactly one of ratio and target_macs")
    over = [
        f"prune.ratio={'null' if ratio is None else ratio}",
        f"prune.target_macs={'null' if target_macs is None else target_macs}",
        "prune.target_params=null",
        "prune.target_latency.speedup=null",
        "prune.target_latency.ms=null",
        "prune.target_latency.levers=[prune]",
    ]
    return over + (["prune.method=magnitude"] if ratio == 0 else [])


def config_from_mapping(data: Any, overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw mapping (plus overrides) into a :class:`RunConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    cfg = _build(RunConfig, data, "")
    cfg.check()
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config file; ``name`` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; pass a YAML config") from None
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    elif data is None:
        data = {"name": path.stem}
    return config_from_mapping(data, overrides)


def field_spec(cls: type, name: str) -> tuple[Any, Any, dict]:
    """(type annotation, default, metadata) of config field ``cls.name``."""
    hints = typing.get_type_hints(cls)
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return hints[name], default, dict(f.metadata)


def check_value(key: str, value: Any, cls: type, name: str) -> Any:
    """Validate ``value`` by the rules of config field ``cls.name``; errors name ``key`` (e.g. a flag)."""
    tp, _, meta = field_spec(cls, name)
    return _coerce(value, tp, key, meta)


def parse_value(key: str, text: str, cls: type, name: str) -> Any:
    """A command-line string checked as config field ``cls.name`` would be (ConfigError naming ``key``)."""
    tp, _, meta = field_spec(cls, name)
    base = tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return _coerce(None, tp, key, meta)
        base = inner[0]
    value: Any = text
    try:
        if base is int:
            value = int(text)
        elif base is float:
            value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {_describe(base)}{_range_text(meta)}, got {text!r}") from None
    return _coerce(value, tp, key, meta)


def describe_field(cls: type, name: str) -> str:
    """The field's doc plus its allowed values, for --help texts."""
    tp, default, meta = field_spec(cls, name)
    return f"{meta.get('doc', '')} ({_describe(tp)}{_range_text(meta)}; default {default})"


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (or one section) for records and hashing."""
    return dataclasses.asdict(cfg)
