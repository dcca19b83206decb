"""``compress-deploy frontier``: every stack of levers measured on the backend, its Pareto front.

    compress-deploy frontier CONFIG [key=value ...] [--ratios 0,0.25,0.45] [--schedulers ddim,dpmsolver++]
                             [--steps 50,20,10] [--cache-intervals 1,2] [--precisions fp32,int8]
                             [--students 0,8,4,2]
                             [--backend onnxruntime] [--batch 16] [--batches 1,4] [--samples N]
                             [--repeat N] [--retime] [--threads N] [--target 3x|40ms|3x,10x]
                             [--levers prune,steps,scheduler,cache,precision,student]
                             [--ray [ADDRESS]] [--workers N] [--out DIR]

Defaults come from the config's ``frontier`` section. Per pruning ratio a nested run
(``OUT/ratio-<r>/``: prune with the run's criterion, finetune with its settings, export)
is made or reused; then each stack's quality (torch for fp32, ONNX Runtime for fp16/int8)
and its sampler latency (alternating with the dense reference sampler, ``sample.scheduler``
at ``sample.steps``). ``--students`` adds few-step students: per ratio a nested run
(``OUT/ratio-<r>-students/``) distils the ratio's model by progressive distillation down to the
fewest steps listed; each listed step count is one of its rounds, sampled with DDIM at its own steps
(``stack.student_steps``). A conditional model's stacks sample with the run's prompts under guidance
(students: unguided, distilled at the run's scale), score prompt adherence beside the Frechet
figures, and time the whole text-to-image call (text encoder, UNet loop, VAE decoder) at every batch
of ``--batches``. Writes ``OUT/frontier.{json,md,png}`` (default OUT: ``runs/<name>/frontier``).
``--target`` also picks the stack of lowest Frechet distance that meets it among the
``--levers`` that may move (the others stay at the run's sampler) and records it as
``chosen``. ``--ray`` runs the fits and quality jobs as Ray tasks: on the cluster at
ADDRESS, or (no address) on a Ray started here with ``--workers`` CPUs; latency is always
timed here, one stack at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compressor.config import load_config
from compressor.errors import UserError
from compressor.preflight import check_model_settings
from pipeline import frontier as fr
from pipeline.commands.args import CommandParser, config_args, int_list
from pipeline.frontier.measure import measure
from pipeline.runlock import RunLock
from rundir import layout


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"{flag} {text!r}: expected comma-separated numbers, e.g. {flag} 0,0.25,0.45"
        ) from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise UserError(f"{flag} {text!r}: every pruning ratio must be in [0, 1)")
    return values


def _names(text: str | None, flag: str, allowed: tuple[str, ...]) -> list[str] | None:
    if text is None:
        return None
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise UserError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return values


def parse_target(text: str) -> tuple[float | None, float | None]:
    """``3x`` -> (3.0, None); ``40ms`` -> (None, 40.0); UserError otherwise."""
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            value = float(t[:-2])
            if value > 0:
                return None, value
        elif t.endswith("x"):
            value = float(t[:-1])
            if value > 1:
                return value, None
    except ValueError:
        pass
    raise UserError(f"--target {text!r}: give a speed-up over 1 such as 3x, or a latency such as 40ms")


def main(argv: list[str]) -> int:
    """Measure the frontier (or reuse what is measured), write frontier.{json,md,png}."""
    parser = CommandParser(prog="compress-deploy frontier", description=__doc__.split("\n")[0])
    config_args(parser)
    parser.add_argument(
        "--ratios", help="comma-separated pruning ratios, 0 = dense (default: frontier.ratios)"
    )
    parser.add_argument(
        "--schedulers",
        help=f"comma-separated solvers, of {','.join(fr.SOLVERS)} (default: frontier.schedulers)",
    )
    parser.add_argument("--steps", help="comma-separated step counts (default: frontier.steps)")
    parser.add_argument(
        "--cache-intervals",
        help="comma-separated feature-reuse intervals, 1 = off (default: frontier.cache_intervals)",
    )
    parser.add_argument(
        "--precisions", help="comma-separated precisions, of fp32,fp16,int8 (default: frontier.precisions)"
    )
    parser.add_argument(
        "--students",
        help="comma-separated few-step students' steps, 0 = none, e.g. 0,8,4,2 (default: frontier.students)",
    )
    parser.add_argument("--backend", help="latency backend (default: frontier.backend)")
    parser.add_argument("--batch", type=int, help="images per timed sampler run (default: frontier.batch)")
    parser.add_argument(
        "--batches", help="comma-separated batches to time too, e.g. 1,4 (default: frontier.batches)"
    )
    parser.add_argument("--samples", type=int, help="images scored per stack (default: quality.num_samples)")
    parser.add_argument("--repeat", type=int, help="timed runs per stack (default: frontier.repeat)")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time every stack again, not reusing cached timings (e.g. measured while the machine was busy)",
    )
    parser.add_argument("--threads", type=int, help="threads of every job and timing (default: all)")
    parser.add_argument(
        "--target",
        help="pick the best stack meeting a speed-up (3x) or latency (40ms); several comma-separated "
        "(3x,10x): each one's choice is stated, the first is recorded as chosen (default: frontier.targets, "
        "stated only)",
    )
    parser.add_argument("--levers", help=f"levers --target may move (default: all of {','.join(fr.LEVERS)})")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the jobs on the Ray cluster at ADDRESS, or without one on a Ray started here "
        "(default: no Ray, jobs run here one by one)",
    )
    parser.add_argument("--workers", type=int, help="CPUs of a local Ray (default: all)")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (default: runs/<config name>/frontier)"
    )
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    for flag in ("batch", "samples", "repeat", "threads", "workers"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "samples" else 1):
            raise UserError(f"--{flag} {value}: must be at least {2 if flag == 'samples' else 1}")
    if args.backend is not None and args.backend not in ("torch", "onnxruntime", "tensorrt"):
        raise UserError(f"--backend {args.backend}: choose torch, onnxruntime or tensorrt")
    f = cfg.frontier
    grid = fr.Grid(
        ratios=_floats(args.ratios, "--ratios") or list(f.ratios),
        schedulers=_names(args.schedulers, "--schedulers", fr.SOLVERS) or list(f.schedulers),
        steps=int_list(args.steps, "--steps") or list(f.steps),
        cache_intervals=int_list(args.cache_intervals, "--cache-intervals") or list(f.cache_intervals),
        precisions=_names(args.precisions, "--precisions", ("fp32", "fp16", "int8")) or list(f.precisions),
        students=int_list(args.students, "--students", minimum=0) or list(f.students),
    )
    grid_keys = {k: getattr(grid, k) for k in ("steps", "cache_intervals", "students")}
    check_model_settings(
        dataclasses.replace(cfg, frontier=dataclasses.replace(f, **grid_keys)), frontier=True
    )
    out = args.out or layout.frontier_dir(Path("runs") / cfg.name)
    batches = int_list(args.batches, "--batches")
    spec = fr.spec_from_config(
        cfg, out, grid, backend=args.backend, batch=args.batch, samples=args.samples, threads=args.threads,
        repeat=args.repeat, batches=batches, retime=args.retime or None,
    )  # fmt: skip
    named = [t.strip() for t in (args.target or "").split(",") if t.strip()]
    if args.target is not None and not named:
        parse_target(args.target)  # the one-line error
    targets = {t: parse_target(t) for t in (named or list(f.targets or []))}
    target = targets[named[0]] if named else None
    levers = _names(args.levers, "--levers", fr.LEVERS) or list(fr.LEVERS)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, " ".join(["compress-deploy frontier", *argv])):
        frontier = measure(spec, args.ray, args.workers)
        allowed = fr.lever_grid(cfg, levers, grid) if args.levers else None
        choices = {
            name: fr.choose(frontier["points"], speedup, ms, cfg.prune.target_latency.margin, allowed,
                            max_increase=cfg.acceptance.max_fd_increase,
                            min_adherence_ratio=cfg.acceptance.min_adherence_ratio)
            for name, (speedup, ms) in targets.items()
        }  # fmt: skip
        if targets:
            frontier["levers"] = levers
        if target:
            frontier["target"] = named[0]
            frontier["chosen"] = choices[named[0]]
        if len(targets) > 1 or (targets and not target):
            frontier["choices"] = choices
        fr.write(frontier, out)
    print(fr.table(frontier))
    on_front = [p["label"] for p in frontier["points"] if p["pareto"]]
    print(f"Pareto-optimal ({len(on_front)} of {len(frontier['points'])}): {'; '.join(on_front)}")
    for name, c in choices.items():
        if c is None:
            print(f"no measured stack meets {name} (levers {', '.join(levers)})")
        else:
            print(fr.choice_text(c, name, frontier["metric"]).replace("**", ""))
    print(f"wrote {out / 'frontier.md'}, {out / 'frontier.png'}, {out / 'frontier.json'}")
    return 0
