"""The stacks a frontier measures: the lever values (:class:`Grid`), one combination
(:class:`Stack`), what a job needs (:class:`Spec`), the grid a latency target may search, and what a
chosen stack adds to a run's config (:func:`apply_stack`)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from compressor.config import RunConfig, config_from_mapping, config_to_dict
from compressor.errors import UserError
from compressor.stack import SamplerVariant, Stack

LEVERS = ("prune", "steps", "scheduler", "cache", "precision", "student")
SOLVERS = ("ddim", "dpmsolver++", "unipc")  # deterministic: a seed fixes the image


@dataclass
class Grid:
    """The lever values to combine."""

    ratios: list[float]
    schedulers: list[str]
    steps: list[int]
    cache_intervals: list[int] = field(default_factory=lambda: [1])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    students: list[int] = field(default_factory=lambda: [0])

    def stacks(self) -> list[Stack]:
        """Every valid combination: feature reuse needs fewer full passes than steps and runs the
        fp32/fp16 passes only (they are not quantized). Students (``students`` > 0) sample with
        DDIM at their own steps, without reuse; every round's student in fp32, the last round's
        (the fewest steps, the one its nested run exports) in every precision."""
        out = []
        if 0 in self.students:
            for r, s, n, c, p in itertools.product(
                self.ratios, self.schedulers, self.steps, self.cache_intervals, self.precisions
            ):
                if c > 1 and (c >= n or p == "int8"):
                    continue
                out.append(Stack(float(r), s, int(n), int(c), p))
        fewest = min((n for n in self.students if n > 0), default=0)
        for r, n, p in itertools.product(self.ratios, sorted(set(self.students) - {0}, reverse=True),
                                         self.precisions):  # fmt: skip
            if p == "fp32" or n == fewest:
                out.append(Stack(float(r), "ddim", int(n), 1, p, int(n)))
        return out

    def check(self, start_steps: int | None = None) -> None:
        """UserError for values no stack can use (``start_steps``: the students' first teacher's steps,
        ``distill_steps.start_steps``: every student must be a round of its chain)."""
        for n in self.students:
            if n < 0 or (n and start_steps and (start_steps % n or (start_steps // n) & (start_steps // n - 1)
                                                or n == start_steps)):  # fmt: skip
                raise UserError(
                    f"frontier: student {n}: each round of progressive distillation halves the steps from "
                    f"distill_steps.start_steps={start_steps}, so a student takes {start_steps} / 2^k steps "
                    f"(e.g. {', '.join(str(start_steps >> k) for k in (2, 3, 4))}); 0 = no student"
                )
        bad = [s for s in self.schedulers if s not in SOLVERS]
        if bad:
            raise UserError(
                f"frontier: solver {bad[0]!r} is stochastic or unknown; choose from {', '.join(SOLVERS)}"
            )
        if not self.stacks():
            raise UserError("frontier: the grid has no valid stack (check --steps and --cache-intervals)")


@dataclass
class Spec:
    """Everything a job needs (plain data, so it pickles to Ray workers)."""

    base: dict  # the run config as a mapping
    out: str
    grid: Grid
    backend: str = "onnxruntime"
    batch: int = 16
    samples: int = 256
    threads: int | None = None
    repeat: int = 3
    warmup: int = 1
    batches: list[int] = field(default_factory=list)  # more timed batches beside ``batch``
    retime: bool = False  # time every stack again, whatever was cached (a busy machine's timings)

    @property
    def root(self) -> Path:
        return Path(self.out)

    @property
    def timed_batches(self) -> list[int]:
        """Every batch the stacks are timed at: ``batch`` (which speed-ups and targets read) first."""
        return [self.batch, *sorted({b for b in self.batches if b != self.batch})]

    def config(self) -> RunConfig:
        return config_from_mapping(self.base)

    @property
    def reference(self) -> SamplerVariant:
        """The dense reference sampler: the run's own solver and steps, no reuse."""
        s = self.config().sample
        return SamplerVariant(s.scheduler, s.steps)


def spec_from_config(cfg: RunConfig, out: Path, grid: Grid | None = None, **changes) -> Spec:
    """A frontier spec from the run config's ``frontier`` section (``changes`` override it)."""
    f = cfg.frontier
    grid = grid or Grid(list(f.ratios), list(f.schedulers), list(f.steps), list(f.cache_intervals),
                        list(f.precisions), list(f.students))  # fmt: skip
    threads = f.threads or cfg.bench.threads
    spec = Spec(config_to_dict(cfg), str(out), grid, f.backend, f.batch,
                f.samples or cfg.quality.fixed_samples, threads, f.repeat, f.warmup,
                list(f.batches or []))  # fmt: skip
    spec = dataclasses.replace(spec, **{k: v for k, v in changes.items() if v is not None})
    spec.grid.check(cfg.distill_steps.start_steps)
    return spec


def stack_guidance(cfg: RunConfig, stack: Stack) -> float:
    """The guidance scale a stack samples a conditional model with: ``sample.guidance_scale``, except a
    few-step student's 1.0 (distilled at the run's fixed scale, it is called once per step on the
    conditional rows alone)."""
    return 1.0 if stack.student_steps else cfg.sample.guidance_scale


def lever_grid(cfg: RunConfig, levers: list[str], base: Grid | None = None) -> Grid:
    """The grid a latency target may search: free levers span ``base`` (default: the ``frontier``
    section), the others stay at the run's sampler (``sample.scheduler``/``steps``, no reuse, fp32)."""
    f, s = base or cfg.frontier, cfg.sample
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise UserError(f"prune.target_latency.levers: unknown lever {unknown[0]!r}; choose from {LEVERS}")
    return Grid(
        ratios=list(f.ratios) if "prune" in levers else [0.0],
        schedulers=list(f.schedulers) if "scheduler" in levers else [s.scheduler],
        steps=list(f.steps) if "steps" in levers else [s.steps],
        cache_intervals=list(f.cache_intervals) if "cache" in levers else [1],
        precisions=list(f.precisions) if "precision" in levers else ["fp32"],
        students=list(f.students) if "student" in levers else [0],
    )


def apply_stack(cfg: RunConfig, stack: Stack | None) -> RunConfig:
    """The run config with what a chosen stack needs, settled before the run's first stage: its
    precision and, with reuse, the passes exported; a student stack's ``distill_steps.target_steps``."""
    if stack is None:
        return cfg
    if stack.student_steps or "student" in cfg.prune.target_latency.levers:
        # chosen among students too: the run trains one exactly when the chosen stack is one
        distill = dataclasses.replace(cfg.distill_steps, target_steps=stack.student_steps or None)
        cfg = dataclasses.replace(cfg, distill_steps=distill)
    export = cfg.export
    precisions = list(export.precisions)
    for needed in ("fp32", stack.precision):
        if needed not in precisions:
            precisions.append(needed)
    reuse = export.feature_reuse or stack.reuses_features
    if precisions == list(export.precisions) and reuse == export.feature_reuse:
        return cfg
    return dataclasses.replace(
        cfg, export=dataclasses.replace(export, precisions=precisions, feature_reuse=reuse)
    )
