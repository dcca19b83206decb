"""A run's verdict at a glance: the headline figures against their limits, and what to do next.

One :class:`Summary` serves the closing lines of ``compress-deploy CONFIG`` (:func:`closing_lines`)
and the summary card at the top of the report. The headline is the sampler's speed-up (the row
the acceptance gates read: ``acceptance.backend`` at ``acceptance.batch``, or the few-step
student's or the chosen stack's sampler when that is the final model) and every quality gate's
figure with its interval against its limit. For a failed or undecided gate, :func:`next_steps`
gives the commands that would change it, each with a rough cost scaled from the run's own stage
wall times (a stage's ``seconds`` in its record, times the samples or steps asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from compressor.config import DEFAULT_STAGES, RunConfig
from compressor.stack import SamplerVariant
from pipeline.acceptance import FAIL, INCONCLUSIVE, PASS, Check, evaluate_run, verdict
from rundir import layout
from rundir.records import (
    BenchMetrics,
    CheckMetrics,
    QualityMetrics,
    Record,
    RecordError,
    final_model_dir,
    read_metrics,
    read_record,
)

# one name per model, everywhere a person reads: the stage that made it -> its name
MODEL_NAMES = layout.MODEL_NAMES
SPEED_GATES = ("min_speedup", "min_sampler_speedup", "max_unet_ms", "max_image_ms")
QUALITY_LABELS = {
    "min_ssim": "SSIM vs dense",
    "max_fd_ratio": "FD-infinity ratio (compressed / dense)",
    "max_fd_increase": "FD-infinity increase (compressed - dense)",
    "max_kid_increase": "KID increase (compressed - dense)",
    "min_adherence_ratio": "prompt adherence (compressed / dense)",
}
NO_LIMITS = "none"  # the verdict when no acceptance limit is configured


def _off(value) -> str:
    """A limit as a person reads it (None: the limit is off)."""
    return "null (off)" if value is None else str(value)


@dataclass(frozen=True)
class Figure:
    """One headline figure: its value (and interval) against a gate's limit, when one is set."""

    name: str  # the gate (e.g. ``min_sampler_speedup``) or, ungated, the figure's key
    label: str  # what a reader sees, e.g. "sampler speed-up"
    value: float | None
    interval: list | None = None
    limit: float | None = None
    direction: str | None = None  # "<=" or ">="
    outcome: str | None = None  # pass | fail | inconclusive; None: no gate reads it
    where: str = ""  # what was measured, e.g. "onnxruntime, batch 16, ddim 20 steps"
    unit: str = ""  # "x" for a speed-up

    def shown(self) -> str:
        """The value and its interval, e.g. ``1.16 [0.827, 1.5]`` or ``1.50x``."""
        shown = "not measured" if self.value is None else _number(self.value, self.unit)
        if self.interval and self.value is not None:
            shown += f" [{self.interval[0]:.3g}, {self.interval[1]:.3g}]"
        return shown

    def text(self) -> str:
        """E.g. ``sampler speed-up 1.50x (limit >= 1.05) PASS``."""
        shown = self.shown()
        limit = f" (limit {self.direction} {self.limit:g}{self.unit})" if self.limit is not None else ""
        outcome = f" {self.outcome.upper()}" if self.outcome else ""
        return f"{self.label} {shown}{limit}{outcome}"


def _number(value: float, unit: str = "") -> str:
    """A speed-up with two decimals (``1.26x``), any other figure with three significant digits."""
    return f"{value:.2f}x" if unit == "x" else f"{value:.3g}"


@dataclass(frozen=True)
class NextStep:
    """A command that would change a failed or undecided gate, why, and its rough cost."""

    gate: str
    why: str
    command: str
    cost: str


@dataclass(frozen=True)
class SamplerRow:
    """The sampler the headline speed-up compares: dense and compressed ms per run of ``batch``."""

    backend: str
    batch: int
    dense_ms: float
    ms: float
    what: str  # e.g. "ddim 20 steps" or "student ddim:4 vs dense ddim:50:1"

    @property
    def speedup(self) -> float:
        """Dense ms / compressed ms."""
        return self.dense_ms / self.ms


