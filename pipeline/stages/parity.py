"""The ``parity`` stage: ONNX Runtime vs PyTorch, per UNet call and per sampler run.

A conditional model's UNet graphs are fed its conditioning (the run's prompts' embeddings or class
labels) per call, and its sampler runs guided (``sample.guidance_scale``) with the run's prompts,
decoded by the torch VAE. Its shared graphs are checked too, once per precision: the text encoder on
the prompts' token ids and the VAE decoder on the torch sampler's final latents (rows with
``model`` ``shared`` and ``component`` ``text_encoder`` / ``vae_decoder``), and the whole call per
model and precision (``component`` ``text_to_image``: prompt -> ONNX text encoder -> guided ONNX
UNet loop -> ONNX VAE decoder against torch from the same seeds, :mod:`deploy.onnx_text_to_image`),
gated on ``parity.min_psnr_<precision>``. Every conditional row names its ``component``; the
whole-call rows hold image errors, so the record's ``max_abs_error`` / ``max_abs_error_fp32`` (the
``max_parity_error`` gate) are taken over the per-graph rows only.

Long because one stage checks every graph a run exports against the same torch references, feeds
and sampler (each UNet precision, feature reuse's two passes with or without conditioning, the shared
text encoder and VAE decoder, the whole call, the TensorRT engines): one function per check here.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from compressor.components import DiffusionModel
from compressor.errors import UserError
from compressor.feature_reuse import FeatureReuseUNet
from compressor.guidance import Conditioning, model_decoder
from compressor.image_quality import psnr
from compressor.persist import load_unet
from compressor.sampling import generate, make_scheduler
from deploy import tensorrt_backend
from deploy.engine_info import profile_of, read_engine_info
from deploy.onnx_text_to_image import text_to_image_parity
from deploy.runtimes import load_backend
from export.compare import (
    compare,
    make_function_runner,
    make_onnxrt_runner,
    make_pass_runner,
    make_torch_runner,
    parity_feeds,
)
from export.pipeline_graphs import (
    TEXT_ENCODER,
    VAE_DECODER,
    text_encoder_parity,
    unscale_latents,
    vae_decoder_parity,
)
from export.quantize import calibration_inputs
from pipeline.context import RunContext, StageResult, log
from rundir import layout

SECTIONS = ["parity", "export", "sample", "build", "device", "threads"]
INPUTS = ["prune", "finetune", "distill_steps", "export", "build"]
ENVIRONMENT = ["torch", "onnxruntime", "polygraphy", "tensorrt", "gpu"]


class ParityError(UserError):
    """Exported models disagree with PyTorch beyond the configured tolerance."""


def _sampler_images(
    ctx: RunContext,
    predict,
    scheduler,
    device: str = "cpu",
    cache_interval: int = 1,
    model: DiffusionModel | None = None,
    latents: list | None = None,
):
    """The parity sampler's images (same seed, steps and count for every backend).

    ``model``: a conditional model (its text encoder and VAE on ``device``): the images are sampled
    guided with the run's prompts and decoded by its torch VAE; ``latents`` then collects the final
    latents before decoding.
    """
    cfg = ctx.cfg.parity
    guided: dict = {}
    if model is not None:
        decode = model_decoder(model)

        def capture(z: torch.Tensor) -> torch.Tensor:
            if latents is not None:
                latents.append(z.detach().float().cpu().clone())
            return decode(z)

        guided = {
            "conditioning": _conditioning(ctx, model, cfg.sampler_images, device),
            "guidance_scale": ctx.cfg.sample.guidance_scale,
            "decode": capture if decode is not None else None,
        }
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
        **guided,
    )


def _conditioning(ctx: RunContext, model: DiffusionModel, count: int, device: str = "cpu") -> Conditioning:
    """The run's prompts (or labels) of its first ``count`` images, encoded by ``model``'s text encoder."""
    return ctx.prompts.conditioning(model, count, 0, device)


def _on(model: DiffusionModel, device: str) -> DiffusionModel:
    """A conditional model whose text encoder and VAE are private copies on ``device`` (the torch
    references of the parity checks)."""
    moved = {k: copy.deepcopy(getattr(model, k)).to(device).eval() for k in ("vae", "text_encoder")
             if getattr(model, k) is not None}  # fmt: skip
    return dataclasses.replace(model, **moved)


def _condition_feeds(ctx: RunContext, model: DiffusionModel | None):
    """Per-call feeds' conditioning for a batch of ``b`` (the first ``b`` images' prompt embeddings or
    labels), None for an unconditional model."""
    if model is None:
        return None

    def conditions(b: int) -> dict[str, np.ndarray]:
        cond = _conditioning(ctx, model, b)
        value = cond.cond.float() if cond.kind == "text" else cond.cond.long()
        return {cond.input_name: value.cpu().numpy()}

    return conditions


def _tolerances(
    ctx: RunContext, precision: str, unet, scheduler, feeds: list[dict], model: DiffusionModel | None = None
):
    """(atol, rtol, min sampler PSNR, feeds) of one precision's per-call check.

    int8 is checked on the inputs the sampler really produces (the trajectory of seeds other
    than the calibration's: random noise at a low timestep lies outside every calibrated
    range), elementwise only for the record (atol/rtol infinite) and gated on the median abs error;
    a conditional ``model``'s trajectory is guided with the run's prompts.
    """
    cfg = ctx.cfg.parity
    if precision == "int8":
        seed = ctx.cfg.sample.seed + 1000
        guided = {}
        if model is not None:
            guided = {
                "conditioning": _conditioning(ctx, model, max(cfg.batches)),
                "guidance_scale": ctx.cfg.sample.guidance_scale,
            }
        held_out = calibration_inputs(
            unet, scheduler, ctx.image_shape(), max(cfg.batches), cfg.sampler_steps, seed, **guided
        )
        return float("inf"), float("inf"), cfg.min_psnr_int8, held_out
    if precision == "fp16":
        return cfg.atol_fp16, cfg.rtol_fp16, cfg.min_psnr_fp16, feeds
    return cfg.atol_fp32, cfg.rtol_fp32, cfg.min_psnr_fp32, feeds


def reuse_interval(ctx: RunContext) -> int:
    """The cache interval the passes' sampler parity runs at (the run's, or 3 when it is off)."""
    return ctx.cfg.sample.cache_interval if ctx.cfg.sample.cache_interval > 1 else 3


def _conditioned_pass_runner(split: FeatureReuseUNet, part: str, name: str, feed: dict):
    """A Polygraphy runner over one feature-reuse pass of a conditioned UNet in torch fp32, its inputs
    named and ordered as the exported pass graph's (``sample``, ``timestep``, the conditioning, the
    shallow pass's ``feature``), typed as ``feed`` holds them."""
    inputs = {k: (v.dtype.type, (-1, *v.shape[1:])) for k, v in feed.items()}

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        given = {k: v for k, v in feeds.items() if k not in ("sample", "timestep", "feature")}
        if part == "full":
            noise, feature = split.full(feeds["sample"], feeds["timestep"], **given)
            return {"noise": noise, "feature": feature}
        return {"noise": split.shallow(feeds["sample"], feeds["timestep"], feeds["feature"], **given)}

    return make_function_runner(run, name, inputs)


