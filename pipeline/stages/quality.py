"""The ``quality`` stage: SSIM/PSNR vs dense from the same seeds, and Frechet distances."""

from __future__ import annotations

from compressor import runlayout
from compressor.data import stack
from compressor.errors import UserError
from compressor.models import as_noise_predictor
from compressor.persist import load_unet
from compressor.quality import FeatureAdapter, frechet_distance, inception_unavailable, psnr, ssim
from compressor.sampling import generate, make_scheduler
from deploy.runtimes import load_backend
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["quality", "sample", "data"]
INPUTS = ["prune", "finetune", "export", "build"]
MODEL_LABELS = {"prune": "pruned", "finetune": "finetuned"}


def feature_network(ctx: RunContext):
    """The Frechet feature extractor and its metric name (``fd_digits`` or ``fid``)."""
    kind = ctx.cfg.quality.feature
    if kind == "auto":
        kind = "digits" if ctx.cfg.data.source == "digits" else "inception"
    if kind == "digits":
        from compressor.features import NUM_FEATURES, load_digits_features

        return FeatureAdapter(load_digits_features(), 1, NUM_FEATURES), "fd_digits"
    return 2048, "fid"


def _deployed(ctx: RunContext, backend: str, model: str):
    """A deployed backend (ONNX Runtime session or TensorRT engine) of the run."""
    ctx.require("export" if backend == "onnxruntime" else "build", "quality")
    sample = ctx.cfg.sample
    level = sample.cache_level if sample.cache_interval > 1 else None
    return load_backend(backend, run_dir=ctx.run_dir, model=model, device=ctx.device, cache_level=level)


def run(ctx: RunContext) -> StageResult:
    """Sample every model of the run from the same seeds and score them."""
    cfg = ctx.cfg.quality
    feature, metric = feature_network(ctx)
    fd_note = None
    if metric == "fid":  # find out before sampling whether FID can run at all
        reason = inception_unavailable(cfg.inception_weights)
        if reason and cfg.require_fid:
            raise UserError(
                f"quality.require_fid is set but FID cannot run ({reason}); install the `fid` extra and set "
                "quality.inception_weights to a local Inception weights file"
            )
        fd_note = f"fid unavailable: {reason}" if reason else None
    steps = cfg.steps or ctx.cfg.sample.steps
    scheduler = make_scheduler(ctx.cfg.sample.scheduler, ctx.dense.scheduler_config)
    models = {"dense": ctx.dense_on()}
    for stage, label in MODEL_LABELS.items():
        if ctx.record(stage):
            models[label] = load_unet(runlayout.model_dir(ctx.run_dir, stage), ctx.device)[0]
    raw = runlayout.model_dir(ctx.run_dir, "finetune", raw=True)
    if cfg.compare_raw and ctx.record("finetune") and raw.is_dir():
        # the raw (non-EMA) weights too, to show which copy is the better one
        models["finetuned (raw)"] = load_unet(raw, ctx.device)[0]
    if len(models) == 1:
        ctx.require("prune", "quality")
    sample = ctx.cfg.sample
    level = sample.cache_level if sample.cache_interval > 1 else None
    predictors = {
        label: load_backend("torch", unet=unet, device=ctx.device, cache_level=level).predict
        if level is not None
        else as_noise_predictor(unet)
        for label, unet in models.items()
    }
    if cfg.backend != "torch":
        # the deployed sampler: dense and final compressed model served by the chosen backend
        final = "finetuned" if "finetuned" in models else "pruned"
        for label, model in (("dense", "dense"), (final, "pruned")):
            predictors[label] = _deployed(ctx, cfg.backend, model).predict
    samples = {}
    for label, predict in predictors.items():
        reuse = f", cache interval {sample.cache_interval}" if level is not None else ""
        log(
            "quality",
            f"sampling {cfg.num_samples} images from the {label} model "
            f"({sample.scheduler} {steps} steps{reuse})",
        )
        samples[label] = generate(
            predict,
            scheduler,
            ctx.image_shape(),
            cfg.num_samples,
            steps,
            ctx.cfg.sample.eta,
            ctx.cfg.sample.seed,
            ctx.cfg.sample.batch_size,
            ctx.device,
            cache_interval=sample.cache_interval,
            cache_schedule=sample.cache_schedule,
        )
    reference = (stack(ctx.dataset, cfg.num_reference) + 1) / 2
    results: dict[str, dict] = {label: {} for label in samples}
    for label, imgs in samples.items():
        if label != "dense":
            results[label]["ssim_vs_dense"] = ssim(imgs, samples["dense"])
            results[label]["psnr_vs_dense"] = psnr(imgs, samples["dense"])
        results[label][metric] = (
            None if fd_note else frechet_distance(reference, imgs, feature, cfg.inception_weights)
        )
    metrics = {
        "models": results,
        "num_samples": cfg.num_samples,
        "num_reference": int(reference.shape[0]),
        "steps": steps,
        "scheduler": ctx.cfg.sample.scheduler,
        "cache_interval": sample.cache_interval,
        "backend": cfg.backend,
        "frechet_metric": metric,
        "frechet_note": fd_note,
    }
    if metric == "fd_digits" and reference.shape[0] >= 4:
        half = reference.shape[0] // 2
        metrics["fd_digits_real_floor"] = frechet_distance(reference[:half], reference[half:], feature)
    for label, vals in results.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in vals.items() if isinstance(v, float))
        log("quality", f"{label}: {shown or 'no figures'}")
    if fd_note:
        log("quality", fd_note)
    ctx.stage_dir("quality")
    path = runlayout.quality_samples(ctx.run_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in samples.items()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return StageResult(metrics, [path])
