"""Typed readers of a run's records: the one place that knows what each stage's record holds.

``RUN/<stage>/record.json`` is written by the pipeline (see :mod:`pipeline.context`); every
reader of it, in any floor, goes through here. A missing record is ``None`` (or, where it
is required, one :class:`RecordError` naming the stage to run); a damaged one (not JSON,
not a mapping, a field missing or of the wrong kind, an interval ``*_ci`` whose low end is
above its high end) is one :class:`RecordError` naming the file and the field, which the CLI
prints as one line with exit 2. A record whose sha256 differs from the one the run's manifest
lists for it (edited or damaged since its stage wrote it) is refused the same way, wherever it
is read; :func:`verify_records` also checks the artifacts a record lists and refuses a record
the manifest does not list, for readers that draw a verdict (``check``). Metrics a reader
does not name stay in :attr:`Record.metrics` for display; no module indexes another
stage's metrics by string keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import ArtifactError
from compressor.stack import Stack, StackChoice
from rundir import layout
from rundir.artifacts import artifact_matches, listed_records
from rundir.integrity import differs_from_manifest, reversed_interval

DONE = ("ok", "skipped")
INCONCLUSIVE = "inconclusive"  # the check stage's status when a quality gate's interval straddles its limit


class RecordError(ArtifactError):
    """A stage's record is missing where it is needed, or damaged."""


def _rerun(path: Path, stage: str) -> str:
    return f"rerun that stage with `compress-deploy CONFIG --force {stage} --run-dir {path.parent.parent}`"


@dataclass(frozen=True)
class Record:
    """One stage's record as written, with typed access to its metrics (see ``METRICS``)."""

    stage: str
    status: str
    reason: str
    config: dict
    metrics: dict
    artifacts: dict
    cache: dict
    path: Path
    data: dict = field(repr=False)

    @property
    def ok(self) -> bool:
        """The stage completed and wrote its outputs (not skipped, not failed)."""
        return self.status == "ok"

    @property
    def seconds(self) -> float | None:
        """The stage's wall time as recorded (None for a record written without one)."""
        value = self.data.get("seconds")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def inputs(self) -> list[str]:
        """The stages whose outputs this stage read (its cache key's inputs), in recorded order."""
        found = self.cache.get("inputs")
        return list(found) if isinstance(found, dict) else []

    def typed(self) -> Any:
        """This stage's metrics as its typed view (``METRICS[stage]``)."""
        return _build(METRICS[self.stage], self.metrics, self.path, "metrics")

    def section(self, name: str) -> dict:
        """A config section the stage recorded; RecordError when absent."""
        value = self.config.get(name)
        if not isinstance(value, dict):
            raise RecordError(
                f"{self.path}: damaged record (no config.{name}); {_rerun(self.path, self.stage)}"
            )
        return value


def _build(cls: type, data: Any, path: Path, where: str) -> Any:
    """``cls`` from the mapping ``data``: every field without a default must be there."""
    stage = path.parent.name
    if not isinstance(data, dict):
        raise RecordError(f"{path}: damaged record ({where} is not a mapping); {_rerun(path, stage)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{path}: damaged record (no {where}.{f.name}); {_rerun(path, stage)}")
    return cls(**kwargs)


def read_record(run: Path, stage: str, done_only: bool = True) -> Record | None:
    """``RUN/<stage>/record.json``, or None when the stage has not completed.

    ``done_only``: a record whose status is not ok/skipped (failed acceptance, say) reads
    as None. Raises RecordError for a damaged record.
    """
    path = layout.record_path(run, stage)
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecordError(f"{path}: damaged record (not valid JSON); {_rerun(path, stage)}") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: damaged record (not a JSON object); {_rerun(path, stage)}")
    for key, kind in (("status", str), ("config", dict), ("metrics", dict)):
        if not isinstance(data.get(key), kind):
            raise RecordError(f"{path}: damaged record (no {key}); {_rerun(path, stage)}")
    if differs_from_manifest(run, path, raw):
        raise RecordError(
            f"{path} differs from its sha256 in {layout.manifest_path(run)} (edited or damaged since "
            f"its stage wrote it); {_rerun(path, stage)}"
        )
    bad = reversed_interval(data["metrics"], "metrics")
    if bad is not None:
        raise RecordError(
            f"{path}: damaged record ({bad}: an interval whose low end is above its high end); "
            f"{_rerun(path, stage)}"
        )
    rec = Record(
        stage=stage,
        status=data["status"],
        reason=str(data.get("reason", "")),
        config=data["config"],
        metrics=data["metrics"],
        artifacts=data.get("artifacts") if isinstance(data.get("artifacts"), dict) else {},
        cache=data.get("cache") if isinstance(data.get("cache"), dict) else {},
        path=path,
        data=data,
    )
    if done_only and rec.status not in DONE:
        return None
    return rec


