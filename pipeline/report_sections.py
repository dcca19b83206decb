"""The report's sections, one per stage record: settings, size and latency search, finetune,
student, quality (with intervals and looks), parity, latency, frontier, acceptance, the samples grid.

Each writes into a :class:`pipeline.report_render.Doc`; the report stage
(:mod:`pipeline.stages.report`) puts the run at a glance above them. Model names: ``names`` maps a
bench or parity record's model key to the one name the report uses (dense / pruned / finetuned /
student).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.acceptance import Check
from pipeline.context import RunContext
from pipeline.frontier.tables import choice_text, noise_note
from pipeline.plots import plot_latency_bars, plot_losses, plot_speedup_vs_macs, plot_taylor_diagnostics
from pipeline.report_render import Doc, fmt, with_interval
from rundir import layout
from rundir.records import (
    BenchMetrics,
    FinetuneMetrics,
    ParityMetrics,
    PruneMetrics,
    QualityMetrics,
)


def settings_section(doc: Doc, ctx: RunContext) -> None:
    """What was done: model, data, pruning criterion and target, finetune recipe, samplers."""
    cfg = ctx.cfg
    p, lat = cfg.prune, cfg.prune.target_latency
    target = ", ".join(
        f"{k}={getattr(p, k)}" for k in ("ratio", "target_macs", "target_params") if getattr(p, k) is not None
    )
    doc.heading("What was done")
    doc.table(
        ["setting", "value"],
        [
            ["model", f"{cfg.model.name} ({cfg.model.init})"],
            ["data", cfg.data.source],
            [
                "pruning",
                f"{p.method}, threshold {p.threshold}, stride {p.timestep_stride}, "
                f"Taylor batch {p.batch_size}, score {p.taylor_score}, "
                f"GroupNorm channels {p.group_selection}",
            ],
            ["target", target or f"latency: {lat.goal()} on {lat.backend} ({lat.what}, batch {lat.batch})"],
            [
                "finetune",
                f"{cfg.finetune.steps} steps, batch {cfg.finetune.batch_size}, lr {cfg.finetune.lr}, "
                f"EMA {cfg.finetune.ema_decay}",
            ],
            ["run directory", str(ctx.run_dir)],
        ],
    )
    doc.para(
        "Models: **dense** (the original), **pruned** (its pruned structure, before finetuning), "
        "**finetuned** (the pruned model after finetuning), **student** (a few-step student, when one "
        "was distilled). The last of these the run made is its final, compressed model."
    )


def prune_section(doc: Doc, m: PruneMetrics, final: str, out: Path) -> None:
    """Size before and after, the Taylor timesteps, the latency search and the diagnostic."""
    doc.heading("Size")
    doc.table(
        ["", "dense", "pruned", "kept"],
        [
            ["params", f"{m.params_before / 1e6:.3f}M", f"{m.params_after / 1e6:.3f}M", m.params_kept],
            ["MACs", f"{m.macs_before / 1e9:.4f}G", f"{m.macs_after / 1e9:.4f}G", m.macs_kept],
        ],
    )
    ts = m.timesteps_used
    shares = "" if final == "pruned" else f" The {final} model keeps the pruned structure and size."
    doc.para(
        (
            f"Pruning ratio {m.ratio:.4g}. Taylor timesteps kept: {len(ts)} ({ts[0]}..{ts[-1]})."
            if ts
            else f"Pruning ratio {m.ratio:.4g}; {m.method} needs no Taylor pass."
        )
        + shares
    )
    if m.trials and m.target_latency:
        latency_search_section(doc, m, out)
    if m.diagnostics:
        plot_taylor_diagnostics([("", m.diagnostics)], {m.threshold: ts[-1]}, out / "taylor.png")
        doc.para(
            "Per-timestep diagnostic of the Taylor pass: each timestep's loss against the largest, "
            "the norm of its gradient, and how well the gradients of two halves of the Taylor batch "
            "agree (cosine near 1: signal; near 0: noise)."
        )
        doc.image(out / "taylor.png", "Taylor pass diagnostic")


def latency_search_section(doc: Doc, m: PruneMetrics, out: Path) -> None:
    """The latency search: target, every trial, the chosen structure and the chart."""
    lat = m.target_latency
    doc.heading("Latency search")
    milder = lat.get("next_milder")
    goal = f"{lat['speedup']:g}x over dense" if lat["speedup"] is not None else f"at most {lat['ms']:g} ms"
    chosen = (
        "levels " + ", ".join(f"{k}: {v:g}" for k, v in m.level_ratios.items())
        if m.level_ratios
        else f"ratio {m.ratio:.4g}"
    )
    doc.para(
        f"Target: {goal} on {lat['probe']}, noise margin {lat['margin']:.0%}. Chosen: {chosen}, measured "
        f"{lat['chosen']['speedup']:.2f}x ({lat['chosen']['median_ms']:.2f} ms, dense "
        f"{lat['chosen']['dense_ms']:.2f} ms)"
        + (
            f"; the next milder trial (ratio {milder['ratio']:.4g}) measured {milder['speedup']:.2f}x"
            if milder
            else ""
        )
        + f". Search time {lat['search_seconds']:.0f} s; each trial timed alternately with dense."
    )
    if lat.get("search") == "latency":
        doc.para(
            "Hardware-aware allocation: each resolution level was timed alone at each ratio (the table "
            f"below{' came from the cache' if lat.get('table_cached') else ' was measured for this run'}); "
            "allocations predicted to meet the target were ranked by the importance they keep and the "
            "best were measured for real. Importance kept by the uniform ratios, for comparison: "
            + ", ".join(f"ratio {u['ratio']:g}: {u['importance_kept']:.3f}" for u in lat["uniform_reference"])
            + "."
        )
        doc.table(
            ["level", "ratio", "dense ms", "pruned ms", "saving"],
            [
                [r["level"], r["ratio"], r["dense_ms"], r["median_ms"], f"{r['saving']:.1%}"]
                for r in lat["table"]
            ],
        )
    doc.table(
        ["ratio", "per level", "MACs kept", "params", "dense ms", "pruned ms", "speed-up", "meets"],
        [
            [
                t["ratio"],
                ", ".join(f"{k}: {v:g}" for k, v in t["levels"].items()) if t.get("levels") else "uniform",
                t["macs_kept"],
                f"{t['params'] / 1e6:.3f}M",
                t["dense_ms"],
                t["median_ms"],
                f"{t['speedup']:.2f}x",
                "yes" if t.get("meets") else "no",
            ]
            for t in m.trials
        ],
    )
    rows = [{**t, "backend": lat["backend"], "batch": lat["batch"], "what": lat["what"]} for t in m.trials]
    plot_speedup_vs_macs(
        rows, out / "latency_search.png", "latency search: measured speed-up vs MACs reduction"
    )
    doc.image(out / "latency_search.png", "latency search trials")


def finetune_section(doc: Doc, m: FinetuneMetrics, out: Path) -> None:
    """Final and evaluation losses, and the loss curve."""
    doc.heading("Finetuning")
    doc.para(
        f"Final training loss {fmt(m.final_loss)}; evaluation loss EMA {fmt(m.eval_loss_ema)} "
        f"vs raw {fmt(m.eval_loss_raw)}."
    )
    if m.loss_terms:
        step, task, output, features = m.loss_terms[-1]
        doc.para(
            f"Distilled from the dense model; at step {step:g}: task loss {fmt(task)}, output "
            f"distillation {fmt(output)}, feature distillation {fmt(features)} (unweighted)."
        )
    if plot_losses(m.losses, out / "loss.png", m.loss_terms):
        doc.image(out / "loss.png", "finetune loss curve")


def student_section(doc: Doc, m, bench: BenchMetrics | None) -> None:
    """The few-step student: its rounds (steps, final loss, distance from the first teacher, cost) and
    its sampler against the dense reference sampler."""
    doc.heading("Few-step student")
    doc.para(
        f"Progressive distillation of {m.student} from the dense model's DDIM {m.start_steps} steps down to "
        f"{m.target_steps} ({m.prediction_type} prediction): {len(m.rounds)} rounds, "
        f"{m.optimizer_steps} optimizer steps, {m.wall_s:.0f} s. The student is the run's final model."
    )
    doc.table(
        ["round", "steps", "final loss", f"MSE vs teacher images ({m.eval_images})", "seconds", "resumed"],
        [[i + 1, r["steps"], r.get("final_loss"), r.get("mse_vs_teacher"), r.get("wall_s"),
          r.get("resumed_from")] for i, r in enumerate(m.rounds)],
    )  # fmt: skip
    if bench is not None and bench.student:
        doc.table(
            ["backend", "batch", "student ms", "dense reference", "dense ms", "speed-up"],
            [[r["backend"], r["batch"], r["ms"], r["reference"], r["reference_ms"], f"{r['speedup']:.2f}x"]
             for r in bench.student],
        )  # fmt: skip


def quality_section(doc: Doc, m: QualityMetrics) -> None:
    """Every model's SSIM/PSNR vs dense, Frechet distance (finite-N and, when recorded, FD-infinity),
    its ratio and increase over dense, and KID, with intervals; the looks when sampled until decided."""
    doc.heading("Quality")
    metric = m.frechet_metric
    columns = [  # (header, key): a row is shown when some model has the figure
        ("SSIM vs dense", "ssim_vs_dense"), ("PSNR vs dense (dB)", "psnr_vs_dense"), (metric, metric),
        (f"{metric} / dense", "fd_ratio"), ("FD-infinity", "fd_inf"), ("FD-infinity - dense", "fd_inf_diff"),
        ("FD-infinity / dense", "fd_inf_ratio"), ("KID", "kid"), ("KID - dense", "kid_diff"),
        (f"prompt adherence ({m.adherence_metric})", "adherence"),
    ]  # fmt: skip
    shown = [(h, k) for h, k in columns if any(m.figure(label, k)[0] is not None for label in m.models)]
    doc.table(  # one row a figure, one column a model: a few models, many figures with intervals
        ["figure", *m.models],
        [[h, *[with_interval(*m.figure(label, k)) for label in m.models]] for h, k in shown],
    )
    level = m.interval.get("level")
    how = (
        f"a paired delete-a-group jackknife over the seeds ({m.interval.get('resamples')} groups)"
        if m.interval.get("method", "bootstrap") == "jackknife"
        else f"a paired bootstrap over the seeds ({m.interval.get('resamples')} resamples)"
    )
    intervals = (
        f" Brackets: {level:.0%} intervals from {how}: what another draw of as many seeds would likely give."
        if level
        else ""
    )
    steps = f", the student at its {m.student_steps}" if m.student_steps else ""
    doc.para(
        f"{m.num_samples} samples per model, {m.scheduler.upper()} {m.steps} steps{steps}, same seeds; "
        f"{m.num_reference} reference images.{intervals}" + (f" {m.frechet_note}" if m.frechet_note else "")
    )
    if m.prompts:
        texts = list(dict.fromkeys(m.prompts.get("prompts") or []))
        shown = ", ".join(f'"{t}"' for t in texts[:4]) + (
            f" and {len(texts) - 4} more" if len(texts) > 4 else ""
        )
        ratio = (
            f"; the compressed model's adherence is {with_interval(m.adherence_ratio, m.adherence_ratio_ci)} "
            "of dense's, paired over seeds and prompts"
            if m.adherence_ratio is not None
            else (f"; prompt adherence: {m.adherence_note}" if m.adherence_note else "")
        )
        doc.para(
            f"Image i is drawn for prompt i of {len(texts)} ({shown}; from {m.prompts.get('source')}), "
            f"guidance scale {m.guidance_scale}{ratio}."
        )
    if m.fd_digits_real_floor is not None:
        doc.para(
            "For scale: two halves of the real digits are "
            f"{with_interval(m.fd_digits_real_floor, m.fd_digits_real_floor_ci)} apart in fd_digits "
            "(finite-N Frechet distance shrinks as the sample count grows; FD-infinity "
            "removes that bias)."
        )
    if m.looks:
        looks_section(doc, m)


def looks_section(doc: Doc, m: QualityMetrics) -> None:
    """Sampling until decided: each look's sample count, its gates and its outcome."""

    def gate(g: object) -> str:
        if not isinstance(g, dict):
            return str(g)
        figure = with_interval(g.get("measured"), g.get("interval"))
        return f"{g.get('name')} {str(g.get('outcome', '')).upper()} {figure}"

    doc.para(
        f"Sampled until decided ({len(m.looks)} looks): "
        + m.sequential.get("how", "every look's intervals widened so all looks hold together")
        + "."
    )
    doc.table(
        ["look", "samples per model", "gates", "outcome"],
        [[i + 1, look.get("samples"), "; ".join(gate(g) for g in look.get("gates", [])) or "-",
          str(look.get("outcome", "-")).upper()] for i, look in enumerate(m.looks)],
    )  # fmt: skip