@dataclass(frozen=True)
class Summary:
    """The verdict, the headline figures, the other gates, the next steps and the report's path."""

    verdict: str  # pass | fail | inconclusive | none (no limits configured)
    final: str  # the compressed model's name (dense / pruned / finetuned / student)
    checks: list[Check]
    speed: Figure | None
    quality: list[Figure]
    steps: list[NextStep]
    report: Path
    sampler: SamplerRow | None = None
    overrides: list = field(default_factory=list)  # limits overridden on the command line

    def verdict_line(self) -> str:
        """E.g. ``INCONCLUSIVE: 4 of 5 gates passed; undecided: max_fd_ratio``."""
        if not self.checks:
            return "NO LIMITS: no acceptance limits are configured (acceptance.* in the config)"
        passed = sum(c.outcome == PASS for c in self.checks)
        text = f"{self.verdict.upper()}: {passed} of {len(self.checks)} gates passed"
        for outcome, word in ((FAIL, "failed"), (INCONCLUSIVE, "undecided")):
            named = [c.name for c in self.checks if c.outcome == outcome]
            text += f"; {word}: {', '.join(named)}" if named else ""
        if self.overrides:
            text += "; overridden: " + ", ".join(
                f"{o['key']}={_off(o['now'])} (run: {_off(o['run'])})" for o in self.overrides
            )
        return text

    def headline(self) -> list[Figure]:
        """The speed-up first, then every quality figure."""
        return ([self.speed] if self.speed else []) + self.quality

    def lines(self) -> list[str]:
        """The closing lines of a run: verdict, headline, report path, next steps."""
        out = [f"verdict: {self.verdict_line()} ({self.final} vs dense)"]
        out += [f"  {f.text()}" + (f" [{f.where}]" if f.where else "") for f in self.headline()]
        out.append(f"report: {self.report}")
        if self.steps:
            out.append("next:")
            for s in self.steps:
                out += [f"  {s.gate}: {s.why}", f"    {s.command}", f"    ({s.cost})"]
        return out


def build_summary(
    run: Path, cfg: RunConfig, config: str = "CONFIG", overrides: list[str] | None = None
) -> Summary:
    """The summary of run directory ``run`` under ``cfg``'s limits.

    ``config`` and ``overrides`` (the user's ``key=value`` list) start every suggested command, so
    it reruns the same run. Raises RecordError for a damaged record.
    """
    checks = evaluate_run(run, cfg.acceptance, cfg.prune.target_latency)
    bench, quality = read_metrics(run, "bench"), read_metrics(run, "quality")
    check = read_record(run, "check", done_only=False)
    shown = check.typed() if check is not None else None
    sampler = sampler_row(bench, cfg) if bench else None
    return Summary(
        verdict=verdict(checks) if checks else NO_LIMITS,
        final=final_name(run),
        checks=checks,
        speed=speed_figure(sampler, checks),
        quality=quality_figures(quality, checks),
        steps=next_steps(run, cfg, checks, command_of(run, cfg, config, overrides or [])),
        report=layout.report_dir(run) / "report.html",
        sampler=sampler,
        overrides=list(shown.overrides) if isinstance(shown, CheckMetrics) else [],
    )


def closing_lines(run: Path, cfg: RunConfig, config: str, overrides: list[str], ran: list[str]) -> str:
    """The closing lines of ``compress-deploy CONFIG``, each ending in a newline (empty when neither
    check nor report was among the stages ``ran``: a partial run has no verdict to tell)."""
    if not {"check", "report"} & set(ran):
        return ""
    return "".join(f"{line}\n" for line in build_summary(run, cfg, config, overrides).lines())


def final_name(run: Path) -> str:
    """The name of the run's final compressed model (``pruned`` when the run holds none yet)."""
    try:
        return MODEL_NAMES.get(final_model_dir(run)[0], "pruned")
    except RecordError:
        return "pruned"


