"""How often each interval method holds the truth: coverage of the quality gates' paired figures.

    .venv/bin/python scripts/interval_coverage.py synthetic [--sets 100] [--n 1024]
    .venv/bin/python scripts/interval_coverage.py demo configs/demo.yaml --run-dir runs/demo \
        [--sets 20] [--n 1024] [--first-seed 20000] [--out FILE]

For every interval method (:data:`compressor.intervals.METHODS`) and every figure a quality
gate reads (``fd_inf_diff``: FD-infinity of compressed minus dense, ``kid_diff``: KID of
compressed minus dense; also ``fd_inf`` of the dense model), the share of disjoint seed sets
whose interval holds the truth, against the interval's level. Also printed: the mean half-width
of the intervals against the spread of the estimates over the sets (a calibrated interval's
half-width is about ``z`` times that spread).

``synthetic``: Gaussian features the width of the digits feature network (64), a "dense" and a
"compressed" generator whose samples from the same seed are correlated (as two models sampled
from the same starting noise are); the truth of the Frechet figures is in closed form, KID's is
the mean of its unbiased estimator over 50 independent draws of 4,096.

``demo``: the dense and the finetuned model of a finished run, sampled with the quality stage's
sampler on ``--sets`` disjoint sets of ``--n`` seeds from ``--first-seed`` (cached in
``RUN/analysis/coverage/``). There is no closed form, so each set's truth is the figure of all the
*other* sets pooled (leave-one-set-out: FD-infinity of the pooled features, the mean of the other
sets' KID differences); that truth carries noise of about 1/sqrt(sets - 1) of a set's, which costs
a calibrated 95% interval about half a point of coverage. For the dense model's Frechet distance
the set whose figure is farthest from the others is examined: the influence of each image (its
jackknife pseudo-value) and the figure with its most influential images left out.

The default method (``quality.interval_method``) is the one whose coverage is closest to its level
without falling below it by more than 2 points (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compressor.fd_infinity import FdInfScorer, extrapolate, nested_masks, nested_sizes  # noqa: E402
from compressor.intervals import (  # noqa: E402
    METHODS,
    ModelScore,
    RealStats,
    Resampling,
    Scorer,
    frechet_from_stats,
    frechet_replicates,
    kid_replicates,
)

FIGURES = ("fd_inf_diff", "kid_diff", "fd_inf")
D = 64
KID_DRAWS = 50  # KID's synthetic truth: its error is about 1/14 of a 1,024-seed set's spread


def score(scorer: Scorer, features: torch.Tensor) -> ModelScore:
    """``Scorer.score`` without its library KID (a torchmetrics subset average, the slow part):
    the unbiased KID over all pairs, which the replicates resample."""
    x = features.double()
    ones = torch.ones(1, x.shape[0], dtype=torch.float64)
    counts = scorer.boot.counts(x.shape[0])
    scaled = x / scorer.kid_scale
    return ModelScore(
        features=x,
        fd=float(frechet_replicates(scorer.stats, x, ones)[0]),
        kid=float(kid_replicates(scorer.kid_real, scaled, ones)[0]),
        kid_std=0.0,
        fd_reps=frechet_replicates(scorer.stats, x, counts),
        kid_reps=kid_replicates(scorer.kid_real, scaled, counts),
    )


def figures(scorer: Scorer, fd_inf: FdInfScorer, dense: torch.Tensor, compressed: torch.Tensor) -> dict:
    """The gate figures of one seed set (features in seed order) with their intervals."""
    d, c = score(scorer, dense), score(scorer, compressed)
    fd, fc = fd_inf.score(d.features), fd_inf.score(c.features)
    out = scorer.figures(c, "fd", d)
    out.update(fd_inf.figures(fc, fd))
    out["fd_inf"], out["fd_inf_ci"] = fd_inf.figures(fd)["fd_inf"], fd_inf.figures(fd)["fd_inf_ci"]
    out["fd_dense"] = d.fd
    return out


def coverage(per_set: list[dict], truths: list[dict], level: float) -> dict:
    """Per figure: the share of sets whose interval holds its truth, the mean half-width and the
    spread of the estimates."""
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    out = {}
    for key in FIGURES:
        cis = [f[f"{key}_ci"] for f in per_set]
        hits = [ci[0] <= t[key] <= ci[1] for ci, t in zip(cis, truths, strict=True)]
        halves = [(f[f"{key}_ci"][1] - f[f"{key}_ci"][0]) / 2 for f in per_set]
        values = [f[key] for f in per_set]
        spread = statistics.stdev(values)
        out[key] = {
            "coverage": sum(hits) / len(hits),
            "hits": sum(hits),
            "sets": len(hits),
            "mean_half_width": statistics.fmean(halves),
            "spread": spread,
            "half_width_over_z_spread": statistics.fmean(halves) / (z * spread) if spread else None,
            "missed": [k for k, h in enumerate(hits) if not h],
        }
    return out


def choose(table: dict, level: float) -> str:
    """The method whose coverage of the gates' figures (the worst of fd_inf_diff and kid_diff) is
    closest to ``level`` without falling more than 2 points below it (else the highest)."""
    worst = {m: min(table[m][k]["coverage"] for k in ("fd_inf_diff", "kid_diff")) for m in table}
    fine = [m for m, c in worst.items() if c >= level - 0.02]
    if not fine:
        return max(worst, key=worst.get)
    return min(fine, key=lambda m: abs(worst[m] - level))


def render(result: dict) -> str:
    """The coverage table (Markdown)."""
    lines = [
        f"{result['case']}: {result['sets']} disjoint seed sets of {result['n']}, "
        f"{result['level']:.0%} intervals ({result['truth']})",
        "",
        "| method | figure | coverage | mean half-width | spread over sets (std) | half-width / (z x std) |",
        "|---|---|---|---|---|---|",
    ]
    for method, rows in result["table"].items():
        for key, r in rows.items():
            ratio = r["half_width_over_z_spread"]
            lines.append(
                f"| {method} | {key} | {r['hits']}/{r['sets']} ({r['coverage']:.0%}) | "
                f"{r['mean_half_width']:.4g} | {r['spread']:.4g} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |"
            )
    lines += ["", f"default by coverage: {result['default']}"]
    return "\n".join(lines)


# -- synthetic ---------------------------------------------------------------------------------------


def synthetic(sets: int, n: int, level: float, resamples: int) -> dict:
    """Coverage on Gaussian features with a known truth (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    a = torch.randn(D, D, generator=g, dtype=f64) / D**0.5
    cov_r = a @ a.T + 0.1 * torch.eye(D, dtype=f64)
    chol_r = torch.linalg.cholesky(cov_r)
    reference = torch.randn(1797, D, generator=g, dtype=f64) @ chol_r.T
    mu_d = 0.10 * torch.randn(D, generator=g, dtype=f64)
    mu_c = mu_d + 0.06 * torch.randn(D, generator=g, dtype=f64)
    scale_d, scale_c, rho = 1.03, 1.07, 0.8  # same seed -> correlated features, as from the same noise

    def draw(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gg = torch.Generator().manual_seed(10_000 + seed)
        z = torch.randn(m, D, generator=gg, dtype=f64)
        w = torch.randn(m, D, generator=gg, dtype=f64)
        dense = mu_d + scale_d * z @ chol_r.T
        compressed = mu_c + scale_c * (rho * z + (1 - rho**2) ** 0.5 * w) @ chol_r.T
        return dense, compressed

    probe = Scorer(reference, lambda x: x, Resampling(level, resamples, 0), kid_scale="auto")
    real = probe.stats
    fd_d = frechet_from_stats(real.mu, real.cov, mu_d, scale_d**2 * cov_r)
    fd_c = frechet_from_stats(real.mu, real.cov, mu_c, scale_c**2 * cov_r)
    kid_diffs = []
    for k in range(KID_DRAWS):  # KID's truth: the mean of its unbiased estimator over large draws
        dense, compressed = draw(4096, 1_000_000 + k)
        ones = torch.ones(1, 4096, dtype=f64)
        kd = kid_replicates(probe.kid_real, dense / probe.kid_scale, ones)
        kc = kid_replicates(probe.kid_real, compressed / probe.kid_scale, ones)
        kid_diffs.append(float(kc - kd))
    truth = {"fd_inf_diff": fd_c - fd_d, "kid_diff": statistics.fmean(kid_diffs), "fd_inf": fd_d}
    table = {}
    per_method = {}
    for method in METHODS:
        per_set = []
        for s in range(sets):
            boot = Resampling(level, resamples, s, method)
            scorer = Scorer(reference, lambda x: x, boot, kid_scale="auto")
            per_set.append(figures(scorer, FdInfScorer(scorer.stats, boot), *draw(n, s)))
        table[method] = coverage(per_set, [truth] * sets, level)
        per_method[method] = per_set
    return {
        "case": "synthetic Gaussian features (d=64), paired generators",
        "sets": sets,
        "n": n,
        "level": level,
        "truth": f"closed form: fd_inf_diff {truth['fd_inf_diff']:.4g}, fd_inf (dense) {fd_d:.4g}; "
        f"kid_diff {truth['kid_diff']:.4g} (mean of {KID_DRAWS} draws of 4,096)",
        "truths": truth,
        "table": table,
        "default": choose(table, level),
    }


# -- the demo's models --------------------------------------------------------------------------------


def demo(
    config: str, run_dir: Path, sets: int, n: int, first_seed: int, level: float, resamples: int
) -> dict:
    """Coverage over disjoint seed sets of a finished run's dense and finetuned models."""
    from quality_spread import sample

    from compressor.config import load_config
    from compressor.data import stack
    from compressor.image_quality import feature_extractor
    from compressor.persist import load_unet
    from pipeline.context import RunContext
    from rundir import layout

    cfg = load_config(config, [])
    ctx = RunContext(cfg, run_dir)
    feature, _ = ctx.frechet_features()
    extract = feature_extractor(feature)
    reference = (stack(ctx.dataset, cfg.quality.num_reference) + 1) / 2
    models = {"dense": ctx.dense_on(), "finetuned": load_unet(layout.model_dir(run_dir, "finetune"))[0]}
    folder = layout.stage_dir(run_dir, "analysis") / "coverage"
    feats: dict = {}
    began = time.perf_counter()
    for k in range(sets):
        seeds = list(range(first_seed + k * n, first_seed + (k + 1) * n))
        for label, unet in models.items():
            images = sample(ctx, unet, seeds, "numpy", folder / f"{label}-set{k}-{n}.npy")
            feats[(label, k)] = extract(images).double()
        print(f"set {k + 1}/{sets} sampled ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    ref_feats = extract(reference).double()
    real = RealStats.of(ref_feats)
    table, per_method = {}, {}
    for method in METHODS:
        per_set = []
        for k in range(sets):
            boot = Resampling(level, resamples, k, method)
            scorer = Scorer(ref_feats, lambda x: x, boot, kid_scale="auto")
            per_set.append(figures(scorer, FdInfScorer(scorer.stats, boot), feats[("dense", k)],
                                   feats[("finetuned", k)]))  # fmt: skip
        per_method[method] = per_set
    truths = []
    for k in range(sets):  # leave-one-set-out: the other sets pooled
        others = [j for j in range(sets) if j != k]
        pooled = {label: torch.cat([feats[(label, j)] for j in others]) for label in models}
        m = pooled["dense"].shape[0]
        masks = nested_masks(m, 0, nested_sizes(m, D))
        inf = {label: extrapolate(real, pooled[label], masks, None)[0] for label in models}
        kid = statistics.fmean(per_method[METHODS[0]][j]["kid_diff"] for j in others)
        diff = inf["finetuned"] - inf["dense"]
        truths.append({"fd_inf_diff": diff, "kid_diff": kid, "fd_inf": inf["dense"]})
    for method in METHODS:
        table[method] = coverage(per_method[method], truths, level)
    fd_dense = [f["fd_dense"] for f in per_method[METHODS[0]]]
    odd = max(range(sets), key=lambda k: abs(fd_dense[k] - statistics.median(fd_dense)))
    steps = cfg.quality.steps or cfg.sample.steps
    return {
        "case": f"demo models ({run_dir}), {cfg.sample.scheduler} {steps} steps",
        "sets": sets,
        "n": n,
        "level": level,
        "first_seed": first_seed,
        "truth": "leave-one-set-out: the other sets pooled",
        "per_set": [
            {
                "seeds": [first_seed + k * n, first_seed + (k + 1) * n - 1],
                "fd_dense": fd_dense[k],
                **{key: per_method[METHODS[0]][k][key] for key in FIGURES},
                "truth": truths[k],
            }
            for k in range(sets)
        ],  # fmt: skip
        "outlier": influence(real, feats[("dense", odd)], odd, first_seed + odd * n, fd_dense),
        "table": table,
        "default": choose(table, level),
    }


def influence(real: RealStats, x: torch.Tensor, k: int, first: int, fd_dense: list[float]) -> dict:
    """Why one set's dense Frechet distance stands out: each image's jackknife influence on it,
    and the figure with the most influential images left out."""
    n = x.shape[0]
    value = float(frechet_replicates(real, x, torch.ones(1, n, dtype=torch.float64))[0])
    loo = frechet_replicates(real, x, 1.0 - torch.eye(n, dtype=torch.float64))
    pseudo = n * value - (n - 1) * loo  # each image's contribution (its pseudo-value)
    order = torch.argsort(pseudo, descending=True)
    without = {}
    for drop in (1, 5, 10, 20):
        keep = torch.ones(1, n, dtype=torch.float64)
        keep[0, order[:drop]] = 0
        without[drop] = float(frechet_replicates(real, x, keep)[0])
    return {
        "set": k,
        "seeds": [first, first + n - 1],
        "fd_dense": value,
        "other_sets_median": statistics.median(fd_dense[:k] + fd_dense[k + 1 :]),
        "top_images": [{"seed": first + int(i), "pseudo_value": float(pseudo[i])} for i in order[:10]],
        "pseudo_value_median": float(pseudo.median()),
        "without_top": without,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=["synthetic", "demo"], help="which coverage study")
    parser.add_argument("config", nargs="?", help="demo: the run's config (default: configs/demo.yaml)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="demo: a finished run")
    parser.add_argument("--sets", type=int, default=None, help="disjoint seed sets (synthetic 100, demo 20)")
    parser.add_argument("--n", type=int, default=1024, help="seeds per set (default: 1024)")
    parser.add_argument("--first-seed", type=int, default=20000, help="demo: the first set's first seed")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default: 0.95)")
    parser.add_argument("--resamples", type=int, default=1000, help="replicates per interval (default: 1000)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.case == "synthetic":
        result = synthetic(args.sets or 100, args.n, args.level, args.resamples)
    else:
        result = demo(args.config or "configs/demo.yaml", args.run_dir, args.sets or 20, args.n,
                      args.first_seed, args.level, args.resamples)  # fmt: skip
    print(render(result))
    if "outlier" in result:
        print(json.dumps(result["outlier"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
