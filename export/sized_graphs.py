"""Graphs exported with dynamic height and width, for TensorRT engines over a range of image sizes
(``build.sizes``): a UNet's plain call (``sample`` and ``noise`` of any side) and a VAE decoder
(``latent_sample`` and ``sample``).

The export stage writes every graph at the model's resolution: its fp32 graphs are traced there and
its fp16 ones pinned there, and Polygraphy's constant folding then turns the shape arithmetic into
constants, so such a graph runs at that one size. An engine profile over several sides needs graphs
whose height and width stay symbolic: these are traced with those axes dynamic and never pinned (the
shape arithmetic stays Shape ops through the folding). fp32 is traced at the model's size, fp16 at a
small one (CPUs have no fast float16 convolution), as the export stage does; int8 (a calibrated QDQ
graph) is not re-exported here. Inputs, outputs and types are the export stage's, so the build and
its checks treat both alike.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compressor.components import ModelSpec
from compressor.errors import ConfigError
from export.onnx_export import (
    INTERFACES,
    NoisePredictorModule,
    fp16_trace_size,
    half_with_fp32_norms,
    trace_to_onnx,
)
from export.pipeline_graphs import VAE_DECODER, VaeDecoderModule, vae_latent_shape
from rundir import layout

SIDE = {2: "height", 3: "width"}


def _dtype(precision: str) -> torch.dtype:
    """The traced dtype of ``precision``; ConfigError for int8 (its QDQ graph is calibrated, not traced)."""
    if precision not in ("fp32", "fp16"):
        raise ConfigError(
            f"build.sizes with build.precision={precision}: graphs of several sizes are exported in fp32 "
            "and fp16 only; build int8 engines at the model's size (build.sizes=null) or use fp16"
        )
    return torch.float16 if precision == "fp16" else torch.float32


def export_sized_unet(
    unet: nn.Module, path: Path, precision: str, spec: ModelSpec | None = None, batch: int = 2
) -> dict:
    """Export ``unet``'s plain call to ``path`` with a dynamic batch, height and width (``sample`` and
    ``noise``); ``spec``: the model's description (its conditioning inputs, as the export stage takes
    them). Returns the export facts (:func:`export.onnx_export.trace_to_onnx`)."""
    dtype = _dtype(precision)
    unet = copy.deepcopy(unet).eval().cpu()
    described = ModelSpec.of(unet, spec).denoiser_inputs(batch)
    conditions = tuple(i.name for i in described.conditions)
    model = half_with_fp32_norms(unet) if precision == "fp16" else unet
    wrapper = NoisePredictorModule(model, dtype, conditions).eval()
    full = described["sample"].shape
    traced = (*full[:2], *fp16_trace_size(unet)) if precision == "fp16" else full
    examples = described.examples(torch.Generator().manual_seed(0), timestep=500, shapes={"sample": traced})
    inputs, outputs = described.names, INTERFACES["unet"][1]
    dynamic = {name: {0: "batch"} for name in (*inputs, *outputs)}
    dynamic.update(described.dynamic_axes())
    for name in ("sample", *outputs):
        dynamic[name].update(SIDE)
    names = (inputs, outputs)
    facts = trace_to_onnx(
        wrapper, tuple(examples.values()), Path(path), "unet", names, dynamic, None, True, inputs
    )
    return {**facts, "precision": precision, "traced_size": list(traced[2:]), "dynamic_size": True}


def export_sized_vae_decoder(vae: nn.Module, path: Path, precision: str, batch: int = 1) -> dict:
    """Export an AutoencoderKL's decoder to ``path`` with a dynamic batch, height and width
    (``latent_sample`` -> ``sample``, as :func:`export.pipeline_graphs.export_vae_decoder`)."""
    dtype = _dtype(precision)
    base = copy.deepcopy(vae).eval().cpu()
    c, h, w = vae_latent_shape(vae)
    model = half_with_fp32_norms(base) if precision == "fp16" else base.float()
    th, tw = (min(h, 4), min(w, 4)) if precision == "fp16" else (h, w)
    latents = torch.randn((batch, c, th, tw), generator=torch.Generator().manual_seed(0))
    dynamic = {"latent_sample": {0: "batch", **SIDE}, "sample": {0: "batch", **SIDE}}
    wrapper = VaeDecoderModule(model, dtype).eval()
    facts = trace_to_onnx(wrapper, (latents,), Path(path), VAE_DECODER, INTERFACES[VAE_DECODER], dynamic)
    return {**facts, "precision": precision, "traced_size": [th, tw], "dynamic_size": True}


def export_run_sized_graphs(
    run_dir: Path,
    precision: str,
    unets: dict[str, nn.Module],
    spec: ModelSpec | None = None,
    vae: nn.Module | None = None,
) -> list[Path]:
    """A run's graphs of dynamic height and width for a build at ``precision``: ``unets`` (``dense`` and
    ``pruned``: the models the export stage exported) and the VAE decoder, at
    :func:`rundir.layout.sized_onnx_path`; the files written."""
    _dtype(precision)
    files = []
    for model, unet in unets.items():
        files.append(layout.sized_onnx_path(run_dir, model, precision))
        export_sized_unet(unet, files[-1], precision, spec)
    if vae is not None:
        files.append(layout.sized_onnx_path(run_dir, "vae_decoder", precision))
        export_sized_vae_decoder(vae, files[-1], precision)
    return files
