"""The ``prune`` stage: Diff-Pruning (or a baseline) of the dense UNet.

A text- or class-conditioned model (pixel or latent) prunes with its conditioning: the Taylor batch
and the held-out batch are its training data encoded by the dense model's VAE and text encoder
(:func:`compressor.encoded_cache.encode_dataset`, cached in ``RUN/encoded/``), each sample with its
caption's embedding or class label, and MACs are counted for one UNet call with a context of the
tokenizer's length.
"""

from __future__ import annotations

from compressor.config import PruneConfig, config_from_mapping, config_to_dict, prune_target_overrides
from compressor.data import taylor_and_holdout, taylor_and_holdout_indices
from compressor.errors import UserError
from compressor.image_quality import denoising_eval_loss
from compressor.models import count_macs_params
from compressor.persist import dense_config, save_unet
from compressor.progress import progress_bar
from compressor.pruning import LatencySearch, PruneResult, prune_unet
from compressor.taylor import candidate_timesteps
from deploy.latency import latency_timer
from pipeline.context import RunContext, StageResult, environment_facts, log
from rundir import layout

SECTIONS = ["model", "data", "prune", "seed"]
INPUTS: list[str] = []


def key_extra(ctx: RunContext) -> dict:
    """A latency target also depends on the host, the backend's libraries and the sampler's steps;
    one over levers on everything the frontier measures (finetune, sampler, quality settings)."""
    lat = ctx.cfg.prune.target_latency
    if not lat.active:
        return {}
    extra: dict = {"latency_host": environment_facts(ctx.device)}
    if lat.what == "sampler":
        extra["bench.sampler_steps"] = ctx.cfg.bench.sampler_steps
    if lat.uses_frontier:
        cfg = config_to_dict(ctx.cfg)
        extra.update({k: cfg[k] for k in ("frontier", "finetune", "sample", "quality", "export", "bench")})
        extra["frontier.chosen"] = ctx.choice.summary["chosen"]["key"] if ctx.choice else None
    return extra


def run(ctx: RunContext) -> StageResult:
    """Prune the dense model by ``prune`` and save it to ``RUN/prune/model``."""
    unet = ctx.dense_on()
    data = _prune_data(ctx, _needs_data(ctx.cfg.prune))
    images, cond, eval_images, eval_cond = data
    tokens = None if cond is None and eval_cond is None else _tokens(ctx)
    before = count_macs_params(unet, tokens)
    log("prune", f"dense: {before[1] / 1e6:.2f}M params, {before[0] / 1e9:.3f}G MACs")
    loss_dense = _eval_loss(ctx, unet, eval_images, eval_cond)
    cfg, allocate, search = _latency_target(ctx, unet)
    result = _prune(ctx, unet, images, cfg, allocate, cond)
    after = count_macs_params(unet, tokens)
    loss_pruned = _eval_loss(ctx, unet, eval_images, eval_cond)
    _log_result(cfg, result, before, after)
    files = _save(ctx, unet, result, cfg)
    metrics = _metrics(ctx, cfg, result, before, after, images, eval_images, search)
    metrics.update(loss_dense=loss_dense, loss_after_pruning=loss_pruned)
    return StageResult(metrics, files)


def _needs_data(cfg: PruneConfig) -> bool:
    return cfg.method in ("diff-pruning", "taylor")


def _latency_target(ctx: RunContext, unet) -> tuple[PruneConfig, object, LatencySearch | None]:
    """(prune config to prune with, allocator or None, the search or None) for a latency target."""
    if not ctx.cfg.prune.target_latency.active:
        return ctx.cfg.prune, None, None
    if ctx.cfg.prune.target_latency.uses_frontier:
        return _chosen_ratio(ctx), None, None
    search = LatencySearch(
        ctx.cfg.prune,
        latency_timer(
            ctx.cfg,
            ctx.device,
            ctx.dense.scheduler_config,
            ctx.image_shape(),
            **ctx.timing_inputs(ctx.cfg.prune.target_latency.batch),
        ),  # fmt: skip
        environment_facts(ctx.device),
        lambda message: log("prune", message),
    )
    cfg, allocate = search.prepare(unet)
    return cfg, allocate, search


