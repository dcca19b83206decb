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
budgets, per kept-MACs ratio and seed): see :mod:`pipeline.distill_sweep`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from compressor import runlayout
from compressor.artifacts import write_json
from compressor.config import RunConfig, load_config, prune_target_overrides
from compressor.digest import mean_std
from compressor.errors import UserError
from compressor.progress import log
from compressor.records import QualityMetrics, read_metrics
from pipeline.commands.args import CommandParser, config_args
from pipeline.plots import plot_ablation
from pipeline.runner import run_pipeline

STAGES = ["prune", "finetune", "quality"]
BASELINES = ("taylor", "magnitude", "random", "reinit")
SELECTIONS = ("shared", "independent")
CONTROL = "control: dense finetuned"


def variants(
    thresholds: list[float], methods: list[str], selections: list[str] | None = None, control: bool = True
) -> dict[str, list[str]]:
    """Variant name -> overrides. The control keeps every channel (ratio 0).

    With several ``selections`` every name carries its rule in brackets; one
    selection leaves names (and run folders) as they were.
    """
    selections = selections or []
    out: dict[str, list[str]] = {}
    for k, sel in enumerate(selections or [None]):
        tag = f" [{sel}]" if len(selections) > 1 else ""
        pick = [f"prune.group_selection={sel}"] if sel else []
        for i, t in enumerate(sorted(thresholds)):
            diag = ["prune.diagnose=true"] if i == 0 and k == 0 else []  # the Taylor pass is per seed
            out[f"diff-pruning T={t:g}{tag}"] = [
                "prune.method=diff-pruning",
                f"prune.threshold={t}",
                *pick,
                *diag,
            ]
        for m in methods:
            out[f"{m}{tag}"] = [f"prune.method={m}", *pick]
    if control:
        out[CONTROL] = prune_target_overrides(ratio=0.0)
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "-" for c in name).strip("-").replace("--", "-")


def finished(run_dir: Path, stages: list[str]) -> bool:
    """Whether every stage in ``stages`` has completed (and quality saw the finetune)."""
    if not all(read_metrics(run_dir, s) is not None for s in stages):
        return False
    if "finetune" in stages:
        return "finetuned" in read_metrics(run_dir, "quality").models
    return True


def run_variant(
    base: Path, overrides: list[str], config: Path, extra: list[str], seed: int, stages: list[str] = STAGES
) -> dict:
    """Run (or reuse) one variant at one seed; returns the records it has."""
    run_dir = base / f"seed-{seed}"
    if not finished(run_dir, stages):
        cfg = load_config(config, [*extra, *overrides, f"seed={seed}"])
        cfg.name = f"{cfg.name}-ablation"
        run_pipeline(cfg, run_dir, stages)
    return load_variant(run_dir)


