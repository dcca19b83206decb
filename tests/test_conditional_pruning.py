"""Diff-Pruning of conditional UNets with their conditioning: the Taylor pass calls the UNet with the
text context / class labels, the structural rules hold, MACs are counted per call with the
conditioning, and the pruned model reloads exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compressor.config import PruneConfig, config_from_mapping
from compressor.errors import ModelError
from compressor.models import build_unet, count_macs_params, example_inputs, predict_noise
from compressor.persist import dense_config, load_unet, probe_difference, save_unet
from compressor.preflight import check_model_settings
from compressor.pruning import attention_modules, head_dims, prune_unet
from compressor.pruning.structure import check_conditional_structure, conditioning_widths
from compressor.sampling import make_scheduler
from compressor.taylor import accumulate_taylor_grads, denoising_loss
from pipeline.runner import run_pipeline
from rundir import layout
from tests.conftest import DDPM_SCHEDULER, TINY_COND_UNET, TINY_UNET

TOKENS = 6
TINY_CLASS_UNET = {**TINY_UNET, "num_class_embeds": 5}


@pytest.fixture
def scheduler():
    return make_scheduler("ddpm", DDPM_SCHEDULER)


def _text_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    ctx = torch.randn(n, TOKENS, TINY_COND_UNET["cross_attention_dim"], generator=g)
    return x0, {"encoder_hidden_states": ctx}


def _class_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 16, 16, generator=g).clamp(-1, 1)
    return x0, {"class_labels": torch.arange(n) % TINY_CLASS_UNET["num_class_embeds"]}


def test_taylor_loss_uses_the_conditioning(scheduler, tiny_cond_unet):
    x0, cond = _text_batch()
    noise = torch.randn_like(x0)
    with torch.no_grad():
        with_ctx = denoising_loss(tiny_cond_unet, scheduler, x0, noise, 100, cond)
        null = denoising_loss(tiny_cond_unet, scheduler, x0, noise, 100)
        zeros = {"encoder_hidden_states": torch.zeros(4, 77, 16)}
        explicit_null = denoising_loss(tiny_cond_unet, scheduler, x0, noise, 100, zeros)
    assert float(with_ctx) != float(null)
    assert float(explicit_null) == float(null)  # no conditioning: the null context, as before


def test_diagnosed_taylor_pass_splits_the_conditioning_with_the_batch(scheduler, tiny_cond_unet):
    x0, cond = _text_batch()
    noise = torch.randn_like(x0)
    full = accumulate_taylor_grads(tiny_cond_unet, scheduler, x0, noise, [10, 200], 0.0, conditioning=cond)
    grads = [p.grad.clone() for p in tiny_cond_unet.parameters()]
    halves = accumulate_taylor_grads(
        tiny_cond_unet, scheduler, x0, noise, [10, 200], 0.0, diagnose=True, conditioning=cond
    )
    assert halves.losses == pytest.approx(full.losses, rel=1e-5)
    for a, p in zip(grads, tiny_cond_unet.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def _check_attention(
    unet: torch.nn.Module,
    dense_heads: dict[str, int],
    cross_dim: int | None,
    dims: dict[str, int] | None = None,
) -> int:
    """Every attention consistent; ``dims`` (the dense head dimensions) given: whole heads were pruned
    (fewer heads, each of the dense dimension), else the head count is the dense one."""
    cross = 0
    for name, attn in attention_modules(unet).items():
        if dims is None:
            assert attn.heads == dense_heads[name]  # heads kept, each the same head dim
        else:
            assert attn.to_q.out_features // attn.heads == dims[name] and attn.heads < dense_heads[name]
        assert attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features
        assert attn.to_q.out_features % attn.heads == 0
        assert attn.inner_dim == attn.to_q.out_features
        if attn.is_cross_attention:
            cross += 1
            assert attn.to_k.in_features == attn.to_v.in_features == cross_dim
    return cross


@pytest.mark.parametrize("kind", ["text", "class"])
def test_conditional_unet_prunes_with_its_conditioning_and_reloads(scheduler, tmp_path, kind):
    config = TINY_COND_UNET if kind == "text" else TINY_CLASS_UNET
    unet = build_unet(config, seed=0).eval()
    x0, cond = (_text_batch if kind == "text" else _class_batch)(4)
    tokens = TOKENS if kind == "text" else None
    dense = count_macs_params(unet, tokens)
    fixed = conditioning_widths(unet)
    heads = {n: a.heads for n, a in attention_modules(unet).items()}
    dims = head_dims(unet)
    cfg = PruneConfig(method="diff-pruning", ratio=0.3, batch_size=4, timestep_stride=250, threshold=0.0)
    result = prune_unet(unet, scheduler, x0, cfg, seed=0, conditioning=cond)
    assert result.taylor is not None and len(result.taylor.timesteps) == 4
    after = count_macs_params(unet, tokens)
    assert after[0] < dense[0] and after[1] < dense[1]
    assert conditioning_widths(unet) == fixed
    # a text UNet (cross-attention) loses whole heads (prune.attention_heads auto); the class UNet head dims
    cross = _check_attention(unet, heads, config.get("cross_attention_dim"), dims if kind == "text" else None)
    if kind == "text":
        assert cross == 4  # down.0 (1), mid (1), up.1 (2 layers): attn2 of each, pruned too
        assert unet.conv_in.in_channels == unet.conv_out.out_channels == 4
    else:
        assert unet.class_embedding.num_embeddings == 5
    with torch.no_grad():
        out = predict_noise(unet, x0, torch.full((4,), 50), **cond)
    assert out.shape == x0.shape and torch.isfinite(out).all()
    folder = tmp_path / "model"
    save_unet(unet, folder, dense_config(build_unet(config)), result.history, result.kept_widths)
    loaded, meta = load_unet(folder)
    assert probe_difference(folder, loaded) == 0.0
    assert ("attention_heads" in meta) == (kind == "text")  # the pruned head counts are saved
    assert {n: a.heads for n, a in attention_modules(loaded).items()} == {
        n: a.heads for n, a in attention_modules(unet).items()
    }
    with torch.no_grad():
        again = predict_noise(loaded, x0, torch.full((4,), 50), **cond)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_macs_are_counted_with_the_conditioning():
    text = build_unet(TINY_COND_UNET, seed=0)
    short, long = count_macs_params(text, 4)[0], count_macs_params(text, 77)[0]
    assert short < long  # the cross-attention's keys and values scale with the tokens
    assert count_macs_params(text)[0] == long  # 77 tokens by default, as before
    labelled = build_unet(TINY_CLASS_UNET, seed=0)
    x = example_inputs(labelled, 2)
    assert x["class_labels"].tolist() == [0, 0]
    macs, params = count_macs_params(labelled)  # counted with class_labels (without them it fails)
    plain = count_macs_params(build_unet(TINY_UNET, seed=0))
    assert macs == plain[0]  # an embedding lookup costs no MACs
    assert params == plain[1] + 5 * TINY_UNET["block_out_channels"][0] * 4  # the class table


def test_macs_target_reached_on_a_text_unet(scheduler):
    unet = build_unet(TINY_COND_UNET, seed=0).eval()
    x0, cond = _text_batch(2)
    dense = count_macs_params(unet, TOKENS)
    cfg = PruneConfig(method="magnitude", target_macs=0.7)
    prune_unet(unet, scheduler, x0, cfg, seed=0, conditioning=cond)
    assert count_macs_params(unet, TOKENS)[0] <= 0.7 * dense[0]


def test_broken_fixed_width_is_refused():
    unet = build_unet(TINY_COND_UNET, seed=0)
    fixed = conditioning_widths(unet)
    broken = copy.deepcopy(unet)
    attn = next(a for a in attention_modules(broken).values() if a.is_cross_attention)
    attn.to_k = torch.nn.Linear(8, attn.to_k.out_features, bias=False)
    with pytest.raises(RuntimeError, match="to_k.in_features: 16 -> 8"):
        check_conditional_structure(broken, fixed)
    check_conditional_structure(unet, fixed)


# -- the prune stage on a conditioned pipeline folder ---------------------------------------------------


def _run_cfg(model: Path, data: Path, **prune):
    return config_from_mapping(
        {
            "seed": 0,
            "device": "cpu",
            "model": {"name": str(model)},
            "data": {"source": str(data)},
            "prune": {
                "method": "diff-pruning",
                "ratio": 0.3,
                "timestep_stride": 250,
                "batch_size": 4,
                "eval_batch": 2,
                **prune,
            },
        }
    )


def test_the_prune_stage_prunes_a_text_conditioned_latent_pipeline(tmp_path, clip_tokenizer_folder):
    from tests.test_components import write_pipeline
    from tests.test_conditioning_data import captioned

    pipe = write_pipeline(tmp_path / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    cfg = _run_cfg(pipe, captioned(tmp_path / "images", 8))
    with pytest.raises(ModelError, match="not supported by stage train yet"):
        check_model_settings(cfg, stages=["train", "prune", "samples"])  # training from scratch refuses
    run = tmp_path / "run"
    record = run_pipeline(cfg, run, ["prune"])["prune"]
    m = record["metrics"]
    assert m["taylor_images"] == 4 and m["eval_images"] == 2 and len(m["timesteps_used"]) == 4
    assert m["params_after"] < m["params_before"] and m["macs_after"] < m["macs_before"]
    assert m["loss_dense"] is not None and m["loss_after_pruning"] is not None
    dense = build_unet(TINY_COND_UNET, seed=0)
    assert m["macs_before"] == count_macs_params(dense, TOKENS)[0]  # one call with the tokenizer's context
    assert layout.encoded_index(run).is_file()  # the Taylor batch came from the encoded cache
    folder = layout.model_dir(run, "prune")
    pruned, _ = load_unet(folder)
    assert probe_difference(folder, pruned) == 0.0
    for attn in attention_modules(pruned).values():
        if attn.is_cross_attention:
            assert attn.to_k.in_features == attn.to_v.in_features == TINY_COND_UNET["cross_attention_dim"]
    assert (pruned.conv_in.in_channels, pruned.conv_out.out_channels) == (4, 4)
    assert run_pipeline(cfg, run, ["prune"])["prune"]["metrics"] == m  # cached on a rerun


def test_the_prune_stage_prunes_a_class_conditioned_pixel_model(tmp_path):
    from tests.conftest import write_model_folder
    from tests.test_conditioning_data import class_tree

    model = write_model_folder(tmp_path / "model", TINY_CLASS_UNET)
    cfg = _run_cfg(model, class_tree(tmp_path / "classes", {"a": 4, "b": 4}))
    m = run_pipeline(cfg, tmp_path / "run", ["prune"])["prune"]["metrics"]
    assert m["params_after"] < m["params_before"] and m["taylor_images"] == 4
    pruned, _ = load_unet(layout.model_dir(tmp_path / "run", "prune"))
    assert pruned.class_embedding.num_embeddings == 5
    with torch.no_grad():
        out = predict_noise(
            pruned, torch.zeros(2, 3, 16, 16), torch.full((2,), 5), class_labels=torch.tensor([0, 1])
        )
    assert torch.isfinite(out).all()
