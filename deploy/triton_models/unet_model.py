"""Triton Python-backend model ``unet``: (sample, timestep) -> noise through a compress-deploy backend.

Copied as ``unet/1/model.py`` by ``compress-deploy triton-repo --unet python`` and by ``serve``
(for servers whose only backend is Python). ``backend.json`` beside it names the backend
(onnxruntime, torch or tensorrt), the file it loads from this folder and, for a conditional
run, the conditioning inputs the UNet takes (``encoder_hidden_states``, ``class_labels``).
"""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [p for p in os.environ.get("COMPRESS_DEPLOY_SYSPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    """Batches of requests are concatenated into one UNet call and split back."""

    def initialize(self, args):
        """Load the backend named in backend.json."""
        here = Path(__file__).parent
        spec = json.loads((here / "backend.json").read_text())
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        # lazy: Triton loads this file by path inside its Python backend; the project is imported
        # only once the model initialises (its import errors then reach Triton's log, not the loader)
        from deploy.runtimes import load_backend

        device = "cuda" if spec["backend"] == "torch" and torch.cuda.is_available() else "cpu"
        self.conditions = list(spec.get("conditions") or [])
        self.backend = load_backend(
            spec["backend"], file=here / spec["file"], threads=spec.get("threads"), device=device
        )

    def execute(self, requests):
        """One UNet call for the whole batch; one response per request."""
        samples, timesteps, sizes = [], [], []
        conditions = {name: [] for name in self.conditions}
        for request in requests:
            s = pb_utils.get_input_tensor_by_name(request, "sample").as_numpy()
            t = pb_utils.get_input_tensor_by_name(request, "timestep").as_numpy().reshape(-1)
            samples.append(s)
            timesteps.append(t)
            sizes.append(len(s))
            for name, parts in conditions.items():
                value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                parts.append(value.reshape(-1) if name == "class_labels" else value)
        kwargs = {name: torch.from_numpy(np.concatenate(parts)) for name, parts in conditions.items()}
        with torch.no_grad():
            noise = self.backend.predict(
                torch.from_numpy(np.concatenate(samples)),
                torch.from_numpy(np.concatenate(timesteps)),
                **kwargs,
            )
        noise = noise.float().cpu().numpy()
        out, start = [], 0
        for size in sizes:
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("noise", noise[start : start + size])]))
            start += size
        return out
