"""The model description (compressor/components.py): components, conditioning, shapes and the denoiser's
inputs on tiny diffusers/transformers models built from configs; pipeline folders written with
save_pretrained into tmp_path (never a download); the up-front refusal of models the stages would get
wrong; the export and the Triton config of a conditioned denoiser."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor.clip_text import frozen_text_encoder
from compressor.components import DiffusionModel, ModelSpec
from compressor.config import ModelConfig, config_from_mapping
from compressor.errors import ConfigError, ModelError
from compressor.models import build_unet, load_model, read_model_spec
from compressor.preflight import check_model_settings
from export.onnx_export import INTERFACES, export_unet
from tests.conftest import DDPM_SCHEDULER, SD_INDEX, TINY_COND_UNET, TINY_UNET, TINY_VAE, write_images

transformers = pytest.importorskip("transformers")

TOKENS = 12
CLASS_UNET = {**TINY_UNET, "num_class_embeds": 10}
INDEX = {  # its scheduler a DDPM one, no feature extractor
    **{k: v for k, v in SD_INDEX.items() if k != "feature_extractor"},
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL.from_config(TINY_VAE).eval()


def tiny_tokenizer(folder: Path):
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_text_encoder(tokenizer, hidden: int = 16):
    return frozen_text_encoder(tokenizer, hidden_size=hidden, layers=1, heads=2, intermediate_size=32)


@pytest.fixture
def tokenizer_folder(clip_tokenizer_folder) -> Path:
    """The project's CLIP tokenizer (trained on the tests' corpus), TOKENS long."""
    return clip_tokenizer_folder(TOKENS)


def write_pipeline(
    root: Path,
    parts: tuple[str, ...] = ("vae", "text_encoder", "tokenizer"),
    unet=TINY_COND_UNET,
    tokenizer: Path | None = None,
):
    """A diffusers pipeline folder: model_index.json, unet/, scheduler/ and the named components (the
    text encoder and tokenizer from the tokenizer folder ``tokenizer``)."""
    build_unet(unet, 0).save_pretrained(str(root / "unet"), safe_serialization=True)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
    index = {k: v for k, v in INDEX.items() if k not in ("vae", "text_encoder", "tokenizer") or k in parts}
    (root / "model_index.json").write_text(json.dumps(index))
    if "vae" in parts:
        tiny_vae().save_pretrained(str(root / "vae"), safe_serialization=True)
    if "text_encoder" in parts:
        encoder = tiny_text_encoder(tiny_tokenizer(tokenizer))
        encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    if "tokenizer" in parts:
        shutil.copytree(tokenizer, root / "tokenizer")
    return root


# -- descriptions ----------------------------------------------------------------------------------


def test_an_unconditional_pixel_model_is_its_denoiser_alone(tiny_unet):
    model = DiffusionModel(tiny_unet, dict(DDPM_SCHEDULER))
    assert model.components == ("unet",)
    assert (model.conditioning, model.latent, model.num_classes) == ("none", False, None)
    assert model.sample_shape == model.image_shape == (3, 16, 16)
    inputs = model.denoiser_inputs(2)
    assert inputs.names == INTERFACES["unet"][0] == ["sample", "timestep"]
    assert inputs["sample"].shape == (2, 3, 16, 16) and inputs["timestep"].dtype == torch.long
    assert inputs.dynamic_axes() == {"sample": {0: "batch"}, "timestep": {0: "batch"}}
    assert model.spec.refusal() == ""


def test_a_conditional_unet_alone_runs_with_the_null_context(tiny_cond_unet):
    """The product's path since the start: the cross-attention input is fixed inside the call."""
    model = DiffusionModel(tiny_cond_unet)
    assert model.conditioning == "none" and model.spec.cross_attention_dim == 16
    assert model.denoiser_inputs(1).names == ["sample", "timestep"]


