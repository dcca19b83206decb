"""Triton Python-backend model ``sampler``: seed (+ steps, eta, scheduler) -> image, calling ``unet``.

Copied as ``sampler/1/model.py`` by ``compress-deploy triton-repo`` and ``serve``;
``sampler.json`` beside it holds the scheduler config, image shape and limits. Requests
the dynamic batcher puts together are grouped by (scheduler, steps, eta) and each group runs one
batched sampling loop whose UNet calls go to the ``unet`` model (Triton's BLS), so the
UNet runs on whatever backend serves it (TensorRT plan, ONNX Runtime, Python). Every
image draws its initial and step noise from its own seed (compressor.sampling), so an
image never depends on what it was batched with. A bad request gets its own error
response; the others in its batch are served.
"""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [p for p in os.environ.get("COMPRESS_DEPLOY_SYSPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from compressor.sampling import SCHEDULERS, denoise, initial_noise, make_scheduler  # noqa: E402


class BadRequest(ValueError):
    """A request whose values are out of range."""


class TritonPythonModel:
    """The sampling loop of a compress-deploy run."""

    def initialize(self, args):
        """Read sampler.json: scheduler config, image shape, step limits, UNet batch limit."""
        # the loop's own tensor work (scheduler steps, noise) is tiny: one thread, so idle
        # OpenMP workers do not spin on the cores the UNet needs
        torch.set_num_threads(1)
        spec = json.loads((Path(__file__).parent / "sampler.json").read_text())
        self.shape = tuple(spec["image_shape"])
        self.max_steps = int(spec["max_steps"])
        self.default_steps = int(spec["default_steps"])
        self.unet_batch = int(spec["unet_max_batch"])
        self.schedulers = {k: make_scheduler(k, spec["scheduler_config"]) for k in SCHEDULERS}
        self.scheduler = spec.get("scheduler", "ddim")

    def _settings(self, request):
        seed_t = pb_utils.get_input_tensor_by_name(request, "seed")
        if seed_t is None:
            raise BadRequest("missing required input 'seed' (INT64, shape [1])")
        seeds = seed_t.as_numpy().reshape(-1)
        steps_t = pb_utils.get_input_tensor_by_name(request, "steps")
        eta_t = pb_utils.get_input_tensor_by_name(request, "eta")
        scheduler_t = pb_utils.get_input_tensor_by_name(request, "scheduler")
        scheduler = self.scheduler
        if scheduler_t is not None:
            names = {
                v.decode() if isinstance(v, bytes) else str(v) for v in scheduler_t.as_numpy().reshape(-1)
            }
            if len(names) != 1:
                raise BadRequest("scheduler: one value per request")
            scheduler = names.pop()
            if scheduler not in self.schedulers:
                raise BadRequest(f"scheduler must be one of {', '.join(self.schedulers)}, got {scheduler!r}")
        steps = self.default_steps if steps_t is None else steps_t.as_numpy().reshape(-1)
        eta = 0.0 if eta_t is None else eta_t.as_numpy().reshape(-1)
        if not isinstance(steps, int):
            if len(set(steps.tolist())) != 1:
                raise BadRequest("steps: one value per request (all images of a request share it)")
            steps = int(steps[0])
        if not isinstance(eta, float):
            if len(set(eta.tolist())) != 1:
                raise BadRequest("eta: one value per request")
            eta = float(eta[0])
        if (seeds < 0).any():
            raise BadRequest(f"seed must be >= 0, got {int(seeds.min())}")
        if not 1 <= steps <= self.max_steps:
            raise BadRequest(f"steps must be in [1, {self.max_steps}], got {steps}")
        if not 0.0 <= eta <= 1.0:
            raise BadRequest(f"eta must be in [0, 1], got {eta}")
        return [int(s) for s in seeds], scheduler, steps, round(eta, 6)

    def _predict(self, sample, timestep):
        outs = []
        for start in range(0, len(sample), self.unet_batch):
            x = sample[start : start + self.unet_batch]
            t = timestep[start : start + self.unet_batch]
            request = pb_utils.InferenceRequest(
                model_name="unet",
                requested_output_names=["noise"],
                inputs=[
                    pb_utils.Tensor("sample", x.float().contiguous().numpy()),
                    pb_utils.Tensor("timestep", t.long().reshape(-1, 1).numpy()),
                ],
            )
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"unet: {response.error().message()}")
            outs.append(torch.from_numpy(pb_utils.get_output_tensor_by_name(response, "noise").as_numpy()))
        return torch.cat(outs)

    def execute(self, requests):
        """Group requests by settings, one batched sampling loop per group, a response each."""
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                seeds, scheduler, steps, eta = self._settings(request)
            except BadRequest as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            groups.setdefault((scheduler, steps, eta), []).append((i, seeds))
        for (scheduler, steps, eta), items in groups.items():
            seeds = [s for _, group in items for s in group]
            try:
                with torch.no_grad():
                    noise = initial_noise(self.shape, seeds)
                    images = denoise(self._predict, self.schedulers[scheduler], noise, steps, eta, seeds)
            except Exception as exc:  # noqa: BLE001 - answered as this group's error
                for i, _ in items:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500]))
                continue
            start = 0
            for i, group in items:
                chunk = images[start : start + len(group)].numpy().astype(np.float32)
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("image", chunk)])
                start += len(group)
        return responses
