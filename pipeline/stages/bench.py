"""The ``bench`` stage: UNet-call and sampler latency, dense vs compressed, per backend."""

from __future__ import annotations

import torch

from compressor import runlayout
from compressor.persist import load_unet
from compressor.sampling import make_scheduler
from deploy.bench import host_facts, percentile_ms, sampler_call, time_alternating, unet_call
from deploy.runtimes import Backend, onnxruntime_backend, torch_backend
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["bench", "build", "device", "threads"]
INPUTS = ["prune", "finetune", "export", "build"]
ENVIRONMENT = ["torch", "onnxruntime", "tensorrt", "gpu"]


def torch_variants(ctx: RunContext, models: dict) -> dict[str, dict[str, Backend]]:
    """fp32 eager everywhere; on CUDA also fp16, bf16, fp16 with CUDA graphs (and compiled)."""
    fp16 = torch.float16
    plans: dict[str, dict] = {"torch": {}}
    if ctx.device.type == "cuda":
        plans["torch-fp16"] = {"dtype": fp16}
        if torch.cuda.is_bf16_supported():
            plans["torch-bf16"] = {"dtype": torch.bfloat16}
        plans["torch-fp16+cudagraph"] = {"dtype": fp16, "cuda_graph": True}
        if ctx.cfg.bench.torch_compile:
            plans["torch-fp16+compile"] = {"dtype": fp16, "compile": True}
    return {
        label: {m: torch_backend(u, ctx.device, **kw) for m, u in models.items()}
        for label, kw in plans.items()
    }


def load_backends(ctx: RunContext, name: str, models: dict) -> tuple[dict[str, dict[str, Backend]], str]:
    """Variants (label -> dense/compressed backends) of one backend, or ({}, why unavailable)."""
    threads = ctx.cfg.bench.threads
    if name == "torch":
        return torch_variants(ctx, models), ""
    if name == "onnxruntime":
        ctx.require("export", "bench")
        return {
            "onnxruntime": {
                m: onnxruntime_backend(runlayout.onnx_path(ctx.run_dir, m, "fp32"), threads) for m in models
            }
        }, ""
    from deploy import tensorrt_backend

    reason = tensorrt_backend.unavailable_reason()
    if reason:
        return {}, reason
    ctx.require("build", "bench")
    variants = {"tensorrt": tensorrt_backend.run_backends(ctx.run_dir)}
    if ctx.cfg.build.cuda_graphs:
        variants["tensorrt+cudagraph"] = tensorrt_backend.run_backends(ctx.run_dir, cuda_graph=True)
    return variants, ""


def run(ctx: RunContext) -> StageResult:
    """Time dense and compressed alternately; write rows, speed-ups and host facts."""
    cfg = ctx.cfg.bench
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source, folder = ctx.final_model_dir()
    models = {"dense": ctx.dense.unet, "pruned": load_unet(folder)[0]}
    macs = ctx.require("prune", "bench")["metrics"]
    macs_reduction = macs["macs_before"] / macs["macs_after"]
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