def verify_records(run: Path, stages: Iterable[str]) -> bool:
    """Check what a verdict is about to be drawn from: the records of ``stages`` that exist, and
    the artifacts each lists, against the hashes written beside them.

    Returns False when the run's manifest predates record hashes (nothing to verify them
    against: the caller says so), else True. Raises RecordError naming the first file that is
    damaged, differs from its hash, is not listed in the manifest (written or copied outside
    the pipeline), or whose artifact is missing or changed, and the stage to rerun.
    """
    listed = listed_records(run)
    for stage in stages:
        rec = read_record(run, stage, done_only=False)  # refuses a record that differs from its hash
        if rec is None:
            continue
        if listed is not None and str(rec.path.relative_to(run)) not in listed:
            raise RecordError(
                f"{rec.path} is not listed in {layout.manifest_path(run)} (written or copied outside the "
                f"pipeline), so it cannot be verified; {_rerun(rec.path, stage)}"
            )
        for rel, entry in rec.artifacts.items():
            if not isinstance(entry, dict) or not artifact_matches(Path(run) / rel, entry):
                raise RecordError(
                    f"{Path(run) / rel}, listed in {rec.path}, is missing or changed since the {stage} stage "
                    f"wrote it; {_rerun(rec.path, stage)}"
                )
    return listed is not None


def require_record(run: Path, stage: str, needed_by: str) -> Record:
    """The completed record of ``stage``; RecordError telling the user which stage to run."""
    rec = read_record(run, stage)
    if rec is None or not rec.ok:
        raise RecordError(
            f"{needed_by} needs the {stage} stage's output, missing in {run}; run "
            f"`compress-deploy CONFIG --stages {stage},{needed_by} --run-dir {run}`"
        )
    return rec


def final_model_dir(run: Path) -> tuple[str, Path]:
    """(stage, folder) of the run's newest compressed model: the student if distilled, else the
    finetuned model if done, else the pruned one (:data:`layout.MODEL_STAGES`).

    The one rule for "the final model": a stage counts when its record is ok and its
    model folder holds a structure file. Raises RecordError when neither does.
    """
    for stage in layout.MODEL_STAGES:
        rec = read_record(run, stage)
        folder = layout.model_dir(run, stage)
        if rec is not None and rec.ok and layout.structure_file(folder).is_file():
            return stage, folder
    raise RecordError(
        f"{run} holds no compressed model (no prune or finetune output); run "
        "`compress-deploy CONFIG --stages prune` first"
    )


# -- typed metrics, one view per stage ---------------------------------------------------------


@dataclass(frozen=True)
class PruneMetrics:
    """What the prune stage measured and chose."""

    method: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    params_kept: float
    macs_kept: float
    timesteps_used: list = field(default_factory=list)
    trials: list = field(default_factory=list)
    target: dict = field(default_factory=dict)
    level_ratios: dict = field(default_factory=dict)
    diagnostics: list = field(default_factory=list)
    threshold: float | None = None
    kept_channels: dict | None = None
    criterion: dict = field(default_factory=dict)
    importance_kept: float | None = None
    loss_dense: float | None = None
    loss_after_pruning: float | None = None

    @property
    def macs_reduction(self) -> float:
        """Dense MACs / pruned MACs."""
        return self.macs_before / self.macs_after

    @property
    def target_latency(self) -> dict | None:
        """The latency search's summary (target, probe, chosen trial, ...), if one ran."""
        return self.target.get("target_latency")

    @property
    def frontier(self) -> dict | None:
        """The frontier search's summary (target, levers, ``chosen`` stack), if levers besides pruning ran."""
        return self.target.get("frontier")

    @property
    def group_selection(self) -> str:
        """How GroupNorm-coupled channels were selected (records before the option: shared)."""
        return self.criterion.get("group_selection", "shared")


