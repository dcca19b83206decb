"""The ``bench`` stage: UNet-call and sampler latency, dense vs compressed, per backend.

A conditional model's UNet calls and sampler loops are fed the run's conditioning (the prompts'
embeddings or class labels, :attr:`pipeline.context.RunContext.prompts`) under
``sample.guidance_scale``: a guided UNet call is timed at twice the batch, as the sampler calls it.
Besides those, it times the whole text-to-image call a user waits for (``what`` ``pipeline``: text
encoder, the guided UNet loop, VAE decoder; :mod:`deploy.whole_call`), each row with its
``components`` in milliseconds. An unconditional model's rows are as they always were.
"""

from __future__ import annotations

import torch

from compressor.guidance import Conditioning
from compressor.models import read_model_spec
from compressor.persist import load_unet, student_sampling
from compressor.sampling import make_scheduler
from compressor.stack import SamplerVariant
from deploy import tensorrt_backend
from deploy.runtimes import VARIANTS, Backend, load_backend, load_variant
from deploy.stopwatch import host_facts, percentile_ms, sampler_call, time_alternating, unet_call
from deploy.whole_call import LOOP, component_sources, unavailable_reason, whole_call
from pipeline.context import RunContext, StageCall, StageResult, log

SECTIONS = ["bench", "build", "device", "threads"]
INPUTS = ["prune", "finetune", "distill_steps", "export", "build"]
ENVIRONMENT = ["torch", "onnxruntime", "tensorrt", "gpu"]
PROMPT_KEYS = ("guidance_scale", "prompts", "prompt_file", "negative_prompt")  # the data's: through prune


def key_extra(ctx: RunContext) -> dict:
    """Timed feature-reuse samplers also depend on the split level and the full-step schedule; a
    conditional model's timed calls on its prompts (or labels) and the guidance scale."""
    extra = {}
    if _conditioning_kind(ctx) != "none":
        s = ctx.cfg.sample
        extra = {f"sample.{k}": getattr(s, k) for k in PROMPT_KEYS}
    if not any(v.cache_interval > 1 for v in ctx.cfg.bench.sampler_variants()):
        return extra
    sample = ctx.cfg.sample
    return {**extra, "sample.cache_level": sample.cache_level, "sample.cache_schedule": sample.cache_schedule}


def _conditioning_kind(ctx: RunContext) -> str:
    """The model's conditioning from its configs alone (the model loaded only where they cannot be read)."""
    spec = read_model_spec(ctx.cfg.model)
    if spec is not None:
        return spec.conditioning
    return ctx.at_stage(StageCall("bench", "key")).dense.conditioning


def variant_labels(ctx: RunContext, kind: str) -> list[str]:
    """The variants of backend ``kind`` this host times (labels of :data:`deploy.runtimes.VARIANTS`).

    torch: fp32 eager everywhere; on CUDA also fp16, bf16, fp16 with CUDA graphs (and
    compiled). TensorRT: plain, and with CUDA graphs when ``build.cuda_graphs``.
    """
    if kind == "torch":
        labels = ["torch"]
        if ctx.device.type == "cuda":
            labels.append("torch-fp16")
            if torch.cuda.is_bf16_supported():
                labels.append("torch-bf16")
            labels.append("torch-fp16+cudagraph")
            if ctx.cfg.bench.torch_compile:
                labels.append("torch-fp16+compile")
        return labels
    if kind == "tensorrt":
        return ["tensorrt", "tensorrt+cudagraph"] if ctx.cfg.build.cuda_graphs else ["tensorrt"]
    if kind == "onnxruntime" and "int8" in ctx.cfg.export.precisions:
        return ["onnxruntime", "onnxruntime-int8"]
    return [kind]


