"""Bounded load test of a local `compress-deploy serve` (or any Triton serving this repository's models).

    python scripts/load_test.py [--url 127.0.0.1:8000] [--clients 8] [--requests 32] [--steps 20]
                                [--eta 0] [--first-seed 0] [--time-limit 600] [--verify RUN]
                                [--backend onnxruntime] [--json OUT]

N client threads each send M requests to the ``sampler`` model (HTTP, tritonclient), seeds
first_seed .. first_seed + N*M - 1, one image per request. It stops by itself after the
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


def _client(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url, connection_timeout=600, network_timeout=600)


def request_image(client, seed: int, steps: int, eta: float) -> np.ndarray:
    """One sampler request; the image (C, H, W)."""
    import tritonclient.http as httpclient

    inputs = [
        httpclient.InferInput("seed", [1, 1], "INT64"),
        httpclient.InferInput("steps", [1, 1], "INT32"),
        httpclient.InferInput("eta", [1, 1], "FP32"),
    ]
    inputs[0].set_data_from_numpy(np.array([[seed]], dtype=np.int64))
    inputs[1].set_data_from_numpy(np.array([[steps]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[eta]], dtype=np.float32))
    result = client.infer("sampler", inputs, outputs=[httpclient.InferRequestedOutput("image")])
    return result.as_numpy("image")[0]


def run(args: argparse.Namespace) -> dict:
    """Drive the clients; return the summary (latencies in ms)."""
    host = args.url.split(":")[0]
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load_test: {args.url} is not local; this script only loads localhost")
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
                image = request_image(client, seed, args.steps, args.eta)
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
            ref = sampler(num_images=1, steps=args.steps, seed=seed, eta=args.eta)[0].numpy()
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