def sampler_row(bench: BenchMetrics, cfg: RunConfig) -> SamplerRow | None:
    """The sampler the headline compares: the chosen stack's when a latency target over levers chose
    one, else the student's, else the plain sampler at the acceptance backend and batch (the first
    timed sampler when bench has no such row); for a conditional model the whole text-to-image call
    (bench rows ``pipeline``), which the sampler gates read too."""
    acc = cfg.acceptance
    if bench.stack:
        r, s = bench.stack, bench.timed_stack
        what = f"stack {s.scheduler} {s.steps} steps, cache {s.cache_interval}, {s.precision}"
        return SamplerRow(
            r["backend"], r["batch"], r["reference_ms"], r["ms"], f"{what} vs dense {r['reference']}"
        )
    students = sorted(bench.student, key=lambda r: (r["backend"], r["batch"]) != (acc.backend, acc.batch))
    if students and acc.variant is None:
        r = students[0]
        what = f"student ddim {r['student_steps']} steps vs dense {r['reference']}"
        return SamplerRow(r["backend"], r["batch"], r["reference_ms"], r["ms"], what)
    variant = str(SamplerVariant.parse(acc.variant, "acceptance.variant")) if acc.variant else None
    looped = "pipeline" if bench.whole_call else "sampler"  # a conditional model: the whole call
    rows = [r for r in bench.results if r["what"] == looped]
    wanted = [r for r in rows if (r["backend"], r["batch"]) == (acc.backend, acc.batch)
              and (variant is None or r.get("variant", variant) == variant)]  # fmt: skip
    if not wanted and rows:
        first = rows[0]
        wanted = [r for r in rows if (r["backend"], r["batch"], r.get("variant")) ==
                  (first["backend"], first["batch"], first.get("variant"))]  # fmt: skip
    ms = {r["model"]: r for r in wanted}
    if "dense" not in ms or "pruned" not in ms:
        return None
    r = ms["pruned"]
    what = f"{r['scheduler']} {r['steps']} steps" if r.get("steps") else f"{bench.sampler_steps} steps"
    if looped == "pipeline":
        what = f"whole text-to-image call, {what}, guidance {r.get('guidance_scale')}"
    return SamplerRow(r["backend"], r["batch"], ms["dense"]["median_ms"], r["median_ms"], what)


def speed_figure(row: SamplerRow | None, checks: list[Check]) -> Figure | None:
    """The sampler speed-up with the limit of the gate that reads the same row (none when no gate
    does: e.g. bench has no row at the acceptance backend and batch, and this is another one)."""
    if row is None:
        return None
    gate = "prune.target_latency.speedup" if row.what.startswith("stack") else "min_sampler_speedup"
    check = next((c for c in checks if c.name == gate), None)
    where = f"{row.backend}, batch {row.batch}, {row.what}"
    label = (
        "text-to-image speed-up" if row.what.startswith("whole text-to-image call") else "sampler speed-up"
    )
    if check is None or check.measured is None or not math.isclose(check.measured, row.speedup):
        return Figure("sampler_speedup", label, row.speedup, where=where, unit="x")
    return Figure(gate, label, row.speedup, None, check.limit, check.direction, check.outcome,
                  where, "x")  # fmt: skip


def quality_figures(quality: QualityMetrics | None, checks: list[Check]) -> list[Figure]:
    """Every quality gate's figure with its interval and limit; ungated, the Frechet figure alone
    (FD-infinity's increase over dense when recorded, else the finite-N ratio)."""
    gated = [
        Figure(c.name, QUALITY_LABELS[c.name], c.measured, c.interval, c.limit, c.direction, c.outcome,
               f"{c.samples} samples" if c.samples else "")
        for c in checks
        if c.name in QUALITY_LABELS
    ]  # fmt: skip
    if quality is None or any(f.name in ("max_fd_ratio", "max_fd_increase") for f in gated):
        return gated
    label = quality.compressed_label()
    if label is None:
        return gated
    for key, name in (("fd_inf_diff", "max_fd_increase"), ("fd_ratio", "max_fd_ratio")):
        value, interval = quality.figure(label, key)
        if value is not None:
            where = f"{quality.num_samples} samples, no gate"
            return [Figure(key, QUALITY_LABELS[name], value, interval, where=where), *gated]
    return gated


# -- what to do next ------------------------------------------------------------------------


@dataclass(frozen=True)
class StageTimes:
    """Each recorded stage's wall time and the stages it read, to price a rerun."""

    seconds: dict[str, float]
    inputs: dict[str, list[str]]

    @classmethod
    def of(cls, run: Path) -> StageTimes:
        """The times recorded in ``run`` (a stage without a record costs nothing)."""
        found: dict[str, Record] = {}
        for stage in ("train", *DEFAULT_STAGES):
            rec = read_record(run, stage, done_only=False)
            if rec is not None:
                found[stage] = rec
        return cls({s: r.seconds or 0.0 for s, r in found.items()}, {s: r.inputs for s, r in found.items()})

    def rerun(self, stage: str, scale: float = 1.0) -> float:
        """Seconds to rerun ``stage`` (its own time times ``scale``) and every stage that reads it."""
        out, grew = {stage}, True
        while grew:
            grown = {s for s, ins in self.inputs.items() if s not in out and out & set(ins)}
            out |= grown
            grew = bool(grown)
        return self.seconds.get(stage, 0.0) * scale + sum(self.seconds.get(s, 0.0) for s in out - {stage})