@dataclass(frozen=True)
class FinetuneMetrics:
    """The finetune's losses."""

    final_loss: float | None
    losses: list = field(default_factory=list)
    eval_loss_ema: float | None = None
    eval_loss_raw: float | None = None
    loss_terms: list = field(default_factory=list)  # distillation: [step, task, output, features]
    steps_per_second: float | None = None


@dataclass(frozen=True)
class QualityMetrics:
    """Per-model quality figures of the quality stage."""

    models: dict
    frechet_metric: str
    num_samples: int
    steps: int
    scheduler: str
    num_reference: int = 0
    backend: str = "torch"
    frechet_note: str | None = None
    cache_interval: int = 1
    compressed_stack: dict | None = None  # the chosen stack the compressed models were sampled with
    interval: dict = field(default_factory=dict)  # level, resamples, seed, method of every *_ci
    kid_feature_scale: float | None = None  # KID's features were divided by it (digits: reference std)
    student_steps: int | None = None  # the final model is a few-step student sampled at these steps
    looks: list = field(default_factory=list)  # num_samples auto: {samples, models, gates, outcome} a look
    sequential: dict = field(default_factory=dict)  # num_samples auto: the looks' boundary (``how``)
    fd_digits_real_floor: float | None = None  # digits: the Frechet distance between two halves of the data
    fd_digits_real_floor_ci: list | None = None
    # conditional models (absent from an unconditional run's record): the prompts images cycled through
    # (PromptSet summary), the guidance scale, the prompt adherence measure (compressor.adherence; None,
    # with the note saying why, when none applied) and the final model's adherence ratio to dense
    prompts: dict | None = None
    guidance_scale: float | None = None
    adherence_metric: str | None = None
    adherence_note: str | None = None
    adherence_ratio: float | None = None
    adherence_ratio_ci: list | None = None

    def compressed_label(self) -> str | None:
        """The final compressed model's label: the student if scored, else finetuned, else pruned."""
        return next((k for k in layout.COMPRESSED_NAMES if k in self.models), None)

    def frechet(self, label: str) -> float | None:
        """The Frechet distance of model ``label`` (None when not measured)."""
        return self.models.get(label, {}).get(self.frechet_metric)

    def figure(self, label: str, key: str) -> tuple[float | None, list | None]:
        """Model ``label``'s figure ``key`` (e.g. ``fd_inf_diff``) and its interval ``<key>_ci``;
        (None, None) when not measured."""
        figures = self.models.get(label, {})
        value = figures.get(key)
        return (value, figures.get(f"{key}_ci")) if isinstance(value, (int, float)) else (None, None)


@dataclass(frozen=True)
class ParityMetrics:
    """The parity rows and the worst fp32 error."""

    results: list
    max_abs_error_fp32: float | None = None


@dataclass(frozen=True)
class BenchMetrics:
    """Latency rows, speed-ups, skipped backends and host facts."""

    results: list
    speedup: list
    skipped: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    sampler_steps: int | None = None
    stack: dict | None = None  # the chosen stack timed against the dense reference sampler
    student: list = field(default_factory=list)  # the few-step student against the dense reference
    compressed_from: str | None = None  # the stage whose model the "pruned" rows timed (finetune, ...)

    @property
    def whole_call(self) -> bool:
        """True when bench timed the whole text-to-image call (rows ``what`` ``pipeline``: text encoder,
        guided UNet loop, VAE decoder), as it does for a conditional model."""
        return any(row.get("what") == "pipeline" for row in self.results)

    @property
    def timed_stack(self) -> Stack | None:
        """The chosen stack bench timed (the ``stack`` row's), typed; None when it timed none."""
        return Stack.from_dict(self.stack["stack"]) if self.stack else None

    def value(
        self, backend: str, batch: int, what: str, key: str, variant: str | None = None
    ) -> float | None:
        """``speedup``, the pruned model's median ``ms`` or its ``per_image`` ms; None when not timed.

        ``what``: ``unet``, ``sampler`` or ``pipeline`` (the whole text-to-image call).
        ``variant`` (``scheduler:steps:interval``) picks a sampler or pipeline row; default: the first timed.
        """

        def matches(row: dict) -> bool:
            same = (row["backend"], row["batch"], row["what"]) == (backend, batch, what)
            # rows written before bench.variants carry no variant: they are the default sampler
            looped = what in ("sampler", "pipeline")  # a sampler, or the whole text-to-image call
            return same and (variant is None or not looped or row.get("variant", variant) == variant)

        if key == "speedup":
            return next((row["speedup"] for row in self.speedup if matches(row)), None)
        for row in self.results:
            if matches(row) and row["model"] == "pruned":
                return row["median_ms"] / (batch if key == "per_image" else 1)
        return None


