"""Every chart lives in pipeline/plots.py; the sweeps' charts draw from their summary rows."""

from __future__ import annotations

from pathlib import Path

from pipeline.plots import plot_ablation, plot_distill_sweep

ROOT = Path(__file__).resolve().parent.parent


def test_matplotlib_is_imported_by_the_charts_module_only():
    packages = ("compressor", "rundir", "pipeline", "deploy", "export")
    sources = [p for d in packages for p in (ROOT / d).rglob("*.py")]
    drawing = [str(p.relative_to(ROOT)) for p in sources if "import matplotlib" in p.read_text()]
    assert drawing == ["pipeline/plots.py"]


def test_the_sweeps_charts_draw_their_rows(tmp_path):
    rows = [
        {"variant": name, "frechet_metric": "fd_digits", "fd_after_pruning_mean": fp,
         "fd_after_pruning_std": 1.0, "fd_after_finetune_mean": ff, "fd_after_finetune_std": 0.5,
         "ssim_after_finetune_mean": s, "ssim_after_finetune_std": None}
        for name, fp, ff, s in (("diff-pruning", 80.0, 14.0, 0.94), ("magnitude", 120.0, 16.0, None))
    ]  # fmt: skip
    plot_ablation(rows, tmp_path / "ablation.png")
    sweep = [
        {"ratio": 0.56, "mode": mode, "budget": budget, "fd_mean": fd, "fd_std": 0.4}
        for mode, budget, fd in (
            ("off", 100, 20.0),
            ("off", 300, 15.0),
            ("full", 100, 16.0),
            ("full", 300, 12.0),
        )
    ]
    plot_distill_sweep(sweep, tmp_path / "sweep.png", "fd_digits", ["off", "full"])
    assert (tmp_path / "ablation.png").stat().st_size > 10_000 and (
        tmp_path / "sweep.png"
    ).stat().st_size > 10_000
