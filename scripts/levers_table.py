"""Each lever alone on the dense model and stacked on the pruned one: latency vs dense DDIM 50, quality.

    python scripts/levers_table.py CONFIG [key=value ...] [--run-dir RUN] [--backend onnxruntime]
                                   [--batches 1,16] [--samples 1024] [--repeat 3] [--threads N]
                                   [--latency-only] [--warmup 1]

Needs a finished run (prune, finetune, export with ``export.feature_reuse=true``):

    LEVERS='export.feature_reuse=true export.precisions=[fp32,fp16,int8]'
    compress-deploy configs/demo.yaml $LEVERS
    python scripts/levers_table.py configs/demo.yaml $LEVERS

For every configuration (model, scheduler, steps, cache interval) it times the whole
sampler on ``--backend`` alternately with the dense model's DDIM 50 sampler in the same
process (medians of ``--repeat`` runs; speed-up = dense DDIM 50 ms / this ms) and scores
``--samples`` images from the quality stage's seeds in torch fp32 (an fp32 sampler's images
do not depend on the backend): the Frechet distance and KID with the quality stage's features
and SSIM against dense DDIM 50's images from the same seeds, each with its interval paired over
the seeds (the Frechet ratio's is that of the replicated ratio, see docs/quality.md). Writes
RUN/levers/levers.{json,md} and prints the table.

``--latency-only`` (an architecture with random weights, whose images mean nothing) skips the
scoring and times a shorter list of rows (one per lever, :data:`LATENCY_ROWS`); the run needs
only the prune and export stages, e.g. for the ddpm-cifar10-32 architecture:

    CIFAR='model.name=ddpm-cifar10-32 model.init=random prune.method=magnitude prune.target_macs=0.57
           prune.eval_batch=0 export.feature_reuse=true export.precisions=[fp32,int8] name=levers-cifar10'
    compress-deploy configs/demo.yaml $CIFAR --stages prune,export
    python scripts/levers_table.py configs/demo.yaml $CIFAR --latency-only --repeat 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.config import load_config  # noqa: E402
from compressor.persist import load_unet  # noqa: E402
from compressor.sampling import generate, make_scheduler  # noqa: E402
from compressor.stack import SamplerVariant  # noqa: E402
from deploy.runtimes import load_backend  # noqa: E402
from deploy.stopwatch import percentile_ms, sampler_call, time_alternating  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from pipeline.frontier.tables import kid_text, with_ci  # noqa: E402
from rundir import layout  # noqa: E402
from rundir.records import final_model_dir  # noqa: E402

REFERENCE = ("dense", SamplerVariant("ddim", 50), "fp32")
DENSE = ["ddim:25", "ddim:10", "dpmsolver++:20", "dpmsolver++:10", "ddim:50:2", "ddim:50:3", "ddim:50:5"]
PRUNED = [
    "ddim:50",
    "ddim:25",
    "ddim:10",
    "dpmsolver++:20",
    "dpmsolver++:10",
    "unipc:10",
    "dpmsolver++:20:2",
    "dpmsolver++:20:3",
    "dpmsolver++:10:2",
    "ddim:25:3",
]
INT8 = [("dense", "ddim:50"), ("pruned", "dpmsolver++:10"), ("pruned", "dpmsolver++:20")]  # int8 rows
LATENCY_ROWS = [  # --latency-only: each lever once on the dense model, and stacked on the pruned one
    ("dense", "ddim:10", "fp32"),
    ("dense", "dpmsolver++:10", "fp32"),
    ("dense", "ddim:50:2", "fp32"),
    ("dense", "ddim:50:3", "fp32"),
    ("dense", "ddim:50:5", "fp32"),
    ("dense", "ddim:50", "int8"),
    ("pruned", "ddim:50", "fp32"),
    ("pruned", "dpmsolver++:10", "fp32"),
    ("pruned", "dpmsolver++:10:2", "fp32"),
    ("pruned", "dpmsolver++:10", "int8"),
]


def score(ctx: RunContext, configs: list, scored: dict, samples: int) -> dict:
    """Frechet distance, KID, the Frechet ratio to dense DDIM 50's and SSIM vs dense DDIM 50, per
    configuration, each with its interval paired over the seeds (the quality stage's scorer)."""
    from compressor.intervals import paired, ssim_figures
    from pipeline.frontier.scoring import make_frontier_scorer

    cfg = ctx.cfg
    scorer, metric = make_frontier_scorer(ctx)
    images = {}
    for model, v, precision in configs:
        images[(model, str(v), precision)] = generate(
            scored[(model, v.cache_interval > 1, precision)],
            make_scheduler(v.scheduler, ctx.dense.scheduler_config),
            ctx.image_shape(),
            samples,
            v.steps,
            seed=cfg.sample.seed,
            batch_size=cfg.sample.batch_size,
            cache_interval=v.cache_interval,
            cache_schedule=cfg.sample.cache_schedule,
        )
    ref_images = images[(REFERENCE[0], str(REFERENCE[1]), REFERENCE[2])]
    ref_score = scorer.score(ref_images)
    out = {}
    for model, v, precision in configs:
        imgs = images[(model, str(v), precision)]
        s = scorer.score(imgs)
        figures = scorer.figures(s, "fd")
        ratio = paired(scorer.boot, s, ref_score)
        is_ref = (model, v, precision) == REFERENCE
        sim = None if is_ref else ssim_figures(scorer.boot, imgs, ref_images)
        out[(model, str(v), precision)] = {
            "metric": metric,
            **figures,
            "ratio": ratio["fd_ratio"],
            "ratio_ci": ratio["fd_ratio_ci"],
            "ssim": sim["ssim_vs_dense"] if sim else None,
            "ssim_ci": sim["ssim_vs_dense_ci"] if sim else None,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--latency-only", action="store_true", help="time the rows, score nothing")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sampler runs before each row")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    run = args.run_dir or Path("runs") / cfg.name
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = RunContext(cfg, run)
    level = cfg.sample.cache_level
    shape = ctx.image_shape()
    if args.latency_only:
        configs = [REFERENCE] + [(m, SamplerVariant.parse(v), p) for m, v, p in LATENCY_ROWS]
        configs = [c for c in configs if c[2] != "int8" or "int8" in cfg.export.precisions]
    else:
        configs = [REFERENCE] + [("dense", SamplerVariant.parse(v), "fp32") for v in DENSE]
        configs += [("pruned", SamplerVariant.parse(v), "fp32") for v in PRUNED]
        if "int8" in cfg.export.precisions:
            configs += [(m, SamplerVariant.parse(v), "int8") for m, v in INT8]
    sched_cfg = ctx.dense.scheduler_config
    pruned_unet = load_unet(final_model_dir(run)[1])[0]
    torch_models = {"dense": ctx.dense.unet, "pruned": pruned_unet}

    def backend(model: str, reuse: bool, name: str, precision: str = "fp32"):
        return load_backend(
            name,
            unet=torch_models[model] if name == "torch" else None,
            run_dir=run,
            model=model,
            threads=args.threads,
            precision=precision,
            cache_level=level if reuse else None,
        ).predict

    keys = [(m, r, "fp32") for m in ("dense", "pruned") for r in (False, True)]
    keys += [(m, False, "int8") for m in ("dense", "pruned") if "int8" in cfg.export.precisions]
    deployed = {k: backend(k[0], k[1], args.backend, k[2]) for k in keys}
    scores = {}
    if not args.latency_only:
        # fp32 images do not depend on the backend: scored in torch; int8 through the backend that runs it
        scored = {k: backend(k[0], k[1], "torch") if k[2] == "fp32" else deployed[k] for k in keys}
        scores = score(ctx, configs, scored, args.samples)
    metric = next(iter(scores.values()))["metric"] if scores else "fd"
    rows = []
    for model, v, precision in configs:
        row = {
            "model": model,
            "variant": str(v),
            "scheduler": v.scheduler,
            "steps": v.steps,
            "cache_interval": v.cache_interval,
            "precision": precision,
        }
        if scores:
            found = scores[(model, str(v), precision)]
            row[metric], row["fd_ratio"] = found["fd"], found["ratio"]
            row[f"{metric}_ci"], row["fd_ratio_ci"] = found["fd_ci"], found["ratio_ci"]
            row["kid"], row["kid_ci"] = found["kid"], found["kid_ci"]
            row["ssim_vs_dense_ddim50"] = found["ssim"]
            row["ssim_vs_dense_ddim50_ci"] = found["ssim_ci"]
        for batch in [int(b) for b in args.batches.split(",")]:
            ref_call = sampler_call(
                deployed[("dense", False, "fp32")], make_scheduler("ddim", sched_cfg), shape, batch, 50, "cpu"
            )
            call = sampler_call(
                deployed[(model, v.cache_interval > 1, precision)],
                make_scheduler(v.scheduler, sched_cfg),
                shape,
                batch,
                v.steps,
                "cpu",
                v.cache_interval,
            )
            times = time_alternating({"reference": ref_call, "candidate": call}, args.warmup, args.repeat)
            ref_ms, ms = percentile_ms(times["reference"])[0], percentile_ms(times["candidate"])[0]
            row[f"ms_b{batch}"] = ms
            row[f"speedup_b{batch}"] = ref_ms / ms
        rows.append(row)
        shown = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float))
        print(f"{model} {v} {precision}: {shown}", file=sys.stderr, flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    header = ["model", "sampler", "cache interval", "precision"]
    header += [f"ms (batch {b})" for b in batches] + [f"speed-up (batch {b})" for b in batches]
    if scores:
        header += [metric, "Frechet ratio", "KID x 1e3", "SSIM vs dense DDIM 50"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], f"{r['scheduler']} {r['steps']}", str(r["cache_interval"]), r["precision"]]
        cells += [f"{r[f'ms_b{b}']:.1f}" for b in batches] + [f"{r[f'speedup_b{b}']:.2f}x" for b in batches]
        if scores:
            s = r["ssim_vs_dense_ddim50"]
            ssim_text = "-" if s is None else with_ci(s, r["ssim_vs_dense_ddim50_ci"], 3)
            kid = kid_text(r["kid"], r["kid_ci"])
            cells += [
                with_ci(r[metric], r[f"{metric}_ci"], 1),
                with_ci(r["fd_ratio"], r["fd_ratio_ci"], 2),
                kid,
                ssim_text,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = layout.levers_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    facts = {"backend": args.backend, "threads": torch.get_num_threads(), "model": cfg.model.name}
    facts["samples"] = args.samples if scores else 0
    (out / "levers.json").write_text(json.dumps({**facts, "rows": rows}, indent=1))
    (out / "levers.md").write_text(f"# Levers on {cfg.name} ({args.backend})\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'levers.md'} and levers.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
