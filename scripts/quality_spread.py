"""How far quality figures move with the seeds, and how many samples decide a comparison.

    .venv/bin/python scripts/quality_spread.py configs/demo.yaml --run-dir runs/demo \
        [--counts 256,1024,2048] [--sets 5] [--first-seed 10000] [--noise numpy,torch]
        [--torch-count 256] [--out FILE]

For the dense and the finetuned model of a finished run, the quality stage's sampler draws
``sets`` disjoint seed sets of ``max(counts)`` images (seeds from ``--first-seed``); each set's
first ``count`` images are scored like the quality stage scores them (its features, Frechet
distance, KID, the paired Frechet ratio finetuned / dense) at every count. Printed per count:

* the spread over the sets (mean +- std, min..max) of each figure, against the interval the
  run would report from one set (mean jackknife and bootstrap half-widths / 1.96: a
  calibrated interval's standard error matches the spread over sets);
* whether the gate ``max_fd_ratio`` (the run's acceptance limit) and the dense-vs-finetuned
  difference are decided on each set (the whole interval on one side).

``--noise torch`` also samples the dense model from the noise generator used before the
bundle's numpy noise (``torch.randn`` with one ``torch.Generator`` per seed): the quality
stage's own seeds (0..N-1) and the disjoint sets under both generators (``--torch-count``
images of each set), which separates a generator effect from a seed-set effect. Images are
cached in ``RUN/analysis/spread/`` (a rerun scores without sampling); the table goes to stdout
and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compressor.config import load_config  # noqa: E402
from compressor.data import stack  # noqa: E402
from compressor.image_quality import make_scorer, resampling  # noqa: E402
from compressor.intervals import difference, paired  # noqa: E402
from compressor.persist import load_unet  # noqa: E402
from compressor.sampling import denoise, initial_noise, make_scheduler  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from rundir import layout  # noqa: E402


def torch_noise(shape: tuple[int, int, int], seeds: list[int]) -> torch.Tensor:
    """The starting noise before the numpy generator: one torch.Generator per seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def sample(ctx: RunContext, unet, seeds: list[int], noise_kind: str, cache: Path) -> torch.Tensor:
    """Images of ``unet`` from ``seeds`` with the run's quality sampler (cached as .npy)."""
    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    s, q = ctx.cfg.sample, ctx.cfg.quality
    scheduler = make_scheduler(s.scheduler, ctx.dense.scheduler_config)
    predict = ctx.torch_predictor(unet)
    out = []
    began = time.perf_counter()
    for start in range(0, len(seeds), s.batch_size):
        chunk = seeds[start : start + s.batch_size]
        make = initial_noise if noise_kind == "numpy" else torch_noise
        noise = make(ctx.image_shape(), chunk)
        out.append(denoise(predict, scheduler, noise, q.steps or s.steps, s.eta, chunk))
        done = start + len(chunk)
        print(
            f"  {cache.stem}: {done}/{len(seeds)} images, {time.perf_counter() - began:.0f} s",
            file=sys.stderr,
        )
    images = torch.cat(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache.with_name(cache.stem + ".tmp.npy"), images.numpy())
    cache.with_name(cache.stem + ".tmp.npy").replace(cache)
    return images


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _half(ci: list[float]) -> float:
    return (ci[1] - ci[0]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--counts", default="256,1024,2048")
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=10000)
    parser.add_argument("--noise", default="numpy", help="numpy, or numpy,torch (the generator before)")
    parser.add_argument(
        "--torch-count", type=int, default=256, help="images per set under the old generator (default 256)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    kinds = [k.strip() for k in args.noise.split(",") if k.strip()]
    cfg = load_config(args.config, [])
    ctx = RunContext(cfg, args.run_dir)
    q = cfg.quality
    limit = cfg.acceptance.max_fd_ratio or 1.5
    feature, metric = ctx.frechet_features()
    reference = (stack(ctx.dataset, q.num_reference) + 1) / 2
    jack, boot = resampling(q, cfg.seed, "jackknife"), resampling(q, cfg.seed, "bootstrap")
    scorers = {"jackknife": make_scorer(reference, feature, metric, jack), "bootstrap": None}
    scorers["bootstrap"] = make_scorer(reference, feature, metric, boot)
    models = {
        "dense": ctx.dense_on(),
        "finetuned": load_unet(layout.model_dir(args.run_dir, "finetune"))[0],
    }
    folder = layout.stage_dir(args.run_dir, "analysis") / "spread"
    n = max(counts)
    sets = [list(range(args.first_seed + k * n, args.first_seed + (k + 1) * n)) for k in range(args.sets)]
    images: dict = {}
    for kind in kinds:
        for label, unet in models.items():
            if kind != "numpy" and label != "dense":
                continue
            m = n if kind == "numpy" else min(n, args.torch_count)  # the old generator: fewer suffice
            for k, seeds in enumerate(sets):
                images[(kind, label, k)] = sample(
                    ctx, unet, seeds[:m], kind, folder / f"{kind}-{label}-set{k}-{m}.npy"
                )
            own = list(range(q.fixed_samples))  # the quality stage's own seeds
            if label == "dense":
                images[(kind, label, "own")] = sample(
                    ctx, unet, own, kind, folder / f"{kind}-{label}-own.npy"
                )
    result: dict = {"metric": metric, "sets": args.sets, "first_seed": args.first_seed, "limit": limit,
                    "level": q.interval_level, "rows": [], "own_seeds": {}}  # fmt: skip
    for kind in kinds:
        own = images.get((kind, "dense", "own"))
        if own is not None:
            s = scorers["jackknife"]
            fig = s.figures(s.score(own), metric)
            result["own_seeds"][kind] = {metric: fig[metric], f"{metric}_ci": fig[f"{metric}_ci"]}
        for count in counts:
            per: dict = {}
            for k in range(args.sets):
                scores = {}
                for label in ("dense", "finetuned"):
                    key = (kind, label, k)
                    if key not in images or len(images[key]) < count:
                        continue
                    imgs = images[key][:count]
                    for name, s in scorers.items():
                        sc = s.score(imgs)
                        scores[(label, name)] = sc
                        fig = s.figures(sc, metric)
                        row = per.setdefault(
                            (label, name), {"fd": [], "fd_half": [], "kid": [], "kid_half": []}
                        )
                        row["fd"].append(fig[metric])
                        row["fd_half"].append(_half(fig[f"{metric}_ci"]))
                        row["kid"].append(fig["kid"])
                        row["kid_half"].append(_half(fig["kid_ci"]))
                if ("finetuned", "jackknife") in scores:
                    for name, s in scorers.items():
                        a, d = scores[("finetuned", name)], scores[("dense", name)]
                        ratio = paired(s.boot, a, d)
                        diff = difference(s.boot, a, d)
                        row = per.setdefault(("ratio", name), {"ratio": [], "ratio_half": [], "gate": [],
                                                               "diff_decided": []})  # fmt: skip
                        row["ratio"].append(ratio["fd_ratio"])
                        row["ratio_half"].append(_half(ratio["fd_ratio_ci"]))
                        lo, hi = ratio["fd_ratio_ci"]
                        row["gate"].append(
                            "pass" if hi <= limit else "fail" if lo > limit else "inconclusive"
                        )
                        dlo, dhi = diff["fd_diff_ci"]
                        row["diff_decided"].append(dhi < 0 or dlo > 0)
            for (label, name), row in per.items():
                entry = {"noise": kind, "count": count, "model": label, "method": name}
                for key, values in row.items():
                    entry[key] = _spread(values) if key not in ("gate", "diff_decided") else values
                result["rows"].append(entry)
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def render(result: dict) -> str:
    """The spread table (Markdown)."""
    m = result["metric"]
    z = 1.959964
    lines = [
        f"Spread over {result['sets']} disjoint seed sets (from seed {result['first_seed']}); the interval "
        f"columns are the mean {result['level']:.0%} half-width one set's interval reports, divided by 1.96 "
        "(a standard error: calibrated when it matches the std over sets).",
        "",
        f"| noise | samples | model | {m} mean +- std (min..max) | jackknife se | bootstrap se | "
        "KID x1e3 mean +- std | jackknife se | bootstrap se |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {(r["noise"], r["count"], r["model"], r["method"]): r for r in result["rows"]}
    for (noise, count, model, method), r in rows.items():
        if method != "jackknife" or model == "ratio":
            continue
        b = rows[(noise, count, model, "bootstrap")]
        fd, kid = r["fd"], r["kid"]
        lines.append(
            f"| {noise} | {count} | {model} | {fd['mean']:.1f} +- {fd['std']:.1f} "
            f"({fd['min']:.1f}..{fd['max']:.1f}) "
            f"| {r['fd_half']['mean'] / z:.1f} | {b['fd_half']['mean'] / z:.1f} "
            f"| {1e3 * kid['mean']:.1f} +- {1e3 * kid['std']:.1f} | {1e3 * r['kid_half']['mean'] / z:.1f} "
            f"| {1e3 * b['kid_half']['mean'] / z:.1f} |"
        )
    lines += [
        "",
        f"| noise | samples | {m} ratio finetuned / dense: mean +- std (min..max) | jackknife se | "
        f"bootstrap se | gate <= {result['limit']:g} per set (jackknife) | difference decided (sets) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (noise, count, model, method), r in rows.items():
        if model != "ratio" or method != "jackknife":
            continue
        b = rows[(noise, count, model, "bootstrap")]
        ratio = r["ratio"]
        lines.append(
            f"| {noise} | {count} | {ratio['mean']:.3f} +- {ratio['std']:.3f} ({ratio['min']:.3f}.."
            f"{ratio['max']:.3f}) | {r['ratio_half']['mean'] / z:.3f} | {b['ratio_half']['mean'] / z:.3f} "
            f"| {', '.join(r['gate'])} | {sum(r['diff_decided'])} of {len(r['diff_decided'])} |"
        )
    if result["own_seeds"]:
        lines += ["", "Dense model on the quality stage's own seeds (0..N-1):"]
        for kind, fig in result["own_seeds"].items():
            ci = fig[f"{m}_ci"]
            lines.append(f"- {kind} noise: {m} {fig[m]:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