def parity_section(doc: Doc, m: ParityMetrics, names: dict[str, str]) -> None:
    """ONNX Runtime (and TensorRT) vs PyTorch, per file."""
    doc.heading("Parity (ONNX Runtime vs PyTorch)")
    header = [
        "model",
        "graph",
        "precision",
        "provider",
        "max abs",
        "median abs",
        "min cosine",
        "sampler PSNR",
    ]
    keys = ["precision", "provider", "max_abs_error", "median_abs_error", "min_cosine", "sampler_psnr_db"]
    doc.table(
        [*header, "verdict"],
        [[names.get(r["model"], r["model"]), r.get("part", "UNet call"), *[r[k] for k in keys],
          "PASS" if r["passed"] else "FAIL"] for r in m.results],
    )  # fmt: skip


def bench_section(doc: Doc, m: BenchMetrics, names: dict[str, str], out: Path) -> None:
    """Latency rows, speed-ups, skipped backends, host facts and the bar chart (linear scale)."""
    final = names["pruned"]
    doc.heading("Latency")
    if plot_latency_bars(m.results, names, out / "latency.png"):
        doc.image(out / "latency.png", f"median latency, dense vs {final}")
        doc.para(
            f"Median latency on a linear scale from zero, the value on each bar and dense / {final} "
            "above each pair; one panel per UNet call or whole sampler and batch."
        )
    doc.table(
        ["backend", "what", "batch", "model", "median ms", "p95 ms"],
        [[r["backend"], r["what"], r["batch"], names.get(r["model"], r["model"]), r["median_ms"], r["p95_ms"]]
         for r in m.results],
    )  # fmt: skip
    keys = ["backend", "what", "batch", "speedup", "macs_reduction", "speedup_over_macs_reduction"]
    doc.table(
        [
            "backend",
            "what",
            "batch",
            f"speed-up (dense / {final})",
            "MACs reduction",
            "speed-up / MACs reduction",
        ],
        [[s[k] for k in keys] for s in m.speedup],
    )
    whole_call_section(doc, m, final)
    for name, why in m.skipped.items():
        doc.para(f"{name}: skipped ({why})")
    doc.para("Host: " + ", ".join(f"{k} {v}" for k, v in m.host.items()))


