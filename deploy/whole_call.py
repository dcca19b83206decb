"""The whole text-to-image call a user waits for, timed by component: what ``bench`` times for a
conditional model besides the UNet call and the UNet loop.

One call (:class:`WholeCall`) is: the prompts encoded once (the text encoder, on torch, its ONNX
graph ``RUN/export/shared/text_encoder.fp32.onnx`` or its TensorRT engine
``RUN/build/shared/text_encoder.plan``, as the benched UNet runs; a class-conditioned model's labels
need no encoder), ``steps`` UNet calls under classifier-free guidance through the scheduler
(:func:`compressor.sampling.denoise`, the UNet on the benched backend), and the final latents decoded
(the torch VAE, the ONNX graph ``vae_decoder.fp32.onnx`` or the engine ``vae_decoder.plan``; a pixel
model decodes nothing). Each
part is timed inside the same call (``perf_counter`` around it, the device synchronised at its
edges), so the parts add up to the call's time; :meth:`WholeCall.component_ms` gives their medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compressor.components import DiffusionModel
from compressor.encoded_cache import padded_tokens
from compressor.guidance import Conditioning, encode_prompts, model_decoder
from compressor.prompts import PromptSet
from compressor.sampling import denoise, initial_noise
from deploy import tensorrt_backend
from deploy.onnx_text_to_image import onnx_prompt_conditioning, onnx_text_encoder, onnx_vae_decoder
from deploy.runtimes import graph_engine
from deploy.stopwatch import sync
from export.pipeline_graphs import TEXT_ENCODER, VAE_DECODER, unscale_latents
from rundir.layout import shared_engine_path, shared_onnx_path

TEXT, LOOP, DECODE = "text_encoder", "unet_loop", "vae_decoder"
WHOLE_CALL_BACKENDS = ("torch", "onnxruntime", "tensorrt")  # where the text encoder and VAE decoder run
WHERE = {"torch": "torch fp32", "onnxruntime": "onnxruntime fp32 graph", "tensorrt": "tensorrt engine"}


class WholeCall:
    """One text-to-image call from fixed noise and prompts (call it with no arguments); each call's
    milliseconds per component are kept in :attr:`calls`.

    ``encode``: the prompts to their :class:`~compressor.guidance.Conditioning` (timed as
    ``text_encoder``), or None with ``conditioning`` given (class labels: nothing to encode).
    ``decode``: the final latents to images in [-1, 1] (timed as ``vae_decoder``), None for a pixel model.
    ``cache_interval`` > 1: the UNet loop reuses features (``predict`` a reuse backend's), as
    :func:`compressor.sampling.denoise` does with ``cache_schedule``.
    """

    def __init__(
        self,
        predict,
        scheduler,
        noise: torch.Tensor,
        steps: int,
        guidance_scale: float,
        encode: Callable[[], Conditioning] | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        conditioning: Conditioning | None = None,
        cache_interval: int = 1,
        cache_schedule: str = "uniform",
    ) -> None:
        if encode is None and conditioning is None:
            raise ValueError("WholeCall: give encode (prompts) or conditioning (class labels)")
        self.predict, self.scheduler, self.noise, self.steps = predict, scheduler, noise, steps
        self.guidance_scale, self.encode, self.decode = guidance_scale, encode, decode
        self.conditioning = conditioning
        self.cache_interval, self.cache_schedule = cache_interval, cache_schedule
        self.calls: list[dict[str, float]] = []

    def components(self) -> list[str]:
        """The parts this call times, in order."""
        return [*([TEXT] if self.encode else []), LOOP, *([DECODE] if self.decode else [])]

    def __call__(self) -> torch.Tensor:
        decoding = [0.0]

        def timed_decode(latents: torch.Tensor) -> torch.Tensor:
            sync()
            start = time.perf_counter()
            images = self.decode(latents)  # type: ignore[misc]
            sync()
            decoding[0] = time.perf_counter() - start
            return images

        sync()
        start = time.perf_counter()
        conditioning = self.encode() if self.encode else self.conditioning
        sync()
        encoded = time.perf_counter()
        images = denoise(
            self.predict,
            self.scheduler,
            self.noise,
            self.steps,
            cache_interval=self.cache_interval,
            cache_schedule=self.cache_schedule,
            conditioning=conditioning,
            guidance_scale=self.guidance_scale,
            decode=timed_decode if self.decode else None,
        )
        sync()
        done = time.perf_counter()
        parts = {TEXT: encoded - start, LOOP: done - encoded - decoding[0], DECODE: decoding[0]}
        self.calls.append({k: parts[k] * 1000.0 for k in self.components()})
        return images

    def component_ms(self, last: int) -> dict[str, float]:
        """The median milliseconds of each component over the last ``last`` calls (the timed ones)."""
        timed = self.calls[-last:]
        if not timed:
            raise ValueError("WholeCall.component_ms: no call timed yet")
        return {k: float(statistics.median(c[k] for c in timed)) for k in self.components()}


def component_sources(model: DiffusionModel, backend: str) -> dict[str, str]:
    """Where a whole call's text encoder and VAE decoder run beside a UNet on ``backend``."""
    where = WHERE[backend]
    out = {}
    if model.conditioning == "text":
        out[TEXT] = where
    if model.vae is not None:
        out[DECODE] = where
    return out


def unavailable_reason(model: DiffusionModel, backend: str, run_dir: Path) -> str:
    """Why the whole call cannot be timed with a UNet on ``backend`` ('' when it can): a backend
    without text encoder and VAE runners, TensorRT unusable here, or the shared ONNX graphs (TensorRT
    engines) not exported (built)."""
    if backend not in WHOLE_CALL_BACKENDS:
        return (
            f"the whole text-to-image call on {backend}: the text encoder and VAE decoder run on "
            f"{', '.join(WHOLE_CALL_BACKENDS)} only"
        )
    if backend == "tensorrt":
        reason = tensorrt_backend.unavailable_reason()
        if reason:
            return reason
    needed = {TEXT_ENCODER: model.conditioning == "text", VAE_DECODER: model.vae is not None}
    stage = "build" if backend == "tensorrt" else "export"
    for part in (p for p, used in needed.items() if used and backend != "torch"):
        path = (
            shared_engine_path(run_dir, part) if stage == "build" else shared_onnx_path(run_dir, part, "fp32")
        )
        if not path.is_file():
            return f"{path} is missing: rerun the {stage} stage (--force {stage})"
    return ""


def engine_text_encoder(path: Path, tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> last_hidden_state`` through the shared text encoder's TensorRT engine, the texts
    tokenized as Stable Diffusion does (padded to the tokenizer's ``model_max_length``, truncated)."""
    runner = graph_engine(Path(path))

    def encode(texts: list[str]) -> torch.Tensor:
        return runner.run(input_ids=padded_tokens(tokenizer, texts).input_ids)["last_hidden_state"].float()

    return encode


def engine_vae_decoder(path: Path, vae_config) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [-1, 1]`` through the shared VAE decoder's TensorRT engine (the latents
    unscaled first, as :func:`deploy.onnx_text_to_image.onnx_vae_decoder` unscales them)."""
    runner = graph_engine(Path(path))

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return runner.run(latent_sample=unscale_latents(latents, vae_config))["sample"].float()

    return decode


def whole_call(
    model: DiffusionModel,
    backend: str,
    predict,
    scheduler,
    prompts: PromptSet,
    batch: int,
    steps: int,
    guidance_scale: float,
    device: torch.device | str,
    run_dir: Path,
    threads: int | None = None,
    graphs: dict | None = None,
    cache_interval: int = 1,
    cache_schedule: str = "uniform",
) -> WholeCall:
    """The whole call for ``batch`` images (images ``0 .. batch - 1`` of the run's prompts and seeds)
    with the UNet ``predict`` of a ``backend`` bench variant: the text encoder and VAE decoder on torch
    (the model's own, on ``device``) for a torch UNet, their fp32 ONNX graphs for an ONNX Runtime one,
    their engines for a TensorRT one (:func:`unavailable_reason` says when they cannot run).
    ``graphs``: a dict the graphs' runners are kept in, so that calls built with the same dict share
    their sessions (engines). ``cache_interval`` > 1: the loop reuses features (``predict`` a reuse
    backend's). At ``guidance_scale`` 1 or below (a few-step student distilled at a fixed scale) the
    UNet sees the prompts alone, so the graphs (engines) encode no negative prompt."""
    noise = initial_noise(model.sample_shape, list(range(batch))).to(device)
    encode, conditioning, decode = None, None, None
    graphs = {} if graphs is None else graphs
    engine = backend == "tensorrt"

    def graph(part: str, load: Callable[[Path], Callable]) -> Callable:
        if (backend, part, threads) not in graphs:
            path = shared_engine_path(run_dir, part) if engine else shared_onnx_path(run_dir, part, "fp32")
            graphs[backend, part, threads] = load(path)
        return graphs[backend, part, threads]

    if model.conditioning == "text":
        texts, negative = prompts.for_images(batch), prompts.negative
        if backend != "torch":
            text_graph = graph(
                TEXT_ENCODER,
                lambda path: (
                    engine_text_encoder(path, model.tokenizer)
                    if engine
                    else onnx_text_encoder(path, model.tokenizer, threads)
                ),
            )

            def encode() -> Conditioning:
                if guidance_scale <= 1:  # unguided: the negative prompt is never used
                    embedded = text_graph(texts)
                    return Conditioning("text", embedded, embedded)
                return onnx_prompt_conditioning(text_graph, texts, negative)
        else:

            def encode() -> Conditioning:
                return encode_prompts(model, texts, negative, device)
    else:
        conditioning = prompts.conditioning(model, batch, 0, device)
    if model.vae is not None:
        config = model.vae.config
        decode = (
            model_decoder(model)
            if backend == "torch"
            else graph(
                VAE_DECODER,
                lambda path: (
                    engine_vae_decoder(path, config) if engine else onnx_vae_decoder(path, config, threads)
                ),
            )
        )
    return WholeCall(predict, scheduler, noise, steps, guidance_scale, encode, decode, conditioning,
                     cache_interval, cache_schedule)  # fmt: skip
