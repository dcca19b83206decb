"""Bounded load test of a local `compress-deploy serve` (or any Triton serving this repository's models).

    python scripts/load_test.py [--url 127.0.0.1:8000] [--clients 8] [--requests 32] [--steps 20]
                                [--eta 0] [--first-seed 0] [--time-limit 600] [--verify RUN]
                                [--backend onnxruntime] [--json OUT]
                                [--model auto|sampler|text_to_image] [--prompt TEXT ...]
                                [--prompt-file FILE] [--guidance-scale G]

N client threads each send M requests to the ``sampler`` model (HTTP, tritonclient), seeds
first_seed .. first_seed + N*M - 1, one image per request. A server of a conditional run
(its ``text_to_image`` model ready: ``--model auto`` asks) gets prompts instead, the request of
seed ``first_seed + i`` taking prompt ``i`` cycled from ``--prompt`` / ``--prompt-file``, else the
prompts the run's samples or quality stage used (``--verify RUN`` or ``--run RUN``), under
``--guidance-scale`` (default: the server's, the run's). It stops by itself after the
requests or the time limit, and talks to localhost only. Prints errors, p50/p95/p99 latency
and throughput. ``--verify RUN`` also computes every image locally with the same seed and
settings (``deploy.sampler.load_sampler``, what ``compress-deploy sample`` runs) and prints
the largest difference. Exit 1 when any request failed or an image differs by > 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = "text_to_image"


def _client(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url, connection_timeout=600, network_timeout=600)


def request_image(
    client,
    seed: int,
    steps: int,
    eta: float,
    prompt: str | None = None,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """One request (``sampler``, or ``text_to_image`` with ``prompt``); the image (C, H, W)."""
    import tritonclient.http as httpclient

    values = {"seed": (np.int64, seed), "steps": (np.int32, steps), "eta": (np.float32, eta)}
    if prompt is not None:
        values["prompt"] = (object, prompt.encode("utf-8"))
        if guidance_scale is not None:
            values["guidance_scale"] = (np.float32, guidance_scale)
    types = {np.int64: "INT64", np.int32: "INT32", np.float32: "FP32", object: "BYTES"}
    inputs = []
    for name, (dtype, value) in values.items():
        inputs.append(httpclient.InferInput(name, [1, 1], types[dtype]))
        inputs[-1].set_data_from_numpy(np.array([[value]], dtype=dtype))
    model = "sampler" if prompt is None else TEXT_TO_IMAGE
    result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput("image")])
    return result.as_numpy("image")[0]


def serves_text_to_image(url: str) -> bool:
    """True when the server at ``url`` has a ready ``text_to_image`` model (a conditional run's)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{url}/v2/models/{TEXT_TO_IMAGE}/ready", timeout=10) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts requests cycle through: ``--prompt`` and ``--prompt-file``, else the run's."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line.strip() for line in args.prompt_file.read_text("utf-8").splitlines() if line.strip()]
    run = args.run or args.verify
    if not prompts and run is not None:
        sys.path.insert(0, str(ROOT))
        from rundir.records import read_record

        quality, samples = read_record(Path(run), "quality"), read_record(Path(run), "samples")
        if quality is not None and quality.typed().prompts:
            prompts = list(quality.typed().prompts.get("prompts") or [])
        elif samples is not None:  # the samples stage's metrics list the prompts its images took
            prompts = list(samples.metrics.get("prompts") or [])
    if not prompts:
        raise SystemExit(
            "load_test: the server takes prompts; pass --prompt TEXT, --prompt-file or --run RUN"
        )
    return prompts


def run(args: argparse.Namespace) -> dict:
    """Drive the clients; return the summary (latencies in ms)."""
    host = args.url.split(":")[0]
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load_test: {args.url} is not local; this script only loads localhost")
    model = args.model
    if model == "auto":
        model = TEXT_TO_IMAGE if serves_text_to_image(args.url) else "sampler"
    prompts = run_prompts(args) if model == TEXT_TO_IMAGE else None
    prompt_of = (
        (lambda seed: prompts[(seed - args.first_seed) % len(prompts)]) if prompts else (lambda seed: None)
    )
    deadline = time.monotonic() + args.time_limit
    latencies: list[float] = []
    errors: list[str] = []
    images: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        client = _client(args.url)
        for j in range(args.requests):
            if time.monotonic() > deadline:
                return
            seed = args.first_seed + k * args.requests + j
            began = time.perf_counter()
            try:
                image = request_image(
                    client, seed, args.steps, args.eta, prompt_of(seed), args.guidance_scale
                )
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"seed {seed}: {str(exc).splitlines()[0][:200]}")
                continue
            with lock:
                latencies.append((time.perf_counter() - began) * 1000)
                images[seed] = image

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    wall = time.perf_counter() - began
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    summary = {
        "clients": args.clients,
        "requests": args.clients * args.requests,
        "answered": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "model": model,
        "prompts": prompts,
        "steps": args.steps,
        "eta": args.eta,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "wall_s": wall,
        "images_per_s": len(latencies) / wall,
        "timed_out": time.monotonic() > deadline,
    }
    if args.verify:
        sys.path.insert(0, str(ROOT))
        from deploy.sampler import load_sampler

        sampler = load_sampler(args.verify, backend=args.backend)
        worst = 0.0
        for seed, image in sorted(images.items()):
            extra = {}
            if prompts:
                extra = {"prompts": [prompt_of(seed)], "guidance_scale": args.guidance_scale}
            ref = sampler(num_images=1, steps=args.steps, seed=seed, eta=args.eta, **extra)[0].numpy()
            worst = max(worst, float(np.abs(ref - image).max()))
        summary["verified_images"] = len(images)
        summary["max_abs_vs_local"] = worst
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP endpoint")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests per client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; clients stop after it")
    parser.add_argument("--verify", type=Path, help="run directory to compare every image with")
    parser.add_argument("--backend", default="onnxruntime", help="local backend for --verify")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument(
        "--model",
        default="auto",
        choices=["auto", "sampler", TEXT_TO_IMAGE],
        help="model to load (auto: text_to_image where the server has it, else sampler)",
    )
    parser.add_argument(
        "--prompt", action="append", help="a prompt (repeatable); requests cycle through them"
    )
    parser.add_argument("--prompt-file", type=Path, help="UTF-8 file, one prompt a line")
    parser.add_argument(
        "--run", type=Path, help="run directory whose samples/quality prompts to cycle through"
    )
    parser.add_argument("--guidance-scale", type=float, help="guidance scale (default: the server's)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.steps < 1:
        parser.error("--clients, --requests and --steps must be >= 1")
    summary = run(args)
    print(
        f"{summary['answered']}/{summary['requests']} answered, {summary['errors']} errors; latency p50 "
        f"{summary['p50_ms']:.0f} ms, p95 {summary['p95_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms; "
        f"throughput {summary['images_per_s']:.2f} images/s over {summary['wall_s']:.1f} s"
    )
    for line in summary["error_samples"]:
        print("  error:", line)
    if "max_abs_vs_local" in summary:
        n, worst = summary["verified_images"], summary["max_abs_vs_local"]
        print(f"served vs local images ({n}): max abs {worst:.3g}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    bad = summary["errors"] or summary.get("max_abs_vs_local", 0.0) > 1e-5
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
