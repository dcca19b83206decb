"""Acceptance checks: measured figures from a run's records against ``acceptance`` limits."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import AcceptanceConfig, LatencyTarget


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


def _bench_value(bench: dict | None, backend: str, batch: int, what: str, key: str) -> float | None:
    if not bench:
        return None
    if key == "speedup":
        for row in bench["metrics"]["speedup"]:
            if (row["backend"], row["batch"], row["what"]) == (backend, batch, what):
                return row["speedup"]
        return None
    for row in bench["metrics"]["results"]:
        if (row["backend"], row["batch"], row["what"], row["model"]) == (backend, batch, what, "pruned"):
            return row["median_ms"] / (batch if key == "per_image" else 1)
    return None


def latency_target_check(target: LatencyTarget, bench: dict | None) -> Check:
    """The prune stage's latency target, verified by the bench stage's own measurement (no margin)."""
    key = "speedup" if target.speedup is not None else "ms"
    what = "sampler" if target.what == "sampler" else "unet"
    value = _bench_value(bench, target.backend, target.batch, what, key)
    limit = target.speedup if target.speedup is not None else target.ms
    direction = ">=" if key == "speedup" else "<="
    detail = f"[{target.backend}, {what}, batch {target.batch}, measured by bench]"
    if value is None:
        detail += (
            f" bench has no such row: add {target.backend} to bench.backends and {target.batch} to "
            f"bench.{'sampler_' if what == 'sampler' else ''}batch_sizes"
        )
    ok = value is not None and (value >= limit if key == "speedup" else value <= limit)  # type: ignore[operator]
    return Check(f"prune.target_latency.{key}", value, limit, direction, ok, detail)  # type: ignore[arg-type]


def evaluate(
    cfg: AcceptanceConfig, records: dict[str, dict | None], target: LatencyTarget | None = None
) -> list[Check]:
    """All configured checks (limits left null are not checked), plus an active latency target."""
    bench, parity, quality = records.get("bench"), records.get("parity"), records.get("quality")
    where = f"[{cfg.backend}, batch {cfg.batch}]"
    compressed = None
    fd = None
    if quality:
        models = quality["metrics"]["models"]
        compressed = models.get("finetuned") or models.get("pruned")
        metric = quality["metrics"]["frechet_metric"]
        if compressed and models["dense"].get(metric) and compressed.get(metric) is not None:
            fd = compressed[metric] / models["dense"][metric]
    measured = {
        "max_unet_ms": (_bench_value(bench, cfg.backend, cfg.batch, "unet", "ms"), "<=", where),
        "max_image_ms": (_bench_value(bench, cfg.backend, cfg.batch, "sampler", "per_image"), "<=", where),
        "min_speedup": (_bench_value(bench, cfg.backend, cfg.batch, "unet", "speedup"), ">=", where),
        "min_sampler_speedup": (
            _bench_value(bench, cfg.backend, cfg.batch, "sampler", "speedup"),
            ">=",
            where,
        ),
        "max_parity_error": (
            parity["metrics"].get("max_abs_error_fp32") if parity else None,
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