def duration(seconds: float, about: str = "about ") -> str:
    """A rough duration: ``about 40 s``, ``about 3 min``, ``about 1.5 h``."""
    if seconds < 90:
        return f"{about}{max(5, round(seconds / 5) * 5):.0f} s"
    if seconds < 5400:
        return f"{about}{seconds / 60:.0f} min"
    return f"{about}{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Command:
    """How the run was started (config, the user's overrides, its run directory), to suggest reruns."""

    config: str
    overrides: list[str]
    run: Path
    default_run: bool

    def pipeline(self, *settings: str, force: str | None = None) -> str:
        """``compress-deploy CONFIG [overrides] settings [--force STAGE] [--run-dir RUN]``; a setting
        replaces the user's own override of the same key."""
        keys = {s.split("=", 1)[0] for s in settings}
        kept = [o for o in self.overrides if o.split("=", 1)[0] not in keys]
        words = ["compress-deploy", self.config, *kept, *settings]
        words += [f"--force {force}"] if force else []
        words += [] if self.default_run else [f"--run-dir {self.run}"]
        return " ".join(words)

    def frontier(self, target: str) -> str:
        """``compress-deploy frontier CONFIG [overrides] --target T`` writing into this run."""
        out = "" if self.default_run else f" --out {layout.frontier_dir(self.run)}"
        return (
            " ".join(["compress-deploy frontier", self.config, *self.overrides, f"--target {target}"]) + out
        )


def next_steps(run: Path, cfg: RunConfig, checks: list[Check], command: Command) -> list[NextStep]:
    """For every failed or undecided gate, the commands that would change it and their rough cost."""
    times = StageTimes.of(run)
    quality, prune = read_metrics(run, "quality"), read_metrics(run, "prune")
    out: list[NextStep] = []
    for c in sorted(checks, key=lambda c: c.outcome != FAIL):  # what failed first
        if c.outcome == PASS:
            continue
        if c.measured is None:
            why = f"not measured {c.detail}".strip()
            out.append(NextStep(c.name, why, command.pipeline(force="bench"), duration(times.rerun("bench"))))
        elif c.outcome == INCONCLUSIVE and c.decide_at:
            out.append(_more_samples(c, command, times, quality))
        elif c.outcome == INCONCLUSIVE and getattr(c, "ill_posed", False) and c.name == "min_adherence_ratio":
            why = "dense's own adherence reaches zero: a ratio to it decides nothing; use prompts it follows"
            cmd = command.pipeline("acceptance.min_adherence_ratio=null")
            out.append(NextStep(c.name, why, cmd, "seconds: only check and report rerun"))
        elif c.outcome == INCONCLUSIVE and getattr(c, "ill_posed", False):
            why = "a ratio to a dense figure near zero decides nothing; gate on the increase (feature units)"
            has = cfg.acceptance.max_fd_increase is not None  # already gated on it: drop the ratio
            cmd = command.pipeline(
                f"acceptance.{c.name}=null", *([] if has else ["acceptance.max_fd_increase=LIMIT"])
            )
            out.append(NextStep(c.name, why, cmd, "seconds: only check and report rerun"))
        elif c.name in QUALITY_LABELS:  # failed, or undecidable: the figure sits on its limit
            out += _better_quality(c, cfg, command, times, prune)
        elif c.name in SPEED_GATES or c.name.startswith("prune.target_latency"):
            out += _faster(c, cfg, command, times, prune, quality)
        else:  # parity: the exported files differ from torch
            why = "the fp32 ONNX file differs from torch (see the Parity table): re-export"
            out.append(
                NextStep(c.name, why, command.pipeline(force="export"), duration(times.rerun("export")))
            )
    merged: dict[str, NextStep] = {}  # a command serving two gates is shown once, naming both
    for s in out:
        seen = merged.get(s.command)
        merged[s.command] = (
            s if seen is None else NextStep(f"{seen.gate}, {s.gate}", seen.why, s.command, s.cost)
        )
    return list(merged.values())


def _more_samples(c: Check, command: Command, times: StageTimes, quality: QualityMetrics | None) -> NextStep:
    """Sample until decided: the likely cost at the count that would decide it, and the most."""
    drawn = quality.num_samples if quality else c.samples or 1
    top = max(4096, 1024 * math.ceil(c.decide_at / 1024))
    spent = times.seconds.get("quality", 0.0)
    likely, most = spent * max(c.decide_at, drawn) / drawn, spent * top / drawn
    why = f"undecided at {c.samples or drawn} samples; about {c.decide_at} would likely decide it"
    cmd = command.pipeline("quality.num_samples=auto", f"quality.max_samples={top}", force="quality")
    bound = f", at most {duration(most, '')}" if duration(most) != duration(likely) else ""
    cost = f"{duration(likely)}{bound}: quality took {spent:.0f} s for {drawn} samples per model"
    return NextStep(c.name, why, cmd, cost)