def load_backends(
    ctx: RunContext, kind: str, models: dict, cache_level: int | None = None
) -> tuple[dict[str, dict[str, Backend]], str]:
    """Variants (label -> dense/compressed backends) of one backend, or ({}, why unavailable).

    ``cache_level``: the feature-reuse builds of the same variants (two passes each).
    """
    if kind == "tensorrt":
        reason = tensorrt_backend.unavailable_reason()
        if reason:
            return {}, reason
        if cache_level is not None and ctx.cfg.build.precision == "int8":
            return {}, "feature reuse on TensorRT: the passes are built in fp32/fp16 only (build.precision)"
    if kind != "torch":
        ctx.require("export" if kind == "onnxruntime" else "build", "bench")
    if kind != "torch" and cache_level is not None and not ctx.cfg.export.feature_reuse:
        return {}, f"feature reuse on {kind} needs the exported passes (set export.feature_reuse=true)"
    variants = {}
    labels = variant_labels(ctx, kind)
    if cache_level is not None:  # the feature-reuse passes are exported in fp32/fp16 only
        labels = [label for label in labels if VARIANTS[label][1].get("precision") != "int8"]
    for label in labels:
        variants[label] = {
            m: load_variant(
                label,
                unet=unet if kind == "torch" else None,
                run_dir=ctx.run_dir,
                model=m,
                device=ctx.device,
                threads=ctx.cfg.bench.threads,
                cache_level=cache_level,
            )
            for m, unet in models.items()
        }
    return variants, ""


def run(ctx: RunContext) -> StageResult:
    """Time dense and compressed alternately; write rows, speed-ups and host facts."""
    cfg = ctx.cfg.bench
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source, folder = ctx.final_model_dir()
    models = {"dense": ctx.dense.unet, "pruned": load_unet(folder)[0]}  # backends build private copies
    macs_reduction = ctx.require("prune", "bench").typed().macs_reduction
    conditional = ctx.dense.conditioning != "none"
    samplers = cfg.sampler_variants()
    plain, reuse, skipped = _backends(ctx, models, any(v.cache_interval > 1 for v in samplers))
    rows, speedups = [], []
    for name, backends in plain.items():
        for batch in cfg.batch_sizes:
            calls = {
                m: unet_call(b.predict, ctx.image_shape(), batch, ctx.device, **_guidance(ctx, batch))
                for m, b in backends.items()
            }
            extra = _unet_keys(ctx, batch)
            _time(
                ctx,
                name,
                batch,
                "unet",
                None,
                calls,
                cfg.warmup,
                cfg.repeat,
                macs_reduction,
                rows,
                speedups,
                extra,
            )
        for variant in samplers:
            chosen = backends if variant.cache_interval == 1 else reuse.get(name)
            if chosen is None:
                continue  # no feature-reuse build of this backend (the reason is in skipped)
            for batch in cfg.sampler_batch_sizes or cfg.batch_sizes:
                calls = {m: _sampler(ctx, b, variant, batch) for m, b in chosen.items()}
                warmup = min(1, cfg.warmup)
                extra = {"guidance_scale": ctx.cfg.sample.guidance_scale} if conditional else None
                _time(
                    ctx,
                    name,
                    batch,
                    "sampler",
                    variant,
                    calls,
                    warmup,
                    cfg.sampler_repeat,
                    macs_reduction,
                    rows,
                    speedups,
                    extra,
                )
        if conditional:
            student = folder if source == "distill_steps" else None
            calls_of = {"plain": backends, "reuse": reuse.get(name), "student": student}
            _time_whole_calls(ctx, name, calls_of, samplers, macs_reduction, rows, speedups, skipped)
    metrics = {
        "results": rows,
        "speedup": speedups,
        "skipped": skipped,
        "backends": {name: {m: b.info for m, b in bk.items()} for name, bk in plain.items()},
        "host": host_facts(),
        "sampler_steps": cfg.sampler_steps,
        "variants": [str(v) for v in samplers],
        "compressed_from": source,
        "stack": _time_stack(ctx, models, folder if source == "distill_steps" else None)
        if ctx.stack is not None
        else None,
    }
    if source == "distill_steps":
        metrics["student"] = _time_student(ctx, folder, plain)
    if conditional:
        metrics["conditioning"] = {
            **ctx.prompts.summary(),
            "guidance_scale": ctx.cfg.sample.guidance_scale,
            "guided_unet_batch": "2x" if _guided(ctx) else "1x",
        }
    return StageResult(metrics)


def _guided(ctx: RunContext) -> bool:
    """Whether a conditional model's sampler runs classifier-free guidance (2 x batch UNet calls)."""
    return ctx.dense.conditioning != "none" and ctx.cfg.sample.guidance_scale > 1


