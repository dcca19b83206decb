"""Config section ``prune`` (:class:`PruneConfig`) with its measured-latency target
(:class:`LatencyTarget`, ``prune.target_latency``), and the overrides that set one pruning target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from compressor.config.fields import Backend, _spec
from compressor.errors import ConfigError


@dataclass
class LatencyTarget:
    """A measured-latency pruning target: the mildest pruning that reaches it on a backend."""

    backend: Backend = _spec(
        "onnxruntime", "backend the latency is measured on (torch: eager fp32 on the run's device)"
    )
    batch: int = _spec(1, "batch size of the timed calls", ge=1)
    what: Literal["unet", "sampler"] = _spec(
        "unet", "one UNet call, or the whole sampler at bench.sampler_steps"
    )
    speedup: float | None = _spec(None, "wanted speed-up over dense (e.g. 1.5)", gt=1.0)
    ms: float | None = _spec(None, "wanted latency of the pruned model in milliseconds", gt=0.0)
    margin: float = _spec(
        0.03, "noise margin: a trial passes at speedup x (1 + margin), or ms x (1 - margin)", ge=0.0, lt=0.5
    )
    warmup: int = _spec(2, "untimed calls per model per trial", ge=0)
    repeat: int = _spec(10, "timed calls per model per trial (medians are compared)", ge=3)
    threads: int | None = _spec(None, "CPU threads while timing (match bench.threads)", ge=1)
    levers: list[Literal["prune", "steps", "scheduler", "cache", "precision", "student"]] = _spec(
        ["prune"],
        "what may move to meet the target: prune alone (the pruning search), or any of prune, steps, "
        "scheduler, cache, precision, student (the best-quality stack of the measured frontier, see "
        "`frontier`; student: a few-step student of frontier.students)",
    )

    @property
    def uses_frontier(self) -> bool:
        """True when levers besides pruning may meet the target (the frontier search)."""
        return self.active and list(self.levers) != ["prune"]

    @property
    def active(self) -> bool:
        """True when a speed-up or a latency is asked for."""
        return self.speedup is not None or self.ms is not None

    def goal(self) -> str:
        """E.g. '1.5x faster than dense' or 'at most 12 ms'."""
        if self.speedup is not None:
            return f"{self.speedup:g}x faster than dense"
        return f"at most {self.ms:g} ms"

    def met(self, speedup: float, ms: float, margin: float | None = None) -> bool:
        """Whether a measured (speed-up, ms) reaches the goal, with ``margin`` (default: self.margin)."""
        m = self.margin if margin is None else margin
        if self.speedup is not None:
            return speedup >= self.speedup * (1 + m)
        return ms <= self.ms * (1 - m)  # type: ignore[operator]


@dataclass
class PruneConfig:
    """Structural pruning (Diff-Pruning and the paper's baselines)."""

    method: Literal["diff-pruning", "taylor", "magnitude", "random", "reinit"] = _spec(
        "diff-pruning", "importance criterion"
    )
    ratio: float | None = _spec(None, "per-layer channel pruning ratio", ge=0.0, lt=1.0)
    target_macs: float | None = _spec(None, "fraction of dense MACs to keep", gt=0.0, le=1.0)
    target_params: float | None = _spec(None, "fraction of dense params to keep", gt=0.0, le=1.0)
    target_latency: LatencyTarget = field(default_factory=LatencyTarget)
    search: Literal["uniform", "fine", "latency"] = _spec(
        "uniform",
        "target search: uniform-width ratios only, bisect finer between them, or (with a latency "
        "target) a ratio per resolution level keeping the most importance per measured millisecond",
    )
    threshold: float = _spec(0.05, "Diff-Pruning loss threshold T", ge=0.0, lt=1.0)
    timestep_stride: int = _spec(1, "use every k-th timestep in the Taylor pass (paper: 1)", ge=1)
    max_timesteps: int | None = _spec(None, "cap on timesteps evaluated", ge=1)
    batch_size: int = _spec(128, "images in the Taylor batch, drawn shuffled with the run's seed", ge=1)
    norm: Literal[1, 2] = _spec(2, "p of the magnitude criterion")
    eval_batch: int = _spec(
        16, "held-out images (never in the Taylor batch) for the loss before/after pruning; 0 skips", ge=0
    )
    round_to: int | None = _spec(None, "round kept channels to a multiple", ge=1)
    group_selection: Literal["shared", "independent"] = _spec(
        "independent",
        "GroupNorm-coupled layers: each group picks its own channels (independent, the paper's code) "
        "or all groups drop the same in-group positions (shared, torch-pruning 1.6)",
    )
    attention_heads: Literal["auto", "whole", "dims"] = _spec(
        "auto",
        "attention: lose whole heads (head dimension kept) or the same channels from every head (head "
        "count kept); auto: whole heads for a UNet with cross-attention (text-conditioned), dims otherwise",
    )
    taylor_score: Literal["abs", "squared"] = _spec(
        "abs", "per-channel Taylor score: sum |w*g| or sum (w*g)^2 (the paper's code)"
    )
    group_reduction: Literal["mean", "sum"] = _spec(
        "sum", "how the scores of coupled layers combine (same ranking under local pruning)"
    )
    diagnose: bool = _spec(
        False, "per-timestep diagnostic: L_t/L_max, gradient norm, half-batch gradient cosine"
    )

    def require_target(self) -> None:
        """Raise ConfigError unless a pruning target is set (the prune stage needs one)."""
        if not self.targets():
            raise ConfigError(
                "prune: no pruning target; set one of prune.ratio, prune.target_macs, prune.target_params, "
                "prune.target_latency.speedup, prune.target_latency.ms"
            )

    def targets(self) -> list[str]:
        """The pruning targets that are set (dotted names)."""
        names = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k) is not None]
        lat = self.target_latency
        return names + [f"target_latency.{k}" for k in ("speedup", "ms") if getattr(lat, k) is not None]


def prune_target_overrides(ratio: float | None = None, target_macs: float | None = None) -> list[str]:
    """The overrides that make a config prune at one ``ratio`` (or to one ``target_macs``) and
    nothing else: every other pruning target nulled, no latency target; at ratio 0 (nothing
    removed) the magnitude criterion, which needs no importance pass. The one place a sweep, the
    frontier or the prune stage sets a pruning target."""
    if (ratio is None) == (target_macs is None):
        raise ValueError("prune_target_overrides: give exactly one of ratio and target_macs")
    over = [
        f"prune.ratio={'null' if ratio is None else ratio}",
        f"prune.target_macs={'null' if target_macs is None else target_macs}",
        "prune.target_params=null",
        "prune.target_latency.speedup=null",
        "prune.target_latency.ms=null",
        "prune.target_latency.levers=[prune]",
    ]
    return over + (["prune.method=magnitude"] if ratio == 0 else [])
