"""Acceptance checks: measured figures from a run's records against ``acceptance`` limits."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import AcceptanceConfig


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


def evaluate(cfg: AcceptanceConfig, records: dict[str, dict | None]) -> list[Check]:
    """All configured checks (limits left null are not checked)."""
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
    return checks
