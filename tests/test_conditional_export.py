"""A text-to-image pipeline's three graphs in ONNX (export/pipeline_graphs.py, export_unet with the
model's description), each proven against torch, and the whole prompt-to-image loop on ONNX Runtime
(deploy/onnx_text_to_image.py, the onnxruntime backend taking conditioning by keyword) against the
torch loop. The tiny Stable-Diffusion-layout model is built from configs in memory (never a download)."""

from __future__ import annotations

import onnx
import pytest
import torch

from compressor.clip_text import frozen_text_encoder
from compressor.components import DiffusionModel
from compressor.errors import ArtifactError, UserError
from compressor.guidance import class_conditioning, encode_prompts, model_decoder
from compressor.models import as_noise_predictor, build_unet
from compressor.sampling import denoise, initial_noise, make_scheduler
from deploy.onnx_text_to_image import text_to_image_parity
from deploy.runtimes import graph_session, load_backend, onnxruntime_backend
from export.onnx_export import check_onnx, export_unet, graph_part
from export.pipeline_graphs import (
    conditional_unet_parity,
    export_text_encoder,
    export_vae_decoder,
    text_encoder_parity,
    unscale_latents,
    vae_decoder_parity,
)
from rundir import layout
from tests.conftest import DDPM_SCHEDULER, TINY_COND_UNET, TINY_UNET, TINY_VAE

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TOKENS = 16
SD_SCHEDULER = {  # Stable Diffusion v1's schedule
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}  # fmt: skip
PROMPTS = ["a cat", "a dog on the moon, painted in oil with far too many words for sixteen tokens"]


@pytest.fixture(scope="module")
def sd_model(clip_tokenizer_folder) -> DiffusionModel:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_folder(TOKENS)), local_files_only=True
    )
    encoder = frozen_text_encoder(
        tokenizer, hidden_size=TINY_COND_UNET["cross_attention_dim"], layers=1, heads=2,
        intermediate_size=32, seed=1,
    )  # fmt: skip
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL.from_config(TINY_VAE).eval()
    unet = build_unet(TINY_COND_UNET, 0).eval()
    model = DiffusionModel(unet, SD_SCHEDULER, vae=vae, text_encoder=encoder.eval(), tokenizer=tokenizer)
    assert model.conditioning == "text" and model.sample_shape == (4, 8, 8)
    return model


@pytest.fixture(scope="module")
def graphs(sd_model, tmp_path_factory) -> dict:
    """The three fp32 graphs, at the run layout's paths."""
    run = tmp_path_factory.mktemp("run")
    paths = {
        "unet": layout.onnx_path(run, "dense", "fp32"),
        "text_encoder": layout.shared_onnx_path(run, "text_encoder", "fp32"),
        "vae_decoder": layout.shared_onnx_path(run, "vae_decoder", "fp32"),
    }
    export_unet(sd_model.unet, paths["unet"], "fp32", spec=sd_model.spec)
    export_text_encoder(sd_model.text_encoder, paths["text_encoder"], TOKENS, "fp32")
    export_vae_decoder(sd_model.vae, paths["vae_decoder"], "fp32")
    return paths


def _ids(model: DiffusionModel) -> torch.Tensor:
    return model.tokenizer(
        PROMPTS, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def _io(path) -> tuple[list[str], list[str]]:
    proto = onnx.load(str(path), load_external_data=False)
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]


def test_the_graphs_are_named_and_placed_as_documented(graphs):
    assert graphs["text_encoder"].as_posix().endswith("export/shared/text_encoder.fp32.onnx")
    assert graphs["vae_decoder"].as_posix().endswith("export/shared/vae_decoder.fp32.onnx")
    assert _io(graphs["text_encoder"]) == (["input_ids"], ["last_hidden_state"])
    assert _io(graphs["vae_decoder"]) == (["latent_sample"], ["sample"])
    assert _io(graphs["unet"]) == (["sample", "timestep", "encoder_hidden_states"], ["noise"])
    assert graph_part(graphs["text_encoder"]) == "text_encoder"
    assert graph_part(graphs["vae_decoder"]) == "vae_decoder"
    proto = onnx.load(str(graphs["text_encoder"]))
    ids = proto.graph.input[0].type.tensor_type
    assert ids.elem_type == onnx.TensorProto.INT64
    assert ids.shape.dim[0].dim_param and ids.shape.dim[1].dim_value == TOKENS  # dynamic batch
    latent = onnx.load(str(graphs["vae_decoder"])).graph.input[0].type.tensor_type.shape.dim
    assert latent[0].dim_param and [d.dim_value for d in latent[1:]] == [4, 8, 8]
    for path in graphs.values():
        check_onnx(path, against_manifest=False, inputs=_io(path)[0])
    with pytest.raises(ValueError, match="shared graph"):
        layout.shared_onnx_path(graphs["unet"].parent, "unet", "fp32")


def test_fp32_graphs_match_torch(sd_model, graphs):
    text = text_encoder_parity(sd_model.text_encoder, graphs["text_encoder"], _ids(sd_model))
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    vae = vae_decoder_parity(sd_model.vae, graphs["vae_decoder"], latents)
    unet = conditional_unet_parity(sd_model.unet, graphs["unet"], sd_model.spec)
    for report in (text, vae, unet):
        assert report.passed and report.max_abs_error < 1e-4 and report.min_cosine > 0.99999, report
    assert {c["batch"] for c in text.cases} == {1, 2} and "timestep" not in text.cases[0]
    assert {c["timestep"] for c in unet.cases} == {999, 500, 10}