def test_text_conditioning_describes_encoder_hidden_states(tiny_cond_unet, tokenizer_folder):
    tokenizer = tiny_tokenizer(tokenizer_folder)
    model = DiffusionModel(tiny_cond_unet, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer)
    assert model.conditioning == "text" and not model.latent
    inputs = model.denoiser_inputs(3)
    assert inputs.names == ["sample", "timestep", "encoder_hidden_states"]
    assert inputs["encoder_hidden_states"].shape == (3, TOKENS, 16)  # (B, tokens, cross_attention_dim)
    x = inputs.examples(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert tiny_cond_unet(**x).sample.shape == x["sample"].shape  # the described inputs fit the UNet
        prompts = ["a handwritten digit seven", "a cat", ""]
        ids = tokenizer(
            prompts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"
        )
        hidden = model.text_encoder(ids.input_ids).last_hidden_state
    words = tokenizer.convert_ids_to_tokens(ids.input_ids[0])
    assert words[:6] == [
        "<|startoftext|>",
        "a</w>",
        "handwritten</w>",
        "digit</w>",
        "seven</w>",
        "<|endoftext|>",
    ]
    assert len({tuple(row) for row in ids.input_ids.tolist()}) == 3  # the prompts really are tokenized
    assert hidden.shape == inputs["encoder_hidden_states"].shape  # what the text encoder makes
    assert not torch.allclose(hidden[0], hidden[1])
    assert "has text conditioning (text_encoder, tokenizer)" in model.spec.refusal()


def test_class_conditioning_describes_class_labels():
    unet = build_unet(CLASS_UNET, 0).eval()
    model = DiffusionModel(unet)
    assert (model.conditioning, model.num_classes) == ("class", 10)
    inputs = model.denoiser_inputs(12)
    assert inputs.names == ["sample", "timestep", "class_labels"]
    assert inputs["class_labels"].shape == (12,) and inputs["class_labels"].dtype == torch.long
    x = inputs.examples(torch.Generator().manual_seed(0))
    assert int(x["class_labels"].max()) < 10
    with torch.no_grad():
        assert unet(**x).sample.shape == x["sample"].shape
    assert model.spec.refusal() == "has class conditioning (num_class_embeds=10)"


def test_a_vae_makes_the_model_latent_and_decodes_to_the_image_shape(tiny_cond_unet):
    vae = tiny_vae()
    model = DiffusionModel(tiny_cond_unet, vae=vae)
    assert model.latent and model.spec.vae_scale_factor == 2 and model.spec.latent_scaling == 0.18215
    assert model.sample_shape == (4, 8, 8) and model.image_shape == (3, 16, 16)
    with torch.no_grad():
        assert tuple(vae.decode(torch.randn(1, *model.sample_shape)).sample.shape[1:]) == model.image_shape
        latents = vae.encode(torch.randn(1, *model.image_shape)).latent_dist.mean
    assert tuple(latents.shape[1:]) == model.sample_shape


def test_the_configs_alone_describe_what_the_modules_do(tiny_cond_unet, tokenizer_folder):
    """ModelSpec from JSON configs (preflight, a run's structure) agrees with the loaded modules'."""
    tokenizer = tiny_tokenizer(tokenizer_folder)
    loaded = DiffusionModel(
        tiny_cond_unet, vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer
    )
    configs = ModelSpec(
        TINY_COND_UNET, vae=TINY_VAE, text_encoder={"max_position_embeddings": TOKENS}, tokenizer={}
    )
    for fact in ("components", "conditioning", "latent", "sample_shape", "image_shape", "tokens"):
        assert getattr(configs, fact) == getattr(loaded.spec, fact), fact
    assert configs.denoiser_inputs(2) == loaded.denoiser_inputs(2)


def test_conditioning_that_cannot_be_described_is_a_model_error(tiny_unet):
    with pytest.raises(ModelError, match="takes no encoder_hidden_states"):
        ModelSpec(TINY_UNET, text_encoder={}).denoiser_inputs()
    with pytest.raises(ModelError, match="class_embed_type='identity'"):
        ModelSpec({**TINY_UNET, "class_embed_type": "identity"}).denoiser_inputs()


# -- loading ---------------------------------------------------------------------------------------


def test_a_pipeline_folder_loads_the_components_it_holds(tmp_path, tokenizer_folder):
    root = write_pipeline(tmp_path / "pipe", tokenizer=tokenizer_folder)
    model = load_model(ModelConfig(name=str(root)))
    assert model.components == ("unet", "vae", "text_encoder", "tokenizer")
    assert type(model.vae).__name__ == "AutoencoderKL" and not model.vae.training
    assert type(model.text_encoder).__name__ == "CLIPTextModel"
    assert model.tokenizer.model_max_length == TOKENS
    ids = model.tokenizer("a handwritten digit seven").input_ids
    assert model.tokenizer.convert_ids_to_tokens(ids)[1:5] == [
        "a</w>",
        "handwritten</w>",
        "digit</w>",
        "seven</w>",
    ]
    assert (model.conditioning, model.latent, model.image_shape) == ("text", True, (3, 16, 16))
    assert model.source == {"kind": "folder", "path": str(root)}
    assert torch.equal(model.vae.decoder.conv_out.weight, tiny_vae().decoder.conv_out.weight)
    spec = read_model_spec(ModelConfig(name=str(root)))  # the same description without the weights
    assert spec.components == model.components and spec.denoiser_inputs(2) == model.denoiser_inputs(2)


def test_only_the_components_present_are_loaded_and_random_init_seeds_them(tmp_path):
    root = write_pipeline(tmp_path / "pipe", parts=("vae",))
    model = load_model(ModelConfig(name=str(root), sample_size=4))
    assert model.components == ("unet", "vae") and model.conditioning == "none"
    assert model.sample_shape == (4, 4, 4) and model.image_shape == (3, 8, 8)  # model.sample_size applies
    a = load_model(ModelConfig(name=str(root), init="random"), seed=3)
    b = load_model(ModelConfig(name=str(root), init="random"), seed=3)
    assert a.components == ("unet", "vae") and a.source["kind"] == "random"
    assert torch.equal(a.vae.decoder.conv_out.weight, b.vae.decoder.conv_out.weight)
    assert not torch.equal(a.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_a_folder_without_model_index_is_the_unet_alone(tmp_path, tokenizer_folder):
    root = write_pipeline(tmp_path / "pipe", tokenizer=tokenizer_folder)
    (root / "model_index.json").unlink()
    assert load_model(ModelConfig(name=str(root))).components == ("unet",)


def test_unsupported_or_damaged_components_are_clear_errors(tmp_path):
    root = write_pipeline(tmp_path / "pipe", parts=("vae",))
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderTiny"]}))
    with pytest.raises(ModelError, match="vae is a AutoencoderTiny; only AutoencoderKL or VQModel is loaded"):
        load_model(ModelConfig(name=str(root)))
    (root / "model_index.json").write_text(json.dumps(index))
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="cannot load the vae"):
        load_model(ModelConfig(name=str(root)))
    (root / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="model_index.json: not valid JSON"):
        load_model(ModelConfig(name=str(root)))
    # a component the index lists but the folder lacks: one line naming it, up front too
    (root / "model_index.json").write_text(
        json.dumps({**index, "text_encoder": ["transformers", "CLIPTextModel"]})
    )
    with pytest.raises(ModelError, match=r"lists the text_encoder but .*text_encoder/config.json is missing"):
        load_model(ModelConfig(name=str(root)))
    with pytest.raises(ModelError, match="lists the text_encoder"):
        check_model_settings(_cfg(root), stages=["prune"])


def test_text_components_without_transformers_say_to_install_it(tmp_path, monkeypatch, tokenizer_folder):
    root = write_pipeline(tmp_path / "pipe", parts=("text_encoder",), tokenizer=tokenizer_folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ModelError, match="needs the transformers package; install it with `pip install"):
        load_model(ModelConfig(name=str(root)))


def test_a_shipped_architecture_is_the_unet_alone_and_a_hub_pipeline_brings_its_components(
    tmp_path, monkeypatch, tokenizer_folder
):
    """No download: the hub's snapshot is the local pipeline folder."""
    import huggingface_hub

    root = write_pipeline(tmp_path / "pipe", tokenizer=tokenizer_folder)
    asked = []

    def snapshot(hub_id, allow_patterns):
        asked.append(allow_patterns)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    arch = load_model(ModelConfig(name="sd-v1-unet"))  # its hub snapshot is Stable Diffusion's pipeline
    assert arch.components == ("unet",)
    assert arch.source == {"kind": "hub", "hub_id": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    hub = load_model(ModelConfig(name="someone/tiny-pipeline"))
    assert hub.components == ("unet", "vae", "text_encoder", "tokenizer")
    assert "*/*.txt" not in asked[0] and "*/*.txt" in asked[1]  # the tokenizer's merges.txt


# -- refused up front -------------------------------------------------------------------------------


def _cfg(model: Path, **model_keys):
    return config_from_mapping({"model": {"name": str(model), **model_keys}})


def test_preflight_refuses_a_text_conditioned_latent_pipeline_naming_the_stages(tmp_path, tokenizer_folder):
    root = write_pipeline(tmp_path / "pipe", tokenizer=tokenizer_folder)
    with pytest.raises(ModelError) as err:
        check_model_settings(_cfg(root), stages=["train", "prune", "samples", "distill_steps"])
    assert str(err.value) == (  # all but train take conditioned models
        f"model {root} has text conditioning (text_encoder, tokenizer) and works on latents (vae): the "
        "conditional latent pipeline is not supported by stage train yet; point model.name "
        "at an unconditional pixel-space model (a UNet without vae, text_encoder, tokenizer or "
        "num_class_embeds)"
    )
    check_model_settings(
        _cfg(root), stages=["prune", "finetune", "distill_steps", "samples", "quality", "bench"]
    )


def test_preflight_refuses_class_conditioning_and_passes_unconditional_models(tmp_path, model_folder):
    from tests.conftest import write_model_folder

    classes = write_model_folder(tmp_path / "classes", CLASS_UNET)
    with pytest.raises(ModelError, match=r"has class conditioning \(num_class_embeds=10\): the conditional "
                                         r"pipeline is not supported by stage train"):  # fmt: skip
        check_model_settings(_cfg(classes), stages=["train", "prune", "finetune"])
    check_model_settings(_cfg(classes), stages=["prune", "distill_steps"])  # they take conditioned models
    check_model_settings(_cfg(classes), frontier=True)  # so does the frontier
    check_model_settings(_cfg(model_folder), stages=["prune"])  # the product's models pass
    adherence = config_from_mapping(
        {"model": {"name": str(model_folder)}, "acceptance": {"min_adherence_ratio": 0.9}}
    )
    with pytest.raises(ConfigError, match="min_adherence_ratio is set but the model is unconditional"):
        check_model_settings(adherence, stages=["prune", "quality"])
    check_model_settings(_cfg("sd-v1-unet", init="random"), stages=["prune"])  # a conditional UNet alone


def test_the_cli_refuses_before_touching_the_run_directory(tmp_path, capsys):
    from pipeline.cli import main
    from tests.conftest import TINY_CONFIG, write_config

    root = write_pipeline(tmp_path / "pipe", parts=("vae",), unet=TINY_UNET)
    write_images(tmp_path / "images", 4)
    cfg = write_config(tmp_path / "c.yaml", TINY_CONFIG.format(model=root, data=tmp_path / "images"))
    run = tmp_path / "run"
    assert main([str(cfg), "--stages", "train,prune", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "works on latents (vae): the latent pipeline is not supported by stage train yet" in err
    assert not run.exists()
    assert main([str(cfg), "--stages", "prune,samples", "--run-dir", str(run)]) == 2
    assert "its UNet takes 3 input channels but its VAE's latents have 4" in capsys.readouterr().err
    assert not run.exists()


def test_the_loaded_model_is_refused_where_preflight_could_not_read_it(
    tmp_path, monkeypatch, tokenizer_folder
):
    """A hub id's configs are not read up front: the run's context refuses the loaded model."""
    from compressor import models
    from pipeline.context import RunContext, StageCall

    root = write_pipeline(tmp_path / "pipe", parts=("text_encoder", "tokenizer"), tokenizer=tokenizer_folder)
    monkeypatch.setattr(models, "read_model_spec", lambda cfg: None)
    check_model_settings(_cfg(root), stages=["train"])  # nothing to check without the configs
    run = RunContext(_cfg(root), tmp_path / "run")
    ctx = run.at_stage(StageCall("train", "key"))
    with pytest.raises(ModelError, match="has text conditioning .*not supported by stage train yet"):
        ctx.dense  # noqa: B018
    assert run.at_stage(StageCall("prune", "key")).dense.conditioning == "text"  # prune takes it


# -- export and serving of a conditioned denoiser -------------------------------------------------------


def _ort(path: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["noise"], {k: v.numpy() for k, v in feeds.items()})[0]


def test_a_text_conditioned_export_takes_encoder_hidden_states(tiny_cond_unet, tmp_path):
    spec = ModelSpec(TINY_COND_UNET, text_encoder={"max_position_embeddings": TOKENS})
    path = tmp_path / "unet.onnx"
    export_unet(tiny_cond_unet, path, "fp32", spec=spec)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    dims = proto.graph.input[2].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [TOKENS, 16]
    feeds = spec.denoiser_inputs(3).examples(torch.Generator().manual_seed(1), timestep=250)
    with torch.no_grad():
        want = tiny_cond_unet(**feeds).sample.numpy()
    assert np.abs(_ort(path, feeds) - want).max() < 1e-4  # the context is an input, not the null one
    full = tmp_path / "full.onnx"  # feature reuse's full pass takes the context too
    export_unet(tiny_cond_unet, full, "fp32", part="full", spec=spec)
    graph = onnx.load(str(full)).graph
    assert [i.name for i in graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in graph.output] == ["noise", "feature"]


def test_a_class_conditioned_export_takes_class_labels(tmp_path):
    unet = build_unet(CLASS_UNET, 0).eval()
    path = tmp_path / "unet.onnx"
    export_unet(unet, path, "fp32", spec=ModelSpec.of(unet))
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["sample", "timestep", "class_labels"]
    assert proto.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.INT64
    feeds = ModelSpec.of(unet).denoiser_inputs(4).examples(torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = unet(**feeds).sample.numpy()
    assert np.abs(_ort(path, feeds) - want).max() < 1e-4


def test_the_triton_unet_config_lists_the_described_inputs():
    from deploy.triton import RepoSettings, unet_config

    spec = ModelSpec(TINY_COND_UNET, text_encoder={"max_position_embeddings": TOKENS})
    text = unet_config(spec.sample_shape, "onnxruntime", RepoSettings(), spec.denoiser_inputs())
    assert 'name: "encoder_hidden_states"\n    data_type: TYPE_FP32\n    dims: [ 12, 16 ]' in text
    plain = unet_config((3, 16, 16), "onnxruntime", RepoSettings())
    assert plain == unet_config(
        (3, 16, 16), "onnxruntime", RepoSettings(), ModelSpec(TINY_UNET).denoiser_inputs()
    )
    try:
        from deploy.triton import parse_config

        assert [i.name for i in parse_config(text).input] == ["sample", "timestep", "encoder_hidden_states"]
    except ImportError:
        pass  # tritonclient (the serve extra) missing: the text is still checked above
