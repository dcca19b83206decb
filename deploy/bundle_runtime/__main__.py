"""``python -m bundle_runtime info|generate|check`` in a bundle folder (numpy + onnxruntime or TensorRT)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

try:
    import numpy as np

    from .core import MANIFEST, Bundle, BundleError, median_ms, seed_noise, sha256, write_png
except ImportError as exc:  # the runtime's only requirements: say so in one line, exit 2
    print(
        f"error: {exc.name or exc} is not installed; the bundle needs `pip install numpy onnxruntime`",
        file=sys.stderr,
    )
    sys.exit(2)

EXIT_FAIL, EXIT_BAD, EXIT_INCONCLUSIVE = 3, 2, 4
ROOT = Path(__file__).resolve().parent.parent  # the bundle folder holds this package


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise BundleError(f"{self.prog}: {message}")


def _info(bundle: Bundle, args) -> int:
    m, s = bundle.manifest, bundle.settings
    print(f"bundle of {m['run']} ({m['model']} model, {m['precision']}) made {m['created']}")
    steps = f"{s['scheduler']} {s['steps']} steps" + (
        f", feature reuse every {s['cache_interval']} steps (level {s['cache_level']})"
        if s["cache_interval"] > 1
        else ""
    )
    print(f"sampler: {steps}; image {'x'.join(map(str, bundle.shape))}; batch {m['batch']}")
    engines = ", ".join(sorted(m.get("engines") or {})) or "none"
    print(f"provider: {m['provider']}; TensorRT engines: {engines}; models: {', '.join(bundle.graphs)}")
    print(f"running on: {bundle.backend} ({bundle.provider})")
    if bundle.fallback_reason:
        print(f"fell back: {bundle.fallback_reason}")
    limits = {k: v for k, v in bundle.acceptance.items() if v is not None}
    print(f"acceptance: {json.dumps(limits)}")
    total = 0
    for name in sorted(m["files"]):
        size = (bundle.root / name).stat().st_size
        total += size
        print(f"  {size / 1e6:9.3f} MB  {name}")
    print(f"  {total / 1e6:9.3f} MB  in {len(m['files'])} files (+ the manifest)")
    return 0


def _generate(bundle: Bundle, args) -> int:
    if args.num_images < 1 or args.seed < 0:
        raise BundleError("generate: --num-images must be >= 1 and --seed >= 0")
    if args.out.suffix not in (".png", ".npy"):
        raise BundleError(f"generate: --out must end in .png or .npy, got {args.out}")
    began = time.perf_counter()
    images = bundle.generate(args.seed, args.num_images, args.batch)
    seconds = time.perf_counter() - began
    if args.out.suffix == ".npy":
        np.save(args.out, images)
    else:
        write_png(images, args.out)
    print(f"{args.num_images} images in {seconds:.2f} s on {bundle.provider} -> {args.out}")
    return 0


def _check(bundle: Bundle, args) -> int:
    """Parity against the stored references, latency on this device, and the build host's quality
    gates with their intervals; one line per check."""
    limits, batch = bundle.acceptance, int(bundle.manifest["batch"])
    rows = []

    def gate(name: str, value: float, limit: float | None, at_most: bool, unit: str = "") -> None:
        if limit is None:
            rows.append({"check": name, "value": value, "limit": None, "passed": True})
            print(f"INFO {name}: {value:.4g}{unit} (no limit set)")
            return
        passed = value <= limit if at_most else value >= limit
        rows.append({"check": name, "value": value, "limit": limit, "passed": passed})
        sign = "<=" if at_most else ">="
        print(f"{'PASS' if passed else 'FAIL'} {name}: {value:.4g}{unit} {sign} {limit:g}{unit}")

    with np.load(bundle.root / "reference.npz", allow_pickle=False) as ref:
        graphs = bundle.graphs["model"]
        if graphs.reuse:
            noise, feature = graphs.full(ref["sample"], ref["timestep"])
            errors = [np.abs(noise - ref["noise"]), np.abs(feature - ref["feature"])]
            shallow = graphs.shallow(ref["sample"], ref["timestep"], ref["feature"])
            errors.append(np.abs(shallow - ref["shallow_noise"]))
            err = np.concatenate([e.ravel() for e in errors])
        else:
            err = np.abs(graphs.unet(ref["sample"], ref["timestep"]) - ref["noise"]).ravel()
        key = "median" if limits.get("parity_statistic") == "median" else "max"
        value = float(np.median(err) if key == "median" else err.max())
        gate(f"unet parity ({key} abs vs torch fp32)", value, limits.get("max_unet_error"), True)
        seeds = ref["image_seeds"]
        images = np.concatenate([bundle.denoise(seed_noise(bundle.shape, int(s))[None]) for s in seeds])
        value = float(np.abs(images - ref["images"]).max())
        gate("sampler parity (max abs vs torch fp32 images)", value, limits.get("max_image_error"), True)
    noise = np.stack([seed_noise(bundle.shape, s) for s in range(batch)])
    t = np.full((batch,), 500, dtype=np.int64)
    unet_ms = median_ms(lambda: bundle.graphs["model"].unet(noise, t), args.repeat)
    sampler_ms = median_ms(lambda: bundle.denoise(noise), args.sampler_repeat)
    gate(f"unet latency (batch {batch}, median ms)", unet_ms, limits.get("max_unet_ms"), True, " ms")
    gate(
        f"sampler latency per image (batch {batch}, ms)",
        sampler_ms / batch,
        limits.get("max_image_ms"),
        True,
        " ms",
    )
    if "dense" in bundle.graphs:
        dense_unet = median_ms(lambda: bundle.graphs["dense"].unet(noise, t), args.repeat)
        dense_sampler = median_ms(lambda: bundle.denoise(noise, "dense"), args.sampler_repeat)
        gate("unet speed-up vs dense", dense_unet / unet_ms, limits.get("min_speedup"), False, "x")
        gate(
            "sampler speed-up vs dense",
            dense_sampler / sampler_ms,
            limits.get("min_sampler_speedup"),
            False,
            "x",
        )
    for entry in limits.get("quality") or []:
        rows.append(_quality_gate(entry, bundle.settings))
    outcomes = {r.get("outcome", "pass" if r["passed"] else "fail") for r in rows}
    verdict = "fail" if "fail" in outcomes else "inconclusive" if "inconclusive" in outcomes else "pass"
    passed = verdict == "pass"
    record = {
        "passed": passed,
        "verdict": verdict,
        "checks": rows,
        "unet_ms": unet_ms,
        "sampler_ms": sampler_ms,
        "batch": batch,
        "provider": bundle.provider,
        "backend": bundle.backend,
        "fallback_reason": bundle.fallback_reason,
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "manifest_sha256": sha256(bundle.root / MANIFEST),
    }
    args.record.write_text(json.dumps(record, indent=1))
    shown = {"pass": "PASSED", "fail": "FAILED", "inconclusive": "INCONCLUSIVE"}[verdict]
    print(f"{shown}; record: {args.record}")
    return {"pass": 0, "fail": EXIT_FAIL, "inconclusive": EXIT_INCONCLUSIVE}[verdict]


def _quality_gate(entry: dict, settings: dict) -> dict:
    """A quality gate the build host measured (figure, interval, limit): pass when the whole interval
    is on the good side of the limit, fail when it is on the bad side, inconclusive otherwise."""
    value, interval, limit = entry["measured"], entry.get("interval"), entry["limit"]
    at_most = entry["direction"] == "<="
    low, high = interval if interval else (value, value)
    good = high <= limit if at_most else low >= limit
    bad = low > limit if at_most else high < limit
    outcome = "pass" if good else "fail" if bad else "inconclusive"
    if entry.get("ill_posed"):  # a ratio to a figure whose interval reaches zero: nothing decides it
        outcome = "inconclusive"
    shown = (
        "not measured"
        if value is None
        else f"{value:.4g}"
        + (f", {entry.get('level', 0.95):.0%} interval [{low:.4g}, {high:.4g}]" if interval else "")
    )
    where = f"measured on the build host: {entry.get('sampler', '?')}, {entry.get('samples', '?')} samples"
    mine = f"{settings['scheduler']} {settings['steps']}"
    if entry.get("sampler") and not str(entry["sampler"]).startswith(mine):
        where += f"; this bundle samples {mine}"
    line = f"{outcome.upper()} {entry['name']}: {shown} {entry['direction']} {limit:g} [{where}]"
    if outcome == "inconclusive" and entry.get("ill_posed"):
        line += " undecidable: the dense model's FD-infinity interval reaches zero; gate on max_fd_increase"
    elif outcome == "inconclusive":
        line += " inconclusive: the interval straddles the limit; rescore with quality.num_samples=auto"
    print(line)
    return {"check": entry["name"], "value": value, "interval": interval, "limit": limit,
            "passed": outcome == "pass", "outcome": outcome}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 success/pass, 3 a failed check, 4 a quality gate inconclusive (none failed),
    2 bad input or a bad bundle."""
    parser = Parser(prog="python -m bundle_runtime", description="Run a compress-deploy sampler bundle.")
    parser.add_argument(
        "--bundle", type=Path, default=ROOT, help="the bundle folder (default: this package's)"
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--backend",
        choices=["onnxruntime", "tensorrt"],
        help="what runs the UNet (default: tensorrt when the bundle has engines, else onnxruntime)",
    )
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="run on ONNX Runtime's CPU provider if the bundle's backend or provider is not usable here",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("info", help="what the bundle holds")
    gen = sub.add_parser("generate", help="images from seeds")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-images", type=int, default=8)
    gen.add_argument("--batch", type=int, help="images per call (default: the bundle's batch)")
    gen.add_argument("--out", type=Path, default=Path("images.png"))
    chk = sub.add_parser("check", help="the acceptance check on this device")
    chk.add_argument("--repeat", type=int, default=20, help="timed UNet calls")
    chk.add_argument("--sampler-repeat", type=int, default=3, help="timed sampler runs")
    chk.add_argument("--record", type=Path, default=Path("bundle-check.json"), help="JSON record to write")
    try:
        args = parser.parse_args(argv)
        try:
            bundle = Bundle(args.bundle, args.threads, args.fallback, args.backend)
        except ImportError as exc:
            raise BundleError(
                f"{exc.name or exc} is not installed; `pip install numpy onnxruntime`"
            ) from None
        return {"info": _info, "generate": _generate, "check": _check}[args.command](bundle, args)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD


if __name__ == "__main__":
    sys.exit(main())