def test_fp16_graphs_are_close(sd_model, tmp_path):
    te, vd, un = (tmp_path / f"{n}.fp16.onnx" for n in ("text_encoder", "vae_decoder", "unet"))
    export_text_encoder(sd_model.text_encoder, te, TOKENS, "fp16")
    facts = export_vae_decoder(sd_model.vae, vd, "fp16")
    export_unet(sd_model.unet, un, "fp16", spec=sd_model.spec)
    assert facts["traced_size"] == [4, 4] and facts["latent_shape"] == [4, 8, 8]  # traced small, pinned
    out = onnx.load(str(vd)).graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT  # fp32 at the edges
    assert [d.dim_value for d in out.shape.dim[1:]] == [3, 16, 16]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    reports = (
        text_encoder_parity(sd_model.text_encoder, te, _ids(sd_model), "fp16"),
        vae_decoder_parity(sd_model.vae, vd, latents, "fp16"),
        conditional_unet_parity(sd_model.unet, un, sd_model.spec, precision="fp16"),
    )
    for report in reports:
        assert report.max_abs_error < 5e-2 and report.min_cosine > 0.999, report


def test_the_vae_graph_decodes_unscaled_latents(sd_model, graphs):
    """The graph is vae.decode alone; unscale_latents is the guidance decoder's division."""
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    session = graph_session(graphs["vae_decoder"], "vae_decoder")
    z = unscale_latents(latents, sd_model.vae.config)
    ours = torch.from_numpy(session.run(["sample"], {"latent_sample": z.numpy()})[0])
    theirs = model_decoder(sd_model)(latents)
    assert float((ours - theirs).abs().max()) < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_onnx_runtime_guided_loop_matches_torch(sd_model, graphs, guidance):
    cond = encode_prompts(sd_model, PROMPTS, "blurry")
    sched = make_scheduler("ddim", sd_model.scheduler_config)
    noise = initial_noise(sd_model.sample_shape, [0, 1])
    kw = {"conditioning": cond, "guidance_scale": guidance}
    ref = denoise(as_noise_predictor(sd_model.unet), sched, noise.clone(), 4, **kw)
    backend = onnxruntime_backend(graphs["unet"], threads=1)
    assert backend.info["conditioning"] == ["encoder_hidden_states"]
    ours = denoise(backend.predict, sched, noise.clone(), 4, **kw)
    torch_backend = load_backend("torch", unet=sd_model.unet)
    theirs = denoise(torch_backend.predict, sched, noise.clone(), 4, **kw)
    assert float((ours - ref).abs().max()) < 1e-4
    assert torch.equal(theirs, ref)


def test_the_whole_text_to_image_parity(sd_model, graphs):
    result = text_to_image_parity(
        sd_model, graphs["unet"], graphs["text_encoder"], graphs["vae_decoder"], PROMPTS,
        negative_prompt="blurry", seed=7, steps=4, guidance_scale=3.0, threads=1,
    )  # fmt: skip
    assert result["torch"].shape == result["onnx"].shape == (2, 3, 16, 16)
    assert result["psnr"] > 60 and result["max_abs_error"] < 1e-4, (result["psnr"], result["max_abs_error"])


def test_conditioning_is_checked_against_the_graphs_inputs(sd_model, graphs, tmp_path):
    backend = onnxruntime_backend(graphs["unet"], threads=1)
    x, t = torch.randn(1, 4, 8, 8), torch.full((1,), 10)
    with pytest.raises(UserError, match="needs encoder_hidden_states"):
        backend.predict(x, t)
    with pytest.raises(UserError, match="takes no class_labels"):
        backend.predict(x, t, encoder_hidden_states=torch.zeros(1, TOKENS, 16), class_labels=t)
    plain = tmp_path / "unet.fp32.onnx"  # an unconditional graph: unchanged, refuses conditioning
    unet = build_unet(TINY_UNET, 0).eval()
    export_unet(unet, plain, "fp32")
    x = torch.randn(1, 3, 16, 16)
    predict = onnxruntime_backend(plain, threads=1).predict
    assert float((predict(x, t) - as_noise_predictor(unet)(x, t)).abs().max()) < 1e-4
    with pytest.raises(UserError, match="takes no encoder_hidden_states"):
        predict(x, t, encoder_hidden_states=torch.zeros(1, TOKENS, 16))
    with pytest.raises(ArtifactError, match="do not match"):  # a text encoder graph is no UNet
        onnxruntime_backend(graphs["text_encoder"])


def test_a_class_conditional_unet_runs_guided_on_onnx_runtime(tmp_path):
    model = DiffusionModel(build_unet({**TINY_UNET, "num_class_embeds": 5}, 0).eval(), dict(DDPM_SCHEDULER))
    path = tmp_path / "unet.fp32.onnx"
    export_unet(model.unet, path, "fp32", spec=model.spec)
    assert _io(path) == (["sample", "timestep", "class_labels"], ["noise"])
    report = conditional_unet_parity(model.unet, path, model.spec)
    assert report.passed and report.max_abs_error < 1e-4
    cond = class_conditioning(model, [0, 3])
    sched = make_scheduler("ddim", model.scheduler_config)
    noise = initial_noise(model.sample_shape, [0, 1])
    kw = {"conditioning": cond, "guidance_scale": 2.0}
    ref = denoise(as_noise_predictor(model.unet), sched, noise.clone(), 3, **kw)
    ours = denoise(load_backend("onnxruntime", file=path, threads=1).predict, sched, noise.clone(), 3, **kw)
    assert float((ours - ref).abs().max()) < 1e-4
