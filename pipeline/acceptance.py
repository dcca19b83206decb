"""Acceptance checks: measured figures from a run's records against ``acceptance`` limits."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import AcceptanceConfig, LatencyTarget
from compressor.stack import SamplerVariant
from rundir.records import BenchMetrics, ParityMetrics, QualityMetrics, read_metrics

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
QUALITY_GATES = {"min_ssim": ">=", "max_fd_ratio": "<=", "max_fd_increase": "<=", "max_kid_increase": "<=",
                 "min_adherence_ratio": ">="}  # fmt: skip
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
    ill_posed: bool = False  # inconclusive because no sample count can decide it (a ratio to ~0)

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
        if self.outcome == INCONCLUSIVE and self.ill_posed:
            text += " undecidable:"
        elif self.outcome == INCONCLUSIVE:
            text += " inconclusive: the interval straddles the limit"
            text += (
                f"; about {self.decide_at} samples would likely decide it (quality.num_samples=auto "
                f"quality.max_samples={self.decide_at})"
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
    # lazy: pulls in torch, which importing pipeline.acceptance alone does not
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
        s = bench.timed_stack
        detail = (
            f"[{row['backend']}, batch {row['batch']}, ratio {s.ratio:g} + {s.scheduler} {s.steps} "
            f"+ cache {s.cache_interval} + {s.precision} vs dense {row['reference']}, by bench]"
        )
    ok = value is not None and (value >= limit if key == "speedup" else value <= limit)  # type: ignore[operator]
    direction = ">=" if key == "speedup" else "<="
    return Check(f"prune.target_latency.{key}", value, limit, direction, ok, detail)  # type: ignore[arg-type]


def quality_checks(cfg: AcceptanceConfig, quality: QualityMetrics | None) -> list[Check]:
    """The configured quality gates (three outcomes, read from the final compressed model's figures
    against dense on the same seeds). The Frechet gates read FD-infinity (free of the sample-size
    bias); ``max_fd_ratio`` refuses to decide when the dense model's own FD-infinity interval
    reaches zero (the ratio is then ill-conditioned) and falls back to the finite-N ratio only on
    records written before FD-infinity. ``min_adherence_ratio`` reads the prompt adherence ratio
    (conditional models, :mod:`compressor.adherence`) the same way: three outcomes from its paired
    interval, undecidable when the dense model's own adherence interval reaches zero, and failed as not
    measured, with the fix, when the run measured none (an unconditional model, or no measure applied)."""
    if quality is None:
        return [
            Check(name, None, getattr(cfg, name), d, False, "[no quality record]")
            for name, d in QUALITY_GATES.items()
            if getattr(cfg, name) is not None
        ]
    label = quality.compressed_label()
    c = quality.models[label] if label else {}
    samples, level = quality.num_samples, quality.interval.get("level")
    dense_inf = quality.models.get("dense", {}).get("fd_inf")
    own = f"; dense's own FD-infinity {dense_inf:.3g}" if isinstance(dense_inf, float) else ""
    if "fd_inf_ratio" in c:
        ratio, ratio_ci = c.get("fd_inf_ratio"), c.get("fd_inf_ratio_ci")
        ratio_detail = "[FD-infinity, compressed / dense, paired over seeds]"
    else:  # a record written before FD-infinity: the finite-N ratio
        ratio, ratio_ci = c.get("fd_ratio"), c.get("fd_ratio_ci")
        dense_fd, fd_c = quality.frechet("dense"), quality.frechet(label) if label else None
        if ratio is None and dense_fd and fd_c is not None:
            ratio = fd_c / dense_fd
        ratio_detail = "[Frechet distance at this sample count, compressed / dense, paired over seeds]"
    gates = {
        "min_ssim": (c.get("ssim_vs_dense"), c.get("ssim_vs_dense_ci"), "[vs dense, same seeds]"),
        "max_fd_ratio": (ratio, ratio_ci, ratio_detail),
        "max_fd_increase": (c.get("fd_inf_diff"), c.get("fd_inf_diff_ci"),
                            f"[FD-infinity, compressed - dense, paired over seeds{own}]"),
        "max_kid_increase": (c.get("kid_diff"), c.get("kid_diff_ci"),
                             "[KID, compressed - dense, paired over seeds]"),
        "min_adherence_ratio": (c.get("adherence_ratio"), c.get("adherence_ratio_ci"), _adherence_detail(c)),
    }  # fmt: skip
    checks = []
    for name, (value, interval, detail) in gates.items():
        limit = getattr(cfg, name)
        if limit is None:
            continue
        if name == "max_fd_ratio" and "fd_inf_ratio" in c and ratio_ci is None:
            note = c.get("fd_inf_ratio_note") or "the dense model's FD-infinity interval reaches zero"
            checks.append(Check(name, ratio, limit, "<=", False, f"{detail} {note}; gate on "
                                "acceptance.max_fd_increase instead", None, INCONCLUSIVE, samples, level,
                                ill_posed=True))  # fmt: skip
            continue
        if name == "min_adherence_ratio" and c.get("adherence_ratio_note"):  # dense's own interval reaches 0
            note = f"{detail} {c['adherence_ratio_note']}"
            checks.append(Check(name, value, limit, ">=", False, note, None, INCONCLUSIVE, samples, level,
                                ill_posed=True))  # fmt: skip
            continue
        checks.append(
            interval_check(name, value, interval, limit, QUALITY_GATES[name], detail, samples, level)
        )
    return checks


def _adherence_detail(figures: dict) -> str:
    """The adherence gate's bracket: what was measured, or why nothing was and what to do."""
    if "adherence" not in figures:
        return (
            "[prompt adherence applies to text- or class-conditioned models; this run's model is "
            "unconditional (or its quality record predates adherence): unset acceptance.min_adherence_ratio]"
        )
    if figures.get("adherence") is None:
        note = figures.get("adherence_note") or "prompt adherence not measured"
        return f"[{note}]"
    return f"[{figures.get('adherence_metric')}, compressed / dense, paired over seeds and prompts]"


