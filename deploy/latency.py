"""Measured latency of pruned structures on a deployment backend: what the pruning search times with.

Latency-targeted pruning (``prune.target_latency``) and ``compress-deploy plan`` both ask: how fast
is the UNet pruned at ratio r on this backend, at this batch, relative to dense? The search that
answers it is :mod:`compressor.pruning.search`; it needs one thing from here, a timer
(:func:`latency_timer`): a :class:`LatencyProbe` loads each candidate structure on the backend
(ONNX / engine files in a temporary folder) and times it alternately with the dense model in the
same process (:func:`time_structure`, :func:`deploy.stopwatch.time_alternating`), so drift and warm-up
cancel; the figure kept is the median of ``repeat`` calls.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.components import ModelSpec
from compressor.config import RunConfig
from compressor.errors import ConfigError
from compressor.guidance import Conditioning
from compressor.sampling import make_scheduler
from deploy import tensorrt_backend
from deploy.engine_info import Profile
from deploy.runtimes import Backend, load_backend
from deploy.stopwatch import percentile_ms, sampler_call, time_alternating, unet_call
from export.onnx_export import export_unet, onnx_input_shapes
from rundir.layout import engine_info_path


def backend_unavailable(name: str) -> str:
    """Why ``name`` cannot be timed here ('' when it can)."""
    if name == "tensorrt":
        return tensorrt_backend.unavailable_reason()
    return ""


@dataclass
class LatencyProbe:
    """Times one backend at one batch size, a UNet call or the whole DDIM sampler."""

    backend: str
    batch: int
    what: str = "unet"
    steps: int = 20
    device: torch.device = torch.device("cpu")
    threads: int | None = None
    warmup: int = 2
    repeat: int = 10
    precision: str = "fp16"  # TensorRT engines only
    scheduler_config: dict | None = None
    scheduler: str = "ddim"  # the timed sampler's solver (what="sampler")
    spec: ModelSpec | None = None  # the model the UNets belong to: the inputs their graphs take
    conditioning: Conditioning | None = None  # a conditional model's inputs, one row per image
    guidance_scale: float = 1.0  # > 1: each UNet call on twice the batch, as the guided sampler calls it

    def __post_init__(self) -> None:
        reason = backend_unavailable(self.backend)
        if reason:
            raise ConfigError(f"latency on {self.backend}: not measurable here ({reason})")
        self._dir = tempfile.TemporaryDirectory(prefix="latency-")
        self._dense: tuple[nn.Module, Backend] | None = None

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        device: torch.device,
        scheduler_config: dict,
        backend: str | None = None,
        batch: int | None = None,
        what: str | None = None,
        repeat: int | None = None,
        threads: int | None = None,
        scheduler: str = "ddim",
        spec: ModelSpec | None = None,
        conditioning: Conditioning | None = None,
    ) -> LatencyProbe:
        """A probe set up from a run config: ``prune.target_latency`` unless overridden.

        torch is timed on the run's device, ONNX Runtime on the CPU, TensorRT engines at
        ``build.precision``; the sampler runs ``bench.sampler_steps`` DDIM steps. A conditional
        model (``spec``, ``conditioning`` for the probe's batch) is timed with its conditioning at
        ``sample.guidance_scale``: one UNet call on twice the batch under guidance.
        """
        lat = cfg.prune.target_latency
        backend = backend or lat.backend
        return cls(
            backend,
            batch or lat.batch,
            what or lat.what,
            cfg.bench.sampler_steps,
            device if backend == "torch" else torch.device("cpu"),
            threads if threads is not None else lat.threads,
            lat.warmup,
            repeat or lat.repeat,
            cfg.build.precision,
            scheduler_config,
            scheduler,
            spec,
            conditioning,
            cfg.sample.guidance_scale if conditioning is not None else 1.0,
        )

    def dense(self, unet: nn.Module) -> Backend:
        """The backend of the dense model, loaded once per probe."""
        if self._dense is None or self._dense[0] is not unet:
            self._dense = (unet, self.load(unet, "dense"))
        return self._dense[1]

    def load(self, unet: nn.Module, label: str) -> Backend:
        """A backend over a private copy of ``unet`` (ONNX / engine files in a temporary folder)."""
        if self.backend == "torch":
            return load_backend("torch", unet=unet, device=self.device)
        precision = self.precision if self.backend == "tensorrt" else "fp32"
        onnx_file = Path(self._dir.name) / f"{label}.{precision}.onnx"
        export_unet(unet, onnx_file, precision, fold=self.backend == "tensorrt", spec=self.spec)
        if self.backend == "onnxruntime":
            backend = load_backend("onnxruntime", file=onnx_file, threads=self.threads)
            _remove(onnx_file)  # the session holds the model: trials of big models must not fill the disk
            return backend
        engine = onnx_file.with_suffix(".plan")
        tensorrt_backend.build_engine(
            onnx_file,
            engine,
            Profile(self.batch, self.batch, self.batch),
            onnx_input_shapes(onnx_file),
            precision,
            4.0,
            3,
            Path(self._dir.name) / "timing.cache",
            label,
        )
        _remove(onnx_file)
        backend = load_backend("tensorrt", file=engine)
        _remove(engine, engine_info_path(engine))
        return backend

    def _call(self, backend: Backend, shape: tuple) -> Callable[[], object]:
        device = "cuda" if self.backend == "tensorrt" else self.device
        cond, scale = self.conditioning, self.guidance_scale
        if self.what == "unet":
            return unet_call(backend.predict, shape, self.batch, device, cond, scale)
        scheduler = make_scheduler(self.scheduler, self.scheduler_config or {})
        return sampler_call(
            backend.predict,
            scheduler,
            shape,
            self.batch,
            self.steps,
            device,
            conditioning=cond,
            guidance_scale=scale,
        )

    def measure(self, dense: Backend, candidate: Backend, shape: tuple) -> tuple[float, float]:
        """(dense median ms, candidate median ms), timed alternately (torch on ``threads`` threads)."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            calls = {"dense": self._call(dense, shape), "candidate": self._call(candidate, shape)}
            warmup = self.warmup if self.what == "unet" else min(1, self.warmup)
            times = time_alternating(calls, warmup, self.repeat)
        finally:
            torch.set_num_threads(before)
        return percentile_ms(times["dense"])[0], percentile_ms(times["candidate"])[0]

    def describe(self) -> str:
        """E.g. 'onnxruntime, UNet call at batch 16'."""
        what = "UNet call" if self.what == "unet" else f"{self.steps}-step {self.scheduler} sampler"
        guided = f" (guided: UNet rows x 2, scale {self.guidance_scale:g})" if self.guidance_scale > 1 else ""
        return f"{self.backend}, {what} at batch {self.batch}{guided}"


def _remove(*paths: Path) -> None:
    for path in paths:
        for p in (path, path.with_name(path.name + ".data")):
            p.unlink(missing_ok=True)


def time_structure(
    probe: LatencyProbe, dense: nn.Module, candidate: nn.Module, shape: tuple, label: str
) -> tuple[float, float]:
    """(dense median ms, candidate median ms): ``candidate`` loaded on the probe's backend (files named
    by ``label``) and timed alternately with ``dense`` (whose backend the probe loads once)."""
    return probe.measure(probe.dense(dense), probe.load(candidate, label), shape)


@dataclass
class ProbeTimer:
    """A probe at one input shape: the :class:`compressor.pruning.search.Timer` the search times with."""

    probe: LatencyProbe
    shape: tuple

    def describe(self) -> str:
        """E.g. 'onnxruntime, UNet call at batch 16'."""
        return self.probe.describe()

    def cache_facts(self) -> dict:
        """The probe's settings a measured latency table depends on (part of its cache key)."""
        p = self.probe
        facts = {
            "probe": [p.backend, p.batch, p.what, p.steps, p.threads, p.precision],
            "device": str(p.device),
        }
        if p.conditioning is not None:  # unconditional keys unchanged
            facts["conditioning"] = [p.conditioning.kind, list(p.conditioning.cond.shape), p.guidance_scale]
        return facts

    def time(self, dense: nn.Module, candidate: nn.Module, label: str) -> tuple[float, float]:
        """(dense median ms, candidate median ms), timed alternately (:func:`time_structure`)."""
        return time_structure(self.probe, dense, candidate, self.shape, label)


def latency_timer(
    cfg: RunConfig, device: torch.device, scheduler_config: dict, shape: tuple, **overrides
) -> ProbeTimer:
    """The search's timer for a run: a probe from ``prune.target_latency`` (``overrides``: the
    arguments of :meth:`LatencyProbe.from_config`, ``spec`` and ``conditioning`` for a conditional
    model) at input ``shape``. Raises ConfigError where the backend cannot be timed here."""
    return ProbeTimer(LatencyProbe.from_config(cfg, device, scheduler_config, **overrides), shape)
