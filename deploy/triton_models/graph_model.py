"""Triton Python-backend model of a shared pipeline graph: ``text_encoder`` or ``vae_decoder``.

Copied as ``<graph>/1/model.py`` by ``compress-deploy serve`` and ``triton-repo --unet python``
(for servers whose only backend is Python). ``backend.json`` beside it names the graph, the
file it loads from this folder (an ONNX graph on ONNX Runtime, or a TensorRT engine) and its
input and output names; the stock server serves the same graph as ``onnxruntime_onnx`` or
``tensorrt_plan`` instead.
"""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [p for p in os.environ.get("COMPRESS_DEPLOY_SYSPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from deploy.runtimes import graph_engine, graph_session  # noqa: E402


class TritonPythonModel:
    """Batches of requests are concatenated into one graph call and split back."""

    def initialize(self, args):
        """Load the graph named in backend.json."""
        here = Path(__file__).parent
        spec = json.loads((here / "backend.json").read_text())
        self.inputs, self.outputs = spec["inputs"], spec["outputs"]
        path = here / spec["file"]
        if spec["backend"] == "tensorrt":
            runner = graph_engine(path)
            self.run = lambda feeds: _engine_outputs(runner, feeds, self.outputs)
        else:
            session = graph_session(path, spec["graph"], spec.get("threads"))
            self.run = lambda feeds: session.run(self.outputs, feeds)

    def execute(self, requests):
        """One graph call for the whole batch; one response per request."""
        feeds, sizes = {name: [] for name in self.inputs}, []
        for request in requests:
            for name in self.inputs:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(len(feeds[self.inputs[0]][-1]))
        results = self.run({name: np.concatenate(parts) for name, parts in feeds.items()})
        out, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(r[start : start + size]))
                for n, r in zip(self.outputs, results, strict=True)
            ]
            out.append(pb_utils.InferenceResponse(tensors))
            start += size
        return out


def _engine_outputs(runner, feeds, names):
    """An engine runner's outputs ``names`` for numpy ``feeds`` (it takes and gives torch tensors)."""
    out = runner.run(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [out[name].detach().float().cpu().numpy() for name in names]
