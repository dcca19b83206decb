"""Measure the two torch ONNX exporters on a shipped architecture: export time, node count, accuracy.

Usage: python scripts/bench_exporters.py [ARCH]        (default ddpm-cifar10-32, random weights)
The project exports with the TorchScript exporter (dynamo=False); this prints why.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from compressor.config import ModelConfig
from compressor.models import example_inputs, load_model
from export.onnx_export import INPUT_NAMES, OUTPUT_NAMES, NoisePredictorModule


def main(arch: str) -> None:
    unet = load_model(ModelConfig(name=arch, init="random")).unet.eval()
    wrapper = NoisePredictorModule(unet).eval()
    x = example_inputs(unet, 4)
    with torch.no_grad():
        ref = wrapper(x["sample"], x["timestep"]).numpy()
    for dynamo in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "u.onnx"
            began = time.perf_counter()
            try:
                with torch.no_grad():
                    torch.onnx.export(
                        wrapper,
                        (x["sample"], x["timestep"]),
                        str(path),
                        input_names=INPUT_NAMES,
                        output_names=OUTPUT_NAMES,
                        opset_version=18,
                        dynamo=dynamo,
                        dynamic_axes={"sample": {0: "b"}, "timestep": {0: "b"}, "noise": {0: "b"}},
                    )
            except Exception as exc:  # noqa: BLE001 - report and go on with the other exporter
                print(f"dynamo={dynamo}: export failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            seconds = time.perf_counter() - began
            nodes = len(onnx.load(str(path)).graph.node)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out = sess.run(None, {"sample": x["sample"].numpy(), "timestep": x["timestep"].numpy()})[0]
            err = float(np.abs(out - ref).max())
            print(f"dynamo={dynamo}: {seconds:.1f} s, {nodes} nodes, max abs error vs torch {err:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ddpm-cifar10-32")
