"""The nested runs behind a frontier, one per pruning ratio: their config, their stages, and the
fingerprints that key every cached measurement to them (a changed nested stage re-measures its
stacks). Fitting them (:mod:`pipeline.frontier.fits`) is apart, since it starts pipelines."""

from __future__ import annotations

import json
from pathlib import Path

from compressor import runlayout
from compressor.config import (
    LatencyTarget,
    RunConfig,
    config_from_mapping,
    config_to_dict,
    prune_target_overrides,
)
from compressor.digest import content_hash
from pipeline.frontier.grid import Spec


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


def fingerprint_of(*parts) -> str:
    """A frontier job's cache key: the content hash of its inputs."""
    return content_hash(list(parts), 16)


def cached(path: Path, fingerprint: str) -> dict | None:
    """A cached measurement at ``path`` keyed by ``fingerprint`` (None: measure it); UserError when it
    holds an interval whose low end is above its high end (it was edited or damaged)."""
    from compressor.errors import UserError
    from compressor.integrity import reversed_interval

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    bad = reversed_interval(data, path.stem)
    if bad:
        raise UserError(
            f"{path}: {bad}, an interval whose low end is above its high end (edited or damaged); "
            "delete the file to measure it again"
        )
    return data


def model_run(spec: Spec, ratio: float, student: bool = False) -> tuple[Path, str]:
    """(nested run, model name in it) of a ratio: ratio 0 is the dense model of its run; a student's
    run exports its last round's student as its compressed ("pruned") model, at every ratio."""
    if student:
        return runlayout.frontier_student_dir(spec.root, ratio), "pruned"
    return runlayout.frontier_ratio_dir(spec.root, ratio), "dense" if ratio == 0 else "pruned"


def ratio_key(spec: Spec, ratio: float, student: bool = False) -> str:
    """Fingerprint of a ratio's model and sampling: its nested stages' cache keys (each the hash of
    the config sections and inputs that stage depends on) and the sampling settings."""
    from compressor.records import read_record

    run, _ = model_run(spec, ratio, student)
    names = student_stages(ratio, spec.backend) if student else ratio_stages(ratio, spec.backend)
    stages = {s: (read_record(run, s) or {}) for s in names}
    keys = {s: getattr(r, "data", {}).get("cache", {}).get("key") for s, r in stages.items()}
    return fingerprint_of(sampling_settings(ratio_config(spec, ratio)), keys)
