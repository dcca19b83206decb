"""Job: fit one pruning ratio of a frontier as a nested run of the ordinary pipeline (prune, finetune,
export; build for a TensorRT frontier), cached, resumable and locked like any run."""

from __future__ import annotations

from compressor import runlayout
from pipeline.frontier.grid import Spec
from pipeline.frontier.nested import ratio_config, ratio_stages


def fit_ratio(spec: Spec, ratio: float) -> dict:
    """Job: prune (and finetune) at ``ratio`` and export, in the nested run ``OUT/ratio-<r>``."""
    import torch

    from compressor.records import read_metrics
    from pipeline.runner import run_pipeline

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, ratio)
    run = runlayout.frontier_ratio_dir(spec.root, ratio)
    run_pipeline(cfg, run, ratio_stages(ratio, spec.backend))
    prune = read_metrics(run, "prune")
    return {"ratio": ratio, "run": str(run), "macs_kept": prune.macs_kept, "params_kept": prune.params_kept}
