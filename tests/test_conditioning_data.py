"""Conditioned training data (compressor/conditioned_data.py): captions from metadata.jsonl, class
indices from class subfolders, the digits' captions and labels, and one-line errors for every bad
input before long work starts; the latent and text-embedding cache (compressor/encoded_cache.py) on
a tiny AutoencoderKL and the project's frozen CLIP text encoder and trained CLIP tokenizer (never a
download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor import encoded_cache
from compressor.clip_text import frozen_text_encoder
from compressor.components import DiffusionModel
from compressor.conditioned_data import (
    DIGIT_NAMES,
    ConditionedImages,
    digits_labels,
    load_conditioned_dataset,
)
from compressor.config import DataConfig, config_from_mapping
from compressor.data import load_dataset
from compressor.encoded_cache import encode_dataset
from compressor.errors import ConfigError, DataError, ModelError
from compressor.models import build_unet
from rundir import layout
from rundir.artifacts import verify_run
from tests.conftest import DDPM_SCHEDULER, TINY_COND_UNET, TINY_UNET, TINY_VAE, write_images


def captioned(root: Path, count: int = 3, lines: list | None = None) -> Path:
    """``root`` with ``count`` images and a metadata.jsonl captioning each (or the given ``lines``)."""
    paths = write_images(root, count, size=12)
    lines = (
        lines
        if lines is not None
        else [{"file_name": p.name, "text": f"image {i}"} for i, p in enumerate(paths)]
    )
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def class_tree(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        write_images(root / name, n, size=12)
    return root


def load(root: Path | str, conditioning: str = "text", num_classes: int | None = None, **keys):
    return load_conditioned_dataset(DataConfig(source=str(root), **keys), 3, 8, conditioning, num_classes)


# -- what loads --------------------------------------------------------------------------------------


def test_the_data_keys_are_declared_with_defaults_and_checked():
    data = config_from_mapping({}).data
    assert (data.captions, data.classes, data.prompt_template) == (
        "auto",
        "auto",
        "a handwritten digit {name}",
    )
    assert (
        config_from_mapping({"data": {"captions": "metadata", "classes": "subfolders"}}).data.classes
        == "subfolders"
    )
    with pytest.raises(ConfigError, match=r"data.captions: expected one of 'auto', 'none', 'metadata'"):
        config_from_mapping({"data": {"captions": "sometimes"}})
    with pytest.raises(ConfigError, match=r"data.classes: expected one of"):
        config_from_mapping({"data": {"classes": "folders"}})


def test_digits_have_captions_and_class_indices():
    labels = digits_labels()
    assert len(labels) == 1797 and sorted(set(labels)) == list(range(10))
    text = load_conditioned_dataset(DataConfig(max_images=20), 1, 8, "text")
    assert isinstance(text, ConditionedImages) and len(text) == 20
    image, caption = text[0]
    assert image.shape == (1, 8, 8) and caption == f"a handwritten digit {DIGIT_NAMES[labels[0]]}"
    seven = labels.index(7)
    assert load_conditioned_dataset(DataConfig(), 1, 8, "text")[seven][1] == "a handwritten digit seven"
    classes = load_conditioned_dataset(DataConfig(max_images=20), 1, 8, "class", num_classes=10)
    assert [classes[i][1] for i in range(20)] == labels[:20] and classes.class_names == list(DIGIT_NAMES)
    numbered = load_conditioned_dataset(DataConfig(prompt_template="digit {label} ({name})"), 1, 8, "text")
    assert numbered[seven][1] == "digit 7 (seven)"


def test_a_captioned_folder_gives_the_listed_images_in_line_order(tmp_path):
    root = captioned(tmp_path / "c", 3)
    (root / "sub").mkdir()
    write_images(root / "sub", 1, size=12)
    lines = [
        {"file_name": "img002.png", "text": "the third"},
        {"file_name": "sub/img000.png", "text": "ünïcode caption"},
        {"file_name": "img000.png", "text": ""},  # an empty caption is a caption (the null prompt)
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    for mode in ("auto", "metadata"):
        ds = load(root, captions=mode)
        assert ds.captions == ["the third", "ünïcode caption", ""] and ds.conditioning == "text"
        assert ds[1][0].shape == (3, 8, 8) and ds[1][1] == "ünïcode caption"
    assert load(root, max_images=2).captions == ["the third", "ünïcode caption"]
    assert len(load_dataset(DataConfig(source=str(root)), 3, 8)) == 4  # unconditional loading: every image


def test_class_subfolders_give_indices_in_sorted_folder_order(tmp_path):
    root = class_tree(tmp_path / "imagenet", {"zebra": 2, "ant": 1, "cat": 3})
    (root / ".cache").mkdir()  # hidden folders are no class
    for mode in ("auto", "subfolders"):
        ds = load(root, "class", num_classes=3, classes=mode)
        assert ds.class_names == ["ant", "cat", "zebra"] and ds.labels == [0, 1, 1, 1, 2, 2]
        assert ds[0][1] == 0 and ds[5][1] == 2 and ds[5][0].shape == (3, 8, 8)
    few = load(root, "class", max_images=4)
    assert sorted(set(few.labels)) == [0, 1, 2] and len(few) == 4  # max_images keeps every class


# -- what is refused, in one line ----------------------------------------------------------------------


def _refused(match: str, root, conditioning="text", **keys):
    with pytest.raises(DataError, match=match) as info:
        load(root, conditioning, **keys)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_missing_caption_file_is_refused_when_captions_are_needed(tmp_path):
    root = tmp_path / "plain"
    write_images(root, 2)
    for mode in ("auto", "metadata"):
        msg = _refused(
            "no metadata.jsonl, and the text-conditioned model needs a caption per image", root, captions=mode
        )
        assert 'add metadata.jsonl with one line {"file_name": "...", "text": "..."}' in msg
    _refused(
        "data.captions=none but the model is text-conditioned", captioned(tmp_path / "c"), captions="none"
    )


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"metadata.jsonl is empty; write one line"),
        (b"\n  \n", r"metadata.jsonl is empty"),
        (
            b'{"file_name": "img000.png", "text": "a"}\nnot json\n',
            r"metadata.jsonl line 2: not JSON \(Expecting value\)",
        ),
        (b'["img000.png", "a"]\n', r"line 1: a JSON list, not an object"),
        (b'{"text": "a"}\n', r'line 1: no "file_name"; each line is one object'),
        (b'{"file_name": "img000.png"}\n', r'line 1: no "text"'),
        (b'{"file_name": "img000.png", "text": ["a", "b"]}\n', r'line 1: "text" must be a string'),
        (b'{"file_name": "", "text": "a"}\n', r'line 1: "file_name" must be a non-empty string'),
        (
            b'{"file_name": "gone.png", "text": "a"}\n',
            r"line 1: image 'gone.png' not found in .*; add it or remove",
        ),
        (b'{"file_name": "../img000.png", "text": "a"}\n', r"line 1: file_name '../img000.png' is outside"),
        (b'{"file_name": "notes.txt", "text": "a"}\n', r"line 1: file_name 'notes.txt' is not a PNG/JPEG"),
        (
            b'{"file_name": "img000.png", "text": "a"}\n{"file_name": "img000.png", "text": "b"}\n',
            r"line 2: 'img000.png' is listed again \(first on line 1\)",
        ),
        (
            b'{"file_name": "img000.png", "text": "caf\xe9"}\n',
            r"line 1: not UTF-8 text; save metadata.jsonl as UTF-8",
        ),
    ],
)
def test_a_bad_caption_file_is_named_with_its_line(tmp_path, content, match):
    root = captioned(tmp_path / "c", 2)
    (root / "notes.txt").write_text("x")
    (root / "metadata.jsonl").write_bytes(content)
    _refused(match, root, captions="metadata")


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    root = captioned(tmp_path / "c", 2)
    (root / "metadata.jsonl").write_bytes(b'\xef\xbb\xbf{"file_name": "img001.png", "text": "a"}\r\n')
    assert load(root).captions == ["a"]


def test_a_listed_image_that_does_not_decode_is_named(tmp_path):
    root = captioned(tmp_path / "c", 2)
    (root / "img001.png").write_bytes(b"\x89PNG broken")
    _refused("img001.png: cannot decode image", root)


def test_bad_class_folders_are_refused(tmp_path):
    root = class_tree(tmp_path / "classes", {"ant": 1, "bee": 1})
    (root / "cat").mkdir()
    _refused(
        r"class folder 'cat' holds no PNG/JPEG images; add its images or remove the folder", root, "class"
    )
    flat = tmp_path / "flat"
    write_images(flat, 2)
    _refused("no class subfolders, and the class-conditioned model needs a class per image", flat, "class")
    _refused(
        r"2 image\(s\) outside any class folder \(e.g. img000.png\)", flat, "class", classes="subfolders"
    )
    (root / "cat").rmdir()
    _refused("data.classes=none but the model is class-conditioned", root, "class", classes="none")
    _refused(r"has 2 classes but the model's UNet embeds num_class_embeds=1", root, "class", num_classes=1)


def test_digits_refuse_settings_that_name_another_source(tmp_path):
    with pytest.raises(DataError, match="data.captions=metadata: the digits' captions come from"):
        load_conditioned_dataset(DataConfig(captions="metadata"), 1, 8, "text")
    with pytest.raises(DataError, match="data.classes=subfolders: the digits' classes are their labels"):
        load_conditioned_dataset(DataConfig(classes="subfolders"), 1, 8, "class")
    with pytest.raises(ConfigError, match=r"data.prompt_template='a \{kind\} digit': cannot be filled"):
        load_conditioned_dataset(DataConfig(prompt_template="a {kind} digit"), 1, 8, "text")
    with pytest.raises(DataError, match="folder not found"):
        load(tmp_path / "nowhere")


# -- the latent and text-embedding cache ---------------------------------------------------------------

TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_folder):
    """The project's CLIP tokenizer (a byte-level BPE trained by train_clip_tokenizer on a few sentences,
    saved in CLIP's format), read back as the loader reads one (no download)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_folder(TOKENS)), local_files_only=True
    )
    ids = tok("a handwritten digit seven")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[1:5] == ["a</w>", "handwritten</w>", "digit</w>", "seven</w>"]
    return tok


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL.from_config(TINY_VAE).eval()


