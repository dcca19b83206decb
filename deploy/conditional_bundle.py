"""The edge bundle of a conditional or latent run: its tokenizer, shared graphs, settings and references.

``compress-deploy bundle`` (:mod:`deploy.edge_bundle`) calls this for a run whose model takes prompts
(text: CLIP tokenizer and text encoder) or class labels, or samples latents (a VAE decoder). Beside
the UNet graph(s) the bundle then carries:

- ``tokenizer/tokenizer.json``: the pipeline's tokenizer as a ``tokenizers`` tokenizer (its own
  ``tokenizer.json`` when the pipeline folder has one, else converted here from CLIP's ``vocab.json``
  + ``merges.txt`` with CLIP's normalizer, pre-tokenizer and start/end tokens), padded and truncated
  to the tokenizer's ``model_max_length`` as Stable Diffusion tokenizes
  (:func:`compressor.encoded_cache.padded_tokens`); checked here, on the run's prompts, the negative
  prompt and odd and over-long texts, to give the same token ids, or the bundle is refused;
- ``graphs/shared/``: the exported text encoder and VAE decoder (``RUN/export/shared``; fp32 for an
  int8 UNet, as the parity stage pairs them);
- ``pipeline.json``: what the numpy sampler needs around the UNet (conditioning kind and input, the
  run's guidance scale, negative prompt and prompts, the latent scaling and shift factors, the
  latent and image shapes, the class table's null class) and the whole-call references' prompts;
- reference entries from torch fp32 (``reference.npz``): the probe texts' token ids and the text
  encoder's states of them, a conditioned UNet call, a VAE decoding, and the whole call's images
  (prompt -> text encoder -> guided UNet loop -> VAE decoder) of the first seeds;
- the acceptance limits of the whole call: each graph's tolerance and the parity stage's
  prompt -> image PSNR limit (``parity.min_psnr_<precision>``, and the build host's own figure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.encoded_cache import padded_tokens
from compressor.errors import ArtifactError, UserError
from compressor.guidance import class_conditioning, encode_prompts, vae_decoder
from deploy.sampler import Sampler, run_guidance_scale
from rundir import layout
from rundir.records import read_metrics, read_record

TOKENIZER = "tokenizer/tokenizer.json"
PIPELINE = "pipeline.json"
ODD_TEXTS = ("", "  Mixed CASE,   punctuation!! and ünïcödé 42 ", "<|endoftext|> inside a prompt")


def has_pipeline(sampler: Sampler) -> bool:
    """True when the run's model is conditional or latent (the bundle then carries this module's parts)."""
    return sampler.components is not None


def _from_clip_files(folder: Path, hf_tokenizer):
    """A ``tokenizers.Tokenizer`` built from CLIP's ``vocab.json`` and ``merges.txt`` as
    ``transformers.CLIPTokenizer`` builds its own (normalizer, split, byte level, ``</w>``, start/end)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    unk, bos, eos = (str(hf_tokenizer.unk_token), str(hf_tokenizer.bos_token), str(hf_tokenizer.eos_token))
    tok = Tokenizer(
        models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                   unk_token=unk)
    )  # fmt: skip
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = dict.fromkeys([bos, eos, unk, str(hf_tokenizer.pad_token)])
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tok


def bundle_tokenizer(hf_tokenizer):
    """The model's tokenizer as a ``tokenizers.Tokenizer`` that pads and truncates to its
    ``model_max_length`` (Stable Diffusion's tokenization); ArtifactError when its folder has neither
    ``tokenizer.json`` nor CLIP's ``vocab.json`` and ``merges.txt``."""
    from tokenizers import Tokenizer

    folder = Path(str(getattr(hf_tokenizer, "name_or_path", "") or ""))
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = _from_clip_files(folder, hf_tokenizer)
    else:
        raise ArtifactError(
            f"the tokenizer folder {folder} has no tokenizer.json nor vocab.json + merges.txt; "
            "a bundle carries the pipeline's tokenizer from them (point model.name at the pipeline folder)"
        )
    length = int(hf_tokenizer.model_max_length)
    tok.no_padding()
    tok.enable_truncation(max_length=length)
    tok.enable_padding(
        length=length, pad_id=int(hf_tokenizer.pad_token_id), pad_token=str(hf_tokenizer.pad_token)
    )
    return tok


