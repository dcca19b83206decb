"""The method ablation: prune + equal finetune budget + quality per method, over seeds.

A sweep over :mod:`pipeline.sweep.engine`: its settings are the variants (each diff-pruning threshold
and baseline method, under each GroupNorm channel-selection rule asked for) and a control, the dense
model finetuned with the same recipe and budget, which separates what pruning costs from what the
finetune recipe itself moves. Each variant runs the ``prune``, ``finetune`` and ``quality`` stages
(``prune`` and ``quality`` only without finetuning) in ``RUN/ablation/<variant>/seed-<k>/``; each
seed is a different Taylor batch (and noise). The diff-pruning variant with the smallest threshold
also records the per-timestep diagnostic. Writes ``RUN/ablation/summary.{json,md,png}`` and
``diagnostics.png``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from compressor.channels import channel_overlap
from compressor.config import load_config, prune_target_overrides
from compressor.digest import mean_std
from compressor.progress import log
from pipeline.plots import plot_ablation, plot_taylor_diagnostics
from pipeline.sweep.engine import Sweep, document, spread, table, write_summary
from rundir import layout
from rundir.records import QualityMetrics, read_metrics

STAGES = ("prune", "finetune", "quality")
BASELINES = ("taylor", "magnitude", "random", "reinit")
SELECTIONS = ("shared", "independent")
CONTROL = "control: dense finetuned"


@dataclass(frozen=True)
class MethodAblation:
    """What ``compress-deploy ablate`` compares (its flags, parsed and checked)."""

    config: Path
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    thresholds: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)
    methods: tuple[str, ...] = BASELINES
    selections: tuple[str, ...] = ()  # none: the config's rule, names without a bracket
    finetune: bool = True  # False: measure right after pruning only (and no control)
    run_dir: Path | None = None  # the run whose ablation/ folder holds the variants
    only: frozenset[str] | None = None  # run only these variants; others are summarised if finished


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


def sweep_of(what: MethodAblation, name: str) -> Sweep:
    """The engine's description of the ablation (``name``: the run config's): every variant at every
    seed, in ``RUN/ablation/``."""
    return Sweep(
        config=what.config,
        overrides=tuple(what.overrides),
        root=layout.ablation_dir(what.run_dir or Path("runs") / name),
        settings=variants(list(what.thresholds), list(what.methods), list(what.selections), what.finetune),
        seeds=tuple(what.seeds),
        stages=STAGES if what.finetune else ("prune", "quality"),
        suffix="-ablation",
    )


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
            row.update(spread(values, key, keep=key))
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
    lines = []
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
        lines.append([t, f"{ratio[0]:.3f} ± {ratio[1]:.3f}", f"{norm[0]:.4g} ± {norm[1]:.2g}",
                      f"{cos[0]:.3f} ± {cos[1]:.3f}"])  # fmt: skip
    head = ["t", "L_t / L_max", "gradient norm", "half-batch gradient cosine"]
    return "## Per-timestep diagnostic (mean over seeds)\n\n" + table(head, lines) + "\n"


def _pm(row: dict, key: str, digits: int = 3) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(
    rows: list[dict], finetune_steps: int, overlap: list[dict] | None = None, diags: list[dict] | None = None
) -> str:
    """The summary tables a person reads (``summary.md``)."""
    metric = rows[0]["frechet_metric"]
    dense = "unavailable" if rows[0]["fd_dense"] is None else f"{rows[0]['fd_dense']:.3f}"
    head = ["variant", "params", "MACs kept", "timesteps kept (last t)", "loss after pruning",
            "SSIM after pruning", f"{metric} after pruning", "SSIM after finetune",
            f"{metric} after finetune", "vs control"]  # fmt: skip
    main = []
    for r in rows:
        kept = (
            f"{statistics.fmean(r['timesteps_kept']):.0f} ({r['last_timestep'][0]})"
            if r["timesteps_kept"][0]
            else "-"
        )
        vs = f"{r['fd_vs_control']:.2f}x" if r.get("fd_vs_control") else "-"
        main.append([r["variant"], f"{r['params'] / 1e6:.3f}M", f"{r['macs_kept']:.3f}", kept,
                     _pm(r, "loss_after_pruning", 4), _pm(r, "ssim_after_pruning"),
                     _pm(r, "fd_after_pruning", 1), _pm(r, "ssim_after_finetune"),
                     _pm(r, "fd_after_finetune", 2), vs])  # fmt: skip
    seeds = max(len(r["fd_after_pruning"]) for r in rows)
    pruned = [r for r in rows if r["variant"] != CONTROL]
    per_seed = []
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
        per_seed.append([r["variant"], *cells])
    blocks = [
        f"Frechet distance: `{metric}`; dense model: {dense}.",
        table(head, main),
        f"## {metric} right after pruning, per seed (lowest of each selection rule in bold)",
        table(["variant", *(f"seed #{k}" for k in range(seeds))], per_seed),
    ]
    if overlap:
        blocks += [
            "## Overlap of kept channels (Jaccard, mean over layer groups; mean ± std over seeds)",
            table(["selection", "variant", "vs", "overlap"],
                  [[o["selection"], o["a"], o["b"], f"{o['mean']:.3f} ± {o['std']:.3f}"] for o in overlap]),
        ]  # fmt: skip
    if diags:
        blocks.append(diagnostic_table(diags))
    title = f"Ablation ({rows[0]['seeds']} seeds, mean ± std; {finetune_steps} finetune steps each)"
    return document(title, *blocks)


def run(what: MethodAblation) -> int:
    """Run (or reuse) every variant at every seed and write the summary; returns the exit code."""
    cfg = load_config(what.config, list(what.overrides))  # validate before any work
    sweep = sweep_of(what, cfg.name)
    results: dict[str, list[dict]] = {}
    for name in sweep.settings:
        cells = sweep.cells(name)
        if what.only is not None and name not in what.only:
            if all(sweep.finished(cell) for cell in cells):
                results[name] = [load_variant(cell.folder) for cell in cells]
            continue
        for cell in cells:
            log("ablate", f"{name}, seed {cell.seed}")
            sweep.run(cell)
            results.setdefault(name, []).append(load_variant(cell.folder))
    rows = summarize(results)
    overlap = overlaps(results)
    diags = diagnostics(results)
    charts = {"summary.png": lambda path: plot_ablation(rows, path)}
    if diags:  # every seed's diagnostic, with each threshold's cut
        cuts = {r["threshold"]: r["last_timestep"][0] for r in rows if r["method"] == "diff-pruning"}
        series = [(f"seed #{d['seed_index']}", d["rows"]) for d in diags]
        charts["diagnostics.png"] = lambda path: plot_taylor_diagnostics(series, cuts, path)
    summary = markdown(rows, cfg.finetune.steps if what.finetune else 0, overlap, diags)
    write_summary(sweep.root, {"variants": rows, "overlap": overlap, "diagnostics": diags}, summary, charts)
    return 0
