"""``compress-deploy serve`` and ``compress-deploy triton-repo``: a finished run on Triton Inference Server.

    compress-deploy serve RUN [--backend onnxruntime|torch|tensorrt] [--model pruned|dense]
                              [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
                              [--max-batch 16] [--max-queue-delay-us 2000] [--no-dynamic-batching]
                              [--max-steps 1000] [--default-steps 50] [--instances 1] [--repo DIR]
    compress-deploy triton-repo RUN OUT [--unet auto|tensorrt|onnxruntime|python] [same batching options]

``serve`` writes a model repository (the UNet as a Python-backend model running the chosen
backend in process, the sampler as a Python-backend model) and runs ``tritonserver`` on it:
PyTriton's bundled binary (the ``serve`` extra) unless ``$TRITONSERVER`` or the PATH names
another. HTTP/REST on ``--http-port`` (``/v2/health/ready``, ``/v2/models/sampler/infer``),
gRPC, and Prometheus metrics on ``--metrics-port``. SIGTERM or SIGINT stops it the way
Triton stops: no new requests, in-flight ones finished, then exit (143 / 130).
``triton-repo`` writes the same repository for the stock ``nvcr.io/nvidia/tritonserver``
container, with the UNet as a TensorRT plan where the run has an engine, else as ONNX.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from compressor.errors import UserError
from deploy.triton import (
    RepoSettings,
    find_server,
    python_backend_dir,
    server_command,
    server_environment,
    server_ready,
    write_repository,
)
from pipeline.context import log
from pipeline.runner import Interrupted


def _batching_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["pruned", "dense"], default="pruned")
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch the dynamic batcher forms")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="how long a request may wait")
    parser.add_argument("--no-dynamic-batching", action="store_true", help="serve each request on its own")
    parser.add_argument("--max-steps", type=int, default=1000, help="largest `steps` a request may ask")
    parser.add_argument("--default-steps", type=int, default=50, help="steps when a request gives none")
    parser.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of the in-process UNet backend (default: all)"
    )


def _settings(args, backend: str, unet_kind: str) -> RepoSettings:
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    for name in ("max_batch", "max_steps", "default_steps", "instances"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.max_queue_delay_us < 0:
        raise UserError("--max-queue-delay-us: must be >= 0")
    if args.default_steps > args.max_steps:
        raise UserError(f"--default-steps {args.default_steps} is above --max-steps {args.max_steps}")
    return RepoSettings(
        backend=backend,
        model=args.model,
        unet_kind=unet_kind,
        max_batch=1 if args.no_dynamic_batching else args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        dynamic_batching=not args.no_dynamic_batching,
        instances=args.instances,
        max_steps=args.max_steps,
        default_steps=args.default_steps,
        scheduler=args.scheduler,
        threads=args.threads,
    )


def _run_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"run directory {path} not found; pass the folder a run wrote")
    return path


def triton_repo_main(argv: list[str]) -> int:
    """Write a model repository for the stock Triton container."""
    parser = argparse.ArgumentParser(prog="compress-deploy triton-repo", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--unet", choices=["auto", "tensorrt", "onnxruntime", "python"], default="auto")
    parser.add_argument("--backend", choices=["onnxruntime", "torch", "tensorrt"], default="onnxruntime",
                        help="in-process backend of a Python-backend unet (--unet python)")  # fmt: skip
    _batching_args(parser)
    args = parser.parse_intermixed_args(argv)
    facts = write_repository(_run_dir(args.run), args.out, _settings(args, args.backend, args.unet))
    print(f"wrote {args.out}: unet = {facts['unet']}; sampler = Python backend (BLS calls to unet)")
    print(f"configs parsed with Triton's ModelConfig protobuf; image shape {facts['image_shape']}")
    return 0


def serve_main(argv: list[str]) -> int:
    """Run tritonserver on a fresh repository until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="compress-deploy serve", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--backend", choices=["onnxruntime", "torch", "tensorrt"], default="onnxruntime")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--repo", type=Path, help="write the repository here (default: a temporary folder)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for ready")
    _batching_args(parser)
    args = parser.parse_intermixed_args(argv)
    run = _run_dir(args.run)
    if args.backend == "tensorrt":
        from deploy.tensorrt_backend import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise UserError(f"--backend tensorrt: {reason}")
    binary, bundled, libs = find_server()
    with tempfile.TemporaryDirectory(prefix="compress-deploy-serve-") as tmp:
        repo = args.repo or Path(tmp) / "repo"
        facts = write_repository(run, repo, _settings(args, args.backend, "python"))
        backends = python_backend_dir(bundled, Path(tmp) / "backends") if bundled else None
        cmd = server_command(binary, repo, backends, args.http_port, args.grpc_port, args.metrics_port)
        log("serve", f"{facts['model']} model, unet: {facts['unet']}; starting {binary}")
        proc = subprocess.Popen(cmd, env=server_environment(libs))
        try:
            began = time.monotonic()
            while not server_ready(args.http_port):
                if proc.poll() is not None:
                    raise UserError(
                        f"tritonserver exited with {proc.returncode} before it was ready (see its log "
                        f"above); is port {args.http_port}, {args.grpc_port} or {args.metrics_port} in use?"
                    )
                if time.monotonic() - began > args.startup_timeout:
                    raise UserError(f"tritonserver not ready after {args.startup_timeout:.0f} s; see its log")
                time.sleep(0.5)
            log(
                "serve",
                f"ready: http://127.0.0.1:{args.http_port}/v2/models/sampler/infer (seed INT64[1], optional "
                f"steps INT32[1], eta FP32[1]), /v2/models/unet/infer, gRPC :{args.grpc_port}, "
                f"metrics http://127.0.0.1:{args.metrics_port}/metrics; SIGTERM or Ctrl-C stops it",
            )
            code = proc.wait()
            raise UserError(f"tritonserver exited on its own with status {code}; see its log above")
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            log("serve", f"{signal.Signals(signum).name}: stopping (in-flight requests are finished first)")
            _stop(proc)
            log("serve", f"stopped (tritonserver exit status {proc.returncode})")
            return 128 + int(signum)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM: Triton finishes in-flight requests (up to its exit timeout), unloads, exits."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
