"""Stable Diffusion's text side, made here without a download: a CLIP tokenizer trained on a corpus and
a frozen, seeded random CLIP text encoder sized for it.

:func:`train_clip_tokenizer` trains a byte-level BPE with the ``tokenizers`` library, splitting and
normalizing text exactly as ``transformers.CLIPTokenizer`` does (NFC, whitespace runs to one space,
lowercase; CLIP's regex, then GPT-2's byte-to-unicode symbols; ``</w>`` closing each word), and saves
it in CLIP's own format: ``vocab.json`` (the 256 byte symbols, the same 256 word-final, one token per
merge, then ``<|startoftext|>`` and ``<|endoftext|>``, in OpenAI's order), ``merges.txt``,
``tokenizer_config.json`` and ``special_tokens_map.json``. Because every byte is in the vocabulary
alone and word-final, any text tokenizes (words never seen split into smaller pieces, never into the
unknown token). The folder loads with ``CLIPTokenizer.from_pretrained`` and so in diffusers'
``StableDiffusionPipeline`` (the ``tokenizer/`` of a pipeline folder).

:func:`frozen_text_encoder` builds a small ``CLIPTextModel`` for such a tokenizer (its vocabulary,
start/end ids and length) with seeded random weights, frozen as Stable Diffusion keeps its text
encoder: the UNet learns to read whatever fixed embedding each prompt gets.

``transformers`` and ``tokenizers`` are imported inside the functions: importing this module (the test
fixtures do) stays as light as the rest of ``compressor``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
"""The regex ``transformers.CLIPTokenizer`` splits normalized text with (OpenAI's ``pat``)."""


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: the printable symbol of each byte 0..255, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in codes:
            codes[b], extra = 256 + extra, extra + 1
    return [chr(codes[b]) for b in range(256)]


def _clip_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    """A ``tokenizers.Tokenizer`` with CLIP's model settings, normalizer and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    bpe = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS
        )
    )
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return bpe


def train_clip_tokenizer(
    sentences: Iterable[str], folder: Path | str, max_length: int = 16, vocab_size: int = 1024
) -> Any:
    """Train a byte-level BPE on ``sentences`` and save it in CLIP's format in ``folder``.

    Args:
        sentences: the corpus (e.g. the training captions); every word seen often enough to be merged
            before the vocabulary is full becomes one token.
        folder: created if missing; gets ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
            ``special_tokens_map.json``.
        max_length: the tokenizer's ``model_max_length``, the sequence length prompts are padded and
            truncated to (CLIP's 77), which the text encoder's positions must match.
        vocab_size: the most tokens in the vocabulary: 512 byte symbols, the merges, the two specials.

    Returns:
        The ``transformers.CLIPTokenizer`` read back from ``folder`` (``local_files_only``).
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    if vocab_size < 514:
        raise ValueError(
            f"vocab_size={vocab_size}: a CLIP vocabulary holds at least 514 tokens (512 bytes, 2 specials)"
        )
    if max_length < 3:
        raise ValueError(
            f"max_length={max_length}: a prompt needs room for its start and end tokens and a word"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = _clip_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(list(sentences), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = byte_symbols()
    base = [*symbols, *(s + "</w>" for s in symbols)]
    merges = merges[: vocab_size - len(base) - 2]
    tokens = [*base, *("".join(m) for m in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("the trained merges repeat a token; the BPE trainer changed its behaviour")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def frozen_text_encoder(
    tokenizer: Any,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> Any:
    """A seeded random ``transformers.CLIPTextModel`` for ``tokenizer``, frozen (no gradients) and in
    eval mode: its vocabulary is the tokenizer's, its positions the tokenizer's ``model_max_length``,
    its start, end and padding ids the tokenizer's (so the pooled output is read at the end token).

    ``hidden_size`` is the width of ``last_hidden_state``, the UNet's ``cross_attention_dim``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(config)
    encoder.requires_grad_(False)
    return encoder.eval()