def evaluate(
    cfg: AcceptanceConfig,
    bench: BenchMetrics | None,
    parity: ParityMetrics | None,
    quality: QualityMetrics | None,
    target: LatencyTarget | None = None,
) -> list[Check]:
    """All configured checks (limits left null are not checked), plus an active latency target."""
    where = f"[{cfg.backend}, batch {cfg.batch}]"
    variant = str(SamplerVariant.parse(cfg.variant, "acceptance.variant")) if cfg.variant else None
    if variant:
        where = f"[{cfg.backend}, batch {cfg.batch}, sampler {variant}]"

    student = next((r for r in (bench.student if bench else []) if variant is None
                    and (r["backend"], r["batch"]) == (cfg.backend, cfg.batch)), None)  # fmt: skip
    sampler_where = where
    if student:  # a few-step student: its sampler at its steps against the dense reference sampler
        shown = f"student ddim:{student['student_steps']} vs dense {student['reference']}"
        sampler_where = f"[{cfg.backend}, batch {cfg.batch}, {shown}]"
    whole_call = bench is not None and bench.whole_call  # a conditional model: what a user waits for
    if whole_call:
        sampler_where = where[:-1] + ", whole call: text encoder + guided UNet loop + VAE decoder]"

    def timed(what: str, key: str) -> float | None:
        if what == "sampler" and student:
            return student["speedup"] if key == "speedup" else student["ms"] / student["batch"]
        if what == "sampler" and whole_call:
            what = "pipeline"
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
    checks += quality_checks(cfg, quality)
    if target is not None and target.active:
        checks.append(latency_target_check(target, bench))
    return checks


def evaluate_run(run, cfg: AcceptanceConfig, target: LatencyTarget | None = None) -> list[Check]:
    """:func:`evaluate` over the bench, parity and quality records of run directory ``run``."""

    return evaluate(
        cfg, read_metrics(run, "bench"), read_metrics(run, "parity"), read_metrics(run, "quality"), target
    )
