"""Conditional training in the product's loop: text- or class-conditioned data, conditioning dropout
(classifier-free guidance), exact resume, distillation from a conditional teacher."""

from __future__ import annotations

import pytest
import torch

from compressor.conditional_batches import PixelConditions, null_condition
from compressor.config import DistillConfig, FinetuneConfig
from compressor.encoded_cache import EncodedData
from compressor.errors import ConfigError, DataError
from compressor.models import build_unet
from compressor.sampling import make_scheduler
from compressor.training import draw_batch, draw_conditioned_batch, train
from tests.conftest import DDPM_SCHEDULER, TINY_COND_UNET, TINY_UNET

N, CAPTIONS, TOKENS, WIDTH, CLASSES = 16, 4, 5, 8, 4  # class 3 is the null class
TEXT_UNET = {**TINY_COND_UNET, "block_out_channels": [16, 32], "norm_num_groups": 4,
             "cross_attention_dim": WIDTH}  # fmt: skip
CLASS_UNET = {**TINY_UNET, "sample_size": 8, "num_class_embeds": CLASSES}
OFF = DistillConfig(weight_output=0.0, weight_features=0.0)


def _text_data() -> EncodedData:
    """A latent model's cache: random latents and caption embeddings (row 0 the empty prompt)."""
    g = torch.Generator().manual_seed(1)
    return EncodedData(
        count=N,
        latents=torch.randn(N, 4, 8, 8, generator=g),
        text_embeddings=torch.randn(1 + CAPTIONS, TOKENS, WIDTH, generator=g),
        caption_index=torch.randint(1, 1 + CAPTIONS, (N,), generator=g),
    )


def _class_data() -> PixelConditions:
    """A pixel model's data: images in [-1, 1] beside class labels 0..CLASSES-2."""
    g = torch.Generator().manual_seed(2)
    images = torch.rand(N, 3, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, CLASSES - 1, (N,), generator=g)
    return PixelConditions(images, EncodedData(count=N, labels=labels))


KINDS = {"text": (TEXT_UNET, _text_data), "class": (CLASS_UNET, _class_data)}


def _train(tmp, kind, steps=4, stop_after=None, teacher=None, distill=OFF, unet=None, **kw):
    config, data = KINDS[kind]
    cfg = FinetuneConfig(
        steps=steps, batch_size=4, lr=1e-3, checkpoint_every=3, log_every=1, distill=distill, **kw
    )
    return train(
        unet if unet is not None else build_unet(config, seed=0),
        make_scheduler("ddpm", DDPM_SCHEDULER),
        data(),
        cfg,
        tmp,
        0,
        torch.device("cpu"),
        stop_after=stop_after,
        teacher=teacher,
    )


def _recorder(unet, seen: list):
    """Record the conditioning of every forward of ``unet`` (and of its deep copies)."""

    def hook(_module, _args, kwargs):
        names = ("encoder_hidden_states", "class_labels")
        seen.append({k: kwargs[k].detach().clone() for k in names if k in kwargs})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return unet


@pytest.mark.parametrize("kind", ["text", "class"])
def test_conditional_training_lowers_the_loss(tmp_path, kind):
    result = _train(tmp_path, kind, steps=40, cond_dropout=0.1)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


@pytest.mark.parametrize("kind", ["text", "class"])
def test_resume_is_exact_with_conditioning_dropout(tmp_path, kind):
    whole = _train(tmp_path / "whole", kind, steps=6, cond_dropout=0.5)
    _train(tmp_path / "split", kind, steps=6, stop_after=3, cond_dropout=0.5)
    resumed = _train(tmp_path / "split", kind, steps=6, cond_dropout=0.5)
    assert resumed.resumed_from == 3
    assert resumed.losses == whole.losses
    for a, b in zip(whole.unet.state_dict().values(), resumed.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema_unet.parameters(), resumed.ema_unet.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_dropout_one_shows_only_the_null_condition_and_zero_never(tmp_path, kind):
    config, data = KINDS[kind]
    null_text = _text_data().text_embeddings[0]
    for rate in (0.0, 1.0):
        seen: list = []
        unet = _recorder(build_unet(config, seed=0), seen)
        _train(tmp_path / str(rate), kind, steps=5, cond_dropout=rate, unet=unet)
        assert len(seen) == 5
        for call in seen:
            if kind == "text":
                ctx = call["encoder_hidden_states"]
                is_null = torch.tensor([torch.equal(row, null_text) for row in ctx])
            else:
                is_null = call["class_labels"] == CLASSES - 1
            assert bool(is_null.all()) if rate == 1.0 else not bool(is_null.any())
    # the data's own conditions at rate 0: exactly the drawn items' captions
    batch = draw_conditioned_batch(data(), 4, 1000, 0.0, _null(kind), 0, 2)
    want = data().conditions(torch.randint(N, (4,), generator=torch.Generator().manual_seed(2)))
    assert all(torch.equal(batch[3][k], want[k]) for k in want)


def _null(kind):
    config, data = KINDS[kind]
    return null_condition(build_unet(config, seed=0), data())


def test_conditioned_draws_match_the_unconditional_draws():
    data = _text_data()
    x0, noise, t, _cond = draw_conditioned_batch(data, 4, 1000, 0.3, _null("text"), 5, 7)
    ref = draw_batch(data.latents, N, 4, (4, 8, 8), 1000, 5, 7)
    for a, b in zip((x0, noise, t), ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_distillation_from_a_conditional_teacher(tmp_path, kind):
    config, _data = KINDS[kind]
    teacher_seen: list = []
    teacher = _recorder(build_unet(config, seed=3).eval(), teacher_seen)
    both = DistillConfig(weight_output=1.0, weight_features=0.5, feature_points=["down", "mid", "up"])
    result = _train(tmp_path, kind, steps=4, teacher=teacher, distill=both, cond_dropout=0.5)
    assert [row[0] for row in result.loss_terms] == [1, 2, 3, 4]
    assert all(len(row) == 4 and row[2] > 0 and row[3] > 0 for row in result.loss_terms)
    # the teacher saw each step's conditioning (its width probe aside): real and null ones
    calls = [c for c in teacher_seen if len(next(iter(c.values()))) == 4]
    assert len(calls) == 4
    if kind == "class":
        labels = torch.cat([c["class_labels"] for c in calls])
        assert (labels == CLASSES - 1).any() and (labels < CLASSES - 1).any()


def test_mismatched_conditioning_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="takes class_labels but the data gives encoder_hidden_states"):
        train(
            build_unet(CLASS_UNET, 0),
            make_scheduler("ddpm", DDPM_SCHEDULER),
            _text_data(),
            FinetuneConfig(steps=1, batch_size=4),
            tmp_path,
            0,
            torch.device("cpu"),
        )
    bad = PixelConditions(torch.zeros(N, 3, 8, 8), EncodedData(count=N, labels=torch.full((N,), CLASSES - 1)))
    with pytest.raises(DataError, match="null class"):
        train(
            build_unet(CLASS_UNET, 0),
            make_scheduler("ddpm", DDPM_SCHEDULER),
            bad,
            FinetuneConfig(steps=1, batch_size=4),
            tmp_path,
            0,
            torch.device("cpu"),
        )
