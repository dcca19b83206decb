"""``compress-deploy serve``: a finished run on Triton Inference Server (``triton-repo``: its repository).

    compress-deploy serve RUN [--backend onnxruntime|torch|tensorrt] [--model pruned|dense]
                              [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001]
                              [--metrics-port 8002] [--max-batch 16] [--max-queue-delay-us 2000]
                              [--no-dynamic-batching] [--max-steps 1000] [--default-steps 50]
                              [--instances 1] [--threads N] [--repo DIR]

``serve`` writes a model repository (the UNet as a Python-backend model running the chosen
backend in process, the sampler as a Python-backend model; for a conditional run the
``text_to_image`` model instead, with the text encoder and VAE decoder graphs as models of their
own) and runs ``tritonserver`` on it:
PyTriton's bundled binary (the ``serve`` extra) unless ``$TRITONSERVER`` or the PATH names
another. HTTP/REST on ``--http-port`` (``/v2/health/ready``, ``/v2/models/sampler/infer`` or
``/v2/models/text_to_image/infer``),
gRPC, and Prometheus metrics on ``--metrics-port``, all on ``--host`` (default 127.0.0.1:
this machine only; Triton authenticates no one, so another address belongs behind a proxy
that does). SIGTERM or SIGINT stops it the way Triton stops: no new requests, in-flight
ones finished, then exit (143 / 130).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from compressor.config import ServeConfig
from compressor.errors import UserError
from deploy.tensorrt_backend import unavailable_reason
from deploy.triton import (
    RepoSettings,
    find_server,
    python_backend_dir,
    server_command,
    server_environment,
    server_ready,
    write_repository,
)
from pipeline.commands.args import (
    CommandParser,
    config_flag,
    run_arg,
    run_dir_arg,
    stack_defaults,
    stack_flag,
)
from pipeline.context import log
from pipeline.runner import Interrupted

LOOPBACK = ("127.0.0.1", "::1")
ENTRY_INPUTS = {  # what the ready line says each entry model takes
    "sampler": "seed INT64[1], optional steps INT32[1], eta FP32[1]",
    "text_to_image": "prompt BYTES[1], seed INT64[1], optional negative_prompt BYTES[1], steps INT32[1], "
    "guidance_scale FP32[1]",
}


def batching_args(parser: argparse.ArgumentParser) -> None:
    """The repository flags ``serve`` and ``triton-repo`` share, validated as :class:`ServeConfig`."""
    config_flag(parser, "--model", ServeConfig, "model")
    config_flag(parser, "--max-batch", ServeConfig, "max_batch")
    config_flag(parser, "--max-queue-delay-us", ServeConfig, "max_queue_delay_us")
    parser.add_argument("--no-dynamic-batching", action="store_true", help="serve each request on its own")
    config_flag(parser, "--max-steps", ServeConfig, "max_steps")
    stack_flag(parser, "--default-steps", ServeConfig, "default_steps")
    stack_flag(parser, "--scheduler", ServeConfig, "scheduler")
    config_flag(parser, "--instances", ServeConfig, "instances")
    config_flag(parser, "--threads", ServeConfig, "threads")


def repo_settings(args, backend: str, unet_kind: str, run: Path) -> RepoSettings:
    """The repository's settings from parsed flags (cross-flag rules checked here); a run whose
    latency target over levers chose a stack serves its solver and steps unless flags say otherwise."""
    names = {"default_steps": "steps", "scheduler": "scheduler"}
    vars(args).update(stack_defaults(args, run, args.model, names, ServeConfig))
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


def check_host(text: str) -> str:
    """``--host``: an IPv4/IPv6 address or ``localhost``; UserError otherwise."""
    if text == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UserError(
            "--host: expected an IP address (127.0.0.1 for this machine only, 0.0.0.0 for every "
            f"interface), got {text!r}"
        ) from None


def client_address(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (a wildcard means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def url_host(host: str) -> str:
    """``host`` as it stands in a URL (IPv6 in brackets)."""
    address = client_address(host)
    return f"[{address}]" if ":" in address else address


def main(argv: list[str]) -> int:
    """Run tritonserver on a fresh repository until SIGTERM/SIGINT."""
    parser = CommandParser(prog="compress-deploy serve", description=__doc__.split("\n")[0])
    run_arg(parser)
    config_flag(parser, "--backend", ServeConfig, "backend")
    config_flag(parser, "--host", ServeConfig, "host")
    config_flag(parser, "--http-port", ServeConfig, "http_port")
    config_flag(parser, "--grpc-port", ServeConfig, "grpc_port")
    config_flag(parser, "--metrics-port", ServeConfig, "metrics_port")
    parser.add_argument("--repo", type=Path, help="write the repository here (default: a temporary folder)")
    config_flag(parser, "--startup-timeout", ServeConfig, "startup_timeout")
    batching_args(parser)
    args = parser.parse_intermixed_args(argv)
    run = run_dir_arg(args.run)
    host = check_host(args.host)
    ports = {
        "--http-port": args.http_port,
        "--grpc-port": args.grpc_port,
        "--metrics-port": args.metrics_port,
    }
    if len(set(ports.values())) < len(ports):
        raise UserError(f"{', '.join(f'{k} {v}' for k, v in ports.items())}: the three ports must differ")
    if args.backend == "tensorrt":
        reason = unavailable_reason()
        if reason:
            raise UserError(f"--backend tensorrt: {reason}")
    if host not in LOOPBACK:
        log(
            "serve",
            f"warning: listening on {host}, reachable from other machines; Triton itself authenticates "
            "no one, so put it behind a proxy that does",
        )
    binary, bundled, libs = find_server()
    with tempfile.TemporaryDirectory(prefix="compress-deploy-serve-") as tmp:
        repo = args.repo or Path(tmp) / "repo"
        facts = write_repository(run, repo, repo_settings(args, args.backend, "python", run))
        backends = python_backend_dir(bundled, Path(tmp) / "backends") if bundled else None
        cmd = server_command(binary, repo, backends, args.http_port, args.grpc_port, args.metrics_port, host)
        log("serve", f"{facts['model']} model, unet: {facts['unet']}; starting {binary}")
        proc = subprocess.Popen(cmd, env=server_environment(libs))
        try:
            began = time.monotonic()
            while not server_ready(args.http_port, client_address(host)):
                if proc.poll() is not None:
                    raise UserError(
                        f"tritonserver exited with {proc.returncode} before it was ready (see its log "
                        f"above); is port {args.http_port}, {args.grpc_port} or {args.metrics_port} in use?"
                    )
                if time.monotonic() - began > args.startup_timeout:
                    raise UserError(f"tritonserver not ready after {args.startup_timeout:.0f} s; see its log")
                time.sleep(0.5)
            where = url_host(host)
            inputs = ENTRY_INPUTS.get(facts["entry"], ENTRY_INPUTS["sampler"])
            log(
                "serve",
                f"ready: http://{where}:{args.http_port}/v2/models/{facts['entry']}/infer ({inputs}), "
                f"/v2/models/unet/infer, gRPC {where}:{args.grpc_port}, "
                f"metrics http://{where}:{args.metrics_port}/metrics; SIGTERM or Ctrl-C stops it",
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
