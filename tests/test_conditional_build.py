"""The build stage on conditional models: the engines a text-to-image run would build (its three graphs,
each with its profile and input shapes; build.shapes static or dynamic, build.sizes checked against the
downsampling and the graphs), the stage skipped with the reason where TensorRT cannot run,
build_run_engines over those graphs with TensorRT's build replaced (it cannot run here), and the
TensorRT sampler's refusals (a missing engine, a call outside a profile)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch

from compressor.config import BuildConfig
from compressor.errors import ArtifactError, ConfigError, UserError
from compressor.models import build_unet
from deploy import engine_info, sampler, tensorrt_backend
from deploy.engine_info import Profile
from deploy.runtimes import load_run_model, load_run_unet
from export.onnx_export import export_unet
from export.sized_graphs import export_run_sized_graphs
from pipeline.runner import run_pipeline
from pipeline.stages import build as build_stage
from rundir import layout
from rundir.records import read_record
from tests.conftest import TINY_COND_UNET, TINY_UNET, conditional_config, tensorrt_reason
from tests.test_components import CLASS_UNET, write_pipeline
from tests.test_conditioning_data import captioned

TOKENS = 6
GUIDANCE = 3.0


def _cfg(model: Path, data: Path) -> object:
    return conditional_config(
        model,
        data,
        sample={"guidance_scale": GUIDANCE},
        export={"precisions": ["fp32", "fp16"]},
        build={"precision": "fp16", "min_batch": 1, "opt_batch": 2, "max_batch": 4},
    )


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, clip_tokenizer_folder) -> tuple[object, Path, dict]:
    """A tiny SD-layout pipeline (CLIP text encoder, UNet2DConditionModel, VAE) pruned, finetuned for 2
    steps, exported, then the build stage."""
    root = tmp_path_factory.mktemp("sd-build")
    pipe = write_pipeline(root / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    cfg = _cfg(pipe, captioned(root / "images", 4))
    run = root / "run"
    records = run_pipeline(cfg, run, ["prune", "finetune", "export", "build"])
    return cfg, run, records


def _input_types(path: Path) -> dict[str, int]:
    proto = onnx.load(str(path), load_external_data=False)
    return {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}


@pytest.mark.skipif(not tensorrt_reason(), reason="TensorRT runs here: the stage builds instead of skipping")
def test_the_build_stage_of_a_text_to_image_run_is_skipped_with_the_reason_here(sd_run):
    _, run, records = sd_run
    record = read_record(run, "build")
    assert record is not None and record.status == "skipped"
    assert record.reason == tensorrt_backend.unavailable_reason() and record.reason
    assert record.metrics["engines"] == {} and not layout.shared_engine_path(run, "text_encoder").exists()
    planned = record.metrics["planned"]  # what a GPU host would build, with its profile shapes
    assert list(planned) == ["dense", "pruned", "shared.text_encoder", "shared.vae_decoder"]
    assert planned["shared.text_encoder"]["engine"] == "build/shared/text_encoder.plan"
    assert planned["shared.text_encoder"]["profile_shapes"] == {
        "input_ids": [[1, TOKENS], [2, TOKENS], [4, TOKENS]]
    }
    assert planned["dense"]["profile"] == {"min_batch": 2, "opt_batch": 4, "max_batch": 8}
    assert planned["dense"]["workspace_bytes"] == 8 << 30 and planned["dense"]["engine_bytes"] is None


def test_a_text_to_image_run_would_build_its_three_graphs_with_their_profiles(sd_run):
    cfg, run, _ = sd_run
    graphs = engine_info.run_graphs(run, cfg.build, None, cfg.sample.guidance_scale)
    by_key = {g.key: g for g in graphs}
    assert list(by_key) == ["dense", "pruned", "shared.text_encoder", "shared.vae_decoder"]
    images, rows = Profile(1, 2, 4), Profile(2, 4, 8)  # the guided UNet: uncond + cond rows per image
    width = TINY_COND_UNET["cross_attention_dim"]
    for model in ("dense", "pruned"):
        unet = by_key[model]
        assert unet.onnx == layout.onnx_path(run, model, "fp16")
        assert unet.engine == layout.engine_path(run, model)
        assert unet.profile == rows and unet.precision == "fp16"
        assert list(unet.inputs) == ["sample", "timestep", "encoder_hidden_states"]
        assert unet.inputs["encoder_hidden_states"] == (TOKENS, width)
        assert unet.inputs["sample"] == (TINY_COND_UNET["in_channels"], *unet.inputs["sample"][1:])
    text, vae = by_key["shared.text_encoder"], by_key["shared.vae_decoder"]
    assert text.onnx == layout.shared_onnx_path(run, "text_encoder", "fp16")
    assert (
        text.engine
        == layout.shared_engine_path(run, "text_encoder")
        == run / "build/shared/text_encoder.plan"
    )
    assert text.profile == images and text.inputs == {"input_ids": (TOKENS,)}
    assert _input_types(text.onnx)["input_ids"] == onnx.TensorProto.INT64  # the engine keeps int64 ids
    assert vae.engine == layout.shared_engine_path(run, "vae_decoder") and vae.profile == images
    assert vae.inputs == {"latent_sample": by_key["dense"].inputs["sample"]}
    assert len({g.engine for g in graphs}) == 4
    # the profile of every input: batch first, then the graph's own per-item dims
    shapes = by_key["dense"].profile.shapes(by_key["dense"].inputs)
    assert shapes["encoder_hidden_states"] == ((2, TOKENS, width), (4, TOKENS, width), (8, TOKENS, width))
    assert shapes["timestep"] == ((2,), (4,), (8,))
    assert text.profile.shapes(text.inputs)["input_ids"] == ((1, TOKENS), (2, TOKENS), (4, TOKENS))


def test_without_guidance_the_unet_profile_counts_images_and_int8_takes_the_fp16_shared_graphs(sd_run):
    cfg, run, _ = sd_run
    plain = engine_info.run_graphs(run, cfg.build, None, 1.0)
    assert {g.key: g.profile for g in plain} == dict.fromkeys(
        ["dense", "pruned", "shared.text_encoder", "shared.vae_decoder"], Profile(1, 2, 4)
    )
    fp32 = BuildConfig(precision="fp32", min_batch=2, opt_batch=3, max_batch=5)
    graphs = {g.key: g for g in engine_info.run_graphs(run, fp32, None, GUIDANCE)}
    assert graphs["dense"].profile == Profile(4, 6, 10)
    assert graphs["shared.vae_decoder"].onnx == layout.shared_onnx_path(run, "vae_decoder", "fp32")
    assert graphs["shared.vae_decoder"].profile == Profile(2, 3, 5)
    int8 = BuildConfig(precision="int8")
    with pytest.raises(ArtifactError, match=r"dense/unet.int8.onnx not found"):
        engine_info.run_graphs(run, int8, None, GUIDANCE)


def test_build_run_engines_builds_every_graph_and_records_each_engine(sd_run, monkeypatch):
    cfg, run, _ = sd_run
    built, lines = [], []

    def fake_build(src, dst, profile, shapes, precision, *rest):  # TensorRT itself cannot run here
        built.append((dst, profile, profile.shapes(shapes), precision))
        return {"build_seconds": 0.0, "precision": precision}

    monkeypatch.setattr(tensorrt_backend, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "build_engine", fake_build)
    engines, files = tensorrt_backend.build_run_engines(run, cfg.build, lines.append, None, GUIDANCE)
    assert list(engines) == ["dense", "pruned", "shared.text_encoder", "shared.vae_decoder"]
    assert [b[0] for b in built] == [
        layout.engine_path(run, "dense"),
        layout.engine_path(run, "pruned"),
        layout.shared_engine_path(run, "text_encoder"),
        layout.shared_engine_path(run, "vae_decoder"),
    ]
    assert layout.engine_info_path(layout.shared_engine_path(run, "vae_decoder")) in files
    assert built[0][1] == Profile(2, 4, 8) and built[2][1] == Profile(1, 2, 4)
    assert any("dense: unet.fp16.onnx" in line and "2..8: UNet rows, 2 per image" in line for line in lines)
    assert any(line.startswith("shared text encoder: text_encoder.fp16.onnx") for line in lines), lines


def test_a_class_conditional_graph_is_profiled_over_guided_rows_and_needs_no_shared_graph(tmp_path):
    unet = build_unet(CLASS_UNET, 0)
    for model in ("dense", "pruned"):
        export_unet(unet, layout.onnx_path(tmp_path, model, "fp32"), "fp32")
    cfg = BuildConfig(precision="fp32", min_batch=1, opt_batch=2, max_batch=4)
    graphs = engine_info.run_graphs(tmp_path, cfg, None, GUIDANCE)
    assert [g.key for g in graphs] == ["dense", "pruned"]
    assert list(graphs[0].inputs) == ["sample", "timestep", "class_labels"]
    assert graphs[0].inputs["class_labels"] == () and graphs[0].profile == Profile(2, 4, 8)
    assert engine_info.conditioned_unet(tmp_path, "fp32")
    assert not engine_info.conditioned_unet(tmp_path, "fp16")  # not exported at fp16


def test_a_text_unet_without_its_text_encoder_graph_is_refused(sd_run, tmp_path):
    _, run, _ = sd_run
    for model in ("dense", "pruned"):  # the UNet graphs alone, no export record listing the shared ones
        dst = layout.onnx_path(tmp_path, model, "fp32")
        dst.parent.mkdir(parents=True)
        shutil.copyfile(layout.onnx_path(run, model, "fp32"), dst)
    cfg = BuildConfig(precision="fp32", min_batch=1, opt_batch=2, max_batch=4)
    with pytest.raises(ArtifactError, match=r"shared/text_encoder.fp32.onnx not found; run the export stage"):
        engine_info.run_graphs(tmp_path, cfg, None, GUIDANCE)


def test_the_guidance_scale_keys_a_conditioned_build_only(sd_run, tmp_path):
    cfg, run, _ = sd_run
    assert build_stage.key_extra(SimpleNamespace(run_dir=run, cfg=cfg)) == {"sample.guidance_scale": GUIDANCE}
    unconditional = tmp_path / "run"
    export_unet(build_unet(TINY_UNET, 0), layout.onnx_path(unconditional, "dense", "fp16"), "fp16")
    assert build_stage.key_extra(SimpleNamespace(run_dir=unconditional, cfg=cfg)) == {}


def _image_side(run: Path) -> tuple[int, int]:
    """(image side in pixels, pixels per latent) of the tiny run, from its exported VAE decoder."""
    vae = layout.shared_onnx_path(run, "vae_decoder", "fp32")
    proto = onnx.load(str(vae), load_external_data=False)
    latent = proto.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    image = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    return image, image // latent


def test_static_shapes_put_every_engine_at_one_shape(sd_run):
    cfg, run, _ = sd_run
    static = BuildConfig(precision="fp16", min_batch=1, opt_batch=2, max_batch=4, shapes="static")
    graphs = {g.key: g for g in engine_info.run_graphs(run, static, None, GUIDANCE)}
    assert graphs["dense"].profile == graphs["pruned"].profile == Profile(4, 4, 4)  # 2 images x 2 rows
    assert graphs["shared.text_encoder"].profile == graphs["shared.vae_decoder"].profile == Profile(2, 2, 2)
    for graph in graphs.values():
        assert graph.profile.static
        for name, (lo, opt, hi) in graph.profile.shapes(graph.inputs).items():
            assert lo == opt == hi, (graph.key, name)
    assert not engine_info.run_graphs(run, cfg.build, None, GUIDANCE)[0].profile.static


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            {"shapes": "static", "sizes": [16, 16, 16]},
            "with build.shapes=static: static engines take one shape",
        ),
        ({"sizes": [32, 16, 64]}, "build.sizes: expected [min, opt, max] image sides"),
        ({"sizes": [16, 32]}, "build.sizes: expected [min, opt, max]"),
        ({"shapes": "fixed"}, "build.shapes: expected one of 'dynamic', 'static'"),
        ({"min_batch": 4, "opt_batch": 2}, "need 1 <= min_batch <= opt_batch <= max_batch"),
        ({"precision": "int8", "sizes": [16, 16, 32]}, "build.sizes with build.precision=int8: graphs"),
    ],
)
def test_build_shapes_settings_that_cannot_work_are_one_config_error(tmp_path, build, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        conditional_config(tmp_path / "pipe", tmp_path / "images", build=build)
    assert "\n" not in str(caught.value)


def test_a_size_range_is_checked_against_the_downsampling_and_the_graphs(sd_run):
    _, run, _ = sd_run
    side, factor = _image_side(run)
    multiple = factor * 2  # the tiny UNet halves its latents once (two down blocks)

    def sized(sizes):
        return BuildConfig(precision="fp32", min_batch=1, opt_batch=2, max_batch=4, sizes=sizes)

    with pytest.raises(ConfigError, match=rf"{side + 1} px is not a multiple of {multiple} .*use multiples"):
        engine_info.run_graphs(run, sized([side, side + 1, side + 2]), None, GUIDANCE)
    with pytest.raises(ConfigError, match=rf"{side + 1} px is not a multiple"):  # the stage, before TensorRT
        engine_info.check_sizes(run, sized([side, side + 1, side + 2]))
    engine_info.check_sizes(run, sized([side, side + multiple, 2 * side]))
    assert not engine_info.sized_graphs_needed(run, sized([side] * 3))
    assert engine_info.sized_graphs_needed(run, sized([side, side, 2 * side]))
    with pytest.raises(ArtifactError, match=r"graphs/dense.fp32.onnx not found: build.sizes needs the dense"):
        engine_info.run_graphs(run, sized([side, side, 2 * side]), None, GUIDANCE)
    graphs = {g.key: g for g in engine_info.run_graphs(run, sized([side] * 3), None, GUIDANCE)}
    assert graphs["dense"].onnx == layout.onnx_path(run, "dense", "fp32")  # the model's side: the export's
    latent = side // factor
    assert graphs["dense"].profile == Profile(2, 4, 8, (latent,) * 3)
    assert graphs["shared.vae_decoder"].profile.sizes == (latent,) * 3
    assert graphs["shared.text_encoder"].profile.sizes is None
    lo, _, hi = graphs["dense"].profile.shapes(graphs["dense"].inputs)["sample"]
    assert lo[0] == 2 and hi[0] == 8 and lo[2:] == hi[2:] == (latent, latent)


def _info(part: str, profile: Profile, inputs: dict) -> dict:
    """An engine info as the build writes it (what check_engine_request reads)."""
    shapes = {n: [list(s) for s in rows] for n, rows in profile.shapes(inputs).items()}
    return {
        "path": f"RUN/build/{part}",
        "profile": profile.record(),
        "inputs": inputs,
        "profile_shapes": shapes,
    }


def test_a_tensorrt_sampler_call_outside_an_engine_profile_is_one_line_naming_the_engine_and_the_fix():
    latent = (4, 8, 8)
    engines = {
        "unet": _info("unet", Profile(4, 4, 4), {"sample": latent, "timestep": ()}),  # static, 2 images
        "text_encoder": _info("text_encoder", Profile(2, 2, 2), {"input_ids": (TOKENS,)}),
        "vae_decoder": _info("vae_decoder", Profile(2, 2, 2), {"latent_sample": latent}),
    }
    sampler.check_engine_request(engines, latent, 4, 2, True)  # two batches of 2 images, 4 UNet rows each
    with pytest.raises(UserError) as caught:
        sampler.check_engine_request(engines, latent, 3, 2, True)  # the last batch has 1 image
    text = str(caught.value)
    assert text.startswith("tensorrt sampler: the unet engine RUN/build/unet takes sample")
    assert "[2, 4, 8, 8] (1 images x 2 rows under guidance)" in text and "build.shapes=static" in text
    assert "\n" not in text
    with pytest.raises(UserError, match=r"the text_encoder engine .* needs \[4, 6\] \(4 images\)"):
        sampler.check_engine_request({"text_encoder": engines["text_encoder"]}, latent, 4, 4, True)
    dynamic = {"unet": _info("unet", Profile(2, 4, 8), {"sample": latent, "timestep": ()})}
    sampler.check_engine_request(dynamic, latent, 9, 4, True)  # 4, 4 and 1 images: 8, 8 and 2 rows
    with pytest.raises(UserError, match=r"\(5 images x 2 rows under guidance\).*build.min_batch<=5<=build"):
        sampler.check_engine_request(dynamic, latent, 5, 8, True)
    sampler.check_engine_request(dynamic, latent, 5, 8, False)  # unguided: 5 rows fit
    with pytest.raises(UserError, match=r"needs \[2, 4, 16, 16\]"):  # another resolution
        sampler.check_engine_request(dynamic, (4, 16, 16), 1, 1, True)


def test_the_tensorrt_sampler_of_a_run_without_engines_names_every_missing_one(sd_run):
    _, run, _ = sd_run
    with pytest.raises(ArtifactError) as caught:
        sampler.load_sampler(run, backend="tensorrt")
    text = str(caught.value)
    for path in (
        layout.engine_path(run, "pruned"),
        layout.shared_engine_path(run, "text_encoder"),
        layout.shared_engine_path(run, "vae_decoder"),
    ):
        assert str(path) in text
    assert "compress-deploy build RUN" in text and "\n" not in text


def test_a_size_range_builds_from_graphs_of_any_side_that_compute_what_torch_does(sd_run, tmp_path):
    """The build's graphs of dynamic height and width (export.sized_graphs): the profiles of a size range
    over them, and the dense UNet and VAE decoder graphs on ONNX Runtime at a side the export never saw."""
    import onnxruntime as ort

    cfg, run, _ = sd_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    side, factor = _image_side(copy)
    sizes = [side, side + 2 * factor, 2 * side]  # latents 8, 10, 16: multiples of the UNet's 2
    build = BuildConfig(precision="fp32", min_batch=1, opt_batch=2, max_batch=4, sizes=sizes)
    dense = load_run_model(copy)
    unets = {"dense": dense.unet, "pruned": load_run_unet(copy, "pruned")}
    files = export_run_sized_graphs(copy, "fp32", unets, dense.spec, dense.vae)
    assert files == [layout.sized_onnx_path(copy, g, "fp32") for g in ("dense", "pruned", "vae_decoder")]
    graphs = {g.key: g for g in engine_info.run_graphs(copy, build, None, GUIDANCE)}
    latents = tuple(s // factor for s in sizes)
    for key, graph_name in (("dense", "dense"), ("pruned", "pruned"), ("shared.vae_decoder", "vae_decoder")):
        assert graphs[key].onnx == layout.sized_onnx_path(copy, graph_name, "fp32")
        assert graphs[key].profile.sizes == latents
    assert graphs["shared.text_encoder"].onnx == layout.shared_onnx_path(copy, "text_encoder", "fp32")
    sample = graphs["dense"].profile.shapes(graphs["dense"].inputs)["sample"]
    channels = TINY_COND_UNET["in_channels"]
    assert sample == ((2, channels, 8, 8), (4, channels, 10, 10), (8, channels, 16, 16))
    assert graphs["shared.vae_decoder"].profile.shapes(graphs["shared.vae_decoder"].inputs)["latent_sample"][
        2
    ] == (
        4,
        channels,
        16,
        16,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, channels, 10, 10), generator=g)  # the opt side: traced at 8, exported for any
    t = torch.tensor([10, 700])
    context = torch.randn((2, TOKENS, TINY_COND_UNET["cross_attention_dim"]), generator=g)
    with torch.no_grad():
        want = dense.unet(x, t, encoder_hidden_states=context).sample
        image = dense.vae.decode(x[:1]).sample
    unet = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.numpy()}
    assert float((torch.from_numpy(unet.run(None, feeds)[0]) - want).abs().max()) < 1e-4
    vae = ort.InferenceSession(str(files[2]), providers=["CPUExecutionProvider"])
    decoded = torch.from_numpy(vae.run(None, {"latent_sample": x[:1].numpy()})[0])
    assert decoded.shape == image.shape and decoded.shape[-1] == 10 * factor
    assert float((decoded - image).abs().max()) < 1e-4


def test_seeds_give_each_image_its_own_seed_and_prompt(sd_run):
    _, run, _ = sd_run
    t2i = sampler.load_sampler(run, backend="onnxruntime")
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    got = t2i(steps=2, prompts=prompts, seeds=[3, 7, 8])  # runs [3] and [7, 8]: one call each
    first = t2i(num_images=1, steps=2, seed=3, prompts=prompts)
    rest = t2i(num_images=2, steps=2, seed=7, prompts=prompts[1:] + prompts[:1])  # image 1 takes prompt 1
    assert torch.allclose(got, torch.cat([first, rest]), atol=1e-6)
    with pytest.raises(UserError, match=r"seeds \[\]: give a non-empty list of integers >= 0"):
        t2i(steps=2, prompts=prompts, seeds=[])


def test_files_the_build_command_rebuilds_are_relisted_in_the_manifest(sd_run, tmp_path):
    from pipeline.commands.build_engines import relist
    from rundir.artifacts import verify_against_manifest

    _, run, _ = sd_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    listed = layout.onnx_path(copy, "dense", "fp32")  # as an engine the build stage listed would be
    listed.write_bytes(listed.read_bytes() + b"rebuilt")
    with pytest.raises(ArtifactError, match="differs from"):
        verify_against_manifest(listed)
    relist(copy, [listed, copy / "build" / "not-listed.plan"])
    verify_against_manifest(listed)
