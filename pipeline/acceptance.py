"""Acceptance checks: measured figures from a run's records against ``acceptance`` limits."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import AcceptanceConfig, LatencyTarget, SamplerVariant
from compressor.records import BenchMetrics, ParityMetrics, QualityMetrics

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
EXIT_FAIL, EXIT_INCONCLUSIVE = 3, 4  # ``check`` and the pipeline's exit codes


@dataclass
class Check:
    """One gate: what was measured (with its interval, for quality figures), the limit, the verdict.

    A gate with an interval passes when the whole interval is on the good side of its limit,
    fails when the whole interval is on the bad side, and is inconclusive otherwise; a gate
    without one (latency, parity, a record written before intervals) compares the figure.
    """

    name: str
    measured: float | None
    limit: float
    direction: str  # "<=" or ">="
    passed: bool
    detail: str
    interval: list | None = None  # [low, high] at ``level``
    outcome: str = ""  # pass | fail | inconclusive (default: from ``passed``)
    samples: int | None = None  # the sample count behind the interval
    level: float | None = None
    decide_at: int | None = None  # inconclusive: the sample count that would likely decide it

    def __post_init__(self) -> None:
        if not self.outcome:
            self.outcome = PASS if self.passed else FAIL

    def line(self) -> str:
        """One line: verdict, gate, figure (and interval), limit, and for an inconclusive gate the
        sample count that would likely decide it."""
        shown = "not measured" if self.measured is None else f"{self.measured:.4g}"
        limit = f"limit {self.direction} {self.limit:g}"
        if self.interval is not None and self.measured is not None:
            level = f"{self.level:.0%} " if self.level else ""
            shown += f", {level}interval [{self.interval[0]:.4g}, {self.interval[1]:.4g}]"
            if self.samples:
                limit += f", {self.samples} samples"
        text = f"{self.outcome.upper()}  {self.name}: {shown} ({limit})"
        if self.outcome == INCONCLUSIVE:
            text += " inconclusive: the interval straddles the limit"
            text += (
                f"; about {self.decide_at} samples would likely decide it (quality.num_samples)"
                if self.decide_at
                else "; the estimate sits on the limit, no sample count decides it"
            )
        return f"{text} {self.detail}".rstrip()


def interval_check(
    name: str,
    value: float | None,
    interval: list | None,
    limit: float,
    direction: str,
    detail: str,
    samples: int | None = None,
    level: float | None = None,
) -> Check:
    """A quality gate decided by its interval (three outcomes), or by the figure when it has none."""
    from compressor.intervals import samples_to_decide

    at_most = direction == "<="
    if value is None:
        return Check(name, None, limit, direction, False, detail)
    if not interval:
        ok = value <= limit if at_most else value >= limit
        return Check(name, value, limit, direction, ok, f"{detail} (no interval recorded: rerun quality)")
    low, high = interval
    good = high <= limit if at_most else low >= limit
    bad = low > limit if at_most else high < limit
    outcome = PASS if good else FAIL if bad else INCONCLUSIVE
    decide = (
        samples_to_decide(value, interval, limit, samples) if outcome == INCONCLUSIVE and samples else None
    )
    return Check(name, value, limit, direction, outcome == PASS, detail, list(interval), outcome, samples,
                 level, decide)  # fmt: skip


def verdict(checks: list[Check]) -> str:
    """``fail`` when any gate failed, else ``inconclusive`` when any is, else ``pass``."""
    outcomes = {c.outcome for c in checks}
    return FAIL if FAIL in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else PASS


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
    compressed: dict = {}
    fd = fd_ci = None
    samples = level = None
    if quality:
        label = quality.compressed_label()
        compressed = quality.models[label] if label else {}
        dense_fd, fd_c = quality.frechet("dense"), quality.frechet(label) if label else None
        fd = compressed.get("fd_ratio")
        if fd is None and dense_fd and fd_c is not None:  # records written before fd_ratio
            fd = fd_c / dense_fd
        fd_ci = compressed.get("fd_ratio_ci")
        samples, level = quality.num_samples, quality.interval.get("level")

    variant = str(SamplerVariant.parse(cfg.variant, "acceptance.variant")) if cfg.variant else None
    if variant:
        where = f"[{cfg.backend}, batch {cfg.batch}, sampler {variant}]"

    student = next((r for r in (bench.student if bench else []) if variant is None
                    and (r["backend"], r["batch"]) == (cfg.backend, cfg.batch)), None)  # fmt: skip
    sampler_where = where
    if student:  # a few-step student: its sampler at its steps against the dense reference sampler
        shown = f"student ddim:{student['student_steps']} vs dense {student['reference']}"
        sampler_where = f"[{cfg.backend}, batch {cfg.batch}, {shown}]"

    def timed(what: str, key: str) -> float | None:
        if what == "sampler" and student:
            return student["speedup"] if key == "speedup" else student["ms"] / student["batch"]
        return bench.value(cfg.backend, cfg.batch, what, key, variant) if bench else None

    measured = {
        "max_unet_ms": (timed("unet", "ms"), "<=", where),
        "max_image_ms": (timed("sampler", "per_image"), "<=", sampler_where),
        "min_speedup": (timed("unet", "speedup"), ">=", where),
        "min_sampler_speedup": (timed("sampler", "speedup"), ">=", sampler_where),
        "max_parity_error": (
            parity.max_abs_error_fp32 if parity else None,
            "<=",
            "[fp32 ONNX vs torch]",
        ),
    }
    checks = []
    for name, (value, direction, detail) in measured.items():
        limit = getattr(cfg, name)
        if limit is None:
            continue
        ok = value is not None and (value <= limit if direction == "<=" else value >= limit)
        checks.append(Check(name, value, limit, direction, ok, detail))
    quality_gates = {
        "min_ssim": (compressed.get("ssim_vs_dense"), compressed.get("ssim_vs_dense_ci"), ">=",
                     "[vs dense, same seeds]"),
        "max_fd_ratio": (fd, fd_ci, "<=", "[Frechet distance, compressed / dense, paired over seeds]"),
    }  # fmt: skip
    for name, (value, interval, direction, detail) in quality_gates.items():
        limit = getattr(cfg, name)
        if limit is not None:
            checks.append(interval_check(name, value, interval, limit, direction, detail, samples, level))
    if target is not None and target.active:
        checks.append(latency_target_check(target, bench))
    return checks


def evaluate_run(run, cfg: AcceptanceConfig, target: LatencyTarget | None = None) -> list[Check]:
    """:func:`evaluate` over the bench, parity and quality records of run directory ``run``."""
    from compressor.records import read_metrics

    return evaluate(
        cfg, read_metrics(run, "bench"), read_metrics(run, "parity"), read_metrics(run, "quality"), target
    )
