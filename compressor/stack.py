"""What a run samples with: a sampler (:class:`SamplerVariant`) and a whole stack of levers
(:class:`Stack`: pruning ratio, solver, steps, feature reuse, precision, few-step student).

The lowest floor: the config parses sampler variants with it, the frontier measures stacks, and
the run receives the stack it uses as a typed input (:class:`~pipeline.context.RunContext.stack`)
that the prune, quality, bench, check and report stages read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from compressor.errors import ConfigError

SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "unipc")  # compressor.sampling.SCHEDULERS
SOLVER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpmsolver++": "DPM++", "unipc": "UniPC"}


@dataclass(frozen=True)
class SamplerVariant:
    """One timed sampler: scheduler, steps and feature-reuse interval (``ddim:20``, ``dpmsolver++:10:3``)."""

    scheduler: str
    steps: int
    cache_interval: int = 1

    def __str__(self) -> str:
        return f"{self.scheduler}:{self.steps}:{self.cache_interval}"

    @classmethod
    def parse(cls, text: str, key: str = "bench.variants") -> SamplerVariant:
        """``SCHEDULER:STEPS[:CACHE_INTERVAL]``; ConfigError naming ``key`` otherwise."""
        parts = str(text).split(":")
        hint = "e.g. ddim:50, dpmsolver++:10 or ddim:20:3 (scheduler:steps[:cache interval])"
        if len(parts) not in (2, 3):
            raise ConfigError(f"{key}: expected SCHEDULER:STEPS[:CACHE_INTERVAL], got {text!r}; {hint}")
        if parts[0] not in SCHEDULERS:
            raise ConfigError(f"{key}: scheduler {parts[0]!r} is not one of {', '.join(SCHEDULERS)}; {hint}")
        try:
            steps, interval = int(parts[1]), int(parts[2]) if len(parts) == 3 else 1
        except ValueError:
            raise ConfigError(
                f"{key}: steps and cache interval must be integers, got {text!r}; {hint}"
            ) from None
        if steps < 1 or interval < 1:
            raise ConfigError(f"{key}: steps and cache interval must be >= 1, got {text!r}")
        return cls(parts[0], steps, interval)


@dataclass(frozen=True)
class Stack:
    """One combination of levers: the compressed model's pruning ratio (0: dense), its sampler
    (solver, steps, feature-reuse interval), its precision, and a few-step student's steps."""

    ratio: float
    scheduler: str
    steps: int
    cache_interval: int = 1
    precision: str = "fp32"
    student_steps: int = 0  # > 0: a few-step student (DDIM at these steps, its own schedule)

    @property
    def variant(self) -> SamplerVariant:
        """The stack's sampler."""
        return SamplerVariant(self.scheduler, self.steps, self.cache_interval)

    @property
    def reuses_features(self) -> bool:
        """True when the sampler reuses deep features (two passes: full and shallow)."""
        return self.cache_interval > 1

    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``r0.25-dpmsolver++-10-c2-fp32`` (students: ``...-student``)."""
        key = f"r{self.ratio:g}-{self.scheduler}-{self.steps}-c{self.cache_interval}-{self.precision}"
        return key + "-student" if self.student_steps else key

    def label(self) -> str:
        """A short human label, e.g. ``pruned 0.25 + DPM++ 10 + cache 2``."""
        model = "dense" if self.ratio == 0 else f"pruned {self.ratio:g}"
        text = f"{model} + {SOLVER_NAMES[self.scheduler]} {self.steps}"
        if self.student_steps:
            text = f"{model} student {self.student_steps} steps"
        if self.cache_interval > 1:
            text += f" + cache {self.cache_interval}"
        if self.precision != "fp32":
            text += f" + {self.precision}"
        return text

    def as_dict(self) -> dict:
        """The stack as a mapping; ``student_steps`` only for a student (so the keys, and the cached
        measurements, of the other stacks are what they were before students existed)."""
        out = dataclasses.asdict(self)
        if not self.student_steps:
            out.pop("student_steps")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stack:
        """The stack a record holds (:meth:`as_dict`'s mapping)."""
        return cls(
            float(data["ratio"]),
            str(data["scheduler"]),
            int(data["steps"]),
            int(data.get("cache_interval", 1)),
            str(data.get("precision", "fp32")),
            int(data.get("student_steps") or 0),
        )


@dataclass(frozen=True)
class StackChoice:
    """The stack a latency target over levers chose, and how (the prune record keeps ``summary`` as
    ``target.frontier``: target, levers, backend, batch, margin, reference, stacks measured, where,
    and ``chosen``, the chosen point with its key, label, speed-up and quality figures)."""

    stack: Stack
    summary: dict[str, Any]

    @classmethod
    def from_summary(cls, summary: dict[str, Any] | None) -> StackChoice | None:
        """The choice a recorded summary holds; None when it holds none."""
        if not summary or not summary.get("chosen"):
            return None
        return cls(Stack.from_dict(summary["chosen"]["stack"]), summary)
