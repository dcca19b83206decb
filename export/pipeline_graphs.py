"""A text-to-image pipeline's other two graphs: the text encoder and the VAE decoder, and their parity.

Only the UNet is compressed, so these two are exported once per run and shared by the dense and
the compressed UNet (``RUN/export/shared/``: :func:`rundir.layout.shared_onnx_path`).

- Text encoder (a ``CLIPTextModel``): input ``input_ids`` (int64, B x tokens: the tokenizer's
  ids padded to ``model_max_length``, as ``StableDiffusionPipeline.encode_prompt`` pads them),
  output ``last_hidden_state`` (float32, B x tokens x hidden): what the UNet's
  ``encoder_hidden_states`` takes. No attention mask (Stable Diffusion passes none; a text
  encoder whose config asks for one, ``use_attention_mask``, is refused with ModelError).
- VAE decoder (an ``AutoencoderKL``): input ``latent_sample`` (float32, B x C x h x w), output
  ``sample`` (float32, B x 3 x H x W, images in [-1, 1]): ``vae.decode`` of latents **already
  unscaled**. The division by ``scaling_factor`` (and the ``shift_factor`` some VAEs add) is not in
  the graph: the caller applies it to the sampler's latents before feeding them
  (:func:`unscale_latents`, the same arithmetic as :func:`compressor.guidance.vae_decoder`), so
  the graph is the decoder network alone, the same whatever scaling a model was trained with.

Both: dynamic batch axis, opset and exporter as :func:`export.onnx_export.export_unet` (TorchScript,
``dynamo=False``), fp32, or fp16 (weights and activations float16, LayerNorm / GroupNorm in float32,
float32 at the edges: :func:`export.onnx_export.half_with_fp32_norms`); written atomically, checked
with ``onnx.checker`` and against the interface (:data:`export.onnx_export.INTERFACES`). The fp16
VAE decoder is traced at a small latent size and pinned to the full one, as the fp16 UNet is (CPUs
have no fast float16 convolution).

Parity (each graph against torch fp32 on fixed inputs, through :func:`export.compare.compare`):
:func:`text_encoder_parity`, :func:`vae_decoder_parity` and :func:`conditional_unet_parity` (the
UNet's ``encoder_hidden_states`` / ``class_labels`` fed too). The whole prompt-to-image parity runs
the ONNX Runtime backend and lives in :mod:`deploy.onnx_text_to_image`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.components import ModelSpec
from compressor.errors import ModelError
from compressor.models import predict_noise
from export.compare import ParityReport, compare, make_function_runner, make_onnxrt_runner
from export.onnx_export import (
    INTERFACES,
    half_with_fp32_norms,
    trace_to_onnx,
)

TEXT_ENCODER = "text_encoder"
VAE_DECODER = "vae_decoder"
# the tolerances the UNet's parity uses by default (compressor.config's parity.atol_* / rtol_*)
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}


class TextEncoderModule(nn.Module):
    """``input_ids -> last_hidden_state`` (float32 out whatever the encoder's dtype)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0].float()


class VaeDecoderModule(nn.Module):
    """``latent_sample -> sample``: ``vae.decode`` of unscaled latents, float32 at the edges."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.vae = vae
        self.dtype = dtype

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample.to(self.dtype), return_dict=False)[0].float()


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The sampler's latents as the exported VAE decoder takes them: ``latents / scaling_factor``
    (+ ``shift_factor`` where the VAE has one), as diffusers' pipelines decode."""
    out = latents.float() / float(vae_config.scaling_factor)
    shift = getattr(vae_config, "shift_factor", None)
    return out if shift is None else out + shift


def vae_latent_shape(vae: nn.Module) -> tuple[int, int, int]:
    """(C, h, w) of the latents a VAE decodes at its own image size (``sample_size`` / scale factor)."""
    size = vae.config.sample_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.latent_channels), h // f, w // f


def _export(
    wrapper: nn.Module,
    args: tuple,
    path: Path,
    part: str,
    dynamic: dict,
    pin: dict[str, tuple] | None = None,
) -> dict:
    """Trace ``wrapper`` to ``path`` with ``part``'s interface (:func:`~export.onnx_export.trace_to_onnx`,
    as export_unet does); facts for the record."""
    return trace_to_onnx(wrapper, args, Path(path), part, INTERFACES[part], dynamic, pin)


def _check_precision(precision: str) -> torch.dtype:
    if precision not in TOLERANCES:
        raise ModelError(f"precision {precision!r}: the text encoder and VAE export as fp32 or fp16")
    return torch.float16 if precision == "fp16" else torch.float32


