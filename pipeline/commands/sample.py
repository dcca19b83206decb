"""``compress-deploy sample RUN``: generate images from a finished run on any backend.

compress-deploy sample RUN [--backend B] [--model pruned|dense] [--num-images N] [--steps S]
                           [--seed K] [--eta E] [--scheduler ddim|ddpm] [--device D] [--out PNG]
"""

from __future__ import annotations

import time
from pathlib import Path

from compressor.config import RunConfig, SampleConfig, ServeConfig
from compressor.errors import UserError
from compressor.models import resolve_device
from compressor.sampling import save_comparison
from deploy.sampler import load_sampler
from pipeline.commands.args import CommandParser, config_flag, run_dir_arg


def main(argv: list[str]) -> int:
    """Sample, write a PNG grid, print the time and the backend facts."""
    parser = CommandParser(prog="compress-deploy sample", description="Generate images from a run.")
    parser.add_argument("run", type=Path)
    config_flag(parser, "--backend", ServeConfig, "backend", default="torch")
    config_flag(parser, "--model", ServeConfig, "model")
    config_flag(parser, "--num-images", SampleConfig, "num_images")
    config_flag(parser, "--steps", SampleConfig, "steps")
    config_flag(parser, "--seed", SampleConfig, "seed")
    config_flag(parser, "--eta", SampleConfig, "eta")
    config_flag(parser, "--scheduler", SampleConfig, "scheduler")
    config_flag(parser, "--device", RunConfig, "device", default="cpu")
    parser.add_argument("--out", type=Path, help="PNG grid to write (default ./sample-<backend>-<model>.png)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sampler = load_sampler(run_dir_arg(args.run), args.backend, args.model, str(device))
    if args.steps > sampler.max_steps:
        raise UserError(
            f"--steps: expected at most {sampler.max_steps} (the model's training timesteps), "
            f"got {args.steps}"
        )
    began = time.perf_counter()
    images = sampler(args.num_images, args.steps, args.seed, args.eta, args.scheduler)
    seconds = time.perf_counter() - began
    out = args.out or Path(f"sample-{args.backend}-{args.model}.png")
    save_comparison({f"{args.model} ({args.backend}, {sampler.info.get('provider', '')})": images}, out)
    print(f"{args.num_images} images in {seconds:.1f} s on {sampler.info} -> {out}")
    return 0