def _chosen_ratio(ctx: RunContext) -> PruneConfig:
    """The prune config of the ratio the sweep around the run chose (:mod:`pipeline.frontier.target`)."""
    if ctx.stack is None:
        raise UserError(
            "prune.target_latency.levers: a target over levers is chosen on the frontier before the run; "
            "run the config with `compress-deploy CONFIG` (pipeline.frontier.target.run_with_target)"
        )
    ratio = ctx.stack.ratio
    log("prune", f"pruning at ratio {ratio:g}, the stack the frontier chose: {ctx.stack.label()}")
    return config_from_mapping(config_to_dict(ctx.cfg), prune_target_overrides(ratio=ratio)).prune


def _prune(ctx: RunContext, unet, images, cfg: PruneConfig, allocate, conditioning=None) -> PruneResult:
    """The Taylor pass (with a progress bar) and the structural pruning, in place on ``unet``.

    The bar's total is every candidate timestep: the pass may stop earlier, at the threshold, and
    then the bar closes short of it.
    """
    bar = None
    scheduler = ctx.noise_scheduler()
    candidates = candidate_timesteps(
        scheduler.config.num_train_timesteps, cfg.timestep_stride, cfg.max_timesteps
    )

    def on_trial(r: float, macs: float, params: float) -> None:
        log("prune", f"search: ratio {r:.4f} keeps {macs:.3f} of MACs, {params:.3f} of params")

    def on_step(t: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(len(candidates), "[prune] Taylor pass", "timestep", leave=False)
        bar.set_postfix(t=t, loss=f"{loss:.4f}")
        bar.update(1)

    try:
        result = prune_unet(
            unet,
            scheduler,
            images,
            cfg,
            ctx.cfg.seed,
            on_step,
            on_trial,
            allocate=allocate,
            conditioning=conditioning,
        )
    finally:
        if bar is not None:
            bar.close()
    unet.eval()
    if result.taylor is not None:
        tp_ = result.taylor
        stop = ", the threshold reached" if len(tp_.timesteps) < len(candidates) else ""
        log(
            "prune",
            f"Taylor pass: {len(tp_.timesteps)} of {len(candidates)} candidate timesteps "
            f"({tp_.timesteps[0]}..{tp_.timesteps[-1]}{stop}), {tp_.seconds_per_timestep:.2f} s per timestep",
        )
    if result.level_ratios:
        log(
            "prune",
            "per-level ratios: " + ", ".join(f"level {k}: {v:g}" for k, v in result.level_ratios.items()),
        )
    return result


def _log_result(cfg: PruneConfig, result: PruneResult, before: tuple, after: tuple) -> None:
    log(
        "prune",
        f"pruned ({cfg.method}, ratio {result.ratio:.4f}): {after[1] / 1e6:.2f}M params "
        f"({after[1] / before[1]:.3f}), {after[0] / 1e9:.3f}G MACs ({after[0] / before[0]:.3f})",
    )


def _save(ctx: RunContext, unet, result: PruneResult, cfg: PruneConfig) -> list:
    """The pruned model (weights, structure file, probe) in ``RUN/prune/model``."""
    ctx.stage_dir("prune")
    return save_unet(
        unet.cpu(),
        layout.model_dir(ctx.run_dir, "prune"),
        dense_config(ctx.dense.unet),
        result.history,
        result.kept_widths,
        extra={"method": cfg.method, "ratio": result.ratio, "scheduler_config": ctx.dense.scheduler_config},
    )


def _metrics(
    ctx: RunContext,
    cfg: PruneConfig,
    result: PruneResult,
    before: tuple,
    after: tuple,
    images,
    eval_images,
    search: LatencySearch | None,
) -> dict:
    """The prune record's metrics (read back through :class:`rundir.records.PruneMetrics`)."""
    (macs_before, params_before), (macs_after, params_after) = before, after
    taylor = result.taylor
    return {
        "method": cfg.method,
        "ratio": result.ratio,
        "target": {
            **{k: getattr(ctx.cfg.prune, k) for k in ("ratio", "target_macs", "target_params")},
            "target_latency": search.summary if search else None,
            "frontier": ctx.choice.summary
            if ctx.choice and ctx.cfg.prune.target_latency.uses_frontier
            else None,
        },
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_kept": params_after / params_before,
        "macs_kept": macs_after / macs_before,
        "timesteps_used": taylor.timesteps if taylor else [],
        "taylor_losses": taylor.losses if taylor else [],
        "seconds_per_timestep": taylor.seconds_per_timestep if taylor else None,
        "threshold": cfg.threshold if cfg.method == "diff-pruning" else None,
        "criterion": {
            "group_selection": cfg.group_selection,
            "taylor_score": cfg.taylor_score if _needs_data(cfg) else None,
            "group_reduction": cfg.group_reduction,
        },
        "taylor_images": 0 if images is None else len(images),
        "eval_images": 0 if eval_images is None else len(eval_images),
        "kept_widths": result.kept_widths,
        "kept_channels": result.kept_channels,
        "diagnostics": taylor.diagnostics if taylor else [],
        "search": result.search,
        "trials": search.trials if search else [],
        "importance_kept": result.importance_kept,
        "level_ratios": {str(k): v for k, v in (result.level_ratios or {}).items()},
    }


def _prune_data(ctx: RunContext, needs_data: bool) -> tuple:
    """(Taylor samples, their conditioning, held-out samples, their conditioning), each None where
    absent; the conditioning is None for an unconditional model."""
    if ctx.dense.conditioning == "none":
        images, eval_images = _prune_images(ctx, needs_data)
        return images, None, eval_images, None
    return _conditioned_data(ctx, needs_data)


def _tokens(ctx: RunContext) -> int | None:
    """The length of the text context a conditional UNet is called with (None without text)."""
    return ctx.dense.spec.tokens if ctx.dense.conditioning == "text" else None


def _conditioned_data(ctx: RunContext, needs_data: bool) -> tuple:
    """A conditioned model's Taylor and held-out batches: the samples (latents of a latent model, else
    pixels) and their conditions (:attr:`RunContext.conditioned_data`), drawn by the indices
    :func:`taylor_and_holdout` draws."""
    cfg = ctx.cfg.prune
    if not needs_data and not cfg.eval_batch:
        return None, None, None, None
    source = ctx.conditioned_data
    pick, holdout = taylor_and_holdout_indices(
        source, cfg.batch_size if needs_data else 0, cfg.eval_batch, ctx.cfg.seed
    )
    if cfg.eval_batch and len(holdout) < cfg.eval_batch:
        log("prune", f"only {len(holdout)} of prune.eval_batch={cfg.eval_batch} images could be held out")

    def batch(idx: list[int]) -> tuple:
        if not idx:
            return None, None
        conditions = {k: v.to(ctx.device) for k, v in source.conditions(idx).items()}
        return source.samples(idx).to(ctx.device), conditions

    return (*batch(pick), *batch(holdout))


def _prune_images(ctx: RunContext, needs_data: bool):
    """(Taylor batch or None, held-out images or None) on the run's device."""
    cfg = ctx.cfg.prune
    if not needs_data and not cfg.eval_batch:
        return None, None
    taylor, holdout = taylor_and_holdout(
        ctx.training_data, cfg.batch_size if needs_data else 0, cfg.eval_batch, ctx.cfg.seed
    )
    if cfg.eval_batch and (holdout is None or len(holdout) < cfg.eval_batch):
        got = 0 if holdout is None else len(holdout)
        log("prune", f"only {got} of prune.eval_batch={cfg.eval_batch} images could be held out")
    return (taylor.to(ctx.device) if taylor is not None else None), (
        holdout.to(ctx.device) if holdout is not None else None
    )


def _eval_loss(ctx: RunContext, unet, images, conditioning=None) -> float | None:
    """The denoising loss on the held-out images (with their conditioning; None when none are held out)."""
    if images is None:
        return None
    return denoising_eval_loss(unet, ctx.noise_scheduler(), images, ctx.cfg.seed, conditioning=conditioning)