def tiny_text_encoder(tokenizer, seed: int = 0):
    return frozen_text_encoder(tokenizer, hidden_size=16, layers=1, heads=2, intermediate_size=32, seed=seed)


@pytest.fixture
def latent_text_model(tokenizer):
    """A text-conditioned latent model: tiny UNet2DConditionModel, AutoencoderKL, CLIP text encoder."""
    unet = build_unet(TINY_COND_UNET, seed=0).eval()
    encoder = tiny_text_encoder(tokenizer)
    return DiffusionModel(
        unet, dict(DDPM_SCHEDULER), vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer
    )


def digits_for(model, conditioning="text", **keys):
    data = DataConfig(max_images=12, **keys)
    c, h, _ = model.image_shape
    return data, load_conditioned_dataset(data, c, h, conditioning, model.num_classes)


def test_the_cache_encodes_images_and_captions_as_diffusers_does(latent_text_model, tokenizer, tmp_path):
    model, run = latent_text_model, tmp_path / "run"
    data, ds = digits_for(model)
    enc = encode_dataset(model, ds, data, run, batch_size=5)
    assert len(enc) == 12 and enc.reused == () and enc.latents.shape == (12, *model.sample_shape)
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(12)])
        want = model.vae.encode(x).latent_dist.mode() * model.vae.config.scaling_factor
    assert torch.allclose(enc.samples(range(12)), want, atol=1e-5)
    distinct = list(dict.fromkeys(ds.captions))
    assert enc.text_embeddings.shape == (1 + len(distinct), TOKENS, 16) and enc.truncated == 0
    with torch.no_grad():  # StableDiffusionPipeline's encode_prompt
        ids = tokenizer([ds.captions[3], ""], padding="max_length", max_length=TOKENS, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        hidden = model.text_encoder(ids)[0]
    cond = enc.conditions([3, 3])
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, TOKENS, 16)
    assert torch.allclose(cond["encoder_hidden_states"][0], hidden[0], atol=1e-5)
    assert torch.allclose(enc.null_embedding[0], hidden[1], atol=1e-5)  # row 0: the empty prompt
    assert not model.vae.training and not model.text_encoder.training
    for path in (layout.encoded_latents(run), layout.encoded_text(run), layout.encoded_index(run)):
        assert path.is_file()
    assert not [p for p in layout.encoded_dir(run).iterdir() if layout.is_temporary(p)]
    index = json.loads(layout.encoded_index(run).read_text())
    assert index["latents"]["key"] != index["text"]["key"] and index["format"] == 1


