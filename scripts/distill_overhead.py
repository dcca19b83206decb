"""The teacher's cost in the finetune: step time and peak memory with and without distillation.

    python scripts/distill_overhead.py CONFIG [key=value ...] [--run-dir RUN] [--steps 60]
                                       [--modes off,output,output+features]

Needs the run's prune stage (``compress-deploy CONFIG --stages prune``). Each mode
finetunes the run's pruned model for ``--steps`` steps (the run's recipe, fresh
checkpoints in a temporary folder) in its own process, so the peak memory of one mode
is not hidden by another's: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the
process's peak resident set size (``ru_maxrss``) minus its size just before training.
Prints one line per mode and the ratios to ``off``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(config: str, overrides: list[str], run: Path, mode: str, steps: int) -> dict:
    """One mode's finetune in this process: steps per second and peak memory (MB)."""
    import dataclasses
    import resource
    import time

    import torch

    from compressor.config import load_config
    from compressor.persist import load_unet
    from compressor.training import train
    from pipeline.context import RunContext
    from pipeline.sweep.distillation import mode_config
    from rundir import layout

    cfg = load_config(config, overrides)
    ctx = RunContext(cfg, run)
    distill = mode_config(mode, cfg.finetune.distill)
    ft = dataclasses.replace(cfg.finetune, steps=steps, distill=distill, checkpoint_every=steps + 1)
    unet = load_unet(layout.model_dir(run, "prune"), ctx.device)[0]
    teacher = ctx.dense_on() if distill.active else None
    images, scheduler = ctx.dataset, ctx.noise_scheduler()
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        result = train(unet, scheduler, images, ft, Path(tmp), cfg.seed, ctx.device, teacher=teacher)
        seconds = time.perf_counter() - began
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    teacher_mb = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20 if teacher else 0.0
    return {
        "mode": mode,
        "steps": steps,
        "seconds": seconds,
        "steps_per_second": result.steps_per_second,
        "peak_extra_mb": peak_mb,
        "teacher_parameters_mb": teacher_mb,
        "device": str(ctx.device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--modes", default="off,output,output+features")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one mode, in a fresh process
    args = parser.parse_intermixed_args()
    from compressor.config import load_config
    from rundir import layout

    cfg = load_config(args.config, args.overrides)
    run = args.run_dir or Path("runs") / cfg.name
    pruned = layout.model_dir(run, "prune")
    if not (pruned / "unet.json").is_file():
        print(
            f"error: {pruned} holds no pruned model; run `compress-deploy {args.config} "
            f"--run-dir {run} --stages prune` first (or pass --run-dir)",
            file=sys.stderr,
        )
        return 2
    if args.child:
        print(json.dumps(measure(args.config, args.overrides, run, args.child, args.steps)))
        return 0
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        argv = [sys.executable, __file__, args.config, *args.overrides, "--run-dir", str(run)]
        done = subprocess.run(
            [*argv, "--steps", str(args.steps), "--child", mode], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{mode:16} {r['steps_per_second']:6.2f} steps/s, peak memory +{r['peak_extra_mb']:7.1f} MB "
            f"(teacher parameters {r['teacher_parameters_mb']:.1f} MB) on {r['device']}",
            flush=True,
        )
    base = next((r for r in rows if r["mode"] == "off"), None)
    if base:
        for r in rows:
            if r is not base:
                slower = base["steps_per_second"] / r["steps_per_second"]
                extra = r["peak_extra_mb"] - base["peak_extra_mb"]
                print(f"{r['mode']}: step time x{slower:.2f} of plain, peak memory {extra:+.1f} MB")
    out = run / "distill-overhead.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
