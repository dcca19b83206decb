"""The ``parity`` stage: ONNX Runtime vs PyTorch, per UNet call and per sampler run."""

from __future__ import annotations

import torch

from compressor.errors import UserError
from compressor.feature_reuse import FeatureReuseUNet
from compressor.image_quality import psnr
from compressor.persist import load_unet
from compressor.sampling import generate, make_scheduler
from deploy import tensorrt_backend
from deploy.engine_info import profile_of, read_engine_info
from deploy.runtimes import load_backend
from export.compare import compare, make_onnxrt_runner, make_pass_runner, make_torch_runner, parity_feeds
from export.quantize import calibration_inputs
from pipeline.context import RunContext, StageResult, log
from rundir import layout

SECTIONS = ["parity", "export", "sample", "build", "device", "threads"]
INPUTS = ["prune", "finetune", "distill_steps", "export", "build"]
ENVIRONMENT = ["torch", "onnxruntime", "polygraphy", "tensorrt", "gpu"]


class ParityError(UserError):
    """Exported models disagree with PyTorch beyond the configured tolerance."""


def _sampler_images(ctx: RunContext, predict, scheduler, device: str = "cpu", cache_interval: int = 1):
    """The parity sampler's images (same seed, steps and count for every backend)."""
    cfg = ctx.cfg.parity
    return generate(
        predict,
        scheduler,
        ctx.image_shape(),
        cfg.sampler_images,
        cfg.sampler_steps,
        seed=ctx.cfg.sample.seed,
        device=device,
        cache_interval=cache_interval,
        cache_schedule=ctx.cfg.sample.cache_schedule,
    )


def _tolerances(ctx: RunContext, precision: str, unet, scheduler, feeds: list[dict]):
    """(atol, rtol, min sampler PSNR, feeds) of one precision's per-call check.

    int8 is checked on the inputs the sampler really produces (the trajectory of seeds other
    than the calibration's: random noise at a low timestep lies outside every calibrated
    range), elementwise only for the record (atol/rtol infinite) and gated on the median abs error.
    """
    cfg = ctx.cfg.parity
    if precision == "int8":
        seed = ctx.cfg.sample.seed + 1000
        held_out = calibration_inputs(
            unet, scheduler, ctx.image_shape(), max(cfg.batches), cfg.sampler_steps, seed
        )
        return float("inf"), float("inf"), cfg.min_psnr_int8, held_out
    if precision == "fp16":
        return cfg.atol_fp16, cfg.rtol_fp16, cfg.min_psnr_fp16, feeds
    return cfg.atol_fp32, cfg.rtol_fp32, cfg.min_psnr_fp32, feeds


def reuse_interval(ctx: RunContext) -> int:
    """The cache interval the passes' sampler parity runs at (the run's, or 3 when it is off)."""
    return ctx.cfg.sample.cache_interval if ctx.cfg.sample.cache_interval > 1 else 3


def _engine_batches(ctx: RunContext, engine) -> list[int]:
    """The parity batches an engine's profile covers (its smallest batch if none is)."""

    profile = profile_of(read_engine_info(engine))
    batches = [b for b in ctx.cfg.parity.batches if profile.min_batch <= b <= profile.max_batch]
    return batches or [profile.min_batch]