def _conditioning(ctx: RunContext, batch: int) -> Conditioning:
    """The conditioning of images ``0 .. batch - 1`` (the run's prompts or labels), encoded once."""
    memo = ctx._memoised("bench_conditioning", dict)
    if batch not in memo:
        memo[batch] = ctx.prompts.conditioning(ctx.dense, batch, 0, ctx.device)
    return memo[batch]


def _guidance(ctx: RunContext, batch: int) -> dict:
    """The timed calls' conditioning and guidance keywords ({} for an unconditional model)."""
    if ctx.dense.conditioning == "none":
        return {}
    return {"conditioning": _conditioning(ctx, batch), "guidance_scale": ctx.cfg.sample.guidance_scale}


def _unet_keys(ctx: RunContext, batch: int) -> dict | None:
    """What a conditional model's UNet-call row says about its batch (None: unconditional)."""
    if ctx.dense.conditioning == "none":
        return None
    scale, guided = ctx.cfg.sample.guidance_scale, _guided(ctx)
    return {
        "unet_batch": 2 * batch if guided else batch,
        "guidance": f"classifier-free at scale {scale:g}: one UNet call on 2 x batch (unconditional rows, "
        "then conditional), as each sampling step calls it"
        if guided
        else f"none (guidance_scale {scale:g} <= 1): the conditional rows alone",
        "conditioning": ctx.dense.conditioning,
    }


def _time_student(ctx: RunContext, folder, plain: dict) -> list[dict]:
    """The few-step student's sampler (DDIM at its own steps, its prediction type) against the dense
    reference sampler (``sample.scheduler`` at ``sample.steps``), alternately, per backend and batch."""

    sched_cfg, steps = student_sampling(folder)
    s, cfg = ctx.cfg.sample, ctx.cfg.bench
    reference, variant = SamplerVariant(s.scheduler, s.steps), SamplerVariant("ddim", steps)
    out = []
    for name, backends in plain.items():
        for batch in cfg.sampler_batch_sizes or cfg.batch_sizes:
            calls = {
                "dense": _sampler(ctx, backends["dense"], reference, batch),
                "pruned": _sampler(ctx, backends["pruned"], variant, batch, sched_cfg),
            }
            times = time_alternating(calls, min(1, cfg.warmup), cfg.sampler_repeat)
            ref_ms, ms = percentile_ms(times["dense"])[0], percentile_ms(times["pruned"])[0]
            log("bench", f"{name} student DDIM {steps} batch {batch}: {ms:.1f} ms vs dense {reference} "
                         f"{ref_ms:.1f} ms, speed-up {ref_ms / ms:.2f}x")  # fmt: skip
            out.append({"backend": name, "batch": batch, "student_steps": steps, "reference": str(reference),
                        "reference_ms": ref_ms, "ms": ms, "speedup": ref_ms / ms})  # fmt: skip
    return out


def _time_stack(ctx: RunContext, models: dict, student=None) -> dict:
    """The chosen stack (compressed, on the target's backend and batch) against the dense reference
    sampler (``sample.scheduler`` at ``sample.steps``, fp32), alternately: what ``check`` verifies.
    ``student``: the folder of a chosen few-step student, sampled with its own schedule."""

    lat, stack, s = ctx.cfg.prune.target_latency, ctx.stack, ctx.cfg.sample
    level = s.cache_level if stack.reuses_features else None
    reference = SamplerVariant(s.scheduler, s.steps)
    variant = stack.variant
    if lat.backend != "torch":
        ctx.require("export" if lat.backend == "onnxruntime" else "build", "bench")

    def backend(model: str, precision: str, cache_level: int | None) -> Backend:
        unet = models[model] if lat.backend == "torch" else None
        return load_backend(lat.backend, unet=unet, run_dir=ctx.run_dir, model=model, device=ctx.device,
                            precision=precision, threads=lat.threads or ctx.cfg.bench.threads,
                            cache_level=cache_level)  # fmt: skip

    calls = {
        "dense": _sampler(ctx, backend("dense", "fp32", None), reference, lat.batch),
        "pruned": _sampler(
            ctx,
            backend("pruned", stack.precision, level),
            variant,
            lat.batch,
            student_sampling(student)[0] if student else None,
        ),
    }
    times = time_alternating(calls, min(1, ctx.cfg.bench.warmup), ctx.cfg.bench.sampler_repeat)
    ref_ms, ms = percentile_ms(times["dense"])[0], percentile_ms(times["pruned"])[0]
    log("bench", f"chosen stack {stack.label()} on {lat.backend} batch {lat.batch}: {ms:.1f} ms vs dense "
                 f"{reference} {ref_ms:.1f} ms, speed-up {ref_ms / ms:.2f}x")  # fmt: skip
    return {
        "backend": lat.backend,
        "batch": lat.batch,
        "stack": stack.as_dict(),
        "reference": str(reference),
        "reference_ms": ref_ms,
        "ms": ms,
        "speedup": ref_ms / ms,
        "runs": ctx.cfg.bench.sampler_repeat,
    }


