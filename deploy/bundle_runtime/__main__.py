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
    from .guided_sampler import guided_eps
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
    print(f"sampler: {steps}; image {'x'.join(map(str, m['image_shape']))}; batch {m['batch']}")
    if bundle.pipeline is not None:
        p = bundle.pipeline.settings
        parts = ["tokenizer", "text encoder"] if p["conditioning"] == "text" else []
        parts += ["UNet"] + (["VAE decoder"] if p["latent"] else [])
        print(
            f"conditioning: {p['conditioning']} ({' -> '.join(parts)}); latents "
            f"{'x'.join(map(str, p['sample_shape']))}; guidance scale {p['guidance_scale']:g}; "
            f"negative prompt {p['negative_prompt']!r}; --steps {_choices(bundle.step_choices)}"
        )
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


def _choices(values: list[int]) -> str:
    return f"{values[0]}..{values[-1]}" if len(values) > 2 else ", ".join(map(str, values))


def _generate(bundle: Bundle, args) -> int:
    if args.num_images < 1 or args.seed < 0:
        raise BundleError("generate: --num-images must be >= 1 and --seed >= 0")
    if args.out.suffix not in (".png", ".npy"):
        raise BundleError(f"generate: --out must end in .png or .npy, got {args.out}")
    began = time.perf_counter()
    images = bundle.generate(
        args.seed,
        args.num_images,
        args.batch,
        prompts=args.prompt,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        steps=args.steps,
    )
    seconds = time.perf_counter() - began
    if args.out.suffix == ".npy":
        np.save(args.out, images)
    else:
        write_png(images, args.out)
    said = ""
    if args.prompt:
        p = bundle.pipeline
        scale = p.guidance_scale if args.guidance_scale is None else args.guidance_scale
        said = f" for {len(args.prompt)} prompt{'s' if len(args.prompt) > 1 else ''} (guidance {scale:g})"
    print(f"{args.num_images} images{said} in {seconds:.2f} s on {bundle.provider} -> {args.out}")
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
        if bundle.pipeline is not None:
            _pipeline_parity(bundle, ref, gate)
        else:
            _sampler_parity(bundle, ref, gate)
    noise = np.stack([seed_noise(bundle.shape, s) for s in range(batch)])
    t = np.full((batch,), 500, dtype=np.int64)
    what = "sampler"
    if bundle.pipeline is not None and bundle.pipeline.kind != "none":  # the whole call a user waits for
        what = "whole call (prompt -> image)"
        prompts = bundle.pipeline.settings["reference_prompts"][:1] * batch
        call = {"guidance": bundle.pipeline.guidance_scale, "rows": bundle.pipeline.conditioning(prompts)}

        distilled = bundle.settings.get("distilled_guidance_scale") is not None  # a guided student: 1 call

        def unet(model: str = "model"):  # the UNet call alone: the prompts were encoded once, above
            graph, scale = (
                bundle.graphs[model].unet,
                1.0 if distilled and model == "model" else call["guidance"],
            )
            return guided_eps(graph, noise, t, bundle.pipeline.input, call["rows"], scale)

        def sampler(model: str = "model"):
            return bundle.generate(0, batch, batch, model, prompts)

        twice = call["guidance"] > 1 and not distilled
        rows_note = f"batch {batch}" + (", guided: twice the rows" if twice else "")
    else:

        def unet(model: str = "model"):
            return bundle.graphs[model].unet(noise, t)

        def sampler(model: str = "model"):
            return bundle.denoise(noise, model)

        rows_note = f"batch {batch}"
    unet_ms = median_ms(unet, args.repeat)
    sampler_ms = median_ms(sampler, args.sampler_repeat)
    gate(f"unet latency ({rows_note}, median ms)", unet_ms, limits.get("max_unet_ms"), True, " ms")
    gate(
        f"{what} latency per image (batch {batch}, ms)",
        sampler_ms / batch,
        limits.get("max_image_ms"),
        True,
        " ms",
    )
    if "dense" in bundle.graphs:
        dense_unet = median_ms(lambda: unet("dense"), args.repeat)
        dense_sampler = median_ms(lambda: sampler("dense"), args.sampler_repeat)
        gate("unet speed-up vs dense", dense_unet / unet_ms, limits.get("min_speedup"), False, "x")
        gate(
            f"{what} speed-up vs dense",
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


def _sampler_parity(bundle: Bundle, ref, gate) -> None:
    """An unconditional bundle's parity: the UNet (or both reuse passes) and the sampler's images."""
    limits, graphs = bundle.acceptance, bundle.graphs["model"]
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


def _pipeline_parity(bundle: Bundle, ref, gate) -> None:
    """A conditional bundle's parity, part by part and whole: the tokenizer's ids (exactly the build
    host's), the text encoder, the conditioned UNet call and the VAE decoder against torch fp32, then
    the whole call's images from the reference prompts and seeds (max abs and PSNR, the parity stage's
    prompt -> image gate)."""
    limits, pipe = bundle.acceptance, bundle.pipeline
    settings = pipe.settings
    if pipe.kind == "text":
        texts = settings["probe_texts"]
        ids = pipe.token_ids(texts)
        wrong = (
            int((ids != ref["token_ids"]).any(axis=1).sum())
            if ids.shape == ref["token_ids"].shape
            else len(texts)
        )
        gate(f"tokenizer (texts tokenized unlike the build host, of {len(texts)})", wrong, 0, True)
        states = pipe.text_encoder.run(["last_hidden_state"], {"input_ids": ref["token_ids"]})[0]
        err = float(np.abs(states - ref["text_states"]).max())
        gate("text encoder parity (max abs vs torch fp32)", err, limits.get("max_text_error"), True)
    condition = {k.split(".", 1)[1]: ref[k] for k in ref.files if k.startswith("condition.")}
    out = bundle.graphs["model"].unet(ref["sample"], ref["timestep"], **condition)
    err = np.abs(out - ref["noise"]).ravel()
    key = "median" if limits.get("parity_statistic") == "median" else "max"
    value = float(np.median(err) if key == "median" else err.max())
    gate(f"unet parity ({key} abs vs torch fp32, conditioned)", value, limits.get("max_unet_error"), True)
    if pipe.decoder is not None:
        decoded = pipe.decode(ref["latents"])
        err = float(np.abs(decoded - ref["decoded"]).max())
        gate("VAE decoder parity (max abs vs torch fp32)", err, limits.get("max_decoder_error"), True)
    prompts = settings.get("reference_prompts") or None
    seeds = ref["image_seeds"]
    images = bundle.generate(int(seeds[0]), len(seeds), 1, prompts=prompts)
    diff = images.astype(np.float64) - ref["images"].astype(np.float64)
    gate(
        "whole call parity (max abs vs torch fp32 images)",
        float(np.abs(diff).max()),
        limits.get("max_image_error"),
        True,
    )
    mse = float((diff**2).mean())
    psnr = float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))
    host = limits.get("build_host_psnr_db")
    name = "whole call parity (prompt -> image PSNR dB vs torch fp32"
    name += f"; build host {host:.1f} dB)" if host is not None else ")"
    gate(name, min(psnr, 999.0), limits.get("min_psnr_db"), False)


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
    if outcome == "inconclusive" and entry.get("ill_posed") and entry["name"] == "min_adherence_ratio":
        line += " undecidable: the dense model's adherence interval reaches zero; score more samples"
    elif outcome == "inconclusive" and entry.get("ill_posed"):
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
    gen.add_argument(
        "--prompt", action="append", metavar="TEXT",
        help="a conditional bundle's prompt, repeatable; image i takes prompt i cycled (class index for "
        "a class-conditioned model)",
    )  # fmt: skip
    gen.add_argument(
        "--negative-prompt", metavar="TEXT", help="what guidance steers from (default: the run's)"
    )
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the run's)")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
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
