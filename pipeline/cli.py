"""``compress-deploy``: run pipeline stages from a YAML config, or act on a finished run.

    compress-deploy CONFIG [key=value ...] [--stages a,b] [--run-dir DIR]
    compress-deploy COMMAND RUN [options]      (COMMAND: see COMMANDS)

Exit codes: 0 success, 2 user error (one line on stderr), 1 internal failure,
3 acceptance checks failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from compressor import oserrors, runlayout
from compressor.config import load_config
from compressor.errors import UserError
from pipeline.context import RunContext
from pipeline.runner import Interrupted, parse_stages, run_pipeline
from pipeline.stages import STAGES


def _main_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="compress-deploy",
        description="Prune, finetune, export, deploy and validate a diffusion UNet.",
        epilog=f"commands on a finished run: {', '.join(COMMANDS)}",
    )
    parser.add_argument("config", help="YAML config (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prune.ratio=0.3")
    parser.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    parser.add_argument("--run-dir", type=Path, help="run directory (default runs/<config name>)")
    parser.add_argument(
        "--force", action="append", default=[], metavar="STAGE", help="rerun STAGE and its dependents"
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit among the flags
    cfg = load_config(args.config, args.overrides)
    stages = parse_stages(args.stages, cfg)
    force = set(parse_stages(",".join(args.force), cfg)) if args.force else set()
    distributed = {"train", "finetune"}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and set(stages) - distributed:
        raise UserError(
            f"under accelerate/torchrun only the {', '.join(sorted(distributed))} stages run data-parallel; "
            "pass --stages finetune (run the other stages in a single process)"
        )
    run_dir = args.run_dir or Path("runs") / cfg.name
    records = run_pipeline(cfg, run_dir, stages, force)
    failed = [name for name, rec in records.items() if rec["status"] == "failed"]
    if failed:
        print(
            f"acceptance failed: {records[failed[0]]['reason']} (see {runlayout.report_dir(run_dir)})",
            file=sys.stderr,
        )
        return 3
    return 0


def _cmd_sample(argv: list[str]) -> int:
    """compress-deploy sample RUN --backend B --num-images N --steps S --seed K [--out PNG]"""
    from compressor.sampling import save_comparison
    from deploy.runtimes import BACKENDS
    from deploy.sampler import load_sampler

    parser = argparse.ArgumentParser(prog="compress-deploy sample", description="Generate images from a run.")
    parser.add_argument("run", type=Path)
    parser.add_argument("--backend", default="torch", help=f"one of {', '.join(BACKENDS)}")
    parser.add_argument("--model", default="pruned", choices=["pruned", "dense"])
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="PNG grid to write (default ./sample-<backend>-<model>.png)")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be at least 1")
    sampler = load_sampler(args.run, args.backend, args.model, args.device)
    began = time.perf_counter()
    images = sampler(args.num_images, args.steps, args.seed, args.eta, args.scheduler)
    seconds = time.perf_counter() - began
    out = args.out or Path(f"sample-{args.backend}-{args.model}.png")
    save_comparison({f"{args.model} ({args.backend}, {sampler.info.get('provider', '')})": images}, out)
    print(f"{args.num_images} images in {seconds:.1f} s on {sampler.info} -> {out}")
    return 0


def _run_command_args(name: str, section: str, argv: list[str], description: str):
    """Parse ``RUN [section.key=value ...]``; the section comes from RUN's last record of it."""
    import json

    from compressor.config import config_from_mapping

    parser = argparse.ArgumentParser(prog=f"compress-deploy {name}", description=description)
    parser.add_argument("run", type=Path)
    parser.add_argument("overrides", nargs="*", help=f"{section}.key=value to change settings")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit among the flags
    if not args.run.is_dir():
        raise UserError(f"run directory {args.run} not found; pass the folder a run wrote")
    for o in args.overrides:
        if not o.startswith(f"{section}."):
            raise UserError(f"override {o!r}: {name} only takes {section}.* overrides")
    base = {}
    rec_file = runlayout.record_path(args.run, name)
    if rec_file.is_file():
        base = {section: json.loads(rec_file.read_text())["config"][section]}
    prune_file = runlayout.record_path(args.run, "prune")
    if name == "check" and prune_file.is_file():  # the latency target the run pruned for
        base["prune"] = json.loads(prune_file.read_text())["config"]["prune"]
    return args.run, config_from_mapping(base, args.overrides)


