"""Acceptance checks: measured figures from a run's records against ``acceptance`` limits."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import AcceptanceConfig, LatencyTarget, SamplerVariant
from compressor.records import BenchMetrics, ParityMetrics, QualityMetrics


@dataclass
class Check:
    """One gate: what was measured, the limit, and the verdict."""

    name: str
    measured: float | None
    limit: float
    direction: str  # "<=" or ">="
    passed: bool
    detail: str

    def line(self) -> str:
        shown = "not measured" if self.measured is None else f"{self.measured:.4g}"
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}  {self.name}: {shown} (limit {self.direction} {self.limit:g}) {self.detail}".rstrip()
        )


def latency_target_check(target: LatencyTarget, bench: BenchMetrics | None) -> Check:
    """The prune stage's latency target, verified by the bench stage's own measurement (no margin)."""
    key = "speedup" if target.speedup is not None else "ms"
    if target.uses_frontier:
        return _stack_check(target, bench, key)
    what = "sampler" if target.what == "sampler" else "unet"
    variant = f"ddim:{bench.sampler_steps}:1" if bench and what == "sampler" and bench.sampler_steps else None
    value = bench.value(target.backend, target.batch, what, key, variant) if bench else None
    limit = target.speedup if target.speedup is not None else target.ms
    direction = ">=" if key == "speedup" else "<="
    detail = f"[{target.backend}, {what}, batch {target.batch}, measured by bench]"
    if value is None:
        detail += (
            f" bench has no such row: add {target.backend} to bench.backends and {target.batch} to "
            f"bench.{'sampler_' if what == 'sampler' else ''}batch_sizes"
            + (f" (and {variant} to bench.variants)" if variant else "")
        )
    ok = value is not None and (value >= limit if key == "speedup" else value <= limit)  # type: ignore[operator]
    return Check(f"prune.target_latency.{key}", value, limit, direction, ok, detail)  # type: ignore[arg-type]


def _stack_check(target: LatencyTarget, bench: BenchMetrics | None, key: str) -> Check:
    """A target over levers: the chosen stack's sampler vs the dense reference sampler, timed by bench."""
    row = bench.stack if bench else None
    value = None if row is None else row["speedup" if key == "speedup" else "ms"]
    limit = target.speedup if target.speedup is not None else target.ms
    if row is None:
        detail = "[chosen stack] bench has no stack row: rerun bench after the prune stage chose one"
    else:
        s = row["stack"]
        detail = (
            f"[{row['backend']}, batch {row['batch']}, ratio {s['ratio']:g} + {s['scheduler']} {s['steps']} "
            f"+ cache {s['cache_interval']} + {s['precision']} vs dense {row['reference']}, by bench]"
        )
    ok = value is not None and (value >= limit if key == "speedup" else value <= limit)  # type: ignore[operator]
    direction = ">=" if key == "speedup" else "<="
    return Check(f"prune.target_latency.{key}", value, limit, direction, ok, detail)  # type: ignore[arg-type]


def evaluate(
    cfg: AcceptanceConfig,
    bench: BenchMetrics | None,
    parity: ParityMetrics | None,
    quality: QualityMetrics | None,
    target: LatencyTarget | None = None,
) -> list[Check]:
    """All configured checks (limits left null are not checked), plus an active latency target."""
    where = f"[{cfg.backend}, batch {cfg.batch}]"
    compressed = None
    fd = None
    if quality:
        label = quality.compressed_label()
        compressed = quality.models[label] if label else None
        dense_fd, fd_c = quality.frechet("dense"), quality.frechet(label) if label else None
        if dense_fd and fd_c is not None:
            fd = fd_c / dense_fd

    variant = str(SamplerVariant.parse(cfg.variant, "acceptance.variant")) if cfg.variant else None
    if variant:
        where = f"[{cfg.backend}, batch {cfg.batch}, sampler {variant}]"

    def timed(what: str, key: str) -> float | None:
        return bench.value(cfg.backend, cfg.batch, what, key, variant) if bench else None

    measured = {
        "max_unet_ms": (timed("unet", "ms"), "<=", where),
        "max_image_ms": (timed("sampler", "per_image"), "<=", where),
        "min_speedup": (timed("unet", "speedup"), ">=", where),
        "min_sampler_speedup": (timed("sampler", "speedup"), ">=", where),
        "max_parity_error": (
            parity.max_abs_error_fp32 if parity else None,
            "<=",
            "[fp32 ONNX vs torch]",
        ),
        "min_ssim": (compressed.get("ssim_vs_dense") if compressed else None, ">=", "[vs dense, same seeds]"),
        "max_fd_ratio": (fd, "<=", "[Frechet distance, compressed / dense]"),
    }
    checks = []
    for name, (value, direction, detail) in measured.items():
        limit = getattr(cfg, name)
        if limit is None:
            continue
        ok = value is not None and (value <= limit if direction == "<=" else value >= limit)
        checks.append(Check(name, value, limit, direction, ok, detail))
    if target is not None and target.active:
        checks.append(latency_target_check(target, bench))
    return checks


def evaluate_run(run, cfg: AcceptanceConfig, target: LatencyTarget | None = None) -> list[Check]:
    """:func:`evaluate` over the bench, parity and quality records of run directory ``run``."""
    from compressor.records import read_metrics

    return evaluate(
        cfg, read_metrics(run, "bench"), read_metrics(run, "parity"), read_metrics(run, "quality"), target
    )
