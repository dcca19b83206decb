"""Job: fit one pruning ratio of a frontier as a nested run of the ordinary pipeline (prune, finetune,
export; build for a TensorRT frontier), cached, resumable and locked like any run."""

from __future__ import annotations

import shutil

from pipeline.frontier.grid import Spec
from pipeline.frontier.nested import ratio_config, ratio_stages, student_config, student_stages
from rundir import layout
from rundir.records import read_metrics, read_record


def fit_ratio(spec: Spec, ratio: float) -> dict:
    """Job: prune (and finetune) at ``ratio`` and export, in the nested run ``OUT/ratio-<r>``."""
    import torch

    # lazy: pulls in torch, which importing pipeline.frontier.fits alone does not
    from pipeline.runner import run_pipeline

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, ratio)
    run = layout.frontier_ratio_dir(spec.root, ratio)
    run_pipeline(cfg, run, ratio_stages(ratio, spec.backend))
    prune = read_metrics(run, "prune")
    return {"ratio": ratio, "run": str(run), "macs_kept": prune.macs_kept, "params_kept": prune.params_kept}


def fit_students(spec: Spec, ratio: float) -> dict:
    """Job (after :func:`fit_ratio`): distil the ratio's model into few-step students, in the nested
    run ``OUT/ratio-<r>-students`` (its rounds are the grid's students; its export is the last).

    The run starts from a copy of the ratio run's prune and finetune stages (records, models, not
    checkpoints): the same config sections and inputs, so the runner takes them as cached.
    """
    import torch

    # lazy: pulls in torch, which importing pipeline.frontier.fits alone does not
    from pipeline.runner import run_pipeline

    if spec.threads:
        torch.set_num_threads(spec.threads)
    source = layout.frontier_ratio_dir(spec.root, ratio)
    run = layout.frontier_student_dir(spec.root, ratio)
    run.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns(layout.CHECKPOINTS)
    for stage in ("prune", "finetune"):
        if read_record(source, stage) is not None and read_record(run, stage, done_only=False) is None:
            src, dst = layout.stage_dir(source, stage), layout.stage_dir(run, stage)
            shutil.copytree(src, dst, ignore=skip, dirs_exist_ok=True)
    if layout.run_file(source).is_file() and not layout.run_file(run).is_file():
        shutil.copyfile(layout.run_file(source), layout.run_file(run))
    run_pipeline(student_config(spec, ratio), run, student_stages(ratio, spec.backend))
    found = read_metrics(run, "distill_steps")
    costs = [{k: r[k] for k in ("steps", "wall_s", "optimizer_steps", "final_loss")} for r in found.rounds]
    return {"ratio": ratio, "run": str(run), "round_costs": costs, "wall_s": found.wall_s,
            "optimizer_steps": found.optimizer_steps}  # fmt: skip
