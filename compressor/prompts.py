"""What a conditional model is sampled with: its prompts (text) or class labels, one per image.

Image ``i`` of a run (seed ``sample.seed + i``) takes prompt ``i mod len(prompts)``, so the samples,
quality, parity and bench stages and the report all agree on which prompt made which image, and a
chunk drawn later (``start``) continues the cycle. Where the prompts come from
(:func:`run_prompts`), first found wins:

1. ``sample.prompts`` (the config or ``--set``; class-conditioned models: class indices);
2. ``sample.prompt_file``: a UTF-8 file, one prompt a line (blank lines skipped);
3. the data's distinct captions (text) or classes (class) in order of first appearance: the
   digits give the ten "a handwritten digit ..." captions, a caption folder its captions (one image
   per caption, as MS-COCO's evaluation draws them).

A prompt that names a digit by ``data.prompt_template`` knows its digit (:attr:`PromptSet.digits`):
the quality stage scores prompt adherence of the digits demo with its classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from compressor.conditioned_data import DIGIT_NAMES, digit_caption, load_conditioned_dataset
from compressor.config import DataConfig, SampleConfig
from compressor.errors import ConfigError, DataError
from compressor.guidance import Conditioning, class_conditioning, encode_prompts

Kind = Literal["text", "class"]


@dataclass(frozen=True)
class PromptSet:
    """The prompts (``kind`` text) or class labels (``kind`` class) a run's images cycle through.

    ``source``: where they came from (``sample.prompts``, ``sample.prompt_file``, ``data``);
    ``negative``: the negative prompt (text); ``template``: ``data.prompt_template`` (digits).
    """

    kind: Kind
    prompts: tuple[str, ...]
    source: str = "sample.prompts"
    negative: str = ""
    template: str = "a handwritten digit {name}"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError(f"{self.source}: no prompts; give at least one")

    def __len__(self) -> int:
        return len(self.prompts)

    def for_images(self, count: int, start: int = 0) -> list[str]:
        """The prompt of images ``start .. start + count - 1``."""
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(count)]

    def labels(self, count: int, start: int = 0) -> list[int]:
        """The class label of each image (class-conditioned models)."""
        return [int(p) for p in self.for_images(count, start)]

    @property
    def digits(self) -> list[int | None]:
        """The digit each prompt asks for (``data.prompt_template`` filled for 0-9, or a class index
        0-9 of a class-conditioned model), None for a prompt naming none."""
        if self.kind == "class":
            return [int(p) if 0 <= int(p) < len(DIGIT_NAMES) else None for p in self.prompts]
        try:
            known = {digit_caption(self.template, d): d for d in range(len(DIGIT_NAMES))}
        except ConfigError:
            return [None] * len(self.prompts)
        return [known.get(p.strip()) for p in self.prompts]

    def conditioning(
        self, model, count: int, start: int = 0, device: torch.device | str = "cpu"
    ) -> Conditioning:
        """The :class:`compressor.guidance.Conditioning` of images ``start .. start + count - 1`` for
        ``model`` (a :class:`compressor.components.DiffusionModel`): the prompts encoded by its text
        encoder beside the negative prompt's encoding, or the labels beside the null class."""
        if self.kind == "text":
            return encode_prompts(model, self.for_images(count, start), self.negative, device)
        cond = class_conditioning(model, self.labels(count, start))
        return Conditioning(cond.kind, cond.cond.to(device), cond.uncond.to(device))

    def summary(self) -> dict:
        """What records keep about it."""
        return {
            "kind": self.kind,
            "source": self.source,
            "prompts": list(self.prompts),
            "negative": self.negative,
        }


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a UTF-8 file, one a line, blank lines skipped; DataError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} not found; pass a UTF-8 text file with one prompt a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts; write one prompt a line")
    return prompts


def _check_labels(values: Sequence[str], num_classes: int | None, where: str) -> None:
    for v in values:
        try:
            label = int(v)
        except ValueError:
            raise ConfigError(
                f"{where}: {v!r} is not a class index; a class-conditioned model takes integers"
            ) from None
        top = (num_classes or 0) - 1  # the last row is the null class (compressor.guidance)
        if num_classes is not None and not 0 <= label < top:
            raise ConfigError(f"{where}: class {label} is outside the model's classes 0..{top - 1}")


def run_prompts(
    sample: SampleConfig,
    data: DataConfig,
    kind: Kind,
    image_shape: tuple[int, int, int],
    num_classes: int | None = None,
    prompts: Sequence[str] | None = None,
) -> PromptSet:
    """The prompts of a run (see the module docstring); ``prompts`` (e.g. ``compress-deploy sample
    --prompt``) come before the config's. ConfigError or DataError, one line, for bad ones."""
    template = data.prompt_template
    if prompts:
        found, source = [str(p) for p in prompts], "--prompt"
    elif sample.prompts:
        found, source = [str(p) for p in sample.prompts], "sample.prompts"
    elif sample.prompt_file:
        found, source = read_prompt_file(sample.prompt_file), f"sample.prompt_file={sample.prompt_file}"
    else:
        found, source = _data_prompts(data, kind, image_shape, num_classes), f"data.source={data.source}"
    if kind == "class":
        _check_labels(found, num_classes, source)
    if any(not p.strip() for p in found):
        raise ConfigError(
            f"{source}: an empty prompt; give text for each (the negative prompt is sample.negative_prompt)"
        )
    return PromptSet(
        kind, tuple(found), source, (sample.negative_prompt or "") if kind == "text" else "", template
    )


def _data_prompts(
    data: DataConfig, kind: Kind, image_shape: tuple[int, int, int], num_classes: int | None
) -> list[str]:
    """The data's distinct captions or class indices, in order of first appearance."""
    c, h, _ = image_shape
    dataset = load_conditioned_dataset(data, c, h, kind, num_classes, check=False)
    values = dataset.captions if kind == "text" else [str(v) for v in dataset.labels or []]
    return list(dict.fromkeys(values or []))
