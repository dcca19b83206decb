"""Conditioned training data (compressor/conditioned_data.py): captions from metadata.jsonl, class
indices from class subfolders, the digits' captions and labels, and one-line errors for every bad
input before long work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.conditioned_data import (
    DIGIT_NAMES,
    ConditionedImages,
    digits_labels,
    load_conditioned_dataset,
)
from compressor.config import DataConfig, config_from_mapping
from compressor.data import load_dataset
from compressor.errors import ConfigError, DataError
from tests.conftest import write_images


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