def whole_call_section(doc: Doc, m: BenchMetrics, final: str) -> None:
    """A conditional model's whole text-to-image call (bench rows ``pipeline``): dense against the
    final model per backend and batch, and where the time goes (text encoder, UNet loop, VAE)."""
    rows = [r for r in m.results if r.get("what") == "pipeline"]
    if not rows:
        return
    doc.heading("Latency: the whole text-to-image call")
    by_key = {(r["backend"], r["batch"], r.get("variant"), r["model"]): r for r in rows}
    table = []
    for s in [s for s in m.speedup if s.get("what") == "pipeline"]:
        dense = by_key.get((s["backend"], s["batch"], s.get("variant"), "dense"))
        pruned = by_key.get((s["backend"], s["batch"], s.get("variant"), "pruned"))
        if dense is None or pruned is None:
            continue
        parts = list(dense.get("components") or {})
        split = "; ".join(
            f"{p} {dense['components'][p]:.1f} -> {pruned['components'].get(p, 0):.1f}" for p in parts
        )
        loop = s.get("unet_loop_speedup")
        table.append([s["backend"], s["batch"], s.get("variant"), f"{dense['median_ms']:.1f}",
                      f"{pruned['median_ms']:.1f}", f"{s['speedup']:.2f}x",
                      "-" if loop is None else f"{loop:.2f}x", split])  # fmt: skip
    doc.table(
        [
            "backend",
            "batch",
            "sampler",
            "dense ms",
            f"{final} ms",
            "speed-up",
            "UNet loop alone",
            "ms by part",
        ],
        table,
    )
    guidance = rows[0].get("guidance_scale")
    doc.para(
        f"What a user waits for per call of `batch` images: the prompts encoded once, the guided UNet "
        f"loop (guidance scale {guidance}: each step one UNet call on twice the batch) and the VAE "
        f"decoding, each part timed inside the same call. Only the UNet is compressed, so the speed-up "
        f"of the whole call is the UNet loop's diluted by the parts both models share."
    )