def _cmd_check(argv: list[str]) -> int:
    """compress-deploy check RUN [acceptance.key=value ...]: print gates, exit 3 if any fails."""
    from pipeline.acceptance import evaluate

    run, cfg = _run_command_args("check", "acceptance", argv, "Acceptance gates of a run.")
    ctx = RunContext(cfg, run)
    records = {s: ctx.record(s) for s in ("bench", "parity", "quality")}
    if not any(records.values()):
        raise UserError(f"{run} has no bench, parity or quality records; run the pipeline first")
    checks = evaluate(cfg.acceptance, records, cfg.prune.target_latency)
    if not checks:
        print("no acceptance limits configured (set acceptance.* in the config or as overrides)")
        return 0
    for c in checks:
        print(c.line())
    failed = [c.name for c in checks if not c.passed]
    print(f"acceptance: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 3 if failed else 0


def _cmd_build(argv: list[str]) -> int:
    """compress-deploy build RUN [build.key=value ...]: (re)build engines from RUN's ONNX files."""
    from pipeline.stages.build import build_engines

    run, cfg = _run_command_args("build", "build", argv, "Build TensorRT engines from a run's ONNX files.")
    from pipeline.runlock import RunLock

    with RunLock(run, " ".join(["compress-deploy build", *argv])):
        result = build_engines(run, cfg.build)
    print(f"built {', '.join(result.metrics['engines'])} engines in {runlayout.stage_dir(run, 'build')}")
    return 0


def _cmd_verify(argv: list[str]) -> int:
    """compress-deploy verify RUN: re-hash every artifact against RUN/manifest.json."""
    from compressor.artifacts import MANIFEST, verify_run

    parser = argparse.ArgumentParser(prog="compress-deploy verify", description="Verify a run's artifacts.")
    parser.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    if not (args.run / MANIFEST).is_file():
        raise UserError(f"{args.run / MANIFEST} not found; pass a run directory written by compress-deploy")
    report = verify_run(args.run)
    for kind, paths in report.items():
        for rel in paths:
            print(f"{kind.upper():8} {rel}")
    bad = sum(len(v) for v in report.values())
    if bad:
        print(
            f"error: {bad} artifact(s) missing, changed or extra in {args.run}; rerun the stages that wrote "
            "them with --force STAGE",
            file=sys.stderr,
        )
        return 2
    print(f"all artifacts in {args.run} match {MANIFEST}")
    return 0


def _cmd_ablate(argv: list[str]) -> int:
    from pipeline.ablation import main as ablate

    return ablate(argv)


def _cmd_plan(argv: list[str]) -> int:
    from pipeline.plan import main as plan

    return plan(argv)


def _cmd_serve(argv: list[str]) -> int:
    from pipeline.serve import serve_main

    return serve_main(argv)


def _cmd_triton_repo(argv: list[str]) -> int:
    from pipeline.serve import triton_repo_main

    return triton_repo_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "ablate": _cmd_ablate,
    "plan": _cmd_plan,
    "serve": _cmd_serve,
    "triton-repo": _cmd_triton_repo,
    "build": _cmd_build,
    "sample": _cmd_sample,
    "check": _cmd_check,
    "verify": _cmd_verify,
}


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point; maps user errors to exit 2 with one line, crashes to exit 1.

    SIGINT and SIGTERM end the run with one line naming the interrupted stage and exit
    128 + the signal number (130, 143); the stage's temporary files are removed first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        return _dispatch(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dispatch(argv: list[str]) -> int:
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
            if not Path(argv[0]).exists():
                raise UserError(
                    f"{argv[0]!r} is neither a command ({', '.join(COMMANDS)}) nor a YAML config file"
                )
        return _main_run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        stage = getattr(exc, "stage", None)
        where = f" during the {stage} stage" if stage else ""
        name = signal.Signals(signum).name
        print(f"interrupted by {name}{where}; rerun the same command to resume", file=sys.stderr)
        return 128 + int(signum)
    except OSError as exc:
        print(f"error: {oserrors.describe(exc, 'a file', resume=False)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    except Exception:  # noqa: BLE001 - internal failure: show the traceback, exit 1
        traceback.print_exc()
        print("internal error: please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
