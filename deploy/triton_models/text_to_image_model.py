"""Triton Python-backend model ``text_to_image``: prompt + seed (+ negative prompt, steps, guidance
scale, eta, scheduler) -> image, calling ``text_encoder``, ``unet`` and ``vae_decoder``.

Copied as ``text_to_image/1/model.py`` by ``compress-deploy triton-repo`` and ``serve`` for a
conditional run; ``text_to_image.json`` beside it holds the loop's settings and limits, the
shapes, the run's guidance scale (the default) and the VAE's scaling, and ``tokenizer/`` the
run's tokenizer. The prompts are tokenized as the project tokenizes everywhere
(:func:`compressor.encoded_cache.padded_tokens`: padded to the tokenizer's ``model_max_length``),
encoded by the ``text_encoder`` model, and each group of requests sharing (scheduler, steps, eta,
guidance scale) runs one guided sampling loop (:func:`compressor.sampling.denoise`) whose UNet
calls go to ``unet`` (Triton's BLS), its latents decoded by ``vae_decoder``. A class-conditioned
model takes the class index as ``prompt`` (the last class row is the null class).

Refused with an error response of its own (the requests batched with it are still served): a
missing ``prompt`` or ``seed``, a prompt that is not UTF-8, empty, or longer than the text
encoder's ``max_length`` tokens (refused, not truncated: the client learns its prompt was too
long instead of getting an image of part of it), a guidance scale that is not a finite number >=
0, steps outside [1, max_steps], a negative seed, eta outside [0, 1], an unknown scheduler.
"""

import json
import math
import os
import sys
from pathlib import Path