@dataclass(frozen=True)
class CheckMetrics:
    """The acceptance checks and their verdict."""

    checks: list
    passed: bool
    failed: list = field(default_factory=list)
    inconclusive: list = field(default_factory=list)
    verdict: str | None = None  # pass | fail | inconclusive (records before intervals: None)
    overrides: list = field(default_factory=list)  # limits unlike the run's config: {key, run, now}


@dataclass(frozen=True)
class ExportMetrics:
    """The exported ONNX files."""

    files: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BuildMetrics:
    """The TensorRT engines built."""

    engines: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SamplesMetrics:
    """The sample grid's rows."""

    rows: list = field(default_factory=list)
    num_images: int = 0
    steps: int = 0


@dataclass(frozen=True)
class StepDistillMetrics:
    """The few-step student's rounds (stage ``distill_steps``)."""

    method: str
    target_steps: int
    start_steps: int
    rounds: list = field(default_factory=list)  # one entry a round: steps, losses, wall_s, ...
    student: str = ""
    prediction_type: str = "epsilon"
    wall_s: float = 0.0
    optimizer_steps: int = 0
    eval_images: int = 0


METRICS: dict[str, type] = {
    "prune": PruneMetrics,
    "finetune": FinetuneMetrics,
    "distill_steps": StepDistillMetrics,
    "train": FinetuneMetrics,
    "samples": SamplesMetrics,
    "export": ExportMetrics,
    "build": BuildMetrics,
    "quality": QualityMetrics,
    "parity": ParityMetrics,
    "bench": BenchMetrics,
    "check": CheckMetrics,
}


def read_metrics(run: Path, stage: str) -> Any:
    """The typed metrics of ``stage``'s completed record, or None when it has not completed."""
    rec = read_record(run, stage)
    return None if rec is None or not rec.ok else rec.typed()


def stack_choice(run: Path) -> StackChoice | None:
    """The stack a latency target over levers chose for the run's compressed model, and how (the prune
    record's ``target.frontier``); None without such a target or a prune record."""
    prune = read_metrics(run, "prune")
    return StackChoice.from_summary(prune.frontier if prune is not None else None)


def chosen_stack(run: Path) -> Stack | None:
    """The stack (ratio, scheduler, steps, cache_interval, precision) a latency target over levers
    chose for the run's compressed model, or None (no such target, or no prune record)."""
    choice = stack_choice(run)
    return choice.stack if choice else None


def limit_overrides(run: Path, acceptance: Any) -> list[dict]:
    """The acceptance limits ``acceptance`` (an AcceptanceConfig) sets unlike the run's own config:
    one ``{"key": "acceptance.<name>", "run": <the run's value>, "now": <this one>, "recorded": True}``
    per differing setting, in field order (None: the limit is off).

    The run's config is what its ``check`` record used (else its ``report`` record's); with neither,
    the run recorded no limits: ``recorded`` is False and ``run`` None for every non-default setting.
    """
    now, default = dataclasses.asdict(acceptance), dataclasses.asdict(type(acceptance)())
    for stage in ("check", "report"):
        rec = read_record(run, stage, done_only=False)
        if rec is not None and isinstance(rec.config.get("acceptance"), dict):
            base = {**default, **rec.config["acceptance"]}  # a key newer than the record: its default
            return [{"key": f"acceptance.{k}", "run": base[k], "now": v, "recorded": True}
                    for k, v in now.items() if v != base[k]]  # fmt: skip
    return [
        {"key": f"acceptance.{k}", "run": None, "now": v, "recorded": False}
        for k, v in now.items()
        if v != default[k]
    ]


def run_config_name(run: Path) -> str | None:
    """The config name ``RUN/run.json`` binds the run to (None when absent or unreadable)."""
    path = layout.run_file(run)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("config_name") if isinstance(data, dict) else None
