"""The run at a glance: the summary (verdict, headline, next steps with costs), the closing lines of a
run, the report's card, charts and pairs, and the page as a browser renders it.

Runs are written by hand here (records with the fields the readers need, wall times chosen so the
costs can be checked), so every test takes well under a second, the browser one aside.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from compressor.config import load_config
from pipeline import plots
from pipeline.acceptance import Check
from pipeline.context import RunContext
from pipeline.report_render import Doc
from pipeline.stages import report
from pipeline.summary import Summary, build_summary, closing_lines, duration
from rundir import layout

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
SECONDS = {
    "prune": 30.0,
    "finetune": 60.0,
    "samples": 5.0,
    "export": 6.0,
    "quality": 100.0,
    "parity": 3.0,
    "bench": 12.0,
    "check": 0.0,
    "report": 1.0,
}
INPUTS = {
    "finetune": ["prune"],
    "samples": ["prune", "finetune"],
    "export": ["prune", "finetune"],
    "quality": ["prune", "finetune", "export"],
    "parity": ["export"],
    "bench": ["prune", "finetune", "export"],
    "check": ["bench", "parity", "quality"],
    "report": ["prune", "finetune", "quality", "bench", "check"],
}
DENSE_MS, FINAL_MS = 800.0, 640.0  # the sampler at onnxruntime batch 16: 1.25x
MACS_KEPT = 0.56


def _record(run: Path, stage: str, metrics: dict) -> None:
    path = layout.record_path(run, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "stage": stage,
        "status": "ok",
        "reason": "",
        "config": {},
        "metrics": metrics,
        "seconds": SECONDS[stage],
        "cache": {"inputs": {s: "0" for s in INPUTS.get(stage, [])}},
    }
    path.write_text(json.dumps(data))


def _bench_rows() -> list[dict]:
    rows = []
    for what, dense, final in (("unet", 20.0, 15.0), ("sampler", DENSE_MS, FINAL_MS)):
        for model, ms in (("dense", dense), ("pruned", final)):
            step = {"variant": "ddim:20:1", "scheduler": "ddim", "steps": 20} if what == "sampler" else {}
            rows.append(
                {
                    "backend": "onnxruntime",
                    "batch": 16,
                    "what": what,
                    "model": model,
                    "median_ms": ms,
                    "p95_ms": ms * 1.1,
                    **step,
                }
            )
    return rows


def write_run(run: Path, fd_inf_diff_ci: tuple[float, float] = (-1.0, 6.0)) -> Path:
    """A finished run of the demo config up to bench (check and report not yet run), its final model's
    folder holding a structure file."""
    _record(
        run,
        "prune",
        {
            "method": "diff-pruning",
            "ratio": 0.25,
            "params_before": 1_000_000,
            "params_after": 560_000,
            "macs_before": 1e9,
            "macs_after": MACS_KEPT * 1e9,
            "params_kept": 0.56,
            "macs_kept": MACS_KEPT,
        },
    )
    _record(run, "finetune", {"final_loss": 0.05})
    folder = layout.model_dir(run, "finetune")
    folder.mkdir(parents=True)
    layout.structure_file(folder).write_text("{}")
    finetuned = {
        "ssim_vs_dense": 0.94,
        "ssim_vs_dense_ci": [0.93, 0.95],
        "psnr_vs_dense": 24.0,
        "fd_digits": 14.0,
        "fd_digits_ci": [8.0, 20.0],
        "kid": 0.004,
        "kid_ci": [-0.008, 0.016],
        "fd_ratio": 1.2,
        "fd_ratio_ci": [0.9, 1.5],
        "fd_inf": 7.0,
        "fd_inf_ci": [2.0, 12.0],
        "fd_inf_diff": 2.0,
        "fd_inf_diff_ci": list(fd_inf_diff_ci),
    }
    dense = {"fd_digits": 12.0, "fd_digits_ci": [6.0, 18.0], "kid": 0.001, "kid_ci": [-0.01, 0.012],
             "fd_inf": 5.0, "fd_inf_ci": [1.0, 9.0]}  # fmt: skip
    _record(
        run,
        "quality",
        {
            "models": {"dense": dense, "finetuned": finetuned},
            "num_samples": 1000,
            "num_reference": 1797,
            "steps": 50,
            "scheduler": "ddim",
            "frechet_metric": "fd_digits",
            "interval": {"level": 0.95, "resamples": 1000, "method": "jackknife"},
        },
    )
    speedups = [
        {
            "backend": "onnxruntime",
            "batch": 16,
            "what": w,
            "speedup": s,
            "macs_reduction": 1 / MACS_KEPT,
            "speedup_over_macs_reduction": s * MACS_KEPT,
        }
        for w, s in (("unet", 20 / 15), ("sampler", 1.25))
    ]
    _record(
        run,
        "bench",
        {"results": _bench_rows(), "speedup": speedups, "sampler_steps": 20, "compressed_from": "finetune"},
    )
    parity = [{"model": m, "precision": "fp32", "provider": "CPUExecutionProvider", "max_abs_error": 1e-6,
               "median_abs_error": 1e-7, "min_cosine": 1.0, "sampler_psnr_db": 120.0, "passed": True}
              for m in ("dense", "pruned")]  # fmt: skip
    _record(run, "parity", {"results": parity, "max_abs_error_fp32": 1e-6})
    _record(run, "export", {"files": {}})
    _record(run, "samples", {"rows": ["dense", "pruned", "finetuned"]})
    return run


def _cfg(*overrides: str):
    return load_config(CONFIG, list(overrides))


def test_the_summary_reads_the_acceptance_row_and_prices_more_samples_for_an_undecided_gate(tmp_path):
    run = write_run(tmp_path / "run")
    s = build_summary(run, _cfg(), "configs/demo.yaml")
    assert s.verdict == "inconclusive" and s.final == "finetuned"
    assert s.speed.value == pytest.approx(DENSE_MS / FINAL_MS) and s.speed.limit == 1.05
    assert s.speed.outcome == "pass" and "onnxruntime, batch 16" in s.speed.where
    (fd,) = [f for f in s.quality if f.name == "max_fd_increase"]
    assert (fd.value, fd.interval, fd.limit, fd.outcome) == (2.0, [-1.0, 6.0], 5.3, "inconclusive")
    (step,) = s.steps
    assert step.gate == "max_fd_increase"
    assert step.command == (
        "compress-deploy configs/demo.yaml quality.num_samples=auto quality.max_samples=4096 "
        f"--force quality --run-dir {run}"
    )
    decide_at = next(c.decide_at for c in s.checks if c.name == "max_fd_increase")
    assert step.cost.startswith(duration(100.0 * decide_at / 1000))  # quality took 100 s for 1000 samples
    assert "quality took 100 s for 1000 samples" in step.cost


def test_a_failed_speed_gate_suggests_a_smaller_macs_target_and_the_frontier_with_their_cost(tmp_path):
    run = write_run(tmp_path / "run", fd_inf_diff_ci=(-1.0, 4.0))
    s = build_summary(run, _cfg("acceptance.min_sampler_speedup=2"), "configs/demo.yaml", ["seed=1"])
    assert s.verdict == "fail" and s.speed.outcome == "fail"
    prune, frontier = [step for step in s.steps if step.gate == "min_sampler_speedup"]
    # this run's speed-up per MACs reduction (1.25x at 1/0.56), extrapolated to 2x
    kept = round(MACS_KEPT ** (math.log(2) / math.log(1.25)), 2)
    assert f"prune.target_macs={kept:g}" in prune.command and prune.command.startswith(
        "compress-deploy configs/demo.yaml seed=1 "
    )
    written = sum(v for k, v in SECONDS.items() if k not in ("check", "report"))
    assert prune.cost.startswith(duration(written))  # prune and every recorded stage after it
    assert (
        frontier.command
        == f"compress-deploy frontier configs/demo.yaml seed=1 --target 2x --out {run}/frontier"
    )


def test_a_failed_quality_gate_suggests_a_longer_finetune_priced_from_its_own_wall_time(tmp_path):
    run = write_run(tmp_path / "run", fd_inf_diff_ci=(-1.0, 4.0))
    s = build_summary(run, _cfg("acceptance.min_ssim=0.96"), "configs/demo.yaml")
    longer, milder = [step for step in s.steps if step.gate == "min_ssim"]
    assert "finetune.steps=600" in longer.command  # the demo finetunes 300 steps
    downstream = sum(v for k, v in SECONDS.items() if k not in ("prune", "finetune", "check", "report"))
    assert longer.cost.startswith(duration(2 * SECONDS["finetune"] + downstream))
    assert f"prune.target_macs={round(MACS_KEPT + (1 - MACS_KEPT) / 2, 2):g}" in milder.command


def test_the_run_closes_with_verdict_headline_report_and_next_steps_only_when_it_decided(tmp_path):
    run = write_run(tmp_path / "run")
    cfg = _cfg()
    assert closing_lines(run, cfg, "configs/demo.yaml", [], ["prune", "finetune"]) == ""
    text = closing_lines(run, cfg, "configs/demo.yaml", [], ["check", "report"])
    lines = text.splitlines()
    assert lines[0].startswith("verdict: INCONCLUSIVE: 4 of 5 gates passed; undecided: max_fd_increase")
    assert "  sampler speed-up 1.25x (limit >= 1.05x) PASS [onnxruntime, batch 16, ddim 20 steps]" in lines
    increase = "FD-infinity increase (compressed - dense) 2 [-1, 6] (limit <= 5.3) INCONCLUSIVE"
    assert any(increase in ln for ln in lines), lines
    assert f"report: {run / 'report' / 'report.html'}" in lines
    assert "next:" in lines and text.endswith("\n")


def _summary(outcome: str) -> Summary:
    checks = [
        Check("min_speedup", 1.3, 1.05, ">=", True, ""),
        Check("max_fd_ratio", 1.2, 1.5, "<=", outcome == "pass", "", [0.9, 1.7], outcome),
    ]
    return Summary(outcome, "finetuned", checks, None, [], [], Path("report.html"))


@pytest.mark.parametrize("outcome", ["pass", "fail", "inconclusive"])
def test_the_card_shows_every_outcome_in_its_colour(outcome):
    doc = Doc("t")
    doc.card(_summary(outcome), None, ["why the step counts"])
    doc.table(["check", "verdict"], [["max_fd_ratio", outcome.upper()]])
    page, md = doc.html(), doc.markdown()
    assert f"<section class='card verdict-{outcome}'" in page
    assert f"<span class='badge verdict-{outcome}'>{outcome.upper()}</span>" in page
    assert f"<td class='{outcome.upper()}'>{outcome.upper()}</td>" in page  # the table cell is coloured too
    for rule in (f".card.verdict-{outcome}{{", f".badge.verdict-{outcome}{{", f".{outcome.upper()}{{color:"):
        assert rule in page, rule
    assert f"**Acceptance: {outcome.upper()}**" in md


def _capture(monkeypatch) -> list:
    figures = []

    def save(fig, path, dpi=100, layout=True):
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", save)
    return figures


def test_latency_bars_are_linear_from_zero_with_each_value_and_the_speedup_printed(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    assert plots.plot_latency_bars(
        _bench_rows(), {"dense": "dense", "pruned": "finetuned"}, tmp_path / "l.png"
    )
    (fig,) = figures
    unet, sampler = fig.axes[0], fig.axes[1]
    for ax in (unet, sampler):
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    heights = sorted(p.get_height() for p in sampler.patches)
    assert heights == [FINAL_MS, DENSE_MS]
    texts = {t.get_text() for t in sampler.texts}
    assert {"800", "640", "1.25x"} <= texts
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dense", "finetuned"]


def test_the_headline_chart_draws_point_interval_and_limit(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    s = build_summary(write_run(tmp_path / "run"), _cfg())
    plots.plot_headline(s.headline(), tmp_path / "h.png")
    (fig,) = figures
    titles = [ax.get_title("left") for ax in fig.axes]
    assert titles[0] == "sampler speed-up: 1.25x"
    fd = fig.axes[titles.index("FD-infinity increase (compressed - dense): 2 [-1, 6]")]
    assert fd.get_title("right") == "INCONCLUSIVE"
    xs = [tuple(line.get_xdata()) for line in fd.lines]
    assert (5.3, 5.3) in xs and (-1.0, 6.0) in xs and (2.0,) in xs  # limit, interval, point


def test_the_report_stage_puts_the_run_at_a_glance_on_top(tmp_path):
    run = write_run(tmp_path / "run")
    samples = {"dense": torch.rand(10, 1, 8, 8), "finetuned": torch.rand(10, 1, 8, 8)}
    from safetensors.torch import save_file

    save_file(samples, str(layout.quality_samples(run)))
    result = report.run(RunContext(_cfg(), run))
    out = layout.report_dir(run)
    md = (out / "report.md").read_text()
    headings = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert md.index("**Acceptance: INCONCLUSIVE**") < md.index("## ")  # the card comes first
    assert headings[:2] == ["## Dense and compressed, same seeds", "## Speed and quality"]
    assert "Speed is timed at 20 steps (bench.sampler_steps)" in md and "DDIM 50 steps" in md
    assert "quality.num_samples=auto" in md
    for png in ("headline.png", "pairs.png", "speed_quality.png", "latency.png"):
        assert (out / png) in result.artifacts, png
    assert (
        "| onnxruntime | sampler | 16 | finetuned |" in md and "| pruned |" not in md.split("## Latency")[1]
    )
    assert result.metrics["verdict"] == "INCONCLUSIVE"


def _screenshot_module():
    spec = importlib.util.spec_from_file_location(
        "report_screenshot", ROOT / "scripts" / "report_screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    _screenshot_module().find_browser() is None,
    reason="no chromium on PATH (Debian: apt-get install -y chromium)",
)
@pytest.mark.parametrize(
    "outcome, colour", [("fail", (0xC6, 0x28, 0x28)), ("inconclusive", (0xD4, 0xA0, 0x17))]
)
def test_a_browser_renders_the_verdict_badge_in_its_colour_at_the_top(tmp_path, outcome, colour):
    import numpy as np
    from PIL import Image

    doc = Doc("compress-deploy report: t")
    doc.card(_summary(outcome), None, [])
    doc.heading("Latency")
    page = tmp_path / "report.html"
    page.write_text(doc.html())
    png = _screenshot_module().screenshot(page, tmp_path / "shot.png", width=900, height=1200)
    image = Image.open(png).convert("RGB")
    top = np.asarray(image.crop((0, 0, image.width, 250)), dtype=int)
    near = (np.abs(top - np.array(colour)).sum(axis=-1) < 30).sum()
    assert near > 500, f"no {outcome} badge in the top of the page"
    assert image.height < 1200  # the blank space below the page was trimmed
