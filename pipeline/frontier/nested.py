"""The nested runs behind a frontier, one per pruning ratio: their config, their stages, and the
fingerprints that key every cached measurement to them (a changed nested stage re-measures its
stacks). Fitting them (:mod:`pipeline.frontier.fits`) is apart, since it starts pipelines.

Keys and cached measurements are the sweep engine's (:mod:`pipeline.sweep.cells`: :func:`key_of`,
16 hex digits, and :func:`cached`, a JSON record under its ``fingerprint``), as are the keys of a
nested run's finished stages (:func:`~pipeline.sweep.cells.stage_keys`)."""

from __future__ import annotations

from pathlib import Path

from compressor.config import (
    LatencyTarget,
    RunConfig,
    config_from_mapping,
    config_to_dict,
    prune_target_overrides,
)
from pipeline.frontier.grid import Spec
from pipeline.sweep.cells import key_of, stage_keys
from rundir import layout


def ratio_overrides(spec: Spec, ratio: float) -> list[str]:
    """What a ratio's nested run changes in the run config."""
    grid = spec.grid
    precisions = ["fp32"] + [p for p in ("fp16", "int8") if p in grid.precisions]
    reuse = any(c > 1 for c in grid.cache_intervals)
    return [
        *prune_target_overrides(ratio=ratio),
        "prune.search=uniform",
        f"export.precisions=[{','.join(precisions)}]",
        f"export.feature_reuse={'true' if reuse else 'false'}",
    ]


def ratio_config(spec: Spec, ratio: float) -> RunConfig:
    """A ratio's nested-run config: the run's, with no latency target of its own (so runs that
    differ only in their target share the nested runs) and the ratio's overrides."""
    base = {**spec.base, "prune": {**spec.base["prune"], "target_latency": config_to_dict(LatencyTarget())}}
    return config_from_mapping(base, ratio_overrides(spec, ratio))


# What a stack's images depend on besides the model (whose stage keys are fingerprinted).
SAMPLING_SECTIONS = ("model", "data", "seed", "sample", "quality")


# Quality settings a frontier's images and scores do not depend on (it sets its own sample count and
# backend), left out of its fingerprints so that a run's other settings reuse its measurements.
NOT_SAMPLING = ("num_samples", "compare_raw", "compare_pruned", "require_fid", "backend")


def sampling_settings(cfg: RunConfig) -> dict:
    """The settings a frontier's images and their scores depend on, besides the models."""
    d = config_to_dict(cfg)
    out = {k: d[k] for k in SAMPLING_SECTIONS}
    out["quality"] = {k: v for k, v in out["quality"].items() if k not in NOT_SAMPLING}
    return out


def student_config(spec: Spec, ratio: float) -> RunConfig:
    """The nested run of a ratio's students: the ratio's, distilled down to the fewest student steps
    (each round's student is one of the grid's students); at ratio 0 the student starts dense."""
    fewest = min(n for n in spec.grid.students if n > 0)
    base = config_to_dict(ratio_config(spec, ratio))
    over = [
        f"distill_steps.target_steps={fewest}",
        f"distill_steps.student={'dense' if ratio == 0 else 'final'}",
    ]
    return config_from_mapping(base, over)


def student_stages(ratio: float, backend: str = "onnxruntime") -> list[str]:
    """The ratio's stages with ``distill_steps`` before the export (which then exports the student)."""
    stages = ratio_stages(ratio, backend)
    return stages[: stages.index("export")] + ["distill_steps"] + stages[stages.index("export") :]


def ratio_stages(ratio: float, backend: str = "onnxruntime") -> list[str]:
    """Ratio 0 is the dense model as it is: no finetune (its export holds the dense graphs); a
    TensorRT frontier also builds the engines it times."""
    stages = ["prune", "export"] if ratio == 0 else ["prune", "finetune", "export"]
    return stages + ["build"] if backend == "tensorrt" else stages


def model_run(spec: Spec, ratio: float, student: bool = False) -> tuple[Path, str]:
    """(nested run, model name in it) of a ratio: ratio 0 is the dense model of its run; a student's
    run exports its last round's student as its compressed ("pruned") model, at every ratio."""
    if student:
        return layout.frontier_student_dir(spec.root, ratio), "pruned"
    return layout.frontier_ratio_dir(spec.root, ratio), "dense" if ratio == 0 else "pruned"


def ratio_key(spec: Spec, ratio: float, student: bool = False) -> str:
    """Fingerprint of a ratio's model and sampling: its nested stages' cache keys (each the hash of
    the config sections and inputs that stage depends on) and the sampling settings."""
    run, _ = model_run(spec, ratio, student)
    names = student_stages(ratio, spec.backend) if student else ratio_stages(ratio, spec.backend)
    return key_of(sampling_settings(ratio_config(spec, ratio)), stage_keys(run, names))