def probe_texts(prompts: list[str], negative: str) -> list[str]:
    """What the tokenizer is checked on: the prompts, the negative prompt, odd texts and an over-long one."""
    long = " ".join([prompts[0] if prompts else "a prompt"] * 40)
    return list(dict.fromkeys([*prompts, negative, *ODD_TEXTS, long]))


def checked_token_ids(tok, hf_tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of ``texts`` by the bundle's tokenizer (int64, N x length), after checking that they are
    :func:`compressor.encoded_cache.padded_tokens`' ids; ArtifactError naming the first text that differs."""
    expected = padded_tokens(hf_tokenizer, texts).input_ids.numpy().astype(np.int64)
    ours = np.array([e.ids for e in tok.encode_batch(texts)], dtype=np.int64)
    for i, text in enumerate(texts):
        if ours.shape != expected.shape or not np.array_equal(ours[i], expected[i]):
            raise ArtifactError(
                f"bundle: the converted tokenizer tokenizes {text[:60]!r} unlike the model's own "
                f"({ours[i][:8].tolist()}... vs {expected[i][:8].tolist()}...); give the pipeline's "
                "tokenizer folder a tokenizer.json"
            )
    return ours


def run_prompts(run: Path) -> tuple[list[str], str]:
    """The prompts (or class indices) and negative prompt the run's quality (else samples) stage used."""
    quality = read_metrics(run, "quality")
    if quality is not None and quality.prompts:
        return [str(p) for p in quality.prompts["prompts"]], str(quality.prompts.get("negative") or "")
    samples = read_record(run, "samples")
    if samples is not None and samples.metrics.get("prompts"):
        return [str(p) for p in samples.metrics["prompts"]], str(samples.metrics.get("negative_prompt") or "")
    raise ArtifactError(
        f"{run}: no quality or samples record names the run's prompts; run `compress-deploy CONFIG "
        "--stages quality` (or samples) first"
    )


def pipeline_files(run: Path, sampler: Sampler, precision: str) -> dict[str, Path]:
    """The run's shared graphs the bundle needs (text encoder, VAE decoder; fp32 beside an int8 UNet)."""
    model = sampler.components
    shared = "fp32" if precision == "int8" else precision
    wanted = (["text_encoder"] if model.conditioning == "text" else []) + (
        ["vae_decoder"] if model.latent else []
    )
    files = {}
    for graph in wanted:
        path = layout.shared_onnx_path(run, graph, shared)
        if not path.is_file():
            raise ArtifactError(
                f"{path} not found; run `compress-deploy CONFIG export.precisions=[{shared}] --stages export`"
            )
        files[graph] = path
    return files


def pipeline_settings(run: Path, sampler: Sampler, reference_images: int) -> dict:
    """``pipeline.json``: the conditioning, guidance, latent scaling and shapes the numpy sampler needs."""
    model = sampler.components
    vae = model.vae.config if model.vae is not None else None
    shift = getattr(vae, "shift_factor", None) if vae is not None else None
    settings = {
        "conditioning": model.conditioning,
        "condition_input": {"text": "encoder_hidden_states", "class": "class_labels"}.get(model.conditioning),
        "latent": bool(model.latent),
        "scaling_factor": float(vae.scaling_factor) if vae is not None else None,
        "shift_factor": None if shift is None else float(shift),
        "sample_shape": list(model.sample_shape),
        "image_shape": list(model.image_shape),
        "guidance_scale": run_guidance_scale(run),
        "negative_prompt": "",
        "prompts": [],
    }
    if model.conditioning == "none":
        return settings
    prompts, negative = run_prompts(run)
    settings.update(prompts=prompts, negative_prompt=negative if model.conditioning == "text" else "")
    settings["reference_prompts"] = [prompts[i % len(prompts)] for i in range(reference_images)]
    if model.conditioning == "text":
        settings["max_length"] = int(model.tokenizer.model_max_length)
        settings["probe_texts"] = probe_texts(prompts, negative)
    else:
        settings.update(num_classes=int(model.num_classes), null_class=int(model.num_classes) - 1)
    return settings


def pipeline_reference(sampler: Sampler, settings: dict, tok, spec) -> dict[str, np.ndarray]:
    """Torch fp32 references of the conditional parts: token ids and text states of the probe texts, a
    conditioned UNet call (guided rows), a VAE decoding, and the whole call's images of the first seeds."""
    model, out = sampler.components, {}
    rng = np.random.Generator(np.random.PCG64(12345))
    rows = 2 * max(1, min(spec.batch, 2))  # a guided call: the unconditional rows, then the conditional
    kind = settings["conditioning"]
    cond = {}
    if kind == "text":
        texts = settings["probe_texts"]
        out["token_ids"] = checked_token_ids(tok, model.tokenizer, texts)
        encoded = encode_prompts(model, texts, texts, device="cpu").cond
        out["text_states"] = encoded.float().numpy()
        cond["encoder_hidden_states"] = encoded[[i % len(texts) for i in range(rows)]].float()
    elif kind == "class":
        labels = [int(p) for p in settings["prompts"]]
        cond["class_labels"] = class_conditioning(model, [labels[i % len(labels)] for i in range(rows)]).cond
    sample = rng.standard_normal((rows, *settings["sample_shape"]), dtype=np.float32)
    timestep = np.linspace(999, 0, rows).round().astype(np.int64)
    with torch.no_grad():
        noise = sampler.predict(torch.from_numpy(sample), torch.from_numpy(timestep), **cond)
    out.update(sample=sample, timestep=timestep, noise=noise.float().numpy())
    out.update({f"condition.{k}": v.numpy() for k, v in cond.items()})
    if settings["latent"]:
        latents = rng.standard_normal((2, *settings["sample_shape"]), dtype=np.float32)
        decoded = vae_decoder(model.vae)(torch.from_numpy(latents))
        out.update(latents=latents, decoded=decoded.float().numpy())
    prompts = settings.get("reference_prompts") or None
    n = len(prompts) if prompts else spec.reference_images
    guidance, negative = settings["guidance_scale"], settings["negative_prompt"]
    images = sampler(
        n, spec.steps, 0, scheduler=spec.scheduler, prompts=prompts, guidance_scale=guidance,
        negative_prompt=negative,
    )  # fmt: skip
    out.update(image_seeds=np.arange(n, dtype=np.int64), images=images.float().numpy())
    return out


def pipeline_limits(run: Path, spec) -> dict:
    """The whole call's limits: each shared graph's tolerance and the prompt -> image PSNR limit of the
    parity stage for this model and precision, with the build host's own figure."""
    parity = read_record(run, "parity", done_only=False)
    par = parity.section("parity") if parity is not None else {}
    shared = "fp32" if spec.precision == "int8" else spec.precision
    atol = par.get(f"atol_{shared}", 1e-4 if shared == "fp32" else 2e-2)
    limits = {"max_text_error": atol, "max_decoder_error": atol}
    limits["min_psnr_db"] = par.get(
        f"min_psnr_{spec.precision}", {"fp32": 40.0, "fp16": 30.0, "int8": 25.0}[spec.precision]
    )
    rows = (parity.metrics.get("results") or []) if parity is not None else []
    for row in rows:
        if row.get("component") == "text_to_image" and row.get("model") == spec.model:
            if row.get("precision") == spec.precision:
                limits.update(min_psnr_db=row["min_psnr_db"], build_host_psnr_db=row["sampler_psnr_db"])
    return limits


def refuse_unsupported(sampler: Sampler, spec) -> None:
    """UserError for what a conditional bundle does not carry yet: feature reuse, TensorRT engines."""
    if spec.cache_interval > 1:
        raise UserError(
            "bundle: feature reuse is not supported with conditioning or guidance; use --cache-interval 1"
        )
    if spec.engine:
        raise UserError(
            "bundle --engine: a conditional run's bundle runs its three ONNX graphs on ONNX Runtime "
            "(engines are not bundled for it yet); bundle without --engine"
        )
    if sampler.components.conditioning == "text" and sampler.components.tokenizer is None:
        raise ArtifactError("bundle: the text-conditioned model has no tokenizer to carry")
