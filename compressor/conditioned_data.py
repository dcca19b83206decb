"""Conditioned training data: images with a caption each (text-conditioned models) or a class index
each (class-conditioned models).

Where the conditions come from (``data.*`` keys, :class:`compressor.config.DataConfig`):

- ``digits``: scikit-learn's labels give the class indices 0-9 and, through ``data.prompt_template``
  (default ``a handwritten digit {name}``), the captions ("a handwritten digit seven");
- an image folder with ``metadata.jsonl`` (Hugging Face's imagefolder convention): one JSON object a
  line, ``{"file_name": "<path relative to the folder>", "text": "<caption>"}``; the images are the
  ones listed, in line order (``data.captions``: ``auto`` reads the file when it is there,
  ``metadata`` requires it);
- an image folder of class subfolders (ImageNet's layout): ``root/<class name>/*.png``, class index
  = the folder's place in the sorted list of class folders; folders whose name starts with ``.`` are
  skipped (``data.classes``: ``auto`` takes this layout when every image sits in a class folder,
  ``subfolders`` requires it).

``data.captions`` is read for a text-conditioned model, ``data.classes`` for a class-conditioned
one. Everything is checked before any long work: the caption file line by line (JSON, its two keys,
UTF-8, every listed image present, no image listed twice), every class folder holding images, the
class count against the UNet's ``num_class_embeds``, and every image decoded, so a bad input is one
line (:class:`~compressor.errors.DataError`) naming the file and what to do. Unconditional data
loading (:func:`compressor.data.load_dataset`) is untouched by any of this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import torch
from torch.utils.data import Dataset

from compressor.config import DataConfig
from compressor.data import (
    IMAGE_SUFFIXES,
    ImageFolder,
    TensorImages,
    digits_images,
    list_images,
    load_image,
    source_folder,
)
from compressor.errors import ConfigError, DataError

METADATA_FILE = "metadata.jsonl"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LINE_FORMAT = '{"file_name": "...", "text": "..."}'

Condition = Literal["text", "class"]


class ConditionedImages(Dataset):
    """Images with their conditions: item ``i`` is ``(image, caption)`` for ``conditioning="text"``
    and ``(image, class index)`` for ``conditioning="class"``.

    ``images``: the pixels (a :class:`~compressor.data.TensorImages` or
    :class:`~compressor.data.ImageFolder`, each item (C, H, W) in [-1, 1]); ``captions`` and
    ``labels``: one per image (either may be None when the source has none; the one
    ``conditioning`` names is always there); ``class_names``: the name of each class index.
    """

    def __init__(
        self,
        images: Dataset,
        conditioning: Condition,
        captions: list[str] | None = None,
        labels: list[int] | None = None,
        class_names: list[str] | None = None,
        name: str = "",
    ) -> None:
        n = len(images)
        if conditioning == "text" and captions is None or conditioning == "class" and labels is None:
            raise ValueError(f"conditioning={conditioning!r} needs its captions or labels")
        for what, values in (("captions", captions), ("labels", labels)):
            if values is not None and len(values) != n:
                raise ValueError(f"{len(values)} {what} for {n} images")
        self.images = images
        self.conditioning = conditioning
        self.captions = captions
        self.labels = labels
        self.class_names = class_names
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str | int]:
        image = self.images[i]
        if self.conditioning == "text":
            return image, self.captions[i]  # type: ignore[index]
        return image, self.labels[i]  # type: ignore[index]


@dataclass(frozen=True)
class Captioned:
    """One line of ``metadata.jsonl``: the image file and its caption."""

    file: Path
    text: str


def load_conditioned_dataset(
    cfg: DataConfig,
    channels: int,
    size: int,
    conditioning: Condition,
    num_classes: int | None = None,
    check: bool = True,
) -> ConditionedImages:
    """The images of ``cfg.source`` with the conditions a ``conditioning`` model trains on.

    ``conditioning``: the model's (:attr:`compressor.components.DiffusionModel.conditioning`,
    ``text`` or ``class``); ``num_classes``: the UNet's ``num_class_embeds`` (class indices must be
    below it). ``check``: decode every image now. Raises DataError (ConfigError for a
    ``data.prompt_template`` that cannot be filled) before any long work.
    """
    if conditioning not in ("text", "class"):
        raise ValueError(f"conditioning={conditioning!r}: only 'text' and 'class' models have conditions")
    if cfg.source == "digits":
        data = _digits(cfg, channels, size, conditioning)
    elif conditioning == "text":
        data = _captioned_folder(cfg, channels, size, check)
    else:
        data = _class_folder(cfg, channels, size, check)
    if conditioning == "class" and num_classes is not None and data.labels:
        count = len(data.class_names or []) or max(data.labels) + 1
        if count > num_classes:
            raise DataError(
                f"data.source={cfg.source!r} has {count} classes but the model's UNet embeds "
                f"num_class_embeds={num_classes}; use at most {num_classes} class folders or another model"
            )
    return data


# -- digits ----------------------------------------------------------------------------------------


def digits_labels() -> list[int]:
    """The digit (0-9) of each of scikit-learn's 1,797 digits, in :func:`compressor.data.digits_images`'s
    order."""
    from sklearn.datasets import load_digits

    return [int(t) for t in load_digits().target]


def digit_caption(template: str, label: int) -> str:
    """``template`` filled for digit ``label``: ``{name}`` its name (``seven``), ``{label}`` its number;
    ConfigError naming ``data.prompt_template`` when the template cannot be filled."""
    try:
        return template.format(name=DIGIT_NAMES[label], label=label)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"data.prompt_template={template!r}: cannot be filled ({type(exc).__name__}: {exc}); use the "
            "fields {name} (zero..nine) and {label} (0..9), and double braces for a literal brace"
        ) from None


def _digits(cfg: DataConfig, channels: int, size: int, conditioning: Condition) -> ConditionedImages:
    if conditioning == "text" and cfg.captions != "auto":
        raise DataError(
            f"data.captions={cfg.captions}: the digits' captions come from data.prompt_template; "
            "set data.captions=auto (or train on an image folder with metadata.jsonl)"
        )
    if conditioning == "class" and cfg.classes != "auto":
        raise DataError(
            f"data.classes={cfg.classes}: the digits' classes are their labels 0-9; set data.classes=auto "
            "(or train on an image folder of class subfolders)"
        )
    images = digits_images(size, channels)
    labels = digits_labels()
    if cfg.max_images:
        images, labels = images[: cfg.max_images], labels[: cfg.max_images]
    captions = [digit_caption(cfg.prompt_template, y) for y in labels]
    return ConditionedImages(
        TensorImages(images, "digits"), conditioning, captions, labels, list(DIGIT_NAMES), "digits"
    )


# -- captions: metadata.jsonl ----------------------------------------------------------------------


def read_metadata(folder: Path) -> list[Captioned]:
    """The lines of ``folder/metadata.jsonl`` in order (blank lines skipped); DataError naming the line
    for anything else than one ``{"file_name": ..., "text": ...}`` object of an image in the folder."""
    path = folder / METADATA_FILE
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        raw = raw[3:]
    if not raw.strip():
        raise DataError(f"{path} is empty; write one line {LINE_FORMAT} per image")
    entries: list[Captioned] = []
    seen: dict[str, int] = {}
    root = folder.resolve()
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text; save {METADATA_FILE} as UTF-8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg}); each line is one object {LINE_FORMAT}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object; write {LINE_FORMAT}")
        for key in ("file_name", "text"):
            if key not in obj:
                raise DataError(f'{where}: no "{key}"; each line is one object {LINE_FORMAT}')
        name, caption = obj["file_name"], obj["text"]
        if not isinstance(name, str) or not name.strip():
            raise DataError(f'{where}: "file_name" must be a non-empty string, got {name!r}')
        if not isinstance(caption, str):
            raise DataError(f'{where}: "text" must be a string (one caption), got {type(caption).__name__}')
        rel = PurePosixPath(name)
        file = folder / rel
        if rel.is_absolute() or not file.resolve().is_relative_to(root):
            raise DataError(f"{where}: file_name {name!r} is outside {folder}; name a file relative to it")
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{where}: file_name {name!r} is not a PNG/JPEG image; list images only")
        if not file.is_file():
            raise DataError(f"{where}: image {name!r} not found in {folder}; add it or remove the line")
        key = str(rel)
        if key in seen:
            raise DataError(
                f"{where}: {name!r} is listed again (first on line {seen[key]}); one caption an image"
            )
        seen[key] = n
        entries.append(Captioned(file, caption))
    return entries


def _captioned_folder(cfg: DataConfig, channels: int, size: int, check: bool) -> ConditionedImages:
    folder = source_folder(cfg)
    if cfg.captions == "none":
        raise DataError(
            "data.captions=none but the model is text-conditioned and needs a caption per image; set "
            f"data.captions=auto and put {METADATA_FILE} in data.source"
        )
    if not (folder / METADATA_FILE).is_file():
        raise DataError(
            f"data.source={cfg.source!r}: no {METADATA_FILE}, and the text-conditioned model needs a caption "
            f"per image; add {METADATA_FILE} with one line {LINE_FORMAT} per image"
        )
    entries = read_metadata(folder)
    if cfg.max_images:
        entries = entries[: cfg.max_images]
    files = [e.file for e in entries]
    if check:
        for path in files:
            load_image(path, channels, size, cfg.max_image_pixels)
    images = ImageFolder(files, channels, size, str(folder), cfg.max_image_pixels)
    return ConditionedImages(images, "text", [e.text for e in entries], name=str(folder))


# -- classes: subfolders ---------------------------------------------------------------------------


def class_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that are classes, sorted by name (the class index order); names
    starting with ``.`` are skipped."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_name)


def _name(path: Path) -> str:
    return path.name


def has_class_layout(folder: Path) -> bool:
    """True when ``folder`` holds class subfolders and no image outside them (``data.classes=auto``)."""
    top = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return not top and bool(class_folders(folder))


def _class_folder(cfg: DataConfig, channels: int, size: int, check: bool) -> ConditionedImages:
    folder = source_folder(cfg)
    if cfg.classes == "none":
        raise DataError(
            "data.classes=none but the model is class-conditioned and needs a class per image; set "
            "data.classes=auto and put each class's images in data.source/<class name>/"
        )
    if cfg.classes == "auto" and not has_class_layout(folder):
        raise DataError(
            f"data.source={cfg.source!r}: no class subfolders, and the class-conditioned model needs a "
            "class per image; put each class's images in data.source/<class name>/ (no images at its top)"
        )
    top = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if top:
        raise DataError(
            f"data.source={cfg.source!r}: {len(top)} image(s) outside any class folder (e.g. "
            f"{sorted(top)[0]}); move them into data.source/<class name>/"
        )
    classes = class_folders(folder)
    if not classes:
        raise DataError(
            f"data.source={cfg.source!r}: no class subfolders; put each class's images in "
            "data.source/<class name>/"
        )
    per_class = []
    for sub in classes:
        found = list_images(sub)
        if not found:
            raise DataError(
                f"data.source={cfg.source!r}: class folder {sub.name!r} holds no PNG/JPEG images; add its "
                "images or remove the folder (class indices follow the sorted folder names)"
            )
        per_class.append(found)
    files = [f for found in per_class for f in found]
    labels = [k for k, found in enumerate(per_class) for _ in found]
    if cfg.max_images and cfg.max_images < len(files):
        keep = sorted(_round_robin([len(found) for found in per_class])[: cfg.max_images])
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    if check:
        for path in files:
            load_image(path, channels, size, cfg.max_image_pixels)
    images = ImageFolder(files, channels, size, str(folder), cfg.max_image_pixels)
    return ConditionedImages(
        images, "class", labels=labels, class_names=[c.name for c in classes], name=str(folder)
    )


def _round_robin(counts: list[int]) -> list[int]:
    """Indices into the classes' images laid end to end, taken one class after another (the first of
    each class, then the second, ...): ``data.max_images`` then keeps every class."""
    starts = [sum(counts[:k]) for k in range(len(counts))]
    return [starts[k] + j for j in range(max(counts, default=0)) for k in range(len(counts)) if j < counts[k]]