def _reuse_parity(
    ctx: RunContext, model: str, unet, precision: str, scheduler, kind: str = "onnxruntime"
) -> list[dict]:
    """The exported full and shallow passes vs torch fp32: per call (the shallow pass fed torch's
    cached feature) and the whole feature-reuse sampler (PSNR against the same sampler in torch).

    ``kind``: the passes' ONNX graphs on ONNX Runtime, or their TensorRT engines (on the GPU,
    the build precision's tolerances).
    """

    cfg, level = ctx.cfg.parity, ctx.cfg.sample.cache_level
    atol, rtol = (cfg.atol_fp32, cfg.rtol_fp32) if precision == "fp32" else (cfg.atol_fp16, cfg.rtol_fp16)
    min_psnr = cfg.min_psnr_fp32 if precision == "fp32" else cfg.min_psnr_fp16
    device = "cuda" if kind == "tensorrt" else "cpu"
    split = FeatureReuseUNet(unet, level)
    feeds = parity_feeds(unet, cfg.batches, cfg.timesteps, ctx.cfg.seed)
    if kind == "tensorrt":
        engine = layout.engine_path(ctx.run_dir, model, "full", level)
        feeds = parity_feeds(unet, _engine_batches(ctx, engine), cfg.timesteps, ctx.cfg.seed)
    with torch.no_grad():
        for feed in feeds:
            feed["feature"] = split.full(
                torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"])
            )[1].numpy()
    interval = reuse_interval(ctx)
    torch_reuse = load_backend("torch", unet=unet, device=device, cache_level=level)
    reference = _sampler_images(ctx, torch_reuse.predict, scheduler, device, cache_interval=interval)
    options = {"precision": precision} if kind == "onnxruntime" else {}
    backend = load_backend(kind, run_dir=ctx.run_dir, model=model, cache_level=level, **options)
    images = _sampler_images(ctx, backend.predict, scheduler, device, cache_interval=interval)
    sampler_psnr = psnr(images, reference)
    rows = []
    for part in ("full", "shallow"):
        part_feeds = (
            feeds if part == "shallow" else [{k: f[k] for k in ("sample", "timestep")} for f in feeds]
        )
        ref = make_pass_runner(split, part, f"torch-{model}-{part}", feeds[0]["feature"].shape)
        if kind == "tensorrt":
            engine = layout.engine_path(ctx.run_dir, model, part, level)
            cand, _ = tensorrt_backend.make_trt_runner(engine, f"tensorrt-{model}-{part}")
        else:
            path = layout.onnx_path(ctx.run_dir, model, precision, part, level)
            cand = make_onnxrt_runner(path, f"onnxruntime-{model}-{part}-{precision}")
        report = compare([ref, cand], part_feeds, atol, rtol)[0]
        row = {
            "model": model,
            "precision": precision if kind == "onnxruntime" else f"tensorrt-{precision}",
            "part": f"{part} pass (level {level})",
            "provider": backend.info.get("provider", "TensorRT"),
            **{k: v for k, v in report.as_dict().items() if k not in ("reference", "candidate")},
            "sampler_psnr_db": sampler_psnr,
            "sampler_cache_interval": interval,
            "min_psnr_db": min_psnr,
        }
        row["passed"] = report.passed and sampler_psnr >= min_psnr
        rows.append(row)
        log(
            "parity",
            f"{model} {row['precision']} {part} pass: max abs {report.max_abs_error:.2e}, sampler (cache "
            f"interval {interval}) PSNR {sampler_psnr:.1f} dB -> {'PASS' if row['passed'] else 'FAIL'}",
        )
    return rows


def _engine_parity(ctx: RunContext, model: str, unet, scheduler) -> dict:
    """TensorRT engine vs the fp32 torch reference on the GPU (fp16 tolerances), plus sampler PSNR."""

    cfg = ctx.cfg.parity
    engine = layout.engine_path(ctx.run_dir, model)
    runner, _ = tensorrt_backend.make_trt_runner(engine, f"tensorrt-{model}")
    feeds = parity_feeds(unet, _engine_batches(ctx, engine), cfg.timesteps, ctx.cfg.seed)
    ref = make_torch_runner(unet, f"torch-{model}-fp32", device="cuda")
    int8 = ctx.cfg.build.precision == "int8"
    if int8:  # the QDQ engine: gated like the int8 ONNX, on the inputs the sampler produces
        feeds = _tolerances(ctx, "int8", unet, scheduler, feeds)[3]
    report = compare([ref, runner], feeds, cfg.atol_fp16, cfg.rtol_fp16)[0]
    gate = f"atol {cfg.atol_fp16}, rtol {cfg.rtol_fp16}"
    min_psnr = cfg.min_psnr_int8 if int8 else cfg.min_psnr_fp16
    if int8:
        report.passed = report.median_abs_error <= cfg.median_abs_int8
        gate = f"median abs <= {cfg.median_abs_int8}"
    reference = _sampler_images(
        ctx, load_backend("torch", unet=unet, device="cuda").predict, scheduler, "cuda"
    )
    engine_predict = load_backend("tensorrt", run_dir=ctx.run_dir, model=model).predict
    images = _sampler_images(ctx, engine_predict, scheduler, "cuda")
    sampler_psnr = psnr(images, reference)
    passed = report.passed and sampler_psnr >= min_psnr
    log(
        "parity",
        f"{model} TensorRT: max abs {report.max_abs_error:.2e}, sampler PSNR {sampler_psnr:.1f} dB -> "
        f"{'PASS' if passed else 'FAIL'} ({gate}, PSNR >= {min_psnr})",
    )
    return {
        "model": model,
        "precision": f"tensorrt-{ctx.cfg.build.precision}",
        "provider": "TensorRT",
        **{k: v for k, v in report.as_dict().items() if k not in ("reference", "candidate")},
        "sampler_psnr_db": sampler_psnr,
        "min_psnr_db": min_psnr,
        "passed": passed,
    }