def _engine_batches(ctx: RunContext, engine) -> list[int]:
    """The parity batches an engine's profile covers (its smallest batch if none is)."""

    profile = profile_of(read_engine_info(engine))
    batches = [b for b in ctx.cfg.parity.batches if profile.min_batch <= b <= profile.max_batch]
    return batches or [profile.min_batch]


def _reuse_parity(
    ctx: RunContext,
    model: str,
    unet,
    precision: str,
    scheduler,
    kind: str = "onnxruntime",
    conditional: DiffusionModel | None = None,
) -> list[dict]:
    """The exported full and shallow passes vs torch fp32: per call (the shallow pass fed torch's
    cached feature) and the whole feature-reuse sampler (PSNR against the same sampler in torch).

    ``kind``: the passes' ONNX graphs on ONNX Runtime, or their TensorRT engines (on the GPU,
    the build precision's tolerances). ``conditional``: a conditional model (its text encoder and VAE
    on the CPU): both passes are fed the run's prompts' embeddings (or labels) per call, and the
    sampler runs guided with them, decoded by the torch VAE (rows with ``component`` ``unet``).
    """

    cfg, level = ctx.cfg.parity, ctx.cfg.sample.cache_level
    atol, rtol = (cfg.atol_fp32, cfg.rtol_fp32) if precision == "fp32" else (cfg.atol_fp16, cfg.rtol_fp16)
    min_psnr = cfg.min_psnr_fp32 if precision == "fp32" else cfg.min_psnr_fp16
    device = "cuda" if kind == "tensorrt" else "cpu"
    split = FeatureReuseUNet(unet, level)
    conditions = _condition_feeds(ctx, conditional)
    batches = cfg.batches
    if kind == "tensorrt":
        batches = _engine_batches(ctx, layout.engine_path(ctx.run_dir, model, "full", level))
    feeds = parity_feeds(unet, batches, cfg.timesteps, ctx.cfg.seed, conditions)
    names = [k for k in feeds[0] if k not in ("sample", "timestep")]  # the conditioning inputs
    with torch.no_grad():
        for feed in feeds:
            given = {k: torch.from_numpy(feed[k]) for k in names}
            args = (torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]))
            feed["feature"] = split.full(*args, **given)[1].numpy()
    interval = reuse_interval(ctx)
    torch_reuse = load_backend("torch", unet=unet, device=device, cache_level=level)
    sampled = {"cache_interval": interval, "model": conditional}
    reference = _sampler_images(ctx, torch_reuse.predict, scheduler, device, **sampled)
    options = {"precision": precision} if kind == "onnxruntime" else {}
    backend = load_backend(kind, run_dir=ctx.run_dir, model=model, cache_level=level, **options)
    images = _sampler_images(ctx, backend.predict, scheduler, device, **sampled)
    sampler_psnr = psnr(images, reference)
    rows = []
    for part in ("full", "shallow"):
        part_feeds = (
            feeds if part == "shallow" else [{k: v for k, v in f.items() if k != "feature"} for f in feeds]
        )
        if names:
            ref = _conditioned_pass_runner(split, part, f"torch-{model}-{part}", part_feeds[0])
        else:
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
            **({"component": "unet", "conditioning": conditional.conditioning} if conditional else {}),
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


