"""Load a finished run's sampler on any backend: the small Python API users serve with.

from deploy.sampler import load_sampler
sampler = load_sampler("runs/demo", backend="onnxruntime")
images = sampler(num_images=16, steps=50, seed=0)   # (N, C, H, W) in [0, 1]
images = sampler(num_images=16, steps=10, seed=0, scheduler="dpmsolver++")

fast = load_sampler("runs/demo", backend="torch", cache_level=0)   # feature reuse (DeepCache)
images = fast(num_images=16, steps=20, scheduler="dpmsolver++", cache_interval=3)

from deploy.sampler import load_pipeline
pipe = load_pipeline("runs/demo")   # a diffusers pipeline around the compressed UNet
images = pipe(batch_size=4, num_inference_steps=20).images      # (StableDiffusionPipeline: pipe(prompt))

# a text-to-image run: prompts (one image each, cycled), classifier-free guidance, the VAE decoding
t2i = load_sampler("runs/demo-sd", backend="onnxruntime")
images = t2i(num_images=4, steps=30, prompts=["a handwritten digit three"], guidance_scale=4.0)

# on TensorRT (a CUDA host, after the build stage): the text encoder, UNet and VAE decoder engines
trt = load_sampler("runs/demo-sd", backend="tensorrt", device="cuda")
images = trt(num_images=8, batch_size=8, prompts=["a handwritten digit three"])   # in every profile
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.components import DiffusionModel, ModelSpec
from compressor.config import ModelConfig, SampleConfig
from compressor.errors import ArtifactError, ModelError, UserError
from compressor.guidance import Conditioning, model_decoder
from compressor.models import NoisePredictor, read_model_spec
from compressor.persist import load_unet, read_structure
from compressor.prompts import PromptSet
from compressor.sampling import generate, make_scheduler
from deploy.engine_info import covers, profile_of, read_engine_info
from deploy.onnx_text_to_image import onnx_prompt_conditioning, onnx_text_encoder, onnx_vae_decoder
from deploy.runtimes import check_backend_name, load_backend, load_run_model
from deploy.whole_call import engine_text_encoder, engine_vae_decoder
from rundir import layout
from rundir.records import final_model_dir, read_record


@dataclass
class Sampler:
    """A noise predictor plus what the sampling loop needs; call it to generate images."""

    predict: NoisePredictor
    scheduler_config: dict
    image_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)
    device: str = "cpu"
    student_steps: int | None = None  # a few-step student: the steps it was trained to take
    components: DiffusionModel | None = None  # a conditional or latent run's dense model (text, VAE)
    encode: Callable[[list[str]], torch.Tensor] | None = None  # texts -> embeddings (ONNX text encoder)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [-1, 1]
    guidance_scale: float = 1.0  # the run's sample.guidance_scale: what a call without one uses
    engines: dict[str, dict] = field(default_factory=dict)  # tensorrt: unet/text_encoder/vae_decoder info

    @property
    def conditioning_kind(self) -> str:
        """``text``, ``class`` or ``none``: what a call's ``prompts`` are."""
        return self.components.conditioning if self.components is not None else "none"

    def conditioning(
        self, prompts: Sequence[str], num_images: int, negative_prompt: str = "", chunk: int | None = None
    ) -> Conditioning:
        """Image ``i``'s conditioning: ``prompts[i % len(prompts)]`` (class indices for a
        class-conditioned model) beside the negative prompt or the null class. ``chunk``: encode the
        texts that many at a time (a text encoder engine takes the sampler's batches)."""
        kind = self.conditioning_kind
        if kind == "none":
            raise UserError("prompts given, but the run's model is unconditional; sample it without prompts")
        found = PromptSet(kind, tuple(str(p) for p in prompts), "--prompt", negative_prompt)
        if kind == "class":
            bad = [p for p in found.prompts if not p.strip().lstrip("-").isdigit()]
            if bad:
                raise UserError(f"--prompt {bad[0]!r}: a class-conditioned model takes class indices")
        if kind == "text" and self.encode is not None:
            encode = self.encode
            if chunk:

                def encode(texts: list[str]) -> torch.Tensor:
                    parts = [self.encode(texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
                    return torch.cat(parts)

            return onnx_prompt_conditioning(encode, found.for_images(num_images), negative_prompt)
        return found.conditioning(self.components, num_images, 0, self.device)

    @property
    def default_steps(self) -> int:
        """The steps a call without ``steps`` takes: a student's own, else 50."""
        return self.student_steps or 50

    @property
    def max_steps(self) -> int:
        """The most sampling steps the model's schedule allows (its training timesteps)."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def __call__(
        self,
        num_images: int = 16,
        steps: int | None = None,
        seed: int = 0,
        eta: float = 0.0,
        scheduler: str = "ddim",
        batch_size: int = 64,
        cache_interval: int = 1,
        cache_schedule: str = "uniform",
        on_batch: Callable[[int], None] | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images from seeds ``seed .. seed + num_images - 1``; UserError for steps beyond the schedule.

        A conditional run's model needs ``prompts`` (image ``i`` takes ``prompts[i % len]``; class
        indices for a class-conditioned model) and samples under ``guidance_scale`` (default: the
        run's ``sample.guidance_scale``) away from ``negative_prompt``; a latent one's images are
        decoded by the run's VAE (its ONNX graph on ONNX Runtime when exported).

        ``cache_interval`` > 1 needs a sampler loaded with ``cache_level`` (feature reuse).
        ``on_batch(n)`` is called after each batch with its image count (progress).
        ``steps`` defaults to :attr:`default_steps`. A few-step student samples with the
        scheduler config it was trained for (its DDIM grid and ``prediction_type``).
        ``seeds``: image ``i`` from ``seeds[i]`` instead (``num_images`` and ``seed`` are then unused);
        each run of consecutive seeds is one call, so its images equal those of ``seed=seeds[k]``.
        """
        if seeds is not None:
            return self._from_seeds(
                list(seeds), prompts, steps=steps, eta=eta, scheduler=scheduler, batch_size=batch_size,
                cache_interval=cache_interval, cache_schedule=cache_schedule, on_batch=on_batch,
                guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            )  # fmt: skip
        steps = self.default_steps if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise UserError(
                f"steps {steps}: the model was trained with {self.max_steps} timesteps; "
                f"use 1..{self.max_steps}"
            )
        sched = make_scheduler(scheduler, self.scheduler_config)
        conditional = {}
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        chunk = None
        if self.engines:  # every engine's profile must take the call's batches before anything runs
            guided = bool(prompts) and scale > 1
            check_engine_request(self.engines, self.image_shape, num_images, batch_size, guided)
            chunk = min(batch_size, num_images)
        if prompts:
            conditional = {
                "conditioning": self.conditioning(prompts, num_images, negative_prompt, chunk),
                "guidance_scale": scale,
            }
        elif self.conditioning_kind != "none":
            raise UserError(
                "the run's model is conditional: pass prompts (--prompt TEXT or --prompt-file FILE)"
            )
        return generate(
            self.predict,
            sched,
            self.image_shape,
            num_images,
            steps,
            eta,
            seed,
            batch_size,
            self.device,
            on_batch=on_batch,
            cache_interval=cache_interval,
            cache_schedule=cache_schedule,
            decode=self.decode,
            **conditional,
        )

    def _from_seeds(self, seeds: list[int], prompts: Sequence[str] | None, **call) -> torch.Tensor:
        """Images from ``seeds`` (image ``i``: ``seeds[i]`` and ``prompts[i % len]``), one call per run of
        consecutive seeds."""
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise UserError(f"seeds {seeds!r}: give a non-empty list of integers >= 0")
        runs, start = [], 0
        for i in range(1, len(seeds) + 1):
            if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
                runs.append((start, i))
                start = i
        out = []
        for lo, hi in runs:
            turned = [prompts[(lo + j) % len(prompts)] for j in range(len(prompts))] if prompts else None
            out.append(self(num_images=hi - lo, seed=seeds[lo], prompts=turned, **call))
        return torch.cat(out)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images a call returns: decoded pixels for a latent model."""
        return self.components.image_shape if self.components is not None else self.image_shape


def load_sampler(
    run_dir: str | Path,
    backend: str = "torch",
    model: str = "pruned",
    device: str = "cpu",
    precision: str = "fp32",
    cache_level: int | None = None,
) -> Sampler:
    """The sampler of a finished run: ``model`` is the compressed model (the final one: the few-step
    student, else finetuned, else pruned) or dense.

    ``precision`` picks the torch dtype or the exported ONNX file; ``cache_level`` loads
    the two feature-reuse passes split at that level (see :mod:`compressor.feature_reuse`).
    ``backend="tensorrt"`` (on CUDA) runs the UNet engine and, for a text-to-image run, the text encoder
    and VAE decoder engines (``RUN/build/shared/*.plan``); ArtifactError naming any that is not built,
    and each call is checked against every engine's profile first (:func:`check_engine_request`).
    """

    check_backend_name(backend)
    if backend == "tensorrt":
        device = engine_device(device)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} not found; pass the folder a run wrote")
    if backend == "tensorrt" and cache_level is None:
        missing = [str(p) for p in engine_files(run_dir, model, _run_spec(run_dir)) if not p.is_file()]
        if missing:
            raise ArtifactError(
                f"the tensorrt sampler needs {', '.join(missing)}: build the run's engines with "
                "`compress-deploy build RUN` (it reads RUN/export; a text-to-image run's export writes the "
                "text encoder and VAE decoder graphs)"
            )
    folder = final_model_dir(run_dir)[1]
    structure = read_structure(folder)
    student = structure.get("student_steps") if model == "pruned" else None
    sched_cfg = _scheduler_config(folder, structure, model)
    shape = ModelSpec(structure["unet_config"]).sample_shape  # the denoiser's input: the image
    b = load_backend(
        backend, run_dir=run_dir, model=model, device=device, precision=precision, cache_level=cache_level
    )
    info = {"backend": backend, "model": model, **b.info}
    sampler = Sampler(b.predict, sched_cfg, shape, info, device, int(student) if student else None)
    dense = _conditional_components(run_dir)
    if dense is not None:
        _attach_components(sampler, dense, run_dir, backend, device)
    return sampler


def engine_device(device: str | torch.device) -> str | torch.device:
    """Where a TensorRT sampler's loop runs: CUDA (engines run there only), whatever ``cpu`` says."""
    return "cuda" if str(device) == "cpu" else device


def _run_spec(run_dir: Path) -> ModelSpec | None:
    """The description of the model the run's prune record names (configs only), None without one."""
    rec = read_record(run_dir, "prune")
    if rec is None:
        return None
    model = rec.section("model")
    return read_model_spec(ModelConfig(**{k: v for k, v in model.items() if k in ("name", "init")}))


def engine_files(run_dir: Path, model: str, spec: ModelSpec | None) -> list[Path]:
    """The engines a TensorRT sampler of the run loads: the UNet's, and a text-to-image (latent) model's
    text encoder (VAE decoder) engines, ``RUN/build/shared/<graph>.plan``."""
    files = [layout.engine_path(run_dir, model)]
    if spec is not None and spec.conditioning == "text":
        files.append(layout.shared_engine_path(run_dir, "text_encoder"))
    if spec is not None and spec.latent:
        files.append(layout.shared_engine_path(run_dir, "vae_decoder"))
    return files


def check_engine_request(
    engines: dict[str, dict], image_shape: tuple[int, ...], num_images: int, batch_size: int, guided: bool
) -> None:
    """UserError (one line: the engine, the shape, the ``build.shapes`` fix) unless every engine's profile
    takes the call's batches: ``min(batch_size, num_images)`` images and the last, smaller batch; the
    UNet over twice the rows under guidance (``engines``: part -> engine info, with its ``path``)."""
    batches = sorted({min(batch_size, num_images), num_images % batch_size} - {0})
    for batch in batches:
        for part, info in engines.items():
            rows = batch * 2 if guided and part == "unet" else batch
            name = {"unet": "sample", "text_encoder": "input_ids", "vae_decoder": "latent_sample"}[part]
            per_item = tuple(image_shape) if name != "input_ids" else tuple(info["inputs"]["input_ids"])
            shape = (rows, *per_item)
            if covers(info, name, shape):
                continue
            span = info.get("profile_shapes", {}).get(name) or profile_of(info).record()
            what = f"{batch} images" + (" x 2 rows under guidance" if rows != batch else "")
            fix = (
                f"build.shapes=static build.opt_batch={batch}"
                if profile_of(info).static
                else f"build.min_batch<={batch}<=build.max_batch"
            )
            raise UserError(
                f"tensorrt sampler: the {part} engine {info['path']} takes {name} {span}, this call needs "
                f"{list(shape)} ({what}); pass batch_size/num_images within its profile or rebuild with "
                f"`compress-deploy build RUN {fix}` (build.shapes=dynamic for a range)"
            )


def _conditional_components(run_dir: Path) -> DiffusionModel | None:
    """The dense model of a conditional or latent run (its text encoder, tokenizer, VAE), None for an
    unconditional pixel-space run (read from its configs first: nothing else is loaded then)."""
    if read_record(run_dir, "prune") is None:
        return None
    spec = _run_spec(run_dir)
    if spec is not None and spec.conditioning == "none" and not spec.latent:
        return None
    dense = load_run_model(run_dir)
    return dense if dense.conditioning != "none" or dense.latent else None


def _attach_components(
    sampler: Sampler, dense: DiffusionModel, run_dir: Path, backend: str, device: str
) -> None:
    """Give ``sampler`` the dense model's text encoder and VAE: their exported ONNX graphs on ONNX
    Runtime when the run has them, else the torch modules; and the run's guidance scale."""
    for module in (dense.text_encoder, dense.vae):
        if module is not None:
            module.to(device).eval()
    sampler.components = dense
    sampler.decode = model_decoder(dense)
    text, vae = (layout.shared_onnx_path(run_dir, c, "fp32") for c in ("text_encoder", "vae_decoder"))
    if backend == "onnxruntime" and dense.tokenizer is not None and text.is_file():
        sampler.encode = onnx_text_encoder(text, dense.tokenizer)
        sampler.info["text_encoder"] = str(text)
    if backend == "onnxruntime" and dense.vae is not None and vae.is_file():
        sampler.decode = onnx_vae_decoder(vae, dense.vae.config)
        sampler.info["vae_decoder"] = str(vae)
    if backend == "tensorrt":
        _attach_engines(sampler, dense, run_dir)
    sampler.guidance_scale = run_guidance_scale(run_dir)


def _attach_engines(sampler: Sampler, dense: DiffusionModel, run_dir: Path) -> None:
    """The TensorRT text encoder and VAE decoder engines (:mod:`deploy.whole_call`'s runners over
    ``RUN/build/shared/<graph>.plan``) beside the UNet engine, with each engine's info for the profile
    checks of a call (:func:`check_engine_request`)."""
    unet = getattr(sampler.predict, "info", None)
    if unet is not None:
        sampler.engines["unet"] = {**unet, "path": str(sampler.predict.path)}
    if dense.conditioning == "text" and dense.tokenizer is not None:
        path = layout.shared_engine_path(run_dir, "text_encoder")
        sampler.encode = engine_text_encoder(path, dense.tokenizer)
        sampler.engines["text_encoder"] = {**read_engine_info(path), "path": str(path)}
        sampler.info["text_encoder"] = str(path)
    if dense.vae is not None:
        path = layout.shared_engine_path(run_dir, "vae_decoder")
        sampler.decode = engine_vae_decoder(path, dense.vae.config)
        sampler.engines["vae_decoder"] = {**read_engine_info(path), "path": str(path)}
        sampler.info["vae_decoder"] = str(path)


def run_guidance_scale(run_dir: Path) -> float:
    """The ``sample.guidance_scale`` a run sampled with (its samples, quality or bench record), else
    the config's default."""
    for stage in ("samples", "quality", "bench"):
        rec = read_record(run_dir, stage)
        scale = (rec.config.get("sample") or {}).get("guidance_scale") if rec is not None else None
        if scale is not None:
            return float(scale)
    return float(SampleConfig().guidance_scale)


def _scheduler_config(folder: Path, structure: dict, model: str) -> dict:
    """The schedule the run's ``model`` (pruned|dense) samples with, from the final model's structure."""
    sched_cfg = structure.get("scheduler_config")
    if model == "dense":  # a student's structure file keeps the dense model's schedule apart
        sched_cfg = structure.get("dense_scheduler_config", sched_cfg)
    if not sched_cfg:
        raise ArtifactError(f"{folder}: its structure file has no scheduler config; rerun the prune stage")
    return sched_cfg


def diffusers_pipeline(unet: torch.nn.Module, dense: DiffusionModel, scheduler):
    """``unet`` (e.g. a compressed copy of ``dense.unet``) with ``dense``'s other components and
    ``scheduler`` in the diffusers pipeline that samples such a model.

    Text-conditioned (VAE, text encoder, tokenizer): ``StableDiffusionPipeline`` (no safety
    checker); unconditional on latents (VAE): ``LDMPipeline``; unconditional on pixels:
    ``DDIMPipeline`` for a DDIM scheduler, else ``DDPMPipeline`` (which steps any scheduler).
    ModelError where diffusers has no pipeline for the model: class conditioning, a text-conditioned
    model without its VAE, a ``UNet2DConditionModel`` without a text encoder (the product runs it
    with a null context that no diffusers pipeline supplies).
    """
    import diffusers

    spec = dense.spec
    if spec.conditioning == "text":
        missing = [c for c in ("vae", "text_encoder", "tokenizer") if getattr(dense, c) is None]
        if missing:
            raise ModelError(
                f"a StableDiffusionPipeline needs the model's {', '.join(missing)}; the dense model has none"
            )
        return diffusers.StableDiffusionPipeline(
            vae=dense.vae, text_encoder=dense.text_encoder, tokenizer=dense.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    if spec.conditioning == "class" or spec.cross_attention_dim is not None:
        what = "class conditioning" if spec.conditioning == "class" else "a UNet2DConditionModel without text"
        raise ModelError(
            f"diffusers has no pipeline for {what}; sample it with deploy.sampler.load_sampler "
            "or compressor.sampling.generate"
        )
    if dense.vae is not None:
        return diffusers.LDMPipeline(vqvae=dense.vae, unet=unet, scheduler=scheduler)
    if isinstance(scheduler, diffusers.DDIMScheduler):
        return diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)


def load_pipeline(run_dir: str | Path, scheduler: str = "ddim", device: str = "cpu"):
    """A finished run's final compressed UNet (the few-step student, else finetuned, else pruned)
    inside a diffusers pipeline (see :func:`diffusers_pipeline`), with the other components of the
    dense model the run's prune record names and a ``scheduler`` (:data:`compressor.sampling.SCHEDULERS`)
    built from the final model's schedule.

    A pipeline samples with diffusers' own noise and rules (its ``generator``, not this project's
    per-seed noise); given the same initial latents it computes what :func:`compressor.sampling.denoise`
    does. ``StableDiffusionPipeline`` rewrites a legacy scheduler config (``steps_offset`` != 1,
    ``clip_sample``) with a deprecation warning, so there it follows diffusers, not the run's config.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} not found; pass the folder a run wrote")
    folder = final_model_dir(run_dir)[1]
    unet, structure = load_unet(folder, device)
    sched = make_scheduler(scheduler, _scheduler_config(folder, structure, "pruned"))
    return diffusers_pipeline(unet, load_run_model(run_dir), sched).to(device)