def frontier_section(doc: Doc, ctx: RunContext, f: dict | str | None, bench: BenchMetrics | None,
                     out: Path) -> None:  # fmt: skip
    """The speed-quality frontier of ``RUN/frontier`` (``compress-deploy frontier`` or a latency target
    over levers): what was measured, the Pareto points, the chosen stack and its chart."""
    if f is None:
        return
    doc.heading("Speed-quality frontier")
    if isinstance(f, str):
        doc.para(f)
        return
    folder = layout.frontier_dir(ctx.run_dir)
    points, ref = f["points"], f["reference"]
    ratios = ", ".join(f"{r:g}" for r in sorted({p["stack"]["ratio"] for p in points}))
    doc.para(
        f"{len(points)} stacks over pruning ratios {ratios}: whole-sampler latency "
        f"on {f['backend']} at batch {f['batch']}, speed-up against dense {ref['stack']['scheduler']} "
        f"{ref['stack']['steps']} timed alternately; {f['metric']} and SSIM from {f['samples']} images per "
        f"stack (dense reference {with_interval(ref['fd'], ref.get('fd_ci'))}); brackets: {noise_note(f)}. "
        "Pareto-optimal stacks:"
    )
    metric = f["metric"]
    front = sorted((p for p in points if p["pareto"]), key=lambda p: -p["speedup"])
    inf = f.get("ranked_by") == "fd_inf"
    doc.table(
        ["stack", "MACs kept", "ms", "speed-up", *(["FD-infinity - dense"] if inf else []), metric,
         f"{metric} / dense", "SSIM"],
        [
            [p["label"], p["macs_kept"], p["latency_ms"], p["speedup"],
             *([with_interval(p["fd_inf_diff"], p.get("fd_inf_diff_ci"))] if inf else []),
             with_interval(p["fd"], p.get("fd_ci")), with_interval(p["fd_ratio"], p.get("fd_ratio_ci")),
             with_interval(p["ssim"], p.get("ssim_ci"))]
            for p in front
        ],
    )  # fmt: skip
    pruned = [p for p in front if p["stack"]["ratio"] > 0]
    doc.para(
        f"{len(pruned)} of the {len(front)} Pareto-optimal stacks are pruned"
        + (f" (from {min(p['speedup'] for p in pruned):.2f}x up)." if pruned else ".")
    )
    chosen = f.get("chosen")
    if chosen:
        verified = ""
        if bench is not None and bench.stack:
            verified = f" Bench measured it at {bench.stack['speedup']:.2f}x."
        levers = f" (levers {', '.join(f.get('levers', []))})"
        doc.para(choice_text(chosen, f"{f.get('target')}{levers}", metric) + verified)
    if (folder / "frontier.png").is_file():
        shutil.copyfile(folder / "frontier.png", out / "frontier.png")
        doc.image(out / "frontier.png", "speed-quality frontier")