def _engine_parity(
    ctx: RunContext, model: str, unet, scheduler, conditional: DiffusionModel | None = None
) -> dict:
    """TensorRT engine vs the fp32 torch reference on the GPU (fp16 tolerances), plus sampler PSNR
    (a ``conditional`` model's: fed its conditioning, sampled guided with its prompts)."""

    cfg = ctx.cfg.parity
    engine = layout.engine_path(ctx.run_dir, model)
    runner, _ = tensorrt_backend.make_trt_runner(engine, f"tensorrt-{model}")
    conditions = _condition_feeds(ctx, conditional)
    feeds = parity_feeds(unet, _engine_batches(ctx, engine), cfg.timesteps, ctx.cfg.seed, conditions)
    spec = conditional.spec if conditional is not None else None
    ref = make_torch_runner(unet, f"torch-{model}-fp32", device="cuda", spec=spec)
    on_gpu = _on(conditional, "cuda") if conditional is not None else None
    int8 = ctx.cfg.build.precision == "int8"
    if int8:  # the QDQ engine: gated like the int8 ONNX, on the inputs the sampler produces
        feeds = _tolerances(ctx, "int8", unet, scheduler, feeds, conditional)[3]
    report = compare([ref, runner], feeds, cfg.atol_fp16, cfg.rtol_fp16)[0]
    gate = f"atol {cfg.atol_fp16}, rtol {cfg.rtol_fp16}"
    min_psnr = cfg.min_psnr_int8 if int8 else cfg.min_psnr_fp16
    if int8:
        report.passed = report.median_abs_error <= cfg.median_abs_int8
        gate = f"median abs <= {cfg.median_abs_int8}"
    torch_predict = load_backend("torch", unet=unet, device="cuda").predict
    reference = _sampler_images(ctx, torch_predict, scheduler, "cuda", model=on_gpu)
    engine_predict = load_backend("tensorrt", run_dir=ctx.run_dir, model=model).predict
    images = _sampler_images(ctx, engine_predict, scheduler, "cuda", model=on_gpu)
    sampler_psnr = psnr(images, reference)
    passed = report.passed and sampler_psnr >= min_psnr
    log(
        "parity",
        f"{model} TensorRT: max abs {report.max_abs_error:.2e}, sampler PSNR {sampler_psnr:.1f} dB -> "
        f"{'PASS' if passed else 'FAIL'} ({gate}, PSNR >= {min_psnr})",
    )
    return {
        "model": model,
        **({"component": "unet"} if conditional is not None else {}),
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
    conditional = _on(ctx.dense, "cpu") if ctx.dense.conditioning != "none" else None
    spec = conditional.spec if conditional is not None else None
    rows, failures = [], []
    for model, unet in models.items():
        feeds = parity_feeds(
            unet, cfg.batches, cfg.timesteps, ctx.cfg.seed, _condition_feeds(ctx, conditional)
        )
        latents: list[torch.Tensor] = []
        torch_predict = load_backend("torch", unet=unet).predict
        reference = _sampler_images(ctx, torch_predict, scheduler, model=conditional, latents=latents)
        if conditional is not None and model == "dense":
            for row in _shared_parity(ctx, conditional, latents[0] if latents else None):
                rows.append(row)
                if not row["passed"]:
                    failures.append(f"{row['part']} {row['precision']} (max abs {row['max_abs_error']:.2e})")
        for precision in ctx.cfg.export.precisions:
            path = layout.onnx_path(ctx.run_dir, model, precision)
            atol, rtol, min_psnr, these = _tolerances(ctx, precision, unet, scheduler, feeds, conditional)
            runner = make_onnxrt_runner(path, f"onnxruntime-{model}-{precision}")
            torch_runner = make_torch_runner(unet, f"torch-{model}-fp32", spec=spec)
            report = compare([torch_runner, runner], these, atol, rtol)[0]
            gate = f"atol {atol}, rtol {rtol}"
            if precision == "int8":  # a few outliers are int8's nature: the typical error is gated
                report.passed = report.median_abs_error <= cfg.median_abs_int8
                gate = f"median abs <= {cfg.median_abs_int8}"
            backend = load_backend("onnxruntime", file=path)
            images = _sampler_images(ctx, backend.predict, scheduler, model=conditional)
            sampler_psnr = psnr(images, reference)
            row = {
                "model": model,
                **({"component": "unet", "conditioning": conditional.conditioning} if conditional else {}),
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
                f"{model} {precision}"
                + (" UNet" if conditional else "")
                + f": max abs {report.max_abs_error:.2e}, "
                f"median {report.median_abs_error:.2e}, "
                f"cosine {report.min_cosine:.6f}, sampler PSNR {sampler_psnr:.1f} dB "
                f"-> {'PASS' if row['passed'] else 'FAIL'} ({gate}, PSNR >= {min_psnr})",
            )
            if not row["passed"]:
                failures.append(
                    f"{model} {precision} (max abs {report.max_abs_error:.2e}, PSNR {sampler_psnr:.1f} dB)"
                )
            if conditional is not None:
                whole = _whole_call_parity(ctx, conditional, model, unet, precision, min_psnr)
                rows.append(whole)
                if not whole["passed"]:
                    failures.append(
                        f"{model} {precision} {whole['part']} (PSNR {whole['sampler_psnr_db']:.1f} dB)"
                    )
            if ctx.cfg.export.feature_reuse and precision != "int8":
                for row in _reuse_parity(ctx, model, unet, precision, scheduler, conditional=conditional):
                    rows.append(row)
                    if not row["passed"]:
                        failures.append(
                            f"{model} {precision} {row['part']} (max abs {row['max_abs_error']:.2e})"
                        )
    build = ctx.record("build")
    if build and build.ok:
        for model, unet in models.items():
            row = _engine_parity(ctx, model, unet, scheduler, conditional)
            rows.append(row)
            if not row["passed"]:
                failures.append(f"{model} TensorRT engine (max abs {row['max_abs_error']:.2e})")
            if f"{model}.full" in build.metrics.get("engines", {}):
                tensorrt_rows = _reuse_parity(
                    ctx, model, unet, ctx.cfg.build.precision, scheduler, "tensorrt", conditional
                )
                for row in tensorrt_rows:
                    rows.append(row)
                    if not row["passed"]:
                        error = f"max abs {row['max_abs_error']:.2e}"
                        failures.append(f"{model} TensorRT {row['part']} ({error})")
    graphs = [r for r in rows if r.get("component") != WHOLE_CALL]  # per-call rows: the gate's errors
    fp32 = [r for r in graphs if r["precision"] == "fp32" and r["provider"] != "TensorRT"]
    metrics = {
        "results": rows,
        "max_abs_error": max(r["max_abs_error"] for r in graphs),
        "max_abs_error_fp32": max((r["max_abs_error"] for r in fp32), default=None),
        "passed": not failures,
    }
    if conditional is not None:
        metrics["text_to_image_psnr_db"] = {
            f"{r['model']}.{r['precision']}": r["sampler_psnr_db"]
            for r in rows
            if r.get("component") == WHOLE_CALL
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


WHOLE_CALL = "text_to_image"
SHARED_LABELS = {TEXT_ENCODER: "text encoder", VAE_DECODER: "VAE decoder"}


def _shared_parity(ctx: RunContext, model: DiffusionModel, latents: torch.Tensor | None) -> list[dict]:
    """The shared text encoder and VAE decoder graphs vs torch fp32, per exported precision (not int8):
    the text encoder on the token ids of the first ``max(parity.batches)`` images' prompts, the VAE
    decoder on the torch sampler's final ``latents`` (unscaled as the graph takes them)."""
    cfg = ctx.cfg.parity
    graphs = ([TEXT_ENCODER] if model.conditioning == "text" else []) + (
        [VAE_DECODER] if model.latent else []
    )
    rows = []
    for precision in [p for p in ctx.cfg.export.precisions if p != "int8"]:
        atol, rtol = (cfg.atol_fp32, cfg.rtol_fp32) if precision == "fp32" else (cfg.atol_fp16, cfg.rtol_fp16)
        for graph in graphs:
            path = layout.shared_onnx_path(ctx.run_dir, graph, precision)
            if graph == TEXT_ENCODER:
                prompts = ctx.prompts.for_images(max(cfg.batches))
                tokenizer = model.tokenizer
                ids = tokenizer(
                    prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt",
                ).input_ids  # fmt: skip
                report = text_encoder_parity(model.text_encoder, path, ids, precision, (atol, rtol))
            else:
                z = unscale_latents(latents, model.vae.config)
                report = vae_decoder_parity(model.vae, path, z, precision, (atol, rtol))
            row = {
                "model": "shared",
                "component": graph,
                "part": SHARED_LABELS[graph],
                "precision": precision,
                "provider": "CPUExecutionProvider",
                **{k: v for k, v in report.as_dict().items() if k not in ("reference", "candidate")},
                "sampler_psnr_db": None,
                "min_psnr_db": None,
                "passed": report.passed,
            }
            rows.append(row)
            log(
                "parity",
                f"{SHARED_LABELS[graph]} {precision}: max abs {report.max_abs_error:.2e}, "
                f"median {report.median_abs_error:.2e}, cosine {report.min_cosine:.6f} "
                f"-> {'PASS' if report.passed else 'FAIL'} (atol {atol}, rtol {rtol})",
            )
    return rows


def _whole_call_parity(
    ctx: RunContext, model: DiffusionModel, name: str, unet, precision: str, min_psnr: float
) -> dict:
    """Prompt to image on ONNX Runtime alone (the text encoder graph, the guided ``name`` UNet graph at
    ``precision``, the VAE decoder graph; the shared graphs at fp32 for an int8 UNet) vs torch from the
    same prompts and seeds: the images' PSNR, gated on ``min_psnr``."""
    cfg = ctx.cfg.parity
    shared = "fp32" if precision == "int8" else precision
    text_path = (
        layout.shared_onnx_path(ctx.run_dir, TEXT_ENCODER, shared) if model.conditioning == "text" else None
    )
    vae_path = layout.shared_onnx_path(ctx.run_dir, VAE_DECODER, shared) if model.latent else None
    unet_path = layout.onnx_path(ctx.run_dir, name, precision)
    result = text_to_image_parity(
        model, unet_path, text_path, vae_path, ctx.prompts.for_images(cfg.sampler_images), unet=unet,
        negative_prompt=ctx.prompts.negative, seed=ctx.cfg.sample.seed, steps=cfg.sampler_steps,
        guidance_scale=ctx.cfg.sample.guidance_scale, scheduler="ddim",
    )  # fmt: skip
    graphs = [g for g, on in (("text encoder", text_path), ("UNet", True), ("VAE decoder", vae_path)) if on]
    plural = "s" if len(graphs) > 1 else ""
    part = f"{'prompt' if text_path else 'class'} -> image ({', '.join(graphs)} graph{plural})"
    a, b = result["torch"].double().flatten(1), result["onnx"].double().flatten(1)
    err = (a - b).abs()
    cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-30)
    passed = result["psnr"] >= min_psnr
    row = {
        "model": name,
        "component": WHOLE_CALL,
        "part": part,
        "precision": precision,
        "provider": "CPUExecutionProvider",
        "max_abs_error": result["max_abs_error"],
        "median_abs_error": float(err.median()),
        "min_cosine": float(cosine.min()),
        "sampler_psnr_db": result["psnr"],
        "min_psnr_db": min_psnr,
        "passed": passed,
        "graphs": [p.relative_to(ctx.run_dir).as_posix() for p in (text_path, unet_path, vae_path) if p],
        "images": len(result["prompts"]),
        "steps": result["steps"],
        "guidance_scale": result["guidance_scale"],
    }
    log(
        "parity",
        f"{name} {precision} whole call, {part}: PSNR {result['psnr']:.1f} dB, max abs "
        f"{result['max_abs_error']:.2e} over {len(result['prompts'])} images -> "
        f"{'PASS' if passed else 'FAIL'} (PSNR >= {min_psnr})",
    )
    return row