def test_a_rerun_reuses_the_cache_and_a_change_recomputes_only_its_part(
    latent_text_model, tmp_path, monkeypatch
):
    model, run = latent_text_model, tmp_path / "run"
    data, ds = digits_for(model)
    first = encode_dataset(model, ds, data, run)

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again")

    with monkeypatch.context() as m:
        m.setattr(encoded_cache, "encode_images", refuse)
        m.setattr(encoded_cache, "encode_tokens", refuse)
        again = encode_dataset(model, ds, data, run)
    assert again.reused == ("latents", "text") and again.key == first.key
    assert torch.equal(again.latents, first.latents) and torch.equal(
        again.text_embeddings, first.text_embeddings
    )
    # another caption template: the text is encoded again, the latents are reused
    data2, ds2 = digits_for(model, prompt_template="digit {label}")
    with monkeypatch.context() as m:
        m.setattr(encoded_cache, "encode_images", refuse)
        other = encode_dataset(model, ds2, data2, run)
    assert other.reused == ("latents",) and other.key != first.key
    # other VAE weights: the latents are encoded again, the text is reused
    with torch.no_grad():
        model.vae.encoder.conv_in.weight.add_(0.1)
    with monkeypatch.context() as m:
        m.setattr(encoded_cache, "encode_tokens", refuse)
        moved = encode_dataset(model, ds2, data2, run)
    assert moved.reused == ("text",) and not torch.allclose(moved.latents, first.latents)
    # other images (max_images): encoded again
    data3, ds3 = digits_for(model, prompt_template="digit {label}")
    data3.max_images = 7
    ds3 = load_conditioned_dataset(data3, 3, 16, "text")
    assert encode_dataset(model, ds3, data3, run).latents.shape[0] == 7