def acceptance_section(doc: Doc, checks: list[Check]) -> None:
    """Every acceptance check with its measured figure, limit and verdict."""
    doc.heading("Acceptance checks")
    if not checks:
        doc.para("No limits are configured in the acceptance section.")
        return
    doc.table(
        ["check", "measured [interval]", "limit", "verdict"],
        [
            [c.name, with_interval(c.measured, c.interval), f"{c.direction} {c.limit:g}", c.outcome.upper()]
            for c in checks
        ],
    )
    unsure = [c for c in checks if c.outcome == "inconclusive"]
    if unsure:
        doc.para(" ".join(c.line() for c in unsure))


def samples_section(doc: Doc, ctx: RunContext, out: Path) -> None:
    """The samples stage's grid: every model's row from the same seeds."""
    grid = layout.samples_grid(ctx.run_dir)
    if grid.is_file():
        shutil.copyfile(grid, out / "grid.png")
        doc.heading("Samples, every model (same seeds)")
        doc.para(f"{ctx.cfg.sample.num_images} seeds per row, {ctx.cfg.sample.scheduler.upper()} "
                 f"{ctx.cfg.sample.steps} steps; each row one model, each column one seed.")  # fmt: skip
        doc.image(out / "grid.png", "samples of every model, same seeds")
    prompts = layout.prompt_pairs(ctx.run_dir)
    rec = ctx.record("samples")
    if prompts.is_file() and rec is not None:
        m = rec.metrics
        shutil.copyfile(prompts, out / "prompts.png")
        negative = f', away from "{m["negative_prompt"]}"' if m.get("negative_prompt") else ""
        doc.heading("Each prompt, dense beside compressed")
        doc.para(f"One row per prompt, every model's image from the same seed, guidance scale "
                 f"{m.get('guidance_scale')}{negative}; the images are decoded by the dense model's VAE "
                 "(only the UNet is compressed).")  # fmt: skip
        doc.image(out / "prompts.png", "each prompt: dense and compressed images, same seed")