def _better_quality(c: Check, cfg: RunConfig, command: Command, times: StageTimes, prune) -> list[NextStep]:
    """A longer finetune (when the run finetuned), and a milder pruning target."""
    out = []
    what = "failed" if c.outcome == FAIL else "sits on its limit (no sample count decides it)"
    if "finetune" in times.seconds:
        steps = cfg.finetune.steps * 2
        why = f"{what}: finetune longer ({cfg.finetune.steps} -> {steps} steps)"
        cost = f"{duration(times.rerun('finetune', 2.0))}: finetune took {times.seconds['finetune']:.0f} s"
        out.append(NextStep(c.name, why, command.pipeline(f"finetune.steps={steps}"), cost))
    if prune is not None and prune.macs_kept < 0.95:
        kept = round(prune.macs_kept + (1 - prune.macs_kept) / 2, 2)
        cmd = command.pipeline(f"prune.target_macs={kept:g}", *_other_targets(cfg, "target_macs"))
        lead = "or " if out else f"{what}: "
        why = f"{lead}prune less (keep {kept:.0%} of the MACs, not {prune.macs_kept:.0%})"
        out.append(NextStep(c.name, why, cmd, f"{duration(times.rerun('prune'))}: the whole pipeline again"))
    return out


def _other_targets(cfg: RunConfig, keep: str) -> list[str]:
    """``prune.<k>=null`` for every other pruning target the config sets."""
    return [f"prune.{k}=null" for k in ("ratio", "target_macs", "target_params")
            if k != keep and getattr(cfg.prune, k) is not None]  # fmt: skip


def _faster(c: Check, cfg: RunConfig, command: Command, times: StageTimes, prune, quality) -> list[NextStep]:
    """A smaller MACs target (this run's speed-up per MACs reduction extrapolated), and the frontier."""
    need = c.limit / c.measured if c.direction == ">=" else c.measured / c.limit  # the speed-up missing
    out = []
    if prune is not None:
        reduction, gained = prune.macs_reduction, c.measured if c.direction == ">=" else None
        if gained and gained > 1 and reduction > 1:  # speed-up = reduction ** e, e from this run
            kept = 1 / reduction ** (math.log(gained * need) / math.log(gained))
        else:
            kept = prune.macs_kept / need
        kept = max(0.05, round(kept, 2))
        cmd = command.pipeline(f"prune.target_macs={kept:g}", *_other_targets(cfg, "target_macs"))
        unit = "x" if "speedup" in c.name else " ms"
        shown = _number(c.measured, "x") if unit == "x" else f"{c.measured:.3g} ms"
        why = f"{shown} misses {c.direction} {c.limit:g}{unit}: prune harder (keep {kept:.0%} of the MACs)"
        out.append(NextStep(c.name, why, cmd, f"{duration(times.rerun('prune'))}: the whole pipeline again"))
    target = f"{c.limit:g}x" if c.direction == ">=" else f"{max(1.1, need):.2g}x"
    why = "or search every lever (pruning, steps, solver, feature reuse, precision) for the target"
    out.append(NextStep(c.name, why, command.frontier(target), _frontier_cost(cfg, times, quality)))
    return out


def _frontier_cost(cfg: RunConfig, times: StageTimes, quality: QualityMetrics | None) -> str:
    """One fit per pruning ratio (prune + finetune + export), plus every stack's samples scored at the
    cost per image and step that this run's quality stage took."""
    f = cfg.frontier
    fits = len([r for r in f.ratios if r > 0])
    fit = sum(times.seconds.get(s, 0.0) for s in ("prune", "finetune", "export"))
    stacks = len(f.ratios) * len(f.schedulers) * len(f.steps) * len(f.cache_intervals) * len(f.precisions)
    if quality is None:
        return f"{duration(fits * fit)} for {fits} fits, plus scoring {stacks} stacks"
    per_image_step = times.seconds.get("quality", 0.0) / (
        len(quality.models) * quality.num_samples * (quality.student_steps or quality.steps)
    )
    per_stack = (f.samples or quality.num_samples) * per_image_step * sum(f.steps) / len(f.steps)
    return f"{duration(fits * fit + stacks * per_stack)}: {fits} fits and {stacks} stacks scored"


def command_of(run: Path, cfg: RunConfig, config: str, overrides: list[str]) -> Command:
    """The :class:`Command` that started run directory ``run`` (``--run-dir`` kept unless default)."""
    return Command(config, list(overrides), Path(run), Path(run) == Path("runs") / cfg.name)