def _backends(ctx: RunContext, models: dict, with_reuse: bool) -> tuple[dict, dict, dict]:
    """(plain variants, feature-reuse variants, skipped: name -> reason) of every bench backend."""
    plain, reuse, skipped = {}, {}, {}
    for kind in ctx.cfg.bench.backends:
        found, reason = load_backends(ctx, kind, models)
        if not found:
            skipped[kind] = reason
            log("bench", f"{kind}: skipped ({reason})")
        plain.update(found)
        if with_reuse and found:
            found, reason = load_backends(ctx, kind, models, ctx.cfg.sample.cache_level)
            if not found:
                skipped[f"{kind} (feature reuse)"] = reason
                log("bench", f"{kind} with feature reuse: skipped ({reason})")
            reuse.update(found)
    return plain, reuse, skipped


def _sampler(ctx: RunContext, backend: Backend, variant: SamplerVariant, batch: int, sched_cfg=None):
    scheduler = make_scheduler(variant.scheduler, sched_cfg or ctx.dense.scheduler_config)
    shape = ctx.image_shape()
    schedule = ctx.cfg.sample.cache_schedule
    return sampler_call(
        backend.predict,
        scheduler,
        shape,
        batch,
        variant.steps,
        ctx.device,
        variant.cache_interval,
        schedule,
        **_guidance(ctx, batch),
    )


