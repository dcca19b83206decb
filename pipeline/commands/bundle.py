"""``compress-deploy bundle RUN OUT``: the compressed sampler as a folder for numpy + ONNX Runtime alone.

    compress-deploy bundle RUN OUT [--model pruned|dense] [--precision fp32|fp16|int8]
                           [--scheduler ddim|dpmsolver++] [--steps N] [--cache-interval N]
                           [--cache-level L] [--cache-schedule uniform|quadratic] [--batch B]
                           [--no-dense] [--max-unet-ms MS] [--max-image-ms MS] [--min-speedup X]
                           [--min-sampler-speedup X] [--engine] [--archive] [--dense-steps N]

On the target: ``cd OUT && python -m bundle_runtime check`` (exit 0 pass, 3 fail, 4 a quality
gate inconclusive, 2 bad input), ``generate --seed S --num-images N --out x.png|x.npy`` and ``info``; see
:mod:`deploy.bundle_runtime`. ``--engine`` adds the run's TensorRT engines (built by
``compress-deploy build`` on the target's GPU), run there with TensorRT + cuda-python.
The acceptance limits start from the run's ``check`` record. A run whose latency target over
levers chose a stack bundles that stack's sampler unless the flags say otherwise; a run whose
final model is a few-step student (stage ``distill_steps``) bundles it at its own steps, with its
prediction type, and its dense model at ``--dense-steps``.

A conditional run (text-to-image, class-conditioned) bundles the whole call (see
:mod:`deploy.conditional_bundle`): the tokenizer as ``tokenizer.json``, the text encoder and VAE
decoder graphs beside the UNet's, ``pipeline.json`` (guidance scale, negative prompt, latent scaling,
shapes); on the target ``generate --prompt TEXT --seed S --num-images N --out x.npy`` (with
``pip install numpy onnxruntime tokenizers``), and ``check`` re-decides the whole call's parity and the
run's adherence gate too.
"""

from __future__ import annotations

import json
from pathlib import Path

from compressor.config import AcceptanceConfig, SampleConfig, ServeConfig
from deploy.edge_bundle import BundleSpec, make_bundle
from pipeline.acceptance import quality_checks
from pipeline.commands.args import (
    STACK_FLAGS,
    CommandParser,
    config_flag,
    run_arg,
    run_dir_arg,
    stack_defaults,
    stack_flag,
)
from pipeline.runlock import RunLock
from rundir.records import read_metrics, read_record


def quality_gates(run: Path) -> list[dict]:
    """The run's quality gates (``min_ssim``, the Frechet and KID gates, the check record's limits) as the
    bundle's ``check`` re-decides them: figure, interval, limit, sample count and sampler."""
    import dataclasses

    check, quality = read_record(run, "check", done_only=False), read_metrics(run, "quality")
    if check is None or quality is None:
        return []
    names = {f.name for f in dataclasses.fields(AcceptanceConfig)}
    acc = AcceptanceConfig(**{k: v for k, v in check.section("acceptance").items() if k in names})
    stack = quality.compressed_stack  # a latency target's chosen stack sampled the compressed model
    sampler = (
        f"{stack['scheduler']} {stack['steps']} steps"
        if stack
        else f"few-step student, ddim {quality.student_steps} steps"
        if quality.student_steps
        else f"{quality.scheduler} {quality.steps} steps"
    )
    return [
        {"name": c.name, "measured": c.measured, "interval": c.interval, "limit": c.limit,
         "direction": c.direction, "samples": c.samples, "level": c.level, "sampler": sampler,
         "ill_posed": c.ill_posed}
        for c in quality_checks(acc, quality)
        if c.measured is not None
    ]  # fmt: skip


def _dense_steps(run: Path) -> int:
    """The steps the run's dense model was scored at (its quality record), else 50."""

    quality = read_metrics(run, "quality")
    return int(quality.steps) if quality is not None else 50


def main(argv: list[str]) -> int:
    """Write the bundle; print where and how large."""
    parser = CommandParser(prog="compress-deploy bundle", description="Bundle a run's sampler for a device.")
    run_arg(parser)
    parser.add_argument("out", metavar="OUT", type=Path, help="the bundle folder to write")
    config_flag(parser, "--model", ServeConfig, "model")
    stack_flag(parser, "--precision", SampleConfig, "precision")
    stack_flag(parser, "--scheduler", SampleConfig, "scheduler")
    stack_flag(parser, "--steps", SampleConfig, "steps")
    stack_flag(parser, "--cache-interval", SampleConfig, "cache_interval")
    config_flag(parser, "--cache-level", SampleConfig, "cache_level")
    config_flag(parser, "--cache-schedule", SampleConfig, "cache_schedule")
    parser.add_argument("--batch", type=int, default=1, help="images per UNet call on the device")
    parser.add_argument(
        "--no-dense", action="store_true", help="leave out the dense graph (no speed-up gates)"
    )
    for flag in ("--max-unet-ms", "--max-image-ms", "--min-speedup", "--min-sampler-speedup"):
        key = flag[2:].replace("-", "_")
        config_flag(parser, flag, AcceptanceConfig, key, f"the run's acceptance.{key}")
    parser.add_argument(
        "--engine", action="store_true", help="also carry the run's TensorRT engines (the build stage's)"
    )
    parser.add_argument("--archive", action="store_true", help="also write OUT.tar.gz")
    parser.add_argument(
        "--dense-steps",
        type=int,
        help="a few-step student's bundle: its dense model's DDIM steps (default: the quality steps)",
    )
    args = parser.parse_args(argv)
    run = run_dir_arg(args.run)
    vars(args).update(stack_defaults(args, run, args.model, STACK_FLAGS, SampleConfig))
    spec = BundleSpec(
        model=args.model,
        precision=args.precision,
        scheduler=args.scheduler,
        steps=args.steps,
        cache_interval=args.cache_interval,
        cache_level=args.cache_level,
        cache_schedule=args.cache_schedule,
        batch=args.batch,
        with_dense=not args.no_dense,
        engine=args.engine,
        dense_steps=args.dense_steps or _dense_steps(run),
    )
    limits = {
        "max_unet_ms": args.max_unet_ms,
        "max_image_ms": args.max_image_ms,
        "min_speedup": args.min_speedup,
        "min_sampler_speedup": args.min_sampler_speedup,
        "quality": quality_gates(run),
    }
    with RunLock(run, " ".join(["compress-deploy bundle", *argv])):
        manifest = make_bundle(run, args.out, spec, limits, args.archive)
    size = sum((args.out / name).stat().st_size for name in manifest["files"]) / 1e6
    print(f"bundle of {len(manifest['files'])} files, {size:.2f} MB -> {args.out}")
    print(f"run it there: cd {args.out} && python -m bundle_runtime check")
    if manifest.get("conditioning") in ("text", "class"):
        example = json.loads((args.out / manifest["pipeline"]).read_text())["prompts"][0]
        print(f'  python -m bundle_runtime generate --prompt "{example}" --seed 0 --num-images 4 --out x.npy')
    return 0
