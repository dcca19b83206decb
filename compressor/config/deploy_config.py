"""Config sections of deployment: ``export`` (ONNX), ``parity`` (ONNX vs torch), ``bench``
(latency), ``build`` (TensorRT engines), and the flags of ``serve``/``triton-repo`` (:class:`ServeConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.config.fields import Backend, Scheduler, _spec
from compressor.errors import ConfigError
from compressor.stack import SamplerVariant


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
    """TensorRT engines of the run's graphs (GPU hosts) and their optimisation profiles.

    ``shapes``: ``dynamic`` (default) builds each engine over batches ``min_batch..max_batch`` (tuned
    for ``opt_batch``) at the model's resolution, or over image sides ``sizes`` (min, opt, max pixels);
    ``static`` builds one shape per engine (min = opt = max: batch ``opt_batch``, the model's
    resolution), the fastest engines. Batches count images: a guided UNet's profile is twice them.
    """

    precision: Literal["fp16", "fp32", "int8"] = _spec(
        "fp16", "engine precision (the ONNX file it is built from; int8: the QDQ file, explicit quantization)"
    )
    min_batch: int = _spec(1, "optimisation profile: smallest batch", ge=1)
    opt_batch: int = _spec(8, "optimisation profile: batch tuned for", ge=1)
    max_batch: int = _spec(64, "optimisation profile: largest batch", ge=1)
    workspace_gib: float = _spec(8.0, "builder workspace limit (GiB)", gt=0.0)
    optimization_level: int = _spec(3, "builder optimisation level", ge=0, le=5)
    cuda_graphs: bool = _spec(True, "also benchmark with CUDA graphs (static shapes)")
    shapes: Literal["dynamic", "static"] = _spec(
        "dynamic",
        "optimisation profiles: dynamic (batch min_batch..max_batch, opt opt_batch; image side build.sizes "
        "or the model's) or static (one shape per engine: batch opt_batch at the model's resolution)",
    )
    sizes: list[int] | None = _spec(
        None,
        "dynamic shapes: the image side in pixels as [min, opt, max] (square images, multiples of the "
        "model's downsampling); null: the model's own size",
        ge=1,
    )

    def __post_init__(self) -> None:
        self.check_shapes()

    def check_shapes(self) -> None:
        """ConfigError (one line, with the fix) for a batch or size range that is not min <= opt <= max,
        or sizes under static shapes (one shape at the model's resolution)."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                "build: need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}; fix build.min_batch/opt_batch/max_batch"
            )
        if self.sizes is None:
            return
        if len(self.sizes) != 3 or not self.sizes[0] <= self.sizes[1] <= self.sizes[2]:
            raise ConfigError(
                f"build.sizes: expected [min, opt, max] image sides in pixels with min <= opt <= max, got "
                f"{self.sizes}; e.g. build.sizes=[256,512,768], or null for the model's size"
            )
        if self.precision == "int8":
            raise ConfigError(
                "build.sizes with build.precision=int8: graphs of several sizes are exported in fp32 and "
                "fp16 only (the int8 graph is calibrated); use build.precision=fp16, or build.sizes=null"
            )
        if self.shapes == "static":
            raise ConfigError(
                f"build.sizes={self.sizes} with build.shapes=static: static engines take one shape at the "
                "model's resolution; set build.shapes=dynamic for a size range, or build.sizes=null"
            )

    def profile_batches(self) -> tuple[int, int, int]:
        """(min, opt, max) images of every engine's profile: all ``opt_batch`` under static shapes."""
        if self.shapes == "static":
            return (self.opt_batch,) * 3
        return self.min_batch, self.opt_batch, self.max_batch


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