sys.path[:0] = [p for p in os.environ.get("COMPRESS_DEPLOY_SYSPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from compressor.encoded_cache import padded_tokens  # noqa: E402
from compressor.guidance import Conditioning  # noqa: E402
from compressor.sampling import SCHEDULERS, denoise, initial_noise, make_scheduler  # noqa: E402


class BadRequest(ValueError):
    """A request whose values are out of range."""


class TritonPythonModel:
    """The guided text-to-image call of a compress-deploy run."""

    def initialize(self, args):
        """Read text_to_image.json and the tokenizer."""
        torch.set_num_threads(1)  # the loop's own tensor work is tiny; the UNet needs the cores
        here = Path(__file__).parent
        spec = json.loads((here / "text_to_image.json").read_text())
        self.kind = spec["conditioning"]
        self.shape = tuple(spec["latent_shape"])
        self.max_steps = int(spec["max_steps"])
        self.default_steps = int(spec["default_steps"])
        self.batch = int(spec["unet_max_batch"])
        self.guidance_scale = float(spec["guidance_scale"])
        self.tokens = int(spec["tokens"])
        self.num_classes = spec.get("num_classes")
        self.vae = spec.get("vae")
        self.schedulers = {k: make_scheduler(k, spec["scheduler_config"]) for k in SCHEDULERS}
        self.scheduler = spec.get("scheduler", "ddim")
        self.tokenizer = None
        if self.kind == "text":
            from transformers import CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(str(here / "tokenizer"), local_files_only=True)

    # -- reading one request ----------------------------------------------------------------------

    def _one(self, request, name, default, cast):
        """The one value a request gives for ``name`` (all its images share it), else ``default``."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return default
        values = {cast(v) for v in tensor.as_numpy().reshape(-1).tolist()}
        if len(values) != 1:
            raise BadRequest(f"{name}: one value per request (all images of a request share it)")
        return values.pop()

    def _texts(self, request, name, required):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            if required:
                raise BadRequest(f"missing required input '{name}' (BYTES, shape [1])")
            return None
        out = []
        for value in tensor.as_numpy().reshape(-1).tolist():
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BadRequest(
                        f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); send it UTF-8 encoded"
                    ) from None
            out.append(str(value))
        return out

    def _check_text(self, name, text, empty_ok):
        if not text.strip():
            if empty_ok:
                return
            raise BadRequest(f"{name} is empty; send the text of the image you want")
        if self.kind == "class":
            try:
                label = int(text.strip())
            except ValueError:
                raise BadRequest(
                    f"{name} {text[:40]!r}: a class-conditioned model takes a class index"
                ) from None
            top = int(self.num_classes) - 1  # the last row is the null class
            if not 0 <= label < top:
                raise BadRequest(f"{name} {label}: the model's classes are 0..{top - 1}")
            return
        count = len(self.tokenizer(text, truncation=False)["input_ids"])
        if count > self.tokens:
            raise BadRequest(
                f"{name} is {count} tokens; the text encoder takes at most {self.tokens} (start and end "
                "tokens included): shorten it (prompts are refused, not truncated)"
            )

    def _settings(self, request):
        seed_t = pb_utils.get_input_tensor_by_name(request, "seed")
        if seed_t is None:
            raise BadRequest("missing required input 'seed' (INT64, shape [1])")
        seeds = [int(s) for s in seed_t.as_numpy().reshape(-1)]
        prompts = self._texts(request, "prompt", True)
        negatives = self._texts(request, "negative_prompt", False)
        if negatives is None:
            negatives = [""] * len(prompts)
        elif self.kind == "class":
            raise BadRequest("negative_prompt: a class-conditioned model takes none (its null class is)")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if not len(prompts) == len(negatives) == len(seeds):
            raise BadRequest(f"{len(seeds)} seeds, {len(prompts)} prompts: send one prompt per seed")
        for text in prompts:
            self._check_text("prompt", text, empty_ok=False)
        for text in negatives:
            self._check_text("negative_prompt", text, empty_ok=True)
        if min(seeds) < 0:
            raise BadRequest(f"seed must be >= 0, got {min(seeds)}")
        steps = self._one(request, "steps", self.default_steps, int)
        if not 1 <= steps <= self.max_steps:
            raise BadRequest(f"steps must be in [1, {self.max_steps}], got {steps}")
        scale = self._one(request, "guidance_scale", self.guidance_scale, float)
        if not math.isfinite(scale) or scale < 0:
            raise BadRequest(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {scale}")
        eta = self._one(request, "eta", 0.0, float)
        if not 0.0 <= eta <= 1.0:
            raise BadRequest(f"eta must be in [0, 1], got {eta}")
        scheduler = self._one(request, "scheduler", self.scheduler, _text)
        if scheduler not in self.schedulers:
            raise BadRequest(f"scheduler must be one of {', '.join(self.schedulers)}, got {scheduler!r}")
        key = (scheduler, steps, round(eta, 6), round(scale, 6))
        return key, seeds, prompts, negatives

    # -- the BLS calls ----------------------------------------------------------------------------

    def _call(self, model, inputs, output):
        """``model`` on ``inputs`` (name -> array, batch first) in chunks of the batch limit."""
        outs = []
        size = len(next(iter(inputs.values())))
        for start in range(0, size, self.batch):
            request = pb_utils.InferenceRequest(
                model_name=model,
                requested_output_names=[output],
                inputs=[
                    pb_utils.Tensor(k, np.ascontiguousarray(v[start : start + self.batch]))
                    for k, v in inputs.items()
                ],
            )
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"{model}: {response.error().message()}")
            outs.append(
                torch.from_numpy(pb_utils.get_output_tensor_by_name(response, output).as_numpy().copy())
            )
        return torch.cat(outs)

    def _predict(self, sample, timestep, **condition):
        inputs = {"sample": sample.float().numpy(), "timestep": timestep.long().reshape(-1, 1).numpy()}
        for name, value in condition.items():
            inputs[name] = (
                value.long().reshape(-1, 1).numpy() if name == "class_labels" else value.float().numpy()
            )
        return self._call("unet", inputs, "noise")

    def _encode(self, texts):
        ids = padded_tokens(self.tokenizer, list(texts)).input_ids.numpy().astype(np.int64)
        return self._call("text_encoder", {"input_ids": ids}, "last_hidden_state")

    def _decode(self, latents):
        z = latents.float() / float(self.vae["scaling_factor"])
        if self.vae.get("shift_factor") is not None:
            z = z + float(self.vae["shift_factor"])
        return self._call("vae_decoder", {"latent_sample": z.numpy()}, "sample")

    def _conditioning(self, prompts, negatives):
        if self.kind == "class":
            labels = torch.tensor([int(p) for p in prompts], dtype=torch.long)
            return Conditioning("class", labels, torch.full_like(labels, int(self.num_classes) - 1))
        return Conditioning("text", self._encode(prompts), self._encode(negatives))

    def execute(self, requests):
        """Group requests by settings, one guided loop per group, a response each."""
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                key, seeds, prompts, negatives = self._settings(request)
            except BadRequest as exc:  # 400 Bad Request over HTTP, INVALID_ARGUMENT over gRPC
                invalid = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                error = (
                    pb_utils.TritonError(str(exc))
                    if invalid is None
                    else pb_utils.TritonError(str(exc), invalid)
                )
                responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            groups.setdefault(key, []).append((i, seeds, prompts, negatives))
        for (scheduler, steps, eta, scale), items in groups.items():
            seeds = [s for _, group, _, _ in items for s in group]
            try:
                with torch.no_grad():
                    conditioning = self._conditioning(
                        [p for *_, ps, _ in items for p in ps], [n for *_, ns in items for n in ns]
                    )
                    images = denoise(
                        self._predict,
                        self.schedulers[scheduler],
                        initial_noise(self.shape, seeds),
                        steps,
                        eta,
                        seeds,
                        conditioning=conditioning,
                        guidance_scale=scale,
                        decode=self._decode if self.vae else None,
                    )
            except Exception as exc:  # noqa: BLE001 - answered as this group's error
                for i, *_ in items:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500]))
                continue
            start = 0
            for i, group, _, _ in items:
                chunk = images[start : start + len(group)].numpy().astype(np.float32)
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("image", chunk)])
                start += len(group)
        return responses


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