def load_variant(run_dir: Path) -> dict:
    """The typed metrics a variant's run directory holds (prune and quality at least)."""
    found = {s: read_metrics(run_dir, s) for s in STAGES}
    return {s: m for s, m in found.items() if m is not None}


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: means and spreads over seeds."""
    rows = []
    for name, runs in results.items():
        prune = [r["prune"] for r in runs]
        quality = [r["quality"] for r in runs]
        metric = quality[0].frechet_metric
        row = {
            "variant": name,
            "method": prune[0].method,
            "threshold": prune[0].threshold,
            "selection": prune[0].group_selection,
            "seeds": len(runs),
            "params": prune[0].params_after,
            "macs": prune[0].macs_after,
            "macs_kept": prune[0].macs_kept,
            "timesteps_kept": [len(p.timesteps_used) for p in prune],
            "last_timestep": [p.timesteps_used[-1] if p.timesteps_used else None for p in prune],
            "frechet_metric": metric,
            "fd_dense": quality[0].frechet("dense"),
        }

        def model(q: QualityMetrics, label: str) -> dict:
            return q.models.get(label, {})

        stats = {
            "loss_after_pruning": [p.loss_after_pruning for p in prune],
            "ssim_after_pruning": [model(q, "pruned").get("ssim_vs_dense") for q in quality],
            "fd_after_pruning": [model(q, "pruned").get(metric) for q in quality],
            "ssim_after_finetune": [model(q, "finetuned").get("ssim_vs_dense") for q in quality],
            "fd_after_finetune": [model(q, "finetuned").get(metric) for q in quality],
            "fd_raw_after_finetune": [model(q, "finetuned (raw)").get(metric) for q in quality],
        }
        for key, values in stats.items():
            row[key] = values
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        rows.append(row)
    control = next((r for r in rows if r["variant"].startswith("control")), None)
    for r in rows:
        if control and control["fd_after_finetune_mean"] and r["fd_after_finetune_mean"] is not None:
            r["fd_vs_control"] = r["fd_after_finetune_mean"] / control["fd_after_finetune_mean"]
    return rows


def overlaps(results: dict[str, list[dict]]) -> list[dict]:
    """Jaccard overlap of kept channels between variants of one selection rule, per seed.

    Pairs: every diff-pruning variant against each baseline, and magnitude against
    random (the overlap that chance alone gives at this pruning ratio).
    """
    from compressor.channels import channel_overlap

    by_sel: dict[str, dict[str, list[dict]]] = {}
    for name, runs in results.items():
        if name == CONTROL or not runs:
            continue
        sel = runs[0]["prune"].group_selection
        by_sel.setdefault(sel, {})[name] = runs
    rows = []
    for sel, group in by_sel.items():
        method = {n: runs[0]["prune"].method for n, runs in group.items()}
        ours = [n for n in group if method[n] == "diff-pruning"]
        pairs = [(a, b) for a in ours for b in group if method[b] in ("taylor", "magnitude", "random")]
        pairs += [(a, b) for a in group for b in group if method[a] == "magnitude" and method[b] == "random"]
        for a, b in pairs:
            values = []
            for ra, rb in zip(group[a], group[b], strict=False):
                ka, kb = ra["prune"].kept_channels, rb["prune"].kept_channels
                if ka and kb:
                    values.append(channel_overlap(ka, kb)["mean"])
            if values:
                mean, std = mean_std(values)
                rows.append({"selection": sel, "a": a, "b": b, "jaccard": values, "mean": mean, "std": std})
    return rows


def diagnostics(results: dict[str, list[dict]]) -> list[dict]:
    """Per-timestep diagnostic rows of each seed (from the variants that recorded one)."""
    out = []
    for name, runs in results.items():
        for k, r in enumerate(runs):
            rows = r["prune"].diagnostics
            if rows:
                out.append({"variant": name, "seed_index": k, "rows": rows})
    return out


def diagnostic_table(diags: list[dict], points: tuple[int, ...] = (0, 50, 100, 250, 500, 750, 995)) -> str:
    """Mean over seeds of L_t/L_max, gradient norm and half-batch cosine at a few timesteps."""
    if not diags:
        return ""
    lines = [
        "## Per-timestep diagnostic (mean over seeds)",
        "",
        "| t | L_t / L_max | gradient norm | half-batch gradient cosine |",
        "|---|---|---|---|",
    ]
    shown = set()
    for target in points:
        picked = [min(d["rows"], key=lambda row, tt=target: abs(row["t"] - tt)) for d in diags]
        t = picked[0]["t"]
        if t in shown:
            continue
        shown.add(t)
        ratio = mean_std([p["loss_ratio"] for p in picked])
        norm = mean_std([p["grad_norm"] for p in picked])
        cos = mean_std([p["half_cosine"] for p in picked])
        lines.append(
            f"| {t} | {ratio[0]:.3f} ± {ratio[1]:.3f} | {norm[0]:.4g} ± {norm[1]:.2g} | "
            f"{cos[0]:.3f} ± {cos[1]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_diagnostics(diags: list[dict], rows: list[dict], path: Path) -> None:
    """The per-timestep diagnostic of every seed, with each threshold's cut."""
    from pipeline.plots import plot_taylor_diagnostics

    cuts = {r["threshold"]: r["last_timestep"][0] for r in rows if r["method"] == "diff-pruning"}
    plot_taylor_diagnostics([(f"seed #{d['seed_index']}", d["rows"]) for d in diags], cuts, path)


