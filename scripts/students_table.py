"""The few-step students' table: the same frontier grid measured with several training seeds.

    python scripts/students_table.py runs/demo-frontier runs/students-s1 runs/students-s2 \
        [--b16 frontier-b16.json] [--b1 frontier-b1.json] [--out docs-table.md]

Each folder is a ``compress-deploy frontier`` output measured with one ``seed=`` (pruning, finetune
and distillation seeds; the sampled noise is the same for every seed), with its ``frontier.json``
copied to ``--b16`` after a ``--batch 16`` run and, where batch 1 was timed, to ``--b1`` after a
``--batch 1`` run (the second run only times: everything else is cached). Latency does not depend
on the seed (the same widths), so batch 1 may be timed on the first folder alone. Prints one row
per stack: what it cost to train, its speed-up over dense DDIM at batch 16 and 1, and per seed its
Frechet distance, the ratio to the dense reference's and SSIM against the reference's images, each
with its paired 95% interval, then the mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _load(folder: Path, name: str, required: bool = True) -> dict | None:
    path = folder / name
    if not path.is_file():
        if not required:
            return None
        sys.exit(f"{path} not found: run the frontier with that batch and copy its frontier.json there")
    return json.loads(path.read_text())


def _ci(value: float, ci: list | None, digits: int = 1) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{value:.{digits}f}"


def _spread(values: list[float], digits: int = 2) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def table(folders: list[Path], b16: str, b1: str) -> str:
    """The Markdown table over ``folders`` (one per seed)."""
    runs = [(_load(f, b16), _load(f, b1, required=i == 0)) for i, f in enumerate(folders)]
    first = runs[0][0]
    metric = first["metric"]
    ref = first["reference"]
    lines = [
        f"Reference: dense {ref['stack']['scheduler'].upper()} {ref['stack']['steps']}, {metric} "
        f"{_ci(ref['fd'], ref.get('fd_ci'))} ({first['samples']} samples, {first['backend']}).",
        "",
        "| stack | training (s, optimizer steps; seed 0) | speed-up b16 (mean +- sd over seeds) | "
        "speed-up b1 | "
        f"{metric} per seed | {metric} mean +- sd | ratio per seed (95%) | ratio upper bound, max over seeds "
        "| SSIM vs dense DDIM 50 (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = [p["key"] for p in sorted(first["points"], key=lambda p: -p["speedup"])]
    for key in keys:
        rows = [
            ({p["key"]: p for p in a["points"]}[key], {p["key"]: p for p in b["points"]}[key] if b else None)
            for a, b in runs
        ]
        p16, _ = rows[0]
        cost = p16.get("student_training")
        trained = f"{cost['wall_s']:.0f} s, {cost['optimizer_steps']}" if cost else "-"
        fds = [r[0]["fd"] for r in rows]
        ratios = [r[0]["fd_ratio"] for r in rows]
        uppers = [r[0]["fd_ratio_ci"][1] for r in rows]
        lines.append(
            f"| {p16['label']} | {trained} | {_spread([r[0]['speedup'] for r in rows])}x | "
            f"{_spread([r[1]['speedup'] for r in rows if r[1]])}x | "
            f"{'; '.join(_ci(r[0]['fd'], r[0]['fd_ci']) for r in rows)} | {_spread(fds, 1)} | "
            f"{'; '.join(_ci(r[0]['fd_ratio'], r[0]['fd_ratio_ci'], 2) for r in rows)} | "
            f"{max(uppers):.2f} (point {_spread(ratios)}) | {_ci(p16['ssim'], p16.get('ssim_ci'), 3)} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--b16", default="frontier-b16.json")
    parser.add_argument("--b1", default="frontier-b1.json")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table(args.folders, args.b16, args.b1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
