"""``compress-deploy bundle``: a finished run's sampler as a folder that needs numpy and ONNX Runtime only.

The folder holds the ONNX graph(s) of the chosen configuration (both feature-reuse passes
when the cache interval is above 1; the dense model's too, for the speed-up gates, unless
``with_dense`` is off), the scheduler's settings (``scheduler.json``) and tables
(``scheduler.npz``, computed here by diffusers and read without pickle), the acceptance
limits (``acceptance.json``), reference inputs/outputs and images from torch fp32
(``reference.npz``), the runtime package (:mod:`deploy.bundle_runtime`, copied as
``bundle_runtime/``) and ``manifest.json`` with the sha256 of every other file. With
``engine`` (``--engine``) it also carries the run's TensorRT engines of the same
configuration and their engine info (``engines/<model>/``); the runtime then runs them with
TensorRT and cuda-python (:mod:`deploy.bundle_runtime.engines`) and keeps the ONNX graphs
for ``--backend onnxruntime`` or ``--fallback``. A conditional or latent run's bundle also carries
the tokenizer, the text encoder and VAE decoder graphs, ``pipeline.json`` and the whole call's
references and limits (:mod:`deploy.conditional_bundle`), and tables for ``generate --steps``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.errors import ArtifactError, UserError
from compressor.feature_reuse import FeatureReuseUNet, full_steps
from compressor.guidance import distilled_scale
from compressor.models import predict_noise
from compressor.sampling import generate, make_scheduler
from deploy.bundle_runtime import FORMAT
from deploy.bundle_runtime.core import MANIFEST, sha256
from deploy.conditional_bundle import (
    PIPELINE,
    TOKENIZER,
    bundle_tokenizer,
    has_pipeline,
    pipeline_files,
    pipeline_limits,
    pipeline_reference,
    pipeline_settings,
    refuse_unsupported,
)
from deploy.engine_info import profile_of, read_engine_info
from deploy.runtimes import load_backend, load_run_unet
from deploy.sampler import load_sampler
from rundir import layout
from rundir.records import read_record

RUNTIME = Path(__file__).resolve().parent / "bundle_runtime"
SOLVERS = ("ddim", "dpmsolver++")  # the loops the runtime reimplements (deterministic ones)
STEP_CHOICES = range(1, 51)  # a conditional bundle's `generate --steps`: the tables of each count
SHARED_TABLES = ("alphas_cumprod", "final_alpha_cumprod")  # the same at every step count


@dataclass
class BundleSpec:
    """What goes into a bundle."""

    model: str = "pruned"
    precision: str = "fp32"
    scheduler: str = "ddim"
    steps: int = 50
    cache_interval: int = 1
    cache_level: int = 0
    cache_schedule: str = "uniform"
    batch: int = 1
    with_dense: bool = True
    provider: str = "CPUExecutionProvider"
    reference_images: int = 2
    engine: bool = False  # also carry the run's TensorRT engines of the same configuration
    dense_steps: int = 50  # a few-step student's bundle: the DDIM steps its dense model takes


def scheduler_tables(kind: str, scheduler_config: dict, steps: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(settings, arrays) of a solver after diffusers' ``set_timesteps(steps)``; UserError if unsupported."""

    if kind not in SOLVERS:
        raise UserError(
            f"--scheduler {kind}: a bundle's runtime has the deterministic solvers {', '.join(SOLVERS)} "
            "(ddpm and unipc are not reimplemented there); choose one of them"
        )
    s = make_scheduler(kind, scheduler_config)
    s.set_timesteps(steps)
    c = s.config
    if c.prediction_type not in ("epsilon", "v_prediction") or getattr(c, "thresholding", False):
        raise UserError(
            f"bundle: {kind} with prediction_type={c.prediction_type}, thresholding: not supported"
        )
    timesteps = s.timesteps.numpy().astype(np.int64)
    settings = {"scheduler": kind, "steps": steps, "init_noise_sigma": float(s.init_noise_sigma)}
    settings["prediction_type"] = c.prediction_type
    settings["num_train_timesteps"] = int(c.num_train_timesteps)
    if kind == "ddim":
        settings.update(clip_sample=bool(c.clip_sample), clip_sample_range=float(c.clip_sample_range))
        prev = timesteps - c.num_train_timesteps // steps
        arrays = {
            "timesteps": timesteps,
            "prev_timesteps": prev.astype(np.int64),
            "alphas_cumprod": s.alphas_cumprod.numpy().astype(np.float32),
            "final_alpha_cumprod": np.asarray(float(s.final_alpha_cumprod), dtype=np.float32),
        }
        return settings, arrays
    expected = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                "final_sigmas_type": "zero", "use_karras_sigmas": False, "euler_at_final": False,
                "lower_order_final": True}  # fmt: skip
    wrong = {k: getattr(c, k, None) for k, v in expected.items() if getattr(c, k, None) != v}
    for flag in ("use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
        if getattr(c, flag, False):
            wrong[flag] = True
    if wrong:
        raise UserError(f"bundle: DPM-Solver++ settings {wrong} are not what the runtime reimplements")
    arrays = {"timesteps": timesteps, "sigmas": s.sigmas.numpy().astype(np.float32)}
    return settings, arrays


def _graph_files(run: Path, model: str, spec: BundleSpec) -> dict[str, Path]:
    """The run's ONNX files a model's sampler needs: the plain call or both passes."""
    parts = ["full", "shallow"] if spec.cache_interval > 1 else ["unet"]
    if spec.cache_interval > 1 and spec.precision == "int8":
        raise UserError("bundle: feature reuse runs the fp32/fp16 passes (they are not quantized); drop int8")
    files = {}
    for part in parts:
        path = layout.onnx_path(run, model, spec.precision, part, spec.cache_level)
        if not path.is_file():
            hint = (
                f"export.feature_reuse=true sample.cache_level={spec.cache_level} " if part != "unet" else ""
            )
            precision = f"export.precisions incl. {spec.precision} "
            raise ArtifactError(
                f"{path} not found; run `compress-deploy CONFIG {hint}{precision}--stages export`"
            )
        files[part] = path
    return files


def _engine_files(run: Path, model: str, spec: BundleSpec) -> dict[str, Path]:
    """The run's TensorRT engines of a model's sampler (as :func:`_graph_files`), checked against ``spec``."""

    parts = ["full", "shallow"] if spec.cache_interval > 1 else ["unet"]
    files = {}
    for part in parts:
        path = layout.engine_path(run, model, part, spec.cache_level)
        if not path.is_file():
            hint = (
                f" with export.feature_reuse=true sample.cache_level={spec.cache_level}"
                if part != "unet"
                else ""
            )
            raise ArtifactError(
                f"{path} not found: --engine carries the run's TensorRT engines; build them on the GPU "
                f"with `compress-deploy build {run}`{hint}, or bundle without --engine"
            )
        info = read_engine_info(path)
        if info["precision"] != spec.precision:
            raise UserError(
                f"{path} is a {info['precision']} engine; bundle with --precision {info['precision']} "
                f"or rebuild with build.precision={spec.precision}"
            )
        profile = profile_of(info)
        if not profile.min_batch <= spec.batch <= profile.max_batch:
            raise UserError(
                f"--batch {spec.batch} is outside {path.name}'s profile "
                f"{profile.min_batch}..{profile.max_batch}; choose a batch in it or rebuild"
            )
        files[part] = path
    return files


def _limits(run: Path, spec: BundleSpec, overrides: dict) -> dict:
    """The acceptance limits the bundle's ``check`` gates on: the run's, then ``overrides``."""
    check = read_record(run, "check", done_only=False)
    acc = check.section("acceptance") if check is not None else {}
    parity = read_record(run, "parity", done_only=False)
    par = parity.section("parity") if parity is not None else {}
    limits = {k: acc.get(k) for k in ("max_unet_ms", "max_image_ms", "min_speedup", "min_sampler_speedup")}
    limits.update({k: v for k, v in overrides.items() if v is not None})
    if spec.precision == "int8":
        limits.update(parity_statistic="median", max_unet_error=par.get("median_abs_int8", 0.05))
    else:
        atol = par.get(f"atol_{spec.precision}", 1e-4 if spec.precision == "fp32" else 2e-2)
        if spec.precision == "fp32" and acc.get("max_parity_error"):  # that gate is the fp32 one
            atol = acc["max_parity_error"]
        limits.update(parity_statistic="max", max_unet_error=atol)
    # images: the build host's torch fp32 sampler; fp32 graphs match it to rounding, others less
    limits["max_image_error"] = {"fp32": 1e-3, "fp16": 0.1, "int8": 0.25}[spec.precision]
    return limits


def _reference(run: Path, spec: BundleSpec, scheduler_config: dict, shape: tuple) -> dict:
    """Torch fp32 outputs on fixed inputs (each pass) and images of the first seeds."""

    unet = load_run_unet(run, spec.model)
    rng = np.random.Generator(np.random.PCG64(12345))
    batch = max(1, min(spec.batch, 2))
    sample = rng.standard_normal((batch, *shape), dtype=np.float32)
    timestep = np.linspace(999, 0, batch).round().astype(np.int64)
    x, t = torch.from_numpy(sample), torch.from_numpy(timestep)
    out = {"sample": sample, "timestep": timestep}
    with torch.no_grad():
        if spec.cache_interval > 1:
            split = FeatureReuseUNet(unet, spec.cache_level)
            noise, feature = split.full(x, t)
            out.update(noise=noise.numpy(), feature=feature.float().numpy())
            out["shallow_noise"] = split.shallow(x, t, feature).numpy()
        else:
            out["noise"] = predict_noise(unet, x, t).numpy()
    level = spec.cache_level if spec.cache_interval > 1 else None
    predict = load_backend("torch", unet=unet, cache_level=level).predict
    seeds = np.arange(spec.reference_images, dtype=np.int64)
    images = generate(
        predict,
        make_scheduler(spec.scheduler, scheduler_config),
        shape,
        len(seeds),
        spec.steps,
        seed=0,
        cache_interval=spec.cache_interval,
        cache_schedule=spec.cache_schedule,
    )
    out.update(image_seeds=seeds, images=images.numpy().astype(np.float32))
    return out


def _copy_files(tmp: Path, folder: str, sources: dict[str, dict[str, Path]], companion: str) -> dict:
    """Copy each model's files to ``tmp/folder/<label>/`` with the file named ``<name><companion>``
    beside each where there is one; label -> part -> path in the bundle."""
    copied: dict[str, dict[str, str]] = {}
    for label, parts in sources.items():
        copied[label] = {}
        for part, src in parts.items():
            rel = f"{folder}/{label}/{src.name}"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
            extra = src.with_name(src.name + companion)
            if extra.is_file():
                shutil.copyfile(extra, tmp / f"{folder}/{label}/{extra.name}")
            copied[label][part] = rel
    return copied


def make_bundle(
    run: Path, out: Path, spec: BundleSpec, limits: dict | None = None, archive: bool = False
) -> dict:
    """Write the bundle folder ``out`` (atomically: built beside it, then renamed); its manifest."""

    run = Path(run)
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder (a bundle never overwrites one)")
    if spec.batch < 1 or spec.steps < 1 or spec.cache_interval < 1:
        raise UserError("bundle: --batch, --steps and --cache-interval must be >= 1")
    sampler = load_sampler(run, "torch", spec.model)  # structure, scheduler config, image shape
    if spec.steps > sampler.max_steps:
        raise UserError(f"--steps {spec.steps}: the model was trained with {sampler.max_steps} timesteps")
    conditional = has_pipeline(sampler)  # prompts, class labels or latents: the whole call's parts too
    if conditional:
        refuse_unsupported(sampler, spec)
    settings, arrays = scheduler_tables(spec.scheduler, sampler.scheduler_config, spec.steps)
    if conditional and distilled_scale(sampler.scheduler_config) is not None:  # a guided student: one call
        settings["distilled_guidance_scale"] = distilled_scale(sampler.scheduler_config)  # a step, cond half
    if conditional and not sampler.student_steps:  # `generate --steps N`: each count's own tables
        settings["step_choices"] = sorted({*STEP_CHOICES, spec.steps} & set(range(1, sampler.max_steps + 1)))
        for n in settings["step_choices"]:
            if n != spec.steps:
                more = scheduler_tables(spec.scheduler, sampler.scheduler_config, n)[1]
                arrays.update({f"steps{n}.{k}": v for k, v in more.items() if k not in SHARED_TABLES})
    if sampler.student_steps and spec.with_dense:  # dense samples with its own schedule and steps
        dense = load_sampler(run, "torch", "dense")
        dense_settings, dense_arrays = scheduler_tables("ddim", dense.scheduler_config, spec.dense_steps)
        settings["dense"] = dense_settings
        arrays.update({f"dense.{k}": v for k, v in dense_arrays.items()})
    settings.update(cache_interval=spec.cache_interval, cache_level=spec.cache_level)
    settings["cache_schedule"] = spec.cache_schedule
    if spec.cache_interval > 1:
        settings["full_steps"] = sorted(full_steps(spec.steps, spec.cache_interval, spec.cache_schedule))
    models = {"model": spec.model}
    if spec.with_dense and spec.model != "dense":
        models["dense"] = "dense"
    sources = {label: _graph_files(run, m, spec) for label, m in models.items()}
    shared = {"shared": pipeline_files(run, sampler, spec.precision)} if conditional else {}
    pipeline = pipeline_settings(run, sampler, spec.reference_images) if conditional else {}
    tokenizer = (
        bundle_tokenizer(sampler.components.tokenizer) if pipeline.get("conditioning") == "text" else None
    )
    engine_sources = (
        {label: _engine_files(run, m, spec) for label, m in models.items()} if spec.engine else {}
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # external weights (``.data``) travel with their graph, the engine info with its engine
        graphs = _copy_files(tmp, "graphs", sources, ".data")
        engines = _copy_files(tmp, "engines", engine_sources, ".json")
        shared_graphs = _copy_files(tmp, "graphs", shared, ".data").get("shared", {})
        if tokenizer is not None:
            (tmp / TOKENIZER).parent.mkdir(parents=True)
            tokenizer.save(str(tmp / TOKENIZER))
        if conditional:
            (tmp / PIPELINE).write_text(json.dumps(pipeline, indent=1))
        some_engine = next((p for parts in engine_sources.values() for p in parts.values()), None)
        engine_info = json.loads(layout.engine_info_path(some_engine).read_text()) if some_engine else {}
        (tmp / "scheduler.json").write_text(json.dumps(settings, indent=1))
        np.savez(tmp / "scheduler.npz", **arrays)
        acceptance = _limits(run, spec, limits or {})
        if conditional:
            acceptance.update(pipeline_limits(run, spec))
        (tmp / "acceptance.json").write_text(json.dumps(acceptance, indent=1))
        reference = (
            pipeline_reference(sampler, pipeline, tokenizer, spec)
            if conditional
            else _reference(run, spec, sampler.scheduler_config, sampler.image_shape)
        )
        np.savez(tmp / "reference.npz", **reference)
        shutil.copytree(
            RUNTIME, tmp / "bundle_runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        files = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run": run.resolve().name,
            "model": spec.model,
            "precision": spec.precision,
            "provider": spec.provider,
            "image_shape": list(sampler.image_shape),
            "batch": spec.batch,
            "graphs": graphs,
            "files": files,
            "requires": ["numpy", "onnxruntime"] + (["tensorrt", "cuda-python"] if engines else []),
            "runtime_module": "bundle_runtime",
        }
        if conditional:  # the denoiser's samples (latents) apart from the images the decoder makes
            manifest.update(conditioning=pipeline["conditioning"], pipeline=PIPELINE, shared=shared_graphs)
            manifest.update(sample_shape=pipeline["sample_shape"], image_shape=pipeline["image_shape"])
            if tokenizer is not None:
                manifest.update(tokenizer=TOKENIZER, requires=[*manifest["requires"], "tokenizers"])
        if engines:
            keys = ("tensorrt_version", "gpu_name", "compute_capability", "precision", "profile")
            manifest.update(engines=engines, engine={k: engine_info.get(k) for k in keys})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if archive:
        target = out.with_name(out.name + ".tar.gz")
        with tarfile.open(target.with_name(target.name + ".tmp"), "w:gz") as tar:
            tar.add(out, arcname=out.name)
        target.with_name(target.name + ".tmp").replace(target)
    return manifest
