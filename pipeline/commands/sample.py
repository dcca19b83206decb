"""``compress-deploy sample RUN``: generate images from a finished run on any backend.

    compress-deploy sample RUN [--backend B] [--model pruned|dense] [--num-images N] [--steps S]
                               [--seed K] [--eta E] [--scheduler ddim|ddpm|dpmsolver++|unipc]
                               [--cache-interval N] [--cache-level L] [--cache-schedule uniform|quadratic]
                               [--precision fp32|fp16|int8] [--device D] [--out PNG|NPY]
                               [--prompt TEXT ...] [--prompt-file FILE] [--negative-prompt TEXT]
                               [--guidance-scale G]

A text-to-image run samples each ``--prompt`` (repeatable; or one a line of ``--prompt-file``),
image ``i`` taking prompt ``i`` cycled, so ``--num-images`` defaults to one image per prompt; a
class-conditioned run takes class indices. Guidance defaults to the run's ``sample.guidance_scale``.
The images are decoded by the run's VAE (its ONNX graph on ``--backend onnxruntime`` when exported).

Where a latency target over levers chose a stack for the run (``prune.target_latency.levers``),
the pruned model samples with its solver, steps, reuse interval and precision unless the
flags say otherwise. ``--cache-interval N`` > 1 reuses deep features (DeepCache): torch
splits the model itself, ONNX Runtime needs the run's exported passes
(``export.feature_reuse=true``).
``--out X.npy`` writes the images themselves (float32, N x C x H x W in [0, 1]), e.g. to
compare with a bundle's ``generate`` (see ``compress-deploy bundle``). The images are held
whole before they are written, so a count whose images cannot fit in the memory available or
on the output's disk is refused up front, in one line (exit 2).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from compressor.config import RunConfig, SampleConfig, ServeConfig
from compressor.errors import UserError
from compressor.models import resolve_device
from compressor.progress import progress_bar
from compressor.prompts import read_prompt_file
from compressor.sampling import save_comparison
from deploy.sampler import load_sampler
from pipeline.commands.args import (
    STACK_FLAGS,
    CommandParser,
    config_flag,
    run_arg,
    run_dir_arg,
    stack_defaults,
    stack_flag,
)


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_fits(num_images: int, shape: tuple[int, int, int], out: Path) -> None:
    """Refuse (UserError) ``num_images`` images of ``shape`` whose float32 tensor, held whole, does
    not fit in the memory available, or whose output file cannot fit on ``out``'s disk."""
    per_image = 4 * math.prod(shape)  # float32
    held = num_images * per_image * (1 if out.suffix == ".npy" else 2)  # a PNG grid is a second copy
    written = num_images * (per_image if out.suffix == ".npy" else per_image // 4)  # PNG: at most uint8
    memory = _available_memory()
    if memory is not None and held > memory:
        most = max(1, memory // (held // num_images))
        raise UserError(
            f"--num-images {num_images}: the images need about {_size(held)} of memory and "
            f"{_size(memory)} is available; sample at most about {most} per call (another --seed "
            "starts the next batch of seeds)"
        )
    folder = next((p for p in [out.absolute().parent, *out.absolute().parents] if p.exists()), None)
    free = shutil.disk_usage(folder).free if folder is not None else None
    if free is not None and written > free:
        raise UserError(
            f"--num-images {num_images}: {out} would take up to {_size(written)} and {folder} has "
            f"{_size(free)} free; sample fewer images or write --out to a larger disk"
        )


def main(argv: list[str]) -> int:
    """Sample, write a PNG grid, print the time and the backend facts."""
    parser = CommandParser(prog="compress-deploy sample", description="Generate images from a run.")
    run_arg(parser)
    config_flag(parser, "--backend", ServeConfig, "backend", default="torch")
    config_flag(parser, "--model", ServeConfig, "model")
    config_flag(parser, "--num-images", SampleConfig, "num_images")
    stack_flag(parser, "--steps", SampleConfig, "steps")
    config_flag(parser, "--seed", SampleConfig, "seed")
    config_flag(parser, "--eta", SampleConfig, "eta")
    stack_flag(parser, "--scheduler", SampleConfig, "scheduler")
    stack_flag(parser, "--cache-interval", SampleConfig, "cache_interval")
    config_flag(parser, "--cache-level", SampleConfig, "cache_level")
    config_flag(parser, "--cache-schedule", SampleConfig, "cache_schedule")
    stack_flag(parser, "--precision", SampleConfig, "precision")
    config_flag(parser, "--device", RunConfig, "device", default="cpu")
    parser.add_argument(
        "--out", type=Path, help="PNG grid, or .npy of the images (default: ./sample-<backend>-<model>.png)"
    )
    parser.add_argument(
        "--prompt", action="append", metavar="TEXT",
        help="a conditional run's prompt, repeatable; image i takes prompt i cycled; class index for "
        "a class-conditioned model (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-file",
        type=Path,
        help="a UTF-8 file of prompts, one a line, after --prompt's (default: none)",
    )
    parser.add_argument(
        "--negative-prompt",
        default="",
        metavar="TEXT",
        help="what guidance steers from (default: the empty prompt)",
    )
    config_flag(parser, "--guidance-scale", SampleConfig, "guidance_scale", default=None,
                help="classifier-free guidance scale (default: the run's sample.guidance_scale)")  # fmt: skip
    count_given = any(a == "--num-images" or a.startswith("--num-images=") for a in argv)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    run = run_dir_arg(args.run)
    vars(args).update(stack_defaults(args, run, args.model, STACK_FLAGS, SampleConfig))
    level = args.cache_level if args.cache_interval > 1 else None
    sampler = load_sampler(run, args.backend, args.model, str(device), args.precision, level)
    if args.steps > sampler.max_steps:
        raise UserError(
            f"--steps: expected at most {sampler.max_steps} (the model's training timesteps), "
            f"got {args.steps}"
        )
    prompts = list(args.prompt or []) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if prompts and not count_given:
        args.num_images = len(prompts)  # one image per prompt
    out = args.out or Path(f"sample-{args.backend}-{args.model}.png")
    check_fits(args.num_images, sampler.output_shape, out)
    began = time.perf_counter()
    with progress_bar(args.num_images, "[sample]", "image") as bar:
        images = sampler(
            args.num_images,
            args.steps,
            args.seed,
            args.eta,
            args.scheduler,
            cache_interval=args.cache_interval,
            cache_schedule=args.cache_schedule,
            on_batch=bar.update,
            prompts=prompts or None,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
        )
    seconds = time.perf_counter() - began
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, images.numpy().astype(np.float32))
    else:
        where = ", ".join(str(v) for v in (args.backend, sampler.info.get("provider")) if v)
        save_comparison({f"{args.model} ({where})": images}, out)
    said = f" for {len(prompts)} prompt{'s' if len(prompts) > 1 else ''}" if prompts else ""
    print(f"{args.num_images} images{said} in {seconds:.1f} s on {sampler.info} -> {out}")
    return 0
