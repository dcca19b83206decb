"""INT8: post-training static quantization of an exported fp32 UNet into QDQ form.

ONNX Runtime's quantizer (``onnxruntime.quantization.quantize_static``) writes a QDQ
graph: QuantizeLinear/DequantizeLinear pairs around the convolutions and matrix products,
per-channel int8 weights, int8 activations with ranges calibrated (MinMax) on the run's own
sampler inputs. The same QDQ file is the explicit-quantization input TensorRT builds
strongly typed int8 engines from. Normalisations, softmax, the SiLU/sigmoid activations
and the whole time embedding stay in float: only ``Conv``, ``MatMul`` and ``Gemm`` outside
the time embedding are quantized.

Why ONNX Runtime's tool and not NVIDIA Model Optimizer: it is already a dependency, runs on
CPU, and its QDQ output is what both ONNX Runtime and TensorRT consume; Model Optimizer's
ONNX PTQ (``nvidia-modelopt``) places Q/DQ for TensorRT's fusions specifically and would add
a large dependency for a gain that only a TensorRT host could measure (none here).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import ArtifactError
from compressor.guidance import Conditioning
from compressor.models import as_noise_predictor
from compressor.sampling import denoise, initial_noise

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
KEPT_IN_FLOAT = ("time_embedding", "time_proj", "time_emb_proj")  # the timestep path and its projections


def calibration_inputs(
    unet: nn.Module,
    scheduler,
    shape: tuple[int, int, int],
    images: int,
    steps: int,
    seed: int = 0,
    *,
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> list[dict[str, np.ndarray]]:
    """The UNet inputs the fp32 sampler really produces: one feed (a batch of ``images``) per step.

    Runs the DDIM sampler in torch from the quality stage's seeds and records ``(x_t, t)``
    at every one of its ``steps`` timesteps, so the activation ranges cover the whole
    trajectory from pure noise to the clean image (one timestep is not enough: the
    ranges of early and late steps differ by an order of magnitude).

    ``conditioning`` (one row per image) and ``guidance_scale``: a conditioned model's sampler, guided
    as the run samples; each feed then holds the doubled batch (unconditional rows first) and its
    ``encoder_hidden_states`` / ``class_labels`` too.
    """

    predict = as_noise_predictor(unet)
    feeds: list[dict[str, np.ndarray]] = []

    def recording(sample: torch.Tensor, timestep: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        feed = {"sample": sample.float().numpy().copy(), "timestep": timestep.long().numpy().copy()}
        for name, value in conditions.items():  # embeddings as float32, labels as int64
            feed[name] = (value.float() if value.is_floating_point() else value.long()).cpu().numpy().copy()
        feeds.append(feed)
        return predict(sample, timestep, **conditions)

    seeds = list(range(seed, seed + images))
    guided = {} if conditioning is None else {"conditioning": conditioning, "guidance_scale": guidance_scale}
    denoise(recording, scheduler, initial_noise(shape, seeds), steps, seeds=seeds, **guided)
    return feeds


def quantize_unet(fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Write the int8 QDQ model of ``fp32_path`` to ``out_path`` (atomically); facts for the record."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    if not fp32_path.is_file():
        raise ArtifactError(f"{fp32_path} not found; int8 is quantized from the fp32 export")
    began = time.perf_counter()
    pre = out_path.with_name(out_path.stem + ".pre.tmp.onnx")
    tmp = out_path.with_name(out_path.stem + ".tmp.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        kept = [
            n.name
            for n in graph.node
            if n.op_type in QUANTIZED_OPS and any(k in n.name for k in KEPT_IN_FLOAT)
        ]
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=kept,
            extra_options={"ActivationSymmetric": True},
        )
        tmp.replace(out_path)
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    nodes = onnx.load(str(out_path)).graph.node
    quantized = sum(1 for n in nodes if n.op_type == "DequantizeLinear")
    timesteps = sorted({int(f["timestep"][0]) for f in feeds})
    return {
        "path": out_path.name,
        "precision": "int8",
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, MinMax)",
        "calibration_inputs": int(sum(len(f["sample"]) for f in feeds)),
        "calibration_timesteps": timesteps,
        "kept_in_float": len(kept),
        "dequantize_nodes": quantized,
        "export_seconds": round(time.perf_counter() - began, 3),
        "bytes": out_path.stat().st_size,
        "external_data": False,
        "nodes": len(nodes),
        "nodes_exported": len(onnx.load(str(fp32_path), load_external_data=False).graph.node),
    }