def test_a_damaged_cache_file_is_encoded_again(latent_text_model, tmp_path):
    model, run = latent_text_model, tmp_path / "run"
    data, ds = digits_for(model)
    first = encode_dataset(model, ds, data, run)
    path = layout.encoded_latents(run)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit in the tensor data: same size, another hash
    path.write_bytes(bytes(raw))
    said = []
    again = encode_dataset(model, ds, data, run, log=said.append)
    assert again.reused == ("text",) and torch.equal(again.latents, first.latents)
    assert any(
        "latents.safetensors differs from encoded.json (damaged or changed); encoding again" in s
        for s in said
    )
    layout.encoded_index(run).write_text("{not json")  # a damaged index: everything encoded again
    assert encode_dataset(model, ds, data, run).reused == ()


def test_an_image_folder_is_keyed_on_its_files(latent_text_model, tmp_path):
    model, run = latent_text_model, tmp_path / "run"
    root = captioned(tmp_path / "c", 3)
    data = DataConfig(source=str(root))
    ds = load_conditioned_dataset(data, 3, 16, "text")
    assert encode_dataset(model, ds, data, run).reused == ()
    assert encode_dataset(model, ds, data, run).reused == ("latents", "text")
    write_images(tmp_path / "other", 1, size=30)  # the first image replaced by another picture
    (tmp_path / "other" / "img000.png").replace(root / "img000.png")
    ds = load_conditioned_dataset(data, 3, 16, "text")
    assert encode_dataset(model, ds, data, run).reused == ("text",)


def test_class_conditioning_needs_no_files_and_the_shapes_are_checked(latent_text_model, tmp_path):
    unet = build_unet({**TINY_UNET, "num_class_embeds": 10}, seed=0)
    pixel = DiffusionModel(unet, dict(DDPM_SCHEDULER))
    data, ds = digits_for(pixel, "class")
    enc = encode_dataset(pixel, ds, data, tmp_path / "run")
    assert enc.latents is None and enc.text_embeddings is None and not (tmp_path / "run").exists()
    assert torch.equal(enc.conditions([0, 5])["class_labels"], torch.tensor([ds.labels[0], ds.labels[5]]))
    with pytest.raises(ValueError, match="no latents"):
        enc.samples([0])
    model = latent_text_model
    data = DataConfig(max_images=4)
    wrong = load_conditioned_dataset(data, 3, 8, "text")  # pixels at the latent size, not the image size
    with pytest.raises(
        DataError, match=r"images are 3x8x8 but the model's VAE takes 3x16x16 \(encoded to the UNet's 4x8x8\)"
    ):
        encode_dataset(model, wrong, data, tmp_path / "run2")
    no_encoder = DiffusionModel(model.unet, {}, tokenizer=model.tokenizer)
    with pytest.raises(ModelError, match="text-conditioned but has no text_encoder"):
        encode_dataset(no_encoder, load_conditioned_dataset(data, 3, 16, "text"), data, tmp_path / "run3")
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()  # refused before any work


def test_the_run_verify_leaves_the_cache_to_its_index(latent_text_model, tmp_path):
    model, run = latent_text_model, tmp_path / "run"
    data, ds = digits_for(model)
    encode_dataset(model, ds, data, run)
    assert verify_run(run) == {"missing": [], "changed": [], "extra": []}
