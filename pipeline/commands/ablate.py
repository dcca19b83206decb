"""The method ablation: prune + equal finetune budget + quality per method, over seeds.

    compress-deploy ablate CONFIG [key=value ...] [--seeds 0,1,2] [--thresholds 0,0.02,0.05,0.1]
                                  [--methods taylor,magnitude,random,reinit]
                                  [--selections shared,independent] [--no-finetune] [--run-dir DIR]
    compress-deploy ablate CONFIG [key=value ...] --distill off,output,output+features
                                  [--finetune-steps 150,300,600,1200] [--ratios 0.57,0.3] [--seeds 0,1,2]

Each variant runs the ``prune``, ``finetune`` and ``quality`` stages in its own run
directory ``RUN/ablation/<variant>/seed-<k>/`` (finished variants are reused when the
command is rerun), plus a control: the dense model finetuned with the same recipe and
budget, which separates what pruning costs from what the finetune recipe itself moves.
Each seed is a different Taylor batch (and noise). ``--selections`` repeats every method
under each GroupNorm channel-selection rule; ``--no-finetune`` measures right after
pruning only (a later run with finetuning reuses those prunes). The diff-pruning
variant with the smallest threshold also records the per-timestep diagnostic.
Writes ``RUN/ablation/summary.{json,md,png}`` and ``diagnostics.png``.

``--distill`` runs the distillation sweep instead (plain vs distilled finetuning at equal
budgets, per kept-MACs ratio and seed): see :mod:`pipeline.sweep.distillation`. This module parses
and checks the flags; both sweeps run on :mod:`pipeline.sweep.engine`.
"""

from __future__ import annotations

from pathlib import Path

from compressor.config import load_config
from compressor.errors import UserError
from pipeline.commands.args import CommandParser, config_args
from pipeline.sweep.ablation import BASELINES, SELECTIONS, MethodAblation
from pipeline.sweep.ablation import run as run_ablation
from pipeline.sweep.distillation import DistillationSweep
from pipeline.sweep.distillation import run as run_distillation


def _numbers(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def _distill(args) -> int:
    """``--distill``: the distillation sweep's flags, parsed and checked."""
    if args.ratios is None:
        target = load_config(args.config, args.overrides).prune.target_macs
        args.ratios = ",".join(f"{r:g}" for r in dict.fromkeys([target or 0.57, 0.3]))
    modes = [m.strip() for m in args.distill.split(",") if m.strip()]
    try:
        budgets = sorted(set(_numbers(args.finetune_steps, int)))
        ratios = _numbers(args.ratios, float)
        seeds = _numbers(args.seeds, int)
    except ValueError:
        raise UserError("--finetune-steps, --ratios and --seeds take comma-separated numbers") from None
    if not budgets or min(budgets) < 1 or not ratios or not seeds or not modes:
        raise UserError("--finetune-steps, --ratios, --seeds and --distill each need at least one value >= 1")
    if any(not 0 < r <= 1 for r in ratios):
        raise UserError(f"--ratios: kept-MACs fractions in (0, 1], got {args.ratios}")
    what = DistillationSweep(
        config=args.config, modes=tuple(modes), budgets=tuple(budgets), ratios=tuple(ratios),
        seeds=tuple(seeds), overrides=tuple(args.overrides), run_dir=args.run_dir,
    )  # fmt: skip
    return run_distillation(what)


def main(argv: list[str]) -> int:
    """Entry point of ``compress-deploy ablate``."""
    parser = CommandParser(prog="compress-deploy ablate", description=__doc__.split("\n\n")[0])
    config_args(parser)
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds: one Taylor batch and noise each"
    )
    parser.add_argument("--thresholds", default="0,0.02,0.05,0.1", help="diff-pruning thresholds to compare")
    parser.add_argument("--methods", default=",".join(BASELINES), help="baseline pruning methods to compare")
    parser.add_argument(
        "--selections", help="GroupNorm channel selection rules to compare (default: the config's)"
    )
    parser.add_argument("--no-finetune", action="store_true", help="measure right after pruning only")
    parser.add_argument(
        "--run-dir", type=Path, metavar="DIR", help="the run whose ablation/ folder holds the variants "
        "(default: runs/<config name>)"
    )  # fmt: skip
    parser.add_argument(
        "--only",
        help="run only these variants (comma-separated names); others are summarised if finished "
        "(default: all)",
    )
    parser.add_argument(
        "--distill",
        help="the distillation sweep instead: finetune modes to compare, e.g. off,output,output+features "
        "(default: the method ablation)",
    )
    parser.add_argument("--finetune-steps", default="150,300,600,1200", help="--distill: the budgets")
    parser.add_argument(
        "--ratios", help="--distill: kept-MACs fractions (default: prune.target_macs, or 0.57, and 0.3)"
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit among the flags
    if args.distill:
        return _distill(args)
    try:
        seeds = _numbers(args.seeds, int)
        thresholds = _numbers(args.thresholds, float)
    except ValueError:
        raise UserError("--seeds and --thresholds take comma-separated numbers, e.g. --seeds 0,1,2") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in BASELINES:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(BASELINES)}")
    selections = [s.strip() for s in (args.selections or "").split(",") if s.strip()]
    for sel in selections:
        if sel not in SELECTIONS:
            raise UserError(f"--selections: unknown rule {sel!r}; choose from {', '.join(SELECTIONS)}")
    what = MethodAblation(
        config=args.config, overrides=tuple(args.overrides), seeds=tuple(seeds), thresholds=tuple(thresholds),
        methods=tuple(methods), selections=tuple(selections), finetune=not args.no_finetune,
        run_dir=args.run_dir, only=frozenset(v.strip() for v in args.only.split(",")) if args.only else None,
    )  # fmt: skip
    return run_ablation(what)
