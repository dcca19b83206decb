"""The project's CLIP text side (compressor/clip_text.py): a byte-level BPE trained here and saved in
CLIP's own format, and a frozen seeded CLIP text encoder sized for it (never a download)."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.clip_text import BOS, EOS, byte_symbols, frozen_text_encoder, train_clip_tokenizer
from tests.conftest import TOKENIZER_CORPUS

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_folder):
    return transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder(16)), local_files_only=True)


def test_the_folder_is_in_clips_format(clip_tokenizer_folder):
    folder = clip_tokenizer_folder(16)
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ"
    order = sorted(vocab, key=vocab.get)
    assert order[:512] == [*symbols, *(s + "</w>" for s in symbols)]  # OpenAI's order: bytes, word-final
    assert order[-2:] == [BOS, EOS] and len(vocab) == 512 + len(merges) - 1 + 2
    assert merges[0] == "#version: 0.2" and all(len(m.split(" ")) == 2 for m in merges[1:])
    assert ["".join(m.split(" ")) for m in merges[1:]] == order[512:-2]  # one token per merge
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 16 and config["tokenizer_class"] == "CLIPTokenizer"


def test_words_of_the_corpus_are_tokens_and_any_text_tokenizes(tokenizer):
    ids = tokenizer(["A  Handwritten digit SEVEN", "zebra 42, éà!"], padding="max_length", truncation=True)
    words = [tokenizer.convert_ids_to_tokens(row) for row in ids.input_ids]
    assert words[0][:6] == [BOS, "a</w>", "handwritten</w>", "digit</w>", "seven</w>", EOS]  # lowercased
    assert len(words[0]) == 16 and words[0][6:] == [EOS] * 10  # padded with the end token, as CLIP does
    unseen = words[1][1 : words[1].index(EOS)]
    assert "4</w>" in unseen and "2</w>" in unseen  # digits split one by one, as CLIP's regex does
    assert tokenizer.unk_token_id not in tokenizer("zebra 42, éà!", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids.input_ids[1], skip_special_tokens=True) == "zebra 4 2 , éà !"
    long = tokenizer(" ".join(TOKENIZER_CORPUS), truncation=True, max_length=16).input_ids
    assert len(long) == 16 and long[0] == tokenizer.bos_token_id and long[-1] == tokenizer.eos_token_id


def test_training_is_deterministic_and_the_vocabulary_size_is_a_bound(tmp_path):
    a = train_clip_tokenizer(TOKENIZER_CORPUS, tmp_path / "a", max_length=8)
    b = train_clip_tokenizer(TOKENIZER_CORPUS, tmp_path / "b", max_length=8)
    assert (tmp_path / "a" / "vocab.json").read_bytes() == (tmp_path / "b" / "vocab.json").read_bytes()
    assert (tmp_path / "a" / "merges.txt").read_bytes() == (tmp_path / "b" / "merges.txt").read_bytes()
    assert a.model_max_length == 8 and len(a) == len(b)
    small = train_clip_tokenizer(TOKENIZER_CORPUS, tmp_path / "small", vocab_size=520)
    assert len(small) == 520
    assert small("a handwritten digit seven").input_ids[-1] == small.eos_token_id
    with pytest.raises(ValueError, match="at least 514"):
        train_clip_tokenizer(TOKENIZER_CORPUS, tmp_path / "c", vocab_size=100)


def test_the_text_encoder_is_frozen_seeded_and_sized_for_the_tokenizer(tokenizer):
    before = torch.random.get_rng_state()
    encoder = frozen_text_encoder(tokenizer, hidden_size=32, layers=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is untouched
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    config = encoder.config
    assert (config.vocab_size, config.max_position_embeddings, config.hidden_size) == (len(tokenizer), 16, 32)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    same, other = frozen_text_encoder(tokenizer, seed=3), frozen_text_encoder(tokenizer, seed=4)
    weights = encoder.get_input_embeddings().weight
    assert torch.equal(weights, same.get_input_embeddings().weight)
    assert not torch.equal(weights, other.get_input_embeddings().weight)
    ids = tokenizer(["a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)
    assert out.last_hidden_state.shape == (2, 16, 32)
    eos_at = (ids == tokenizer.eos_token_id).int().argmax(dim=1)  # the pooled output: the first end token
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_at])
