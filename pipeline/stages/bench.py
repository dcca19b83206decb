"""The ``bench`` stage: UNet-call and sampler latency, dense vs compressed, per backend."""

from __future__ import annotations

import torch

from compressor.persist import load_unet
from compressor.sampling import make_scheduler
from deploy.bench import host_facts, percentile_ms, sampler_call, time_alternating, unet_call
from deploy.runtimes import Backend, load_variant
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["bench", "build", "device", "threads"]
INPUTS = ["prune", "finetune", "export", "build"]
ENVIRONMENT = ["torch", "onnxruntime", "tensorrt", "gpu"]


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
    return [kind]


def load_backends(ctx: RunContext, kind: str, models: dict) -> tuple[dict[str, dict[str, Backend]], str]:
    """Variants (label -> dense/compressed backends) of one backend, or ({}, why unavailable)."""
    if kind == "tensorrt":
        from deploy import tensorrt_backend

        reason = tensorrt_backend.unavailable_reason()
        if reason:
            return {}, reason
    if kind != "torch":
        ctx.require("export" if kind == "onnxruntime" else "build", "bench")
    variants = {}
    for label in variant_labels(ctx, kind):
        variants[label] = {
            m: load_variant(
                label,
                unet=unet if kind == "torch" else None,
                run_dir=ctx.run_dir,
                model=m,
                device=ctx.device,
                threads=ctx.cfg.bench.threads,
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
    scheduler = make_scheduler("ddim", ctx.dense.scheduler_config)
    shape = ctx.image_shape()
    rows, speedups, skipped, backend_info = [], [], {}, {}
    variants: dict[str, dict[str, Backend]] = {}
    for kind in cfg.backends:
        found, reason = load_backends(ctx, kind, models)
        if not found:
            skipped[kind] = reason
            log("bench", f"{kind}: skipped ({reason})")
        variants.update(found)
    for name, backends in variants.items():
        backend_info[name] = {m: b.info for m, b in backends.items()}
        plans = [("unet", b, cfg.repeat) for b in cfg.batch_sizes]
        plans += [("sampler", b, cfg.sampler_repeat) for b in (cfg.sampler_batch_sizes or cfg.batch_sizes)]
        for what, batch, repeat in plans:
            calls = {
                m: unet_call(bk.predict, shape, batch, ctx.device)
                if what == "unet"
                else sampler_call(bk.predict, scheduler, shape, batch, cfg.sampler_steps, ctx.device)
                for m, bk in backends.items()
            }
            warmup = cfg.warmup if what == "unet" else min(1, cfg.warmup)
            times = time_alternating(calls, warmup, repeat)
            med = {}
            for model, samples in times.items():
                median, p95 = percentile_ms(samples)
                med[model] = median
                rows.append(
                    {
                        "backend": name,
                        "batch": batch,
                        "model": model,
                        "what": what,
                        "median_ms": median,
                        "p95_ms": p95,
                        "runs": repeat,
                    }
                )
            speedup = med["dense"] / med["pruned"]
            speedups.append(
                {
                    "backend": name,
                    "batch": batch,
                    "what": what,
                    "speedup": speedup,
                    "macs_reduction": macs_reduction,
                    "speedup_over_macs_reduction": speedup / macs_reduction,
                }
            )
            log(
                "bench",
                f"{name} {what} batch {batch}: dense {med['dense']:.1f} ms, pruned {med['pruned']:.1f} ms, "
                f"speed-up {speedup:.2f}x (MACs reduction {macs_reduction:.2f}x)",
            )
    metrics = {
        "results": rows,
        "speedup": speedups,
        "skipped": skipped,
        "backends": backend_info,
        "host": host_facts(),
        "sampler_steps": cfg.sampler_steps,
        "compressed_from": source,
    }
    return StageResult(metrics)
