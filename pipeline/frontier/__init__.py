"""The speed-quality frontier: every stack of levers measured on the backend it ships on.

A *stack* is a pruning ratio (0 = the dense model; otherwise ``prune.ratio`` with the run's
criterion, then the run's finetune), a solver, a step count, a feature-reuse interval and a
precision. For every stack the frontier records

* **quality**: the Frechet distance (the quality stage's features, against the training
  images) and SSIM against the dense reference sampler's images (``sample.scheduler`` at
  ``sample.steps``, fp32) from the same seeds. An fp32 stack's images do not depend on the
  backend, so they are sampled in torch; fp16 and int8 stacks through ONNX Runtime, which
  runs them;
* **latency**: the whole sampler at ``batch`` on the named backend, timed alternately with
  the dense reference sampler in the same process (as ``bench`` does); speed-up =
  reference ms / stack ms.

Work is split into independent jobs: one per pruning ratio (a nested run under
``OUT/ratio-<r>/`` through :func:`pipeline.runner.run_pipeline`, so its stages are cached,
resumable and locked like any run), one for the reference images, one per stack's
quality. :func:`~pipeline.frontier.jobs.run_jobs` runs them in this process one after another, or on Ray (an
existing cluster by address, or a local one) when asked. Latency is measured afterwards in
this process, one stack at a time: timings must not share the machine with other work, and
they belong to the host the user ships on, not to whichever worker a job landed on.
Every job writes its result to ``OUT/points/`` keyed by a fingerprint of its inputs, so a
rerun measures only what is missing or changed.

One concern a module:

==================  ==============================================================================
``grid``            stacks, the lever grid, a job's spec, the grid a target may search, apply_stack
``nested``          the nested run per ratio: its config and stages, fingerprints of measurements
``fits``            job: fit a ratio (prune, finetune, export) as a nested pipeline run
``scoring``         jobs: the reference images and every stack's quality, with intervals
``jobs``            running jobs here or on Ray
``timing``          where stacks are timed (this process, alternating with the reference)
``choice``          the Pareto rule, "within noise", and the stack a target chooses
``measure``         the whole measurement: fits, scores, timings -> the frontier as a dict
``tables``          the Markdown table, the chart and the sentences written for people
``target``          a latency target over levers: the sweep around a run (measure, choose, run)
==================  ==============================================================================

This package's ``__init__`` gathers the modules that start no pipeline (grid, nested, choice,
tables); ``fits``, ``measure`` and ``target`` start nested runs and are imported by name, so the
runner and the stages can use the light part without a circle of imports.
"""

from pipeline.frontier.choice import (
    QUALITY_KEYS,
    choose,
    figure,
    mark_noise,
    pareto,
    point_interval,
    ranking_key,
)
from pipeline.frontier.grid import (
    LEVERS,
    SOLVERS,
    Grid,
    Spec,
    Stack,
    apply_stack,
    lever_grid,
    spec_from_config,
)
from pipeline.frontier.nested import ratio_config, ratio_overrides, ratio_stages
from pipeline.frontier.tables import choice_text, noise_note, plot, table, write

__all__ = [
    "LEVERS", "QUALITY_KEYS", "SOLVERS", "Grid", "Spec", "Stack", "apply_stack", "choice_text", "choose",
    "figure", "lever_grid", "mark_noise", "noise_note", "pareto", "plot", "point_interval", "ranking_key",
    "ratio_config", "ratio_overrides", "ratio_stages", "spec_from_config", "table", "write",
]  # fmt: skip