def _time_whole_calls(
    ctx: RunContext,
    name: str,
    calls_of: dict,
    samplers: list[SamplerVariant],
    macs_reduction: float,
    rows: list,
    speedups: list,
    skipped: dict,
) -> None:
    """A conditional model's whole text-to-image call (text encoder, guided UNet loop, VAE decoder),
    dense and compressed alternately, at each sampler batch: rows ``what`` ``pipeline`` with their
    ``components`` (median ms each), the speed-up of the call and of its UNet loop alone.

    ``calls_of``: ``plain`` (model -> backend), ``reuse`` (model -> feature-reuse backend, or None:
    variants that reuse features are then skipped, the reason already in ``skipped``) and ``student``
    (the folder of a few-step student the run ends with, or None). A student's call samples with its
    own schedule at its own steps (unguided when it was distilled at a fixed scale, as everywhere it
    is sampled) against the dense model's call at the variant: the call a user of the run waits for."""
    cfg, dense = ctx.cfg.bench, ctx.dense
    student = calls_of["student"]
    student_cfg, student_steps = student_sampling(student) if student is not None else (None, None)
    kind = VARIANTS[name][0]
    reason = unavailable_reason(dense, kind, ctx.run_dir)
    if reason:
        if f"{kind} (whole call)" not in skipped:
            skipped[f"{kind} (whole call)"] = reason
            log("bench", f"{kind} whole call: skipped ({reason})")
        return
    scale, graphs = ctx.cfg.sample.guidance_scale, {}  # the ONNX graphs' sessions, shared by the calls
    for variant in samplers:
        backends = calls_of["plain"] if variant.cache_interval == 1 else calls_of["reuse"]
        if backends is None:
            continue  # no feature-reuse build of this backend (the reason is in skipped)
        for batch in cfg.sampler_batch_sizes or cfg.batch_sizes:
            calls = {}
            for m, b in backends.items():
                own = student is not None and m == "pruned"
                calls[m] = whole_call(
                    dense,
                    kind,
                    b.predict,
                    make_scheduler(
                        "ddim" if own else variant.scheduler, student_cfg if own else dense.scheduler_config
                    ),
                    ctx.prompts,
                    batch,
                    student_steps if own else variant.steps,
                    scale,
                    ctx.device,
                    ctx.run_dir,
                    cfg.threads,
                    graphs,
                    1 if own else variant.cache_interval,
                    ctx.cfg.sample.cache_schedule,
                )
            times = time_alternating(calls, min(1, cfg.warmup), cfg.sampler_repeat)
            keys = {
                "backend": name,
                "batch": batch,
                "what": "pipeline",
                "variant": str(variant),
                "scheduler": variant.scheduler,
                "steps": variant.steps,
                "cache_interval": variant.cache_interval,
                **({"student_steps": student_steps} if student is not None else {}),
                "precision": _precision(ctx, name),
                "guidance_scale": scale,
                "components_on": component_sources(dense, kind),
            }
            med, parts = {}, {}
            for model, samples in times.items():
                median, p95 = percentile_ms(samples)
                med[model], parts[model] = median, calls[model].component_ms(cfg.sampler_repeat)
                rows.append({**keys, "model": model, "median_ms": median, "p95_ms": p95,
                             "runs": cfg.sampler_repeat, "components": parts[model]})  # fmt: skip
            speedup = med["dense"] / med["pruned"]
            loop_speedup = parts["dense"][LOOP] / parts["pruned"][LOOP]
            speedups.append({**keys, "speedup": speedup, "unet_loop_speedup": loop_speedup,
                             "macs_reduction": macs_reduction,
                             "speedup_over_macs_reduction": speedup / macs_reduction})  # fmt: skip
            log(
                "bench",
                f"{name} whole call {variant} batch {batch}: dense {med['dense']:.1f} ms, pruned "
                f"{med['pruned']:.1f} ms, speed-up {speedup:.2f}x (UNet loop alone {loop_speedup:.2f}x); "
                f"dense {_breakdown(parts['dense'])}; pruned {_breakdown(parts['pruned'])}",
            )


def _breakdown(parts: dict[str, float]) -> str:
    """E.g. 'text_encoder 1.2 + unet_loop 30.5 + vae_decoder 2.1 ms'."""
    return " + ".join(f"{k} {v:.1f}" for k, v in parts.items()) + " ms"


def _time(
    ctx, name, batch, what, variant, calls, warmup, repeat, macs_reduction, rows, speedups, extra=None
) -> None:
    """Time dense and pruned alternately; append their rows and the speed-up row (``extra``: more
    keys for both, a conditional model's)."""
    times = time_alternating(calls, warmup, repeat)
    keys = {
        "backend": name,
        "batch": batch,
        "what": what,
        "variant": str(variant) if variant else None,
        "scheduler": variant.scheduler if variant else None,
        "steps": variant.steps if variant else None,
        "cache_interval": variant.cache_interval if variant else 1,
        "precision": _precision(ctx, name),
        **(extra or {}),
    }
    med = {}
    for model, samples in times.items():
        median, p95 = percentile_ms(samples)
        med[model] = median
        rows.append({**keys, "model": model, "median_ms": median, "p95_ms": p95, "runs": repeat})
    speedup = med["dense"] / med["pruned"]
    speedups.append(
        {
            **keys,
            "speedup": speedup,
            "macs_reduction": macs_reduction,
            "speedup_over_macs_reduction": speedup / macs_reduction,
        }
    )
    label = f"{what} {variant}" if variant else what
    log(
        "bench",
        f"{name} {label} batch {batch}: dense {med['dense']:.1f} ms, pruned {med['pruned']:.1f} ms, "
        f"speed-up {speedup:.2f}x (MACs reduction {macs_reduction:.2f}x)",
    )


def _precision(ctx: RunContext, label: str) -> str:
    """The arithmetic a bench variant runs in (TensorRT: the engines' build precision)."""
    backend, options = VARIANTS[label]
    return ctx.cfg.build.precision if backend == "tensorrt" else options.get("precision", "fp32")