def _pm(row: dict, key: str, digits: int = 3) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(
    rows: list[dict], finetune_steps: int, overlap: list[dict] | None = None, diags: list[dict] | None = None
) -> str:
    """The summary tables a person reads."""
    metric = rows[0]["frechet_metric"]
    lines = [
        f"# Ablation ({rows[0]['seeds']} seeds, mean ± std; {finetune_steps} finetune steps each)",
        "",
        f"Frechet distance: `{metric}`; dense model: "
        + ("unavailable" if rows[0]["fd_dense"] is None else f"{rows[0]['fd_dense']:.3f}")
        + ".",
        "",
        "| variant | params | MACs kept | timesteps kept (last t) | loss after pruning | "
        f"SSIM after pruning | {metric} after pruning | SSIM after finetune | "
        f"{metric} after finetune | vs control |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = (
            f"{statistics.fmean(r['timesteps_kept']):.0f} ({r['last_timestep'][0]})"
            if r["timesteps_kept"][0]
            else "-"
        )
        vs = f"{r['fd_vs_control']:.2f}x" if r.get("fd_vs_control") else "-"
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.3f}M | {r['macs_kept']:.3f} | {kept} | "
            f"{_pm(r, 'loss_after_pruning', 4)} | {_pm(r, 'ssim_after_pruning')} | "
            f"{_pm(r, 'fd_after_pruning', 1)} | "
            f"{_pm(r, 'ssim_after_finetune')} | {_pm(r, 'fd_after_finetune', 2)} | {vs} |"
        )
    seeds = max(len(r["fd_after_pruning"]) for r in rows)
    lines += [
        "",
        f"## {metric} right after pruning, per seed (lowest of each selection rule in bold)",
        "",
        "| variant | " + " | ".join(f"seed #{k}" for k in range(seeds)) + " |",
        "|---|" + "---|" * seeds,
    ]
    pruned = [r for r in rows if r["variant"] != CONTROL]
    for r in pruned:
        cells = []
        for k, v in enumerate(r["fd_after_pruning"]):
            rivals = [
                o["fd_after_pruning"][k]
                for o in pruned
                if o["selection"] == r["selection"] and k < len(o["fd_after_pruning"])
            ]
            best = v is not None and v == min(x for x in rivals if x is not None)  # v itself is a rival
            cells.append("-" if v is None else (f"**{v:.1f}**" if best else f"{v:.1f}"))
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if overlap:
        lines += [
            "",
            "## Overlap of kept channels (Jaccard, mean over layer groups; mean ± std over seeds)",
            "",
            "| selection | variant | vs | overlap |",
            "|---|---|---|---|",
        ]
        for o in overlap:
            lines.append(f"| {o['selection']} | {o['a']} | {o['b']} | {o['mean']:.3f} ± {o['std']:.3f} |")
    if diags:
        lines += ["", diagnostic_table(diags)]
    return "\n".join(lines) + "\n"


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
        from pipeline import distill_sweep

        if args.ratios is None:
            target = load_config(args.config, args.overrides).prune.target_macs
            args.ratios = ",".join(f"{r:g}" for r in dict.fromkeys([target or 0.57, 0.3]))
        return distill_sweep.run(args, args.overrides)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
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
    cfg: RunConfig = load_config(args.config, args.overrides)  # validate before any work
    root = runlayout.ablation_dir(args.run_dir or Path("runs") / cfg.name)
    stages = ["prune", "quality"] if args.no_finetune else STAGES
    results: dict[str, list[dict]] = {}
    only = {v.strip() for v in args.only.split(",")} if args.only else None
    table = variants(thresholds, methods, selections, control=not args.no_finetune)
    for name, overrides in table.items():
        base = root / _slug(name)
        if only is not None and name not in only:
            if all(read_metrics(base / f"seed-{seed}", "quality") for seed in seeds):
                results[name] = [load_variant(base / f"seed-{seed}") for seed in seeds]
            continue
        for seed in seeds:
            log("ablate", f"{name}, seed {seed}")
            rec = run_variant(base, overrides, args.config, args.overrides, seed, stages)
            results.setdefault(name, []).append(rec)
    rows = summarize(results)
    overlap = overlaps(results)
    diags = diagnostics(results)
    write_json(root / "summary.json", {"variants": rows, "overlap": overlap, "diagnostics": diags})
    text = markdown(rows, 0 if args.no_finetune else cfg.finetune.steps, overlap, diags)
    (root / "summary.md").write_text(text)
    plot_ablation(rows, root / "summary.png")
    if diags:
        plot_diagnostics(diags, rows, root / "diagnostics.png")
    print(text)
    print(f"wrote {root / 'summary.md'}, summary.json and summary.png")
    return 0
