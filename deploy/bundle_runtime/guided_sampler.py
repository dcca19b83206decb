"""A conditional bundle's parts around the UNet: tokenizer, text encoder, guidance, VAE decoder.

Imports numpy and onnxruntime, and ``tokenizers`` for a text-to-image bundle only (never torch,
diffusers or transformers). ``pipeline.json`` says what the model takes: ``text`` (prompts: the
bundled ``tokenizer.json`` pads and truncates them as Stable Diffusion does, the text encoder graph
encodes them), ``class`` (class indices; the null class is the table's last row) or ``none``; and
whether the samples are latents (``latent``: unscaled by ``scaling_factor`` (+ ``shift_factor``) and
decoded by the VAE decoder graph). Classifier-free guidance runs both halves in one UNet call at
twice the batch, the unconditional rows first, and combines ``uncond + scale * (cond - uncond)``,
as diffusers does; at a scale of 1 or below the conditional rows alone are predicted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bundle_errors import BundleError


def ort_session(path: Path, provider: str, threads: int | None, spin: bool = True):
    """An ONNX Runtime session over ``path``; BundleError (one line) when it cannot load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:  # sessions in turn: spinning threads would steal each other's cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=[provider])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
        why = str(exc).splitlines()[0][:160]
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({why})") from None


class Pipeline:
    """The conditional parts of a verified bundle (``manifest['pipeline']`` names its settings)."""

    def __init__(self, root: Path, manifest: dict, provider: str, threads: int | None) -> None:
        self.settings = json.loads((root / manifest["pipeline"]).read_text())
        self.kind = self.settings["conditioning"]
        self.input = self.settings.get("condition_input")
        shared = manifest.get("shared") or {}
        self.tokenizer = self.text_encoder = self.decoder = None
        if self.kind == "text":
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise BundleError(
                    "tokenizers is not installed; a text-to-image bundle needs "
                    "`pip install numpy onnxruntime tokenizers`"
                ) from None
            self.tokenizer = Tokenizer.from_file(str(root / manifest["tokenizer"]))
            self.text_encoder = ort_session(root / shared["text_encoder"], provider, threads, spin=False)
        if self.settings["latent"]:
            self.decoder = ort_session(root / shared["vae_decoder"], provider, threads, spin=False)

    @property
    def guidance_scale(self) -> float:
        """The run's ``sample.guidance_scale``: what a call without one uses."""
        return float(self.settings["guidance_scale"])

    @property
    def negative_prompt(self) -> str:
        """The run's negative prompt (text; the empty prompt when it had none)."""
        return str(self.settings.get("negative_prompt") or "")

    def token_ids(self, texts: list[str]) -> np.ndarray:
        """(N, max_length) int64 token ids, padded and truncated as Stable Diffusion tokenizes."""
        return np.array([e.ids for e in self.tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def encode(self, texts: list[str]) -> np.ndarray:
        """The text encoder's ``last_hidden_state`` of ``texts`` (float32, N x tokens x width)."""
        ids = self.token_ids(texts)
        return self.text_encoder.run(["last_hidden_state"], {"input_ids": ids})[0].astype(np.float32)

    def labels(self, prompts: list[str]) -> np.ndarray:
        """Class indices of ``prompts``; BundleError for one that is not a class of the model."""
        top = int(self.settings["num_classes"]) - 1  # the last row is the null class
        out = []
        for p in prompts:
            try:
                label = int(str(p).strip())
            except ValueError:
                raise BundleError(f"--prompt {p!r}: a class-conditioned model takes class indices") from None
            if not 0 <= label < top:
                raise BundleError(f"--prompt {label}: the model's classes are 0..{top - 1}")
            out.append(label)
        return np.array(out, dtype=np.int64)

    def conditioning(self, prompts: list[str], negative: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cond, uncond) of one image per prompt: the prompts' and the negative prompt's encodings,
        or the class labels and the null class."""
        if not prompts:
            raise BundleError("the bundle's model is conditional: pass --prompt")
        if self.kind == "text":
            negative = self.negative_prompt if negative is None else negative
            return self.encode(list(prompts)), self.encode([negative] * len(prompts))
        labels = self.labels(prompts)
        return labels, np.full_like(labels, int(self.settings["null_class"]))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images in [-1, 1] of the sampler's latents: ``/ scaling_factor`` (+ ``shift_factor``), decoded."""
        z = latents.astype(np.float32) / np.float32(self.settings["scaling_factor"])
        if self.settings.get("shift_factor") is not None:
            z = z + np.float32(self.settings["shift_factor"])
        return self.decoder.run(["sample"], {"latent_sample": z})[0]


def guided_eps(
    unet, x: np.ndarray, timestep: np.ndarray, name: str | None, rows, guidance: float
) -> np.ndarray:
    """The model output at one step: ``unet(sample, timestep, **feeds)`` on both halves at twice the batch
    (unconditional rows first) combined by ``guidance``, or on the conditional rows alone (scale <= 1)."""
    if name is None:
        return unet(x, timestep)
    cond, uncond = rows
    if guidance > 1:
        both = np.concatenate([x, x])
        t2 = np.concatenate([timestep, timestep])
        out = unet(both, t2, **{name: np.concatenate([uncond, cond])}).astype(np.float32)
        u, c = np.split(out, 2)
        return (u + np.float32(guidance) * (c - u)).astype(np.float32)
    return unet(x, timestep, **{name: cond})