def run(ctx: RunContext) -> StageResult:
    """Compare every exported file with its torch model; a breach fails the stage."""
    cfg = ctx.cfg.parity
    ctx.require("export", "parity")
    _, folder = ctx.final_model_dir()
    models = {"dense": ctx.dense_on("cpu"), "pruned": load_unet(folder)[0]}
    scheduler = make_scheduler("ddim", ctx.dense.scheduler_config)
    rows, failures = [], []
    for model, unet in models.items():
        feeds = parity_feeds(unet, cfg.batches, cfg.timesteps, ctx.cfg.seed)
        reference = _sampler_images(ctx, load_backend("torch", unet=unet).predict, scheduler)
        for precision in ctx.cfg.export.precisions:
            path = layout.onnx_path(ctx.run_dir, model, precision)
            atol, rtol, min_psnr, these = _tolerances(ctx, precision, unet, scheduler, feeds)
            runner = make_onnxrt_runner(path, f"onnxruntime-{model}-{precision}")
            report = compare([make_torch_runner(unet, f"torch-{model}-fp32"), runner], these, atol, rtol)[0]
            gate = f"atol {atol}, rtol {rtol}"
            if precision == "int8":  # a few outliers are int8's nature: the typical error is gated
                report.passed = report.median_abs_error <= cfg.median_abs_int8
                gate = f"median abs <= {cfg.median_abs_int8}"
            backend = load_backend("onnxruntime", file=path)
            images = _sampler_images(ctx, backend.predict, scheduler)
            sampler_psnr = psnr(images, reference)
            row = {
                "model": model,
                "precision": precision,
                "provider": backend.info["provider"],
                **{k: v for k, v in report.as_dict().items() if k not in ("reference", "candidate")},
                "sampler_psnr_db": sampler_psnr,
                "min_psnr_db": min_psnr,
            }
            row["passed"] = report.passed and sampler_psnr >= min_psnr
            rows.append(row)
            log(
                "parity",
                f"{model} {precision}: max abs {report.max_abs_error:.2e}, "
                f"median {report.median_abs_error:.2e}, "
                f"cosine {report.min_cosine:.6f}, sampler PSNR {sampler_psnr:.1f} dB "
                f"-> {'PASS' if row['passed'] else 'FAIL'} ({gate}, PSNR >= {min_psnr})",
            )
            if not row["passed"]:
                failures.append(
                    f"{model} {precision} (max abs {report.max_abs_error:.2e}, PSNR {sampler_psnr:.1f} dB)"
                )
            if ctx.cfg.export.feature_reuse and precision != "int8":
                for row in _reuse_parity(ctx, model, unet, precision, scheduler):
                    rows.append(row)
                    if not row["passed"]:
                        failures.append(
                            f"{model} {precision} {row['part']} (max abs {row['max_abs_error']:.2e})"
                        )
    build = ctx.record("build")
    if build and build.ok:
        for model, unet in models.items():
            row = _engine_parity(ctx, model, unet, scheduler)
            rows.append(row)
            if not row["passed"]:
                failures.append(f"{model} TensorRT engine (max abs {row['max_abs_error']:.2e})")
            if f"{model}.full" in build.metrics.get("engines", {}):
                for row in _reuse_parity(ctx, model, unet, ctx.cfg.build.precision, scheduler, "tensorrt"):
                    rows.append(row)
                    if not row["passed"]:
                        error = f"max abs {row['max_abs_error']:.2e}"
                        failures.append(f"{model} TensorRT {row['part']} ({error})")
    fp32 = [r for r in rows if r["precision"] == "fp32" and r["provider"] != "TensorRT"]
    metrics = {
        "results": rows,
        "max_abs_error": max(r["max_abs_error"] for r in rows),
        "max_abs_error_fp32": max((r["max_abs_error"] for r in fp32), default=None),
        "passed": not failures,
    }
    if failures:
        ctx.write_record(
            "parity", SECTIONS, StageResult(metrics, status="failed", reason="; ".join(failures)), 0.0
        )
        raise ParityError(
            f"parity failed for {', '.join(failures)}; see {layout.record_path(ctx.run_dir, 'parity')} "
            "(re-export, or loosen parity.* tolerances if the precision warrants it)"
        )
    return StageResult(metrics)
