"""The method ablation: prune + equal finetune budget + quality per method, over seeds.

    compress-deploy ablate CONFIG [key=value ...] [--seeds 0,1,2] [--thresholds 0,0.02,0.05]
                                  [--methods taylor,magnitude,random,reinit] [--run-dir DIR]

Each variant runs the ``prune``, ``finetune`` and ``quality`` stages in its own run
directory ``RUN/ablation/<variant>/seed-<k>/`` (finished variants are reused when the
command is rerun), plus a control: the dense model finetuned with the same recipe and
budget, which separates what pruning costs from what the finetune recipe itself moves.
Writes ``RUN/ablation/summary.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from compressor.config import RunConfig, load_config
from compressor.errors import UserError
from pipeline.context import log, write_json

STAGES = ["prune", "finetune", "quality"]
BASELINES = ("taylor", "magnitude", "random", "reinit")


def variants(thresholds: list[float], methods: list[str]) -> dict[str, list[str]]:
    """Variant name -> overrides. The control keeps every channel (ratio 0)."""
    out = {f"diff-pruning T={t:g}": ["prune.method=diff-pruning", f"prune.threshold={t}"] for t in thresholds}
    for m in methods:
        out[m] = [f"prune.method={m}"]
    out["control: dense finetuned"] = [
        "prune.method=magnitude",
        "prune.ratio=0.0",
        "prune.target_macs=null",
        "prune.target_params=null",
    ]
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "-" for c in name).strip("-").replace("--", "-")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_variant(base: Path, overrides: list[str], config: Path, extra: list[str], seed: int) -> dict:
    """Run (or reuse) one variant at one seed; returns the records it produced."""
    from pipeline.cli import run_pipeline

    run_dir = base / f"seed-{seed}"
    done = run_dir / "quality" / "record.json"
    if not done.is_file():
        cfg = load_config(config, [*extra, *overrides, f"seed={seed}"])
        cfg.name = f"{cfg.name}-ablation"
        run_pipeline(cfg, run_dir, STAGES)
    return {s: json.loads((run_dir / s / "record.json").read_text()) for s in STAGES}


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: means and spreads over seeds."""
    rows = []
    for name, runs in results.items():
        prune = [r["prune"]["metrics"] for r in runs]
        quality = [r["quality"]["metrics"] for r in runs]
        metric = quality[0]["frechet_metric"]
        row = {
            "variant": name,
            "seeds": len(runs),
            "params": prune[0]["params_after"],
            "macs": prune[0]["macs_after"],
            "macs_kept": prune[0]["macs_kept"],
            "timesteps_kept": [len(p["timesteps_used"]) for p in prune],
            "last_timestep": [p["timesteps_used"][-1] if p["timesteps_used"] else None for p in prune],
            "frechet_metric": metric,
            "fd_dense": quality[0]["models"]["dense"][metric],
        }
        stats = {
            "loss_after_pruning": [p["loss_after_pruning"] for p in prune],
            "ssim_after_pruning": [q["models"]["pruned"].get("ssim_vs_dense") for q in quality],
            "fd_after_pruning": [q["models"]["pruned"].get(metric) for q in quality],
            "ssim_after_finetune": [q["models"]["finetuned"].get("ssim_vs_dense") for q in quality],
            "fd_after_finetune": [q["models"]["finetuned"].get(metric) for q in quality],
            "fd_raw_after_finetune": [q["models"].get("finetuned (raw)", {}).get(metric) for q in quality],
        }
        for key, values in stats.items():
            row[key] = values
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values)
        rows.append(row)
    control = next((r for r in rows if r["variant"].startswith("control")), None)
    for r in rows:
        if control and control["fd_after_finetune_mean"] and r["fd_after_finetune_mean"] is not None:
            r["fd_vs_control"] = r["fd_after_finetune_mean"] / control["fd_after_finetune_mean"]
    return rows


def _pm(row: dict, key: str, digits: int = 3) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(rows: list[dict], finetune_steps: int) -> str:
    """The summary table a person reads."""
    metric = rows[0]["frechet_metric"]
    lines = [
        f"# Ablation ({rows[0]['seeds']} seeds, mean ± std; {finetune_steps} finetune steps each)",
        "",
        f"Frechet distance: `{metric}`; dense model: {rows[0]['fd_dense']:.3f}.",
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
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Frechet distance after pruning and after finetuning, with the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title, log_scale in (
        (axes[0], "fd_after_pruning", "right after pruning", True),
        (axes[1], "fd_after_finetune", "after finetuning", False),
        (axes[2], "ssim_after_finetune", "SSIM vs dense after finetuning", False),
    ):
        means = [r[f"{key}_mean"] or 0 for r in rows]
        stds = [r[f"{key}_std"] or 0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color="#2a7", capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title if key.startswith("ssim") else f"{rows[0]['frechet_metric']} {title}")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Entry point of ``compress-deploy ablate``."""
    parser = argparse.ArgumentParser(prog="compress-deploy ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--thresholds", default="0,0.02,0.05")
    parser.add_argument("--methods", default=",".join(BASELINES))
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument(
        "--only", help="run only these variants (comma-separated names); others are summarised if finished"
    )
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        raise UserError("--seeds and --thresholds take comma-separated numbers, e.g. --seeds 0,1,2") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in BASELINES:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(BASELINES)}")
    cfg: RunConfig = load_config(args.config, args.overrides)  # validate before any work
    root = (args.run_dir or Path("runs") / cfg.name) / "ablation"
    results: dict[str, list[dict]] = {}
    only = {v.strip() for v in args.only.split(",")} if args.only else None
    for name, overrides in variants(thresholds, methods).items():
        base = root / _slug(name)
        if only is not None and name not in only:
            if all((base / f"seed-{seed}" / "quality" / "record.json").is_file() for seed in seeds):
                results[name] = [run_variant(base, overrides, args.config, args.overrides, s) for s in seeds]
            continue
        for seed in seeds:
            log("ablate", f"{name}, seed {seed}")
            rec = run_variant(base, overrides, args.config, args.overrides, seed)
            results.setdefault(name, []).append(rec)
    rows = summarize(results)
    write_json(root / "summary.json", rows)
    text = markdown(rows, cfg.finetune.steps)
    (root / "summary.md").write_text(text)
    plot(rows, root / "summary.png")
    print(text)
    print(f"wrote {root / 'summary.md'}, summary.json and summary.png")
    return 0
