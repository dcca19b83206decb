"""The latent and text-embedding cache: a conditioned dataset encoded once by the model's frozen VAE
and text encoder, kept in the run directory and reused by every stage and every rerun.

:func:`encode_dataset` takes the run's :class:`~compressor.components.DiffusionModel` and its
:class:`~compressor.conditioned_data.ConditionedImages` and returns :class:`EncodedData`:

- latents (with a VAE): ``vae.encode(x).latent_dist.mode()``, shifted by ``vae.config.shift_factor``
  where the VAE has one and times ``vae.config.scaling_factor``, as diffusers' training scripts
  prepare them. The mode (the posterior's mean), not a ``.sample(generator)``: the cache is then a
  pure function of the weights and the pixels (its key says everything that made it; a rerun on
  another machine or seed gives the same file), and one cached draw would freeze a single noise
  sample for every epoch anyway, which is no better than the mean (the posterior's spread is small
  beside the diffusion noise that training adds on top);
- text embeddings (with a tokenizer and a text encoder): every distinct caption tokenized as
  diffusers' ``StableDiffusionPipeline`` does (padded to ``tokenizer.model_max_length``, truncated,
  the attention mask passed only where ``text_encoder.config.use_attention_mask`` says so) and
  encoded once (``last_hidden_state``); row 0 is the empty prompt, the null condition of
  classifier-free guidance;
- class labels (class conditioning): the dataset's own, nothing to encode.

Files (names from :mod:`rundir.layout`): ``RUN/encoded/latents.safetensors``,
``RUN/encoded/text.safetensors`` and ``RUN/encoded/encoded.json``, the index holding each file's key,
size and sha256. A file is reused only when its key matches and it still hashes as written; else it
is recomputed (a damaged file is recomputed, and ``log`` says so). Keys: latents on the VAE's digest
(config and weights, :func:`module_digest`), the image shape, the data settings and the images
(a folder's file names, sizes and modification times; in-memory pixels by their bytes); text on the
text encoder's digest and the token ids of the captions. Files are written atomically (a temporary
file, fsynced, renamed), the index last. The run directory's verify skips ``RUN/encoded/``: this
index is what checks it.

How the stages use it (through :attr:`pipeline.context.RunContext.conditioned_data`): the data is
loaded at the model's ``image_shape``, :func:`encode_dataset` called once, and the prune stage feeds
its Taylor batch
``encoded.samples(idx)`` (latents) with ``**encoded.conditions(idx)`` into the UNet; the finetune
stage does the same for each training batch (dropping captions to row 0 with the guidance drop
rate), and neither stage then holds the VAE or the text encoder in memory while it trains. Call it
from the main process only (it writes into the run directory, under the run's lock).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.data import Dataset

from compressor.components import DiffusionModel
from compressor.conditioned_data import ConditionedImages
from compressor.config import DataConfig, config_to_dict
from compressor.data import ImageFolder, TensorImages
from compressor.digest import content_hash, stream_hash
from compressor.errors import DataError, ModelError
from rundir import layout
from rundir.artifacts import artifact_matches, sha256_bytes, write_json

FORMAT = 1  # bump when what the files hold changes: every cache then recomputes


@dataclass
class EncodedData:
    """A conditioned dataset as the denoiser consumes it (CPU tensors, float32).

    ``latents``: (N, C, h, w), scaled, None without a VAE (the stage then reads the dataset's
    pixels); ``text_embeddings``: (U, tokens, width), row 0 the empty prompt, rows 1.. the distinct
    captions, and ``caption_index``: (N,) each image's row; ``labels``: (N,) class indices. ``key``:
    the content hash of both caches' keys; ``reused``: which parts came from the run directory.
    """

    count: int
    latents: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None
    caption_index: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    key: str = ""
    reused: tuple[str, ...] = ()
    truncated: int = 0

    def __len__(self) -> int:
        return self.count

    @property
    def null_embedding(self) -> torch.Tensor | None:
        """(1, tokens, width): the empty prompt's embedding (classifier-free guidance's null condition)."""
        return None if self.text_embeddings is None else self.text_embeddings[:1]

    def samples(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The latents of items ``indices`` (N, C, h, w); ValueError for a model without a VAE."""
        if self.latents is None:
            raise ValueError("no latents: the model has no VAE, its samples are the dataset's pixels")
        return self.latents[_index(indices)]

    def conditions(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning inputs for items ``indices``, named as
        :meth:`~compressor.components.ModelSpec.denoiser_inputs` names them:
        ``encoder_hidden_states`` (B, tokens, width) and/or ``class_labels`` (B,)."""
        idx = _index(indices)
        out = {}
        if self.text_embeddings is not None and self.caption_index is not None:
            out["encoder_hidden_states"] = self.text_embeddings[self.caption_index[idx]]
        if self.labels is not None:
            out["class_labels"] = self.labels[idx]
        return out


def _index(indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long)


def encode_dataset(
    model: DiffusionModel,
    dataset: ConditionedImages,
    data: DataConfig,
    run: Path,
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> EncodedData:
    """``dataset`` encoded by ``model``'s VAE and text encoder, from ``RUN/encoded/`` when cached
    under the same keys, else computed (on the modules' own device and dtype) and written there.

    ``dataset`` must be loaded at ``model.image_shape`` (its pixels are what the VAE encodes);
    ``data``: the settings it was loaded with (part of the latents' key). Raises ModelError for text
    conditioning without both a tokenizer and a text encoder, DataError when the VAE's latents do
    not have the UNet's sample shape.
    """
    say = log or (lambda _msg: None)
    run = Path(run)
    _check_inputs(model, dataset)  # before any long work
    index = _read_index(run)
    out = EncodedData(count=len(dataset))
    keys: dict[str, str] = {}
    if dataset.labels is not None and model.num_classes is not None:  # the UNet embeds classes
        out.labels = torch.tensor(dataset.labels, dtype=torch.long)
    if model.vae is not None:
        keys["latents"] = latents_key(model.vae, dataset, data)
        cached = _reuse(run, index, "latents", keys["latents"], say)
        if cached is None:
            say(f"encoding {len(dataset)} images with the VAE")
            cached = {"latents": encode_images(model.vae, dataset.images, batch_size)}
            _check_latent_shape(cached["latents"], model)
            index["latents"] = _write(layout.encoded_latents(run), cached, keys["latents"])
            write_json(layout.encoded_index(run), index)
        else:
            out.reused += ("latents",)
        out.latents = cached["latents"]
    if model.conditioning == "text":
        rows = ["", *dict.fromkeys(c for c in dataset.captions or [] if c != "")]
        ids, mask, out.truncated = tokenize(model.tokenizer, rows)
        if not _uses_attention_mask(model.text_encoder):
            mask = None
        keys["text"] = text_key(model.text_encoder, ids, mask)
        cached = _reuse(run, index, "text", keys["text"], say)
        if cached is None:
            say(f"encoding {len(rows)} distinct captions with the text encoder")
            cached = {"embeddings": encode_tokens(model.text_encoder, ids, mask, batch_size)}
            index["text"] = _write(layout.encoded_text(run), cached, keys["text"])
            write_json(layout.encoded_index(run), index)
        else:
            out.reused += ("text",)
        out.text_embeddings = cached["embeddings"]
        row = {c: i for i, c in enumerate(rows)}
        out.caption_index = torch.tensor([row[c] for c in dataset.captions or []], dtype=torch.long)
        if out.truncated:
            say(f"{out.truncated} caption(s) longer than the tokenizer's {ids.shape[1]} tokens were cut")
    out.key = content_hash(keys)
    return out


# -- encoding --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode without gradients, its training flag restored afterwards."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was)


def encode_images(vae: nn.Module, images: Dataset, batch_size: int = 16) -> torch.Tensor:
    """The scaled latents (N, C, h, w) of every image of ``images`` (items (C, H, W) in [-1, 1]):
    ``(latent_dist.mode() - shift_factor) * scaling_factor``, float32 on the CPU."""
    p = next(vae.parameters())
    device, dtype = p.device, p.dtype
    vq = type(vae).__name__ == "VQModel"  # the LDMs' VQ autoencoder: its latents, unscaled
    scale = 1.0 if vq else float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = None if vq else getattr(vae.config, "shift_factor", None)
    out = []
    with _frozen(vae):
        for start in range(0, len(images), batch_size):
            x = torch.stack([images[i] for i in range(start, min(start + batch_size, len(images)))])
            encoded = vae.encode(x.to(device=device, dtype=dtype))
            z = encoded.latents if vq else encoded.latent_dist.mode()
            if shift is not None:
                z = z - float(shift)
            out.append((z * scale).float().cpu())
    return torch.cat(out)


def padded_tokens(tokenizer, texts: list[str]):
    """``texts`` tokenized as ``StableDiffusionPipeline`` does: padded to the tokenizer's
    ``model_max_length`` and truncated there; torch tensors (``input_ids``, ``attention_mask``)."""
    length = int(tokenizer.model_max_length)
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids and attention mask (N, model_max_length) of ``captions``, padded and truncated as
    ``StableDiffusionPipeline`` does (:func:`padded_tokens`), and how many captions were cut."""
    length = int(tokenizer.model_max_length)
    batch = padded_tokens(tokenizer, captions)
    full = tokenizer(captions, padding=False, truncation=False)["input_ids"]
    truncated = sum(len(ids) > length for ids in full)
    return batch["input_ids"], batch["attention_mask"], truncated


def _uses_attention_mask(text_encoder: nn.Module) -> bool:
    return bool(getattr(text_encoder.config, "use_attention_mask", False))


def encode_tokens(
    text_encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 16
) -> torch.Tensor:
    """The text encoder's ``last_hidden_state`` (N, tokens, width) of token ids ``ids``, float32 on the
    CPU (``mask``: passed as ``attention_mask`` when given)."""
    device = next(text_encoder.parameters()).device
    out = []
    with _frozen(text_encoder):
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size].to(device)
            att = None if mask is None else mask[start : start + batch_size].to(device)
            hidden = text_encoder(part, attention_mask=att).last_hidden_state
            out.append(hidden.float().cpu())
    return torch.cat(out)


def _check_inputs(model: DiffusionModel, dataset: ConditionedImages) -> None:
    """ModelError/DataError for what would fail only after encoding: text conditioning without a
    tokenizer, text encoder or captions; images of another shape than the model's."""
    if model.conditioning == "text":
        if model.tokenizer is None or model.text_encoder is None:
            missing = "tokenizer" if model.tokenizer is None else "text_encoder"
            raise ModelError(
                f"the model is text-conditioned but has no {missing}; add it to the pipeline folder"
            )
        if dataset.captions is None:
            raise DataError("the model is text-conditioned but the data has no captions; see data.captions")
    if model.vae is not None and len(dataset):
        got, want = tuple(dataset.images[0].shape), tuple(model.image_shape)
        if got != want:
            raise DataError(
                f"the data's images are {_dims(got)} but the model's VAE takes {_dims(want)} (encoded to the "
                f"UNet's {_dims(model.sample_shape)}); load the data at the model's image_shape"
            )


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _check_latent_shape(latents: torch.Tensor, model: DiffusionModel) -> None:
    got, want = tuple(latents.shape[1:]), tuple(model.sample_shape)
    if got != want:
        raise DataError(
            f"the VAE gives latents {'x'.join(map(str, got))} but the UNet takes {'x'.join(map(str, want))}; "
            f"load the data at the model's image shape {'x'.join(map(str, model.image_shape))}"
        )


# -- keys ------------------------------------------------------------------------------------------


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's config (its ``_``-prefixed and version entries aside: where it was loaded
    from does not change what it computes) and of every tensor of its state dict (name, dtype, shape,
    bytes)."""
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    kept = {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}
    head = content_hash({"class": type(module).__name__, "config": kept}).encode()

    def chunks() -> Iterator[bytes]:  # one tensor's bytes at a time (an SD UNet's weights are GBs)
        yield head
        for name, t in sorted(module.state_dict().items()):
            yield f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
            yield _bytes(t)

    return stream_hash(chunks())


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_digest(tensor: torch.Tensor) -> str:
    return stream_hash([f"{tensor.dtype}|{tuple(tensor.shape)}".encode(), _bytes(tensor)])


def text_key(text_encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The text embeddings' cache key: the text encoder's digest and the token ids (and mask) fed to it."""
    digest = None if mask is None else _tensor_digest(mask)
    return content_hash(
        {"format": FORMAT, "encoder": module_digest(text_encoder), "ids": _tensor_digest(ids), "mask": digest}
    )


def images_digest(images: Dataset) -> str:
    """What the pixels depend on: a folder's files (relative names, sizes, modification times) and its
    decoding settings, or the bytes of in-memory images (anything else: every image decoded)."""
    if isinstance(images, ImageFolder):
        root = Path(images.name)
        files = [[_relative(f, root), st.st_size, st.st_mtime_ns] for f in images.files for st in [f.stat()]]
        settings = {"channels": images.channels, "size": images.size, "max_pixels": images.max_pixels}
        return content_hash({"root": str(root.resolve()), "files": files, **settings})
    if isinstance(images, TensorImages):
        return _tensor_digest(images.images)
    return stream_hash(_tensor_digest(images[i]).encode() for i in range(len(images)))


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def latents_key(vae: nn.Module, dataset: ConditionedImages, data: DataConfig) -> str:
    """The latents' cache key: the VAE's digest, the data settings and the images."""
    return content_hash(
        {
            "format": FORMAT,
            "vae": module_digest(vae),
            "data": _image_settings(data),
            "images": images_digest(dataset.images),
            "count": len(dataset),
        }
    )


def _image_settings(data: DataConfig) -> dict:
    """The data settings that choose or decode the images (the caption template does neither)."""
    return {k: v for k, v in config_to_dict(data).items() if k != "prompt_template"}


# -- files -----------------------------------------------------------------------------------------


def _read_index(run: Path) -> dict:
    """``RUN/encoded/encoded.json``; a missing, damaged or older-format index reads as empty."""
    try:
        found = json.loads(layout.encoded_index(run).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    return found if isinstance(found, dict) and found.get("format") == FORMAT else {"format": FORMAT}


def _reuse(run: Path, index: dict, part: str, key: str, say: Callable[[str], None]) -> dict | None:
    """The cached tensors of ``part`` when its entry has ``key`` and its file still hashes as written."""
    entry = index.get(part)
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    path = layout.encoded_dir(run) / str(entry.get("file", ""))
    if not artifact_matches(path, entry):
        say(f"{path} differs from {layout.encoded_index(run).name} (damaged or changed); encoding again")
        return None
    return load_safetensors(path.read_bytes())


def _write(path: Path, tensors: dict[str, torch.Tensor], key: str) -> dict:
    """Write ``tensors`` atomically to ``path``; the index entry (file, key, bytes, sha256)."""
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"key": key})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return {"file": path.name, "key": key, "bytes": len(data), "sha256": sha256_bytes(data)}