def export_text_encoder(
    text_encoder: nn.Module, path: Path, tokens: int, precision: str = "fp32", batch: int = 2
) -> dict:
    """Export a CLIP text encoder to ``path`` (atomically): ``input_ids`` (int64, B x ``tokens``) ->
    ``last_hidden_state``; dynamic batch. Returns facts for the record; ModelError for an encoder
    that needs an attention mask or an unknown precision."""
    dtype = _check_precision(precision)
    if getattr(text_encoder.config, "use_attention_mask", False):
        raise ModelError(
            "the text encoder's config sets use_attention_mask; its export (input_ids alone, as Stable "
            "Diffusion encodes) would ignore the mask"
        )
    model = copy.deepcopy(text_encoder).eval().cpu()
    model = half_with_fp32_norms(model) if precision == "fp16" else model.float()
    vocab = int(text_encoder.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    dynamic = {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    facts = _export(TextEncoderModule(model).eval(), (ids,), path, TEXT_ENCODER, dynamic)
    return {**facts, "precision": precision, "tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}


def export_vae_decoder(
    vae: nn.Module,
    path: Path,
    precision: str = "fp32",
    batch: int = 1,
    latent_shape: tuple[int, int, int] | None = None,
) -> dict:
    """Export an AutoencoderKL's decoder to ``path`` (atomically): ``latent_sample`` (unscaled latents,
    B x C x h x w; see the module docstring for the scaling) -> ``sample`` (images in [-1, 1]);
    dynamic batch. ``latent_shape``: (C, h, w), by default the VAE's own (:func:`vae_latent_shape`).
    fp16 is traced at a small size then pinned to ``latent_shape``. Returns facts for the record."""
    dtype = _check_precision(precision)
    base = copy.deepcopy(vae).eval().cpu()
    c, h, w = latent_shape or vae_latent_shape(vae)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    model = half_with_fp32_norms(base) if precision == "fp16" else base.float()
    th, tw = (min(h, 4), min(w, 4)) if precision == "fp16" else (h, w)
    latents = torch.randn((batch, c, th, tw), generator=torch.Generator().manual_seed(0))
    dynamic = {"latent_sample": {0: "batch"}, "sample": {0: "batch"}}
    pin = None
    if (th, tw) != (h, w):
        dynamic["latent_sample"].update({2: "latent_height", 3: "latent_width"})
        dynamic["sample"].update({2: "height", 3: "width"})
        out_c = int(vae.config.out_channels)
        pin = {"latent_sample": (batch, c, h, w), "sample": (batch, out_c, h * f, w * f)}
    facts = _export(VaeDecoderModule(model, dtype).eval(), (latents,), path, VAE_DECODER, dynamic, pin)
    return {**facts, "precision": precision, "latent_shape": [c, h, w], "traced_size": [th, tw]}


# -- parity of each graph against torch ----------------------------------------------------------


def _report(
    runners: list, feeds: list[dict], precision: str, output: str, tolerances: tuple[float, float] | None
) -> ParityReport:
    atol, rtol = tolerances or TOLERANCES[precision]
    return compare(runners, feeds, atol, rtol, output=output)[0]


def text_encoder_parity(
    text_encoder: nn.Module,
    path: Path,
    input_ids: torch.Tensor,
    precision: str = "fp32",
    tolerances: tuple[float, float] | None = None,
) -> ParityReport:
    """The exported text encoder against torch fp32 on ``input_ids`` (and on its first row alone: a
    second batch size); ``tolerances`` (atol, rtol), by default the precision's (:data:`TOLERANCES`)."""
    module = TextEncoderModule(copy.deepcopy(text_encoder).float().eval())
    ids = input_ids.long()

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": module(feeds["input_ids"])}

    runner = make_function_runner(
        run, "torch-text_encoder-fp32", {"input_ids": (np.int64, (-1, ids.shape[1]))}
    )
    feeds = [{"input_ids": ids.numpy()}, {"input_ids": ids[:1].numpy()}]
    onnx_runner = make_onnxrt_runner(Path(path), f"onnxrt-text_encoder-{precision}")
    return _report([runner, onnx_runner], feeds, precision, "last_hidden_state", tolerances)


def vae_decoder_parity(
    vae: nn.Module,
    path: Path,
    latents: torch.Tensor,
    precision: str = "fp32",
    tolerances: tuple[float, float] | None = None,
) -> ParityReport:
    """The exported VAE decoder against torch fp32 ``vae.decode`` on the unscaled ``latents`` (and
    their first row alone); ``tolerances`` (atol, rtol) as :func:`text_encoder_parity`'s."""
    module = VaeDecoderModule(copy.deepcopy(vae).float().eval())
    z = latents.float()

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sample": module(feeds["latent_sample"])}

    meta = {"latent_sample": (np.float32, (-1, *z.shape[1:]))}
    runner = make_function_runner(run, "torch-vae_decoder-fp32", meta)
    feeds = [{"latent_sample": z.numpy()}, {"latent_sample": z[:1].numpy()}]
    onnx_runner = make_onnxrt_runner(Path(path), f"onnxrt-vae_decoder-{precision}")
    return _report([runner, onnx_runner], feeds, precision, "sample", tolerances)


def conditional_unet_parity(
    unet: nn.Module,
    path: Path,
    spec: ModelSpec,
    batches: tuple[int, ...] = (1, 2),
    timesteps: tuple[int, ...] = (999, 500, 10),
    precision: str = "fp32",
    seed: int = 0,
) -> ParityReport:
    """A conditioned UNet's exported graph (``export_unet(..., spec=)``) against torch fp32, every
    input of the model's description fed (``encoder_hidden_states``, ``class_labels``), at each
    batch size and timestep."""
    model = copy.deepcopy(unet).float().eval()
    described = ModelSpec.of(unet, spec).denoiser_inputs(1)
    names = described.names

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        conditions = {k: v for k, v in feeds.items() if k not in ("sample", "timestep")}
        return {"noise": predict_noise(model, feeds["sample"], feeds["timestep"], **conditions)}

    meta = {
        i.name: (np.int64 if i.dtype == torch.long else np.float32, (-1, *i.per_item))
        for i in described.inputs
    }
    runner = make_function_runner(run, "torch-unet-fp32", meta)
    g = torch.Generator().manual_seed(seed)
    feeds = []
    for b in batches:
        for t in timesteps:
            examples = ModelSpec.of(unet, spec).denoiser_inputs(b).examples(g, timestep=t)
            feeds.append({n: examples[n].numpy() for n in names})
    onnx_runner = make_onnxrt_runner(Path(path), f"onnxrt-unet-{precision}")
    return _report([runner, onnx_runner], feeds, precision, "noise", None)
