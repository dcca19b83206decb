"""The distillation sweep of ``compress-deploy ablate --distill``: plain vs distilled finetuning.

    compress-deploy ablate CONFIG [key=value ...] --distill off,output,output+features
                           [--finetune-steps 150,300,600,1200] [--ratios 0.57,0.3] [--seeds 0,1,2]
                           [--run-dir DIR]

A sweep over :mod:`pipeline.sweep.engine` whose settings are the kept-MACs ratios: for each ratio
and seed the run's pruning (``prune.target_macs`` = the ratio, ``seed`` = the seed: another Taylor
batch) runs once in ``RUN/ablation/distill/macs-<r>/seed-<k>/``; then each distillation mode
finetunes that pruned model with the run's finetune recipe and scores the EMA weights after every
budget: the Frechet distance (the quality stage's features) and SSIM against the dense model's
images from the same seeds, ``quality.num_samples`` images with the run's sampler.

Budgets share one finetune when the learning-rate schedule does not depend on the total
step count (``finetune.schedule: constant``): the EMA after 150 of 600 steps is exactly
what a 150-step finetune ends with (every step's batch, noise and EMA decay depend only
on the step), so each budget is a checkpoint of the longest run. Other schedules run one
finetune per budget. Everything is resumable: a rerun continues the interrupted finetune
from its checkpoint and reuses every score already written.

Modes: ``off`` (the plain loss), ``output`` (+ output distillation, weight 1), ``features``
(+ feature distillation at ``finetune.distill.feature_points``, weight 1) and
``output+features`` (both). Writes ``RUN/ablation/distill/summary.{json,md,png}``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from compressor.config import DistillConfig, RunConfig, load_config, prune_target_overrides
from compressor.data import stack
from compressor.errors import UserError
from compressor.image_quality import inception_unavailable, make_scorer, resampling
from compressor.intervals import ssim_figures
from compressor.persist import load_unet
from compressor.training import checkpoint_at, ema_model, train
from pipeline.context import RunContext, log, write_json
from pipeline.plots import plot_distill_sweep
from pipeline.sweep.cells import cached, key_of
from pipeline.sweep.engine import (
    Sweep,
    compare,
    document,
    paired_difference,
    spread,
    table,
    tally,
    write_summary,
)
from rundir import layout

MODES = ("off", "output", "features", "output+features")


@dataclass(frozen=True)
class DistillationSweep:
    """What ``compress-deploy ablate --distill`` compares (its flags, parsed and checked there: at
    least one of each, budgets >= 1, ratios in (0, 1]; the modes are checked here)."""

    config: Path
    modes: tuple[str, ...]
    budgets: tuple[int, ...]  # finetune steps after which each mode is scored
    ratios: tuple[float, ...]  # kept-MACs fractions, in (0, 1]
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()
    run_dir: Path | None = None  # the run whose ablation/distill/ folder holds the cells


def mode_config(mode: str, base: DistillConfig) -> DistillConfig:
    """The distillation settings of a sweep mode (feature points from the run's config)."""
    if mode not in MODES:
        raise UserError(f"--distill: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    parts = mode.split("+")
    return DistillConfig(
        weight_task=1.0,
        weight_output=1.0 if "output" in parts else 0.0,
        weight_features=1.0 if "features" in parts else 0.0,
        feature_points=list(base.feature_points),
    )


def setting(ratio: float) -> str:
    """A ratio's setting name (and folder): ``macs-<r>``."""
    return f"macs-{ratio:g}"


def _score_path(folder: Path, mode: str, budget: int, key: str) -> Path:
    return folder / "scores" / f"{mode}-{key}-{budget}.json"


def cell_key(cfg: RunConfig, ctx: RunContext) -> str:
    """What a cell's finetunes and scores depend on: the pruned model (the prune stage's cache
    key), the finetune recipe and the sampler/quality settings; 12 hex digits.

    Checkpoints and scores are filed under it, so a changed config never resumes or reuses
    another config's work; the run's distillation weights are left out (each mode sets its own).
    """

    rec = ctx.require("prune", "the distillation sweep")
    # each cell's mode sets the distillation weights, so the run's own weights are not a fact of it
    # (written as mode "off" would be: a changed default must not orphan finished cells)
    recipe = dataclasses.replace(cfg.finetune, distill=mode_config("off", cfg.finetune.distill))
    facts = [rec.cache, dataclasses.asdict(recipe), dataclasses.asdict(cfg.sample)]
    # the sweep scores the EMA weights only: whether the quality stage also scores the raw
    # weights is not a fact of a cell (always written as true, the value the existing cells
    # were keyed with, so toggling it orphans nothing)
    facts.append(dataclasses.asdict(dataclasses.replace(cfg.quality, compare_raw=True)))
    return key_of(*facts, length=12)


class Scorer:
    """Frechet distance, KID and SSIM vs dense of a model with their intervals, the dense images
    computed once; one bootstrap over the quality seeds for the whole sweep (the base config's
    seed), so any two cells' figures are paired."""

    def __init__(self, ctx: RunContext, seed: int) -> None:
        self.ctx = ctx
        feature, self.metric = ctx.frechet_features()
        reason = inception_unavailable(ctx.cfg.quality.inception_weights) if self.metric == "fid" else None
        if reason:
            raise UserError(
                f"the distillation sweep scores Frechet distances and FID cannot run here ({reason}); "
                "install the `fid` extra and set quality.inception_weights, or quality.feature=digits"
            )
        q = ctx.cfg.quality
        self.boot = resampling(q, seed)
        reference = (stack(ctx.dataset, q.num_reference) + 1) / 2
        self.scorer = make_scorer(reference, feature, self.metric, self.boot, q.inception_weights)
        self.steps = q.steps or ctx.cfg.sample.steps
        self.count = q.fixed_samples
        self.dense = self.images(ctx.dense_on())
        self.dense_score = self.scorer.score(self.dense)
        self.dense_fd = self.dense_score.fd
        self.dense_figures = self.scorer.figures(self.dense_score, "fd")

    def images(self, unet):
        """The run's sampler's images of ``unet`` from the quality seeds."""
        return self.ctx.sample_images(self.ctx.torch_predictor(unet), self.count, self.steps)

    def score(self, unet) -> dict:
        """``fd``, ``kid``, ``fd_ratio`` and ``ssim_vs_dense`` of ``unet`` with their ``*_ci``, and the
        Frechet replicates (``fd_replicates``: paired differences between cells are read from them)."""
        imgs = self.images(unet)
        score = self.scorer.score(imgs)
        out = self.scorer.figures(score, "fd", self.dense_score)
        out.update(ssim_figures(self.boot, imgs, self.dense))
        out["fd_replicates"] = [round(float(v), 6) for v in score.fd_reps]
        return out

    def difference(self, a: dict, b: dict) -> list[float] | None:
        """The paired interval of ``a['fd'] - b['fd']`` (two scored cells), or None when either
        was scored before replicates were kept."""
        return paired_difference(self.boot, a, b, "fd")


def sweep_cell(
    cfg: RunConfig, folder: Path, mode: str, budgets: list[int], scorer: Scorer, ctx: RunContext
) -> list[dict]:
    """Finetune one pruned model in one mode and score it after each budget (cached, resumable)."""
    key = cell_key(cfg, ctx)
    scored = {b: cached(_score_path(folder, mode, b, key), needs=["fd_replicates"]) for b in budgets}
    wanted = [b for b in budgets if scored[b] is None]
    if wanted:
        pruned = load_unet(layout.model_dir(folder, "prune"), ctx.device)[0]
        distill = mode_config(mode, cfg.finetune.distill)
        shared = cfg.finetune.schedule == "constant"
        runs = [max(budgets)] if shared else wanted
        every = math.gcd(*budgets) if shared else None
        for steps in runs:
            ft = dataclasses.replace(
                cfg.finetune, steps=steps, distill=distill, checkpoint_every=every or steps, log_every=10
            )
            ckpts = folder / "finetune" / (f"{mode}-{key}" if shared else f"{mode}-{key}-{steps}")
            log("ablate", f"{folder.name} {mode}: finetune {steps} steps -> {ckpts}")
            began = time.perf_counter()
            result = train(
                _copy(pruned),
                ctx.noise_scheduler(),
                ctx.dataset,
                ft,
                ckpts,
                cfg.seed,
                ctx.device,
                teacher=ctx.dense_on() if distill.active else None,
            )
            took = time.perf_counter() - began
            for budget in budgets if shared else [steps]:
                if budget not in wanted:
                    continue
                found = scorer.score(ema_model(checkpoint_at(ckpts, budget), pruned))
                row = {"mode": mode, "budget": budget, **found, "steps_per_second": result.steps_per_second}
                row["finetune_seconds"] = took
                write_json(_score_path(folder, mode, budget, key), row)
                shown = f"fd {found['fd']:.2f}, ssim {found['ssim_vs_dense']:.3f}"
                log("ablate", f"{folder.parent.name}/{folder.name} {mode} {budget} steps: {shown}")
    return [cached(_score_path(folder, mode, b, key)) for b in budgets]


def _copy(unet):
    return copy.deepcopy(unet).train()


def summarize(cells: dict, dense_fd: float) -> list[dict]:
    """One row per (ratio, mode, budget): mean and std over seeds, and every seed's value."""
    rows = []
    order = sorted(cells.items(), key=lambda kv: (-kv[0][0], MODES.index(kv[0][1]), kv[0][2]))
    for (ratio, mode, budget), scores in order:
        fd = [s["fd"] for s in scores]
        sps = [s["steps_per_second"] for s in scores if s.get("steps_per_second")]
        fd_spread = spread(fd, "fd")
        rows.append(
            {
                "ratio": ratio,
                "mode": mode,
                "budget": budget,
                **fd_spread,
                "fd_ratio_mean": fd_spread["fd_mean"] / dense_fd,
                **spread([s["ssim_vs_dense"] for s in scores], "ssim"),
                "fd_per_seed": fd,
                "fd_ci_per_seed": [s.get("fd_ci") for s in scores],
                "fd_ratio_ci_per_seed": [s.get("fd_ratio_ci") for s in scores],
                "kid_per_seed": [s.get("kid") for s in scores],
                "steps_per_second": statistics.fmean(sps) if sps else None,
            }
        )
    return rows


def verdicts(rows: list[dict], budgets: list[int], cells: dict, difference=None) -> list[str]:
    """The issue's three questions per ratio and distillation mode, seed by seed from the paired
    intervals of the difference to plain (``difference(a, b)``: the interval of a's Frechet distance
    minus b's; None or missing: the bare figures are compared)."""
    lines = []
    full = max(budgets)
    half = max((b for b in budgets if 2 * b <= full), default=None)  # the largest budget <= half of full
    by = {(r["ratio"], r["mode"], r["budget"]): r for r in rows}
    for ratio in sorted({r["ratio"] for r in rows}, reverse=True):
        plain = by.get((ratio, "off", full))
        if plain is None:
            continue
        base = cells[(ratio, "off", full)]
        distilled = {r["mode"] for r in rows if r["ratio"] == ratio and r["mode"] != "off"}
        for mode in sorted(distilled, key=MODES.index):
            # the first budget from which no seed is clearly worse than plain at the full budget
            reach = [
                b for b in sorted(budgets)
                if all(compare(a, p, difference) != "higher" for a, p in zip(cells[(ratio, mode, b)], base,
                                                                               strict=True))
            ]  # fmt: skip
            goal = f"plain's {full}-step FD {plain['fd_mean']:.2f}"
            text = (f"matches {goal} within noise on every seed from {reach[0]} steps" if reach
                    else f"is clearly worse than {goal} on some seed at every budget")  # fmt: skip
            if half is not None:  # this mode after half the steps vs plain at the full budget
                early = tally(cells[(ratio, mode, half)], base, difference)
                text += f"; at {half} steps vs plain at {full}: {early}"
            text += f"; at {full} steps vs plain: {tally(cells[(ratio, mode, full)], base, difference)}"
            lines.append(f"MACs {ratio:g}, {mode}: {text}")
    return lines


def markdown(rows: list[dict], dense_fd: float, metric: str, notes: list[str]) -> str:
    """The sweep table and verdicts as Markdown (``summary.md``)."""
    head = ["kept MACs", "distillation", "steps", f"{metric} (mean +- std)", "/ dense", "SSIM vs dense",
            "steps/s"]  # fmt: skip
    body = [
        [f"{r['ratio']:g}", r["mode"], r["budget"], f"{r['fd_mean']:.2f} +- {r['fd_std']:.2f}",
         f"{r['fd_ratio_mean']:.2f}", f"{r['ssim_mean']:.3f} +- {r['ssim_std']:.3f}",
         "-" if r["steps_per_second"] is None else f"{r['steps_per_second']:.2f}"]
        for r in rows
    ]  # fmt: skip
    return document(
        "Distillation sweep: plain vs distilled finetuning at equal budgets",
        f"Dense {metric}: {dense_fd:.2f}. Means over seeds; each seed prunes with its own Taylor batch.",
        table(head, body),
        "\n".join(f"- {n}" for n in notes),
    )


def sweep_of(what: DistillationSweep, name: str) -> Sweep:
    """The engine's description of the sweep (``name``: the run config's): the prune stage of every
    ratio at every seed, in ``RUN/ablation/distill/``."""
    return Sweep(
        config=what.config,
        overrides=tuple(what.overrides),
        root=layout.ablation_dir(what.run_dir or Path("runs") / name) / "distill",
        settings={setting(r): prune_target_overrides(target_macs=r) for r in what.ratios},
        seeds=tuple(what.seeds),
        stages=("prune",),
        suffix="-distill",
    )


def run(what: DistillationSweep) -> int:
    """The sweep (``ablate --distill``); returns the exit code."""
    budgets = sorted(set(what.budgets))
    base_cfg = load_config(what.config, list(what.overrides))  # validate before any work
    for mode in what.modes:
        mode_config(mode, base_cfg.finetune.distill)
    sweep = sweep_of(what, base_cfg.name)
    ratio_of = {setting(r): r for r in what.ratios}
    cells: dict[tuple, list[dict]] = {}
    scorer = None
    for cell in sweep.cells():
        log("ablate", f"{cell.setting} seed {cell.seed}: pruning (reused when done)")
        cfg = sweep.run(cell)
        ctx = RunContext(cfg, cell.folder)
        scorer = scorer or Scorer(ctx, base_cfg.seed)  # dense images: the same for every pruning seed
        for mode in what.modes:
            for score in sweep_cell(cfg, cell.folder, mode, budgets, scorer, ctx):
                cells.setdefault((ratio_of[cell.setting], mode, score["budget"]), []).append(score)
    assert scorer is not None
    rows = summarize(cells, scorer.dense_fd)
    notes = verdicts(rows, budgets, cells, scorer.difference)
    boot = scorer.boot
    rule = (
        f"seed by seed: lower / higher = the paired {boot.level:.0%} interval ({boot.method}) of the "
        "Frechet difference to plain is below / above zero (same quality seeds); within noise otherwise"
    )
    summary = {
        "dense_fd": scorer.dense_fd,
        "dense": scorer.dense_figures,
        "metric": scorer.metric,
        "rows": rows,
        "verdicts": notes,
        "verdict_rule": rule,
        "interval": boot.describe(scorer.count),
    }
    text = markdown(rows, scorer.dense_fd, scorer.metric, [*notes, rule])
    charts = {"summary.png": lambda path: plot_distill_sweep(rows, path, scorer.metric, list(MODES))}
    write_summary(sweep.root, summary, text, charts)
    return 0
