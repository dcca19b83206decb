"""Prompt adherence (compressor/adherence.py): the digits classifier on real digits, CLIP score on a tiny
random CLIPModel saved to a folder (held to torchmetrics' definition image by image), the paired
intervals, the quality stage recording it per model on a tiny Stable-Diffusion-layout pipeline, and the
``acceptance.min_adherence_ratio`` gate's three outcomes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.adherence import (
    CLIP,
    DIGITS,
    AdherenceMeasure,
    choose_adherence,
    clip_scores,
    load_clip,
    ratio_figures,
)
from compressor.config import AcceptanceConfig, config_from_mapping
from compressor.data import digits_images
from compressor.errors import ConfigError, ModelError
from compressor.intervals import Resampling
from compressor.prompts import PromptSet
from pipeline.acceptance import FAIL, INCONCLUSIVE, PASS, quality_checks
from pipeline.runner import run_pipeline
from rundir import layout
from rundir.records import QualityMetrics, read_metrics
from tests.test_components import write_pipeline
from tests.test_conditioning_data import captioned

transformers = pytest.importorskip("transformers")

TOKENS = 6
CLIP_TOKENS = 16  # the CLIP model's context: every test prompt fits (torchmetrics cuts longer ones
# without their end token, the tokenizer's truncation keeps it: the two differ only there)
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits(which: list[int]) -> torch.Tensor:
    """One real scikit-learn digit image of each class in ``which`` (in [0, 1], 1 x 16 x 16)."""
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target)
    images = (digits_images(16, 1) + 1) / 2
    return torch.stack([images[int((target == d).nonzero()[0])] for d in which])


def _prompts(digits: list[int]) -> PromptSet:
    return PromptSet("text", tuple(f"a handwritten digit {NAMES[d]}" for d in digits), "data")


# -- the digits classifier ---------------------------------------------------------------------------


def test_a_real_digit_scores_one_for_its_own_prompt_and_zero_for_another():
    measure = choose_adherence(_prompts([3, 7, 0, 2]), None, digit_images=True)
    assert measure.metric == DIGITS
    real = _digits([3, 7, 0, 2])
    assert measure.score(real, 0).tolist() == [1.0, 1.0, 1.0, 1.0]
    # image i takes prompt i mod 4: the same images one prompt on are all the wrong digit
    assert measure.score(real, 1).tolist() == [0.0, 0.0, 0.0, 0.0]
    # grey digits as three channels (an RGB decoder's output) score the same
    assert measure.score(real.expand(-1, 3, -1, -1), 0).tolist() == [1.0] * 4


def test_scores_drawn_in_chunks_equal_those_drawn_at_once():
    measure = choose_adherence(_prompts([1, 2, 3]), None, digit_images=True)
    images = _digits([1, 2, 3, 1, 2, 3, 3])
    whole = measure.score(images, 0)
    assert whole.tolist() == [1.0] * 6 + [0.0]  # image 6 takes prompt 0 (one) but shows a three
    assert torch.equal(torch.cat([measure.score(images[:2], 0), measure.score(images[2:], 2)]), whole)


def test_no_measure_applies_without_digits_or_a_clip_model():
    none = choose_adherence(_prompts([3]), None, digit_images=False)
    assert none.metric is None and "not digits" in none.note and "clip_model is not set" in none.note
    cat = choose_adherence(PromptSet("text", ("a handwritten digit three", "a cat")), None, digit_images=True)
    assert cat.metric is None and "'a cat' names no digit" in cat.note
    boot = Resampling(resamples=50)
    figures = none.figures(boot, None)
    assert figures["adherence"] is None and figures["adherence_ci"] is None and figures["adherence_note"]
    classes = choose_adherence(PromptSet("class", ("3", "4")), None, digit_images=True)
    assert classes.metric == DIGITS and classes.score(_digits([3, 4]), 0).tolist() == [1.0, 1.0]


# -- CLIP score ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_tokenizer_folder) -> Path:
    """A tiny random CLIPModel with the tests' CLIP tokenizer and a 32-pixel image processor, saved with
    save_pretrained as a local CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder(CLIP_TOKENS)), local_files_only=True)
    text = {"vocab_size": tok.vocab_size, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": CLIP_TOKENS,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(2)  # a seed whose scores on the test's images are positive but for one clamped to 0
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(str(folder))
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    return folder


class _TensorFeatures(torch.nn.Module):
    """The CLIP model with ``get_*_features`` returning the embedding tensor, as torchmetrics 1.9 reads
    it (newer transformers return an output object whose ``pooler_output`` holds it)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_is_torchmetrics_clip_score_image_by_image(clip_folder):
    from torchmetrics.functional.multimodal import clip_score

    model, processor = load_clip(clip_folder)
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [
        "a handwritten digit three",
        "a cat on a mat",
        "a dog on the moon",
        "the empty prompt",
        "a cat",
    ]
    ours = clip_scores(model, processor, images, prompts)
    assert ours.shape == (5,) and bool((ours <= 100).all())
    assert int((ours == 0).sum()) == 1 and int((ours > 0).sum()) == 4  # a negative cosine scores 0
    shim = _TensorFeatures(model)
    for i in range(5):  # torchmetrics' functional clip_score of one pair: 100 * max(cos, 0)
        rgb = (images[i].expand(3, -1, -1) * 255).round().to(torch.uint8)
        theirs = float(clip_score(rgb, prompts[i], lambda: (shim, processor)))
        assert ours[i].item() == pytest.approx(theirs, abs=1e-3)
    # another prompt moves the score: the text matters
    other = clip_scores(model, processor, images, ["a dog on the moon"] * 5)
    assert not torch.allclose(ours, other)


def test_a_clip_model_folder_that_is_missing_or_empty_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        load_clip(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a loadable CLIPModel folder"):
        load_clip(tmp_path / "empty")


# -- intervals ---------------------------------------------------------------------------------------------


def test_adherence_figures_carry_paired_intervals():
    boot = Resampling(resamples=100)
    dense = torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1, 0, 1] * 4, dtype=torch.float64)
    worse = dense.clone()
    worse[::5] = 0  # 8 of 40 lost
    measure = AdherenceMeasure(DIGITS, "test", lambda images, start: images)
    f = measure.figures(boot, worse, dense)
    assert f["adherence"] == pytest.approx(float(worse.mean()))
    assert f["adherence_ratio"] == pytest.approx(float(worse.mean() / dense.mean()))
    lo, hi = f["adherence_ratio_ci"]
    assert lo < f["adherence_ratio"] < hi < 1.0  # paired: every lost image lowers the ratio
    own = f["adherence_ci"]
    assert own[0] < f["adherence"] < own[1]
    # a model equal to dense: ratio 1 exactly, interval [1, 1]
    same = ratio_figures(boot, dense, dense)
    assert same["adherence_ratio"] == 1.0 and same["adherence_ratio_ci"] == pytest.approx([1.0, 1.0])
    # dense never adheres: no ratio interval, and the note says why
    zero = ratio_figures(boot, worse, torch.zeros(40, dtype=torch.float64))
    assert zero["adherence_ratio_ci"] is None and "reaches zero" in zero["adherence_ratio_note"]


# -- the gate ------------------------------------------------------------------------------------------------


def _quality(**finetuned) -> QualityMetrics:
    dense = {"adherence": 0.9, "adherence_ci": [0.85, 0.95], "adherence_metric": DIGITS}
    return QualityMetrics(
        models={"dense": dense, "finetuned": {"adherence_metric": DIGITS, "adherence": 0.8, **finetuned}},
        frechet_metric="fd_digits", num_samples=256, steps=30, scheduler="ddim", interval={"level": 0.95},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [([0.92, 0.99], PASS), ([0.6, 0.89], FAIL), ([0.88, 0.97], INCONCLUSIVE), ([0.9, 1.0], PASS)],
)
def test_the_adherence_gate_reads_the_ratio_interval(ci, outcome):
    limits = AcceptanceConfig(min_adherence_ratio=0.9)
    (check,) = quality_checks(limits, _quality(adherence_ratio=sum(ci) / 2, adherence_ratio_ci=ci))
    assert check.name == "min_adherence_ratio" and check.outcome == outcome and check.interval == ci
    assert "digits_accuracy, compressed / dense" in check.line()


def test_the_adherence_gate_unset_is_not_checked_and_unmeasured_fails_with_the_fix():
    figures = {"adherence_ratio": 0.5, "adherence_ratio_ci": [0.4, 0.6]}
    assert quality_checks(AcceptanceConfig(), _quality(**figures)) == []
    limits = AcceptanceConfig(min_adherence_ratio=0.9)
    # ill-conditioned: dense's own interval reaches zero
    ill_figures = _quality(
        adherence_ratio=2.0, adherence_ratio_ci=None, adherence_ratio_note="... reaches zero"
    )
    (ill,) = quality_checks(limits, ill_figures)
    assert ill.outcome == INCONCLUSIVE and ill.ill_posed and "reaches zero" in ill.line()
    # a conditional run where no measure applied: not measured, the record's reason
    unmeasured = _quality(adherence=None, adherence_note="prompt adherence not measured: x")
    (none,) = quality_checks(limits, unmeasured)
    assert none.outcome == FAIL and none.measured is None and "not measured: x" in none.line()
    # an unconditional model's record has no adherence at all: fail, saying to unset the limit
    models = {"dense": {}, "finetuned": {"ssim_vs_dense": 0.9}}
    plain = QualityMetrics(
        models=models, frechet_metric="fd_digits", num_samples=256, steps=30, scheduler="ddim"
    )
    (unconditional,) = quality_checks(limits, plain)
    assert unconditional.outcome == FAIL and "unset acceptance.min_adherence_ratio" in unconditional.line()


# -- the quality stage --------------------------------------------------------------------------------------


def test_the_quality_stage_records_prompt_adherence_per_model(tmp_path, clip_tokenizer_folder, clip_folder):
    """The tiny text-to-image pipeline through prune, finetune and quality with a CLIP model folder:
    pixels at the decoded shape scored against the data, CLIP score per model with its interval and
    the paired ratio, the prompts recorded, and the adherence gate decided on the record."""
    pipe = write_pipeline(tmp_path / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    cfg = config_from_mapping(
        {
            "seed": 0,
            "device": "cpu",
            "model": {"name": str(pipe)},
            "data": {"source": str(captioned(tmp_path / "images", 4))},
            "prune": {"method": "diff-pruning", "ratio": 0.3, "timestep_stride": 250, "batch_size": 4},
            "finetune": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
            "sample": {"steps": 2, "batch_size": 4, "guidance_scale": 3.0},
            "quality": {"num_samples": 6, "resamples": 20, "clip_model": str(clip_folder)},
            "acceptance": {"min_adherence_ratio": 0.5},
        }
    )
    run = tmp_path / "run"
    m = run_pipeline(cfg, run, ["prune", "finetune", "quality"])["quality"]["metrics"]
    assert m["prompts"]["prompts"] == [f"image {i}" for i in range(4)] and m["guidance_scale"] == 3.0
    assert m["adherence_metric"] == CLIP and m["num_samples"] == 6
    for label in ("dense", "pruned", "finetuned", "finetuned (raw)"):
        figures = m["models"][label]
        assert figures["adherence_metric"] == CLIP and 0 <= figures["adherence"] <= 100
        lo, hi = figures["adherence_ci"]
        assert lo <= figures["adherence"] <= hi
    final = m["models"]["finetuned"]
    assert final["adherence_ratio"] == pytest.approx(final["adherence"] / m["models"]["dense"]["adherence"])
    assert (
        m["adherence_ratio"] == final["adherence_ratio"]
        and m["adherence_ratio_ci"] == final["adherence_ratio_ci"]
    )
    assert "adherence_ratio" not in m["models"]["dense"]
    # the other figures on the same pixels: SSIM vs dense; no Inception weights offline, so FID says why
    assert math.isfinite(final["ssim_vs_dense"]) and m["frechet_metric"] == "fid" and m["frechet_note"]
    # the stage's own score equals CLIP score of the saved samples (pixels at the decoded shape)
    saved = load_file(str(layout.quality_samples(run)))
    assert saved["dense"].shape == (6, 3, 16, 16) and 0 <= float(saved["dense"].min())
    model, processor = load_clip(clip_folder)
    prompts = [f"image {i % 4}" for i in range(6)]
    assert float(clip_scores(model, processor, saved["dense"], prompts).mean()) == pytest.approx(
        m["models"]["dense"]["adherence"]
    )
    quality = read_metrics(run, "quality")
    (check,) = quality_checks(cfg.acceptance, quality)
    assert check.name == "min_adherence_ratio" and check.measured == final["adherence_ratio"]
    assert check.outcome in (PASS, FAIL, INCONCLUSIVE) and check.interval == final["adherence_ratio_ci"]
