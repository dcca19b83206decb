"""The export and parity stages on conditional models: a tiny Stable-Diffusion-layout pipeline (text
encoder, UNet2DConditionModel, VAE) and a class-conditional pixel UNet, through run_pipeline. The UNet
graphs take the conditioning, the text encoder and VAE decoder graphs are exported once (shared), and
parity records a row per graph (component) plus the whole prompt-to-image call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compressor.components import DiffusionModel
from compressor.guidance import class_conditioning
from compressor.models import build_unet
from compressor.sampling import make_scheduler
from export.quantize import calibration_inputs
from pipeline.runner import run_pipeline
from rundir import layout
from rundir.records import ParityMetrics, read_metrics, read_record
from tests.conftest import DDPM_SCHEDULER, TINY_UNET, conditional_config, write_model_folder

TOKENS = 6


def _cfg(model: Path, data: Path, precisions=("fp32", "fp16"), **export) -> object:
    return conditional_config(
        model, data,
        export={"precisions": list(precisions), "calibration_images": 2, "calibration_steps": 3, **export},
        parity={"batches": [1, 2], "timesteps": [10, 500], "sampler_images": 2, "sampler_steps": 3,
                "median_abs_int8": 10.0, "min_psnr_int8": 0.0},
    )  # fmt: skip


def _inputs(path: Path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _by_component(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row.get("component", "-"), []).append(row)
    return out


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, clip_tokenizer_folder) -> tuple[Path, dict]:
    from tests.test_components import write_pipeline
    from tests.test_conditioning_data import captioned

    root = tmp_path_factory.mktemp("sd")
    pipe = write_pipeline(root / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    run = root / "run"
    records = run_pipeline(
        _cfg(pipe, captioned(root / "images", 4)), run, ["prune", "finetune", "export", "parity"]
    )
    return run, records


def test_a_text_to_image_run_exports_its_three_graphs(sd_run):
    run, records = sd_run
    files = records["export"]["metrics"]["files"]
    for model in ("dense", "pruned"):
        for precision in ("fp32", "fp16"):
            path = layout.onnx_path(run, model, precision)
            assert _inputs(path) == ["sample", "timestep", "encoder_hidden_states"]
            hidden = onnx.load(str(path)).graph.input[2].type.tensor_type.shape.dim
            assert [d.dim_value for d in hidden[1:]] == [TOKENS, 16]  # the tokenizer's length, the text width
    for precision in ("fp32", "fp16"):
        text = layout.shared_onnx_path(run, "text_encoder", precision)
        vae = layout.shared_onnx_path(run, "vae_decoder", precision)
        assert text.as_posix().endswith(f"export/shared/text_encoder.{precision}.onnx")
        assert _inputs(text) == ["input_ids"] and _inputs(vae) == ["latent_sample"]
        assert files[f"text_encoder.{precision}"]["path"] == f"shared/text_encoder.{precision}.onnx"
        assert files[f"text_encoder.{precision}"]["tokens"] == TOKENS
        assert files[f"vae_decoder.{precision}"]["latent_shape"] == [4, 8, 8]
        for graph in ("text_encoder", "vae_decoder"):
            assert f"export/shared/{graph}.{precision}.onnx" in records["export"]["artifacts"]
    assert not list(layout.stage_dir(run, "export").glob("shared/*int8*"))


def test_a_text_to_image_run_proves_each_graph_and_the_whole_call(sd_run):
    run, records = sd_run
    m = records["parity"]["metrics"]
    rows = _by_component(m["results"])
    assert set(rows) == {"unet", "text_encoder", "vae_decoder", "text_to_image"}
    assert {(r["model"], r["precision"]) for r in rows["unet"]} == {
        (model, p) for model in ("dense", "pruned") for p in ("fp32", "fp16")
    }
    for graph in ("text_encoder", "vae_decoder"):
        assert [(r["model"], r["precision"]) for r in rows[graph]] == [("shared", "fp32"), ("shared", "fp16")]
    for row in rows["unet"] + rows["text_encoder"] + rows["vae_decoder"]:
        assert row["passed"] and {c["batch"] for c in row["cases"]} >= {1}
        if row["precision"] == "fp32":
            assert row["max_abs_error"] < 1e-4 and row["min_cosine"] > 0.9999, row
    assert {c["timestep"] for c in rows["unet"][0]["cases"]} == {10, 500}
    whole = {(r["model"], r["precision"]): r for r in rows["text_to_image"]}
    assert set(whole) == {(model, p) for model in ("dense", "pruned") for p in ("fp32", "fp16")}
    fp32 = whole[("dense", "fp32")]
    assert fp32["part"] == "prompt -> image (text encoder, UNet, VAE decoder graphs)"
    assert fp32["graphs"] == [
        "export/shared/text_encoder.fp32.onnx",
        "export/dense/unet.fp32.onnx",
        "export/shared/vae_decoder.fp32.onnx",
    ]
    assert fp32["sampler_psnr_db"] > 60 and fp32["passed"] and fp32["guidance_scale"] == 3.0
    assert whole[("pruned", "fp16")]["graphs"][0] == "export/shared/text_encoder.fp16.onnx"
    assert m["text_to_image_psnr_db"]["dense.fp32"] == fp32["sampler_psnr_db"]
    # the gate reads the per-graph fp32 rows only, as the check stage does
    per_graph = [r for r in m["results"] if r["component"] != "text_to_image"]
    assert m["max_abs_error_fp32"] == max(r["max_abs_error"] for r in per_graph if r["precision"] == "fp32")
    parsed = read_metrics(run, "parity")
    assert isinstance(parsed, ParityMetrics) and parsed.max_abs_error_fp32 < 1e-4


def test_a_class_conditional_pixel_run_exports_int8_and_proves_it(tmp_path):
    from tests.test_conditioning_data import class_tree

    model = write_model_folder(tmp_path / "model", {**TINY_UNET, "num_class_embeds": 5})
    cfg = _cfg(model, class_tree(tmp_path / "classes", {"a": 4, "b": 4}), ("fp32", "int8"))
    run = tmp_path / "run"
    records = run_pipeline(cfg, run, ["prune", "finetune", "export", "parity"])
    for name in ("dense", "pruned"):
        for precision in ("fp32", "int8"):
            assert _inputs(layout.onnx_path(run, name, precision)) == ["sample", "timestep", "class_labels"]
    files = records["export"]["metrics"]["files"]
    assert set(files) == {"dense.fp32", "dense.int8", "pruned.fp32", "pruned.int8"}  # no text encoder, no VAE
    assert not (layout.stage_dir(run, "export") / "shared").exists()
    # calibrated guided: each step's batch doubled (the null class beside the labels), 3 steps x 2 images
    assert files["dense.int8"]["calibration_inputs"] == 3 * 2 * 2
    assert files["dense.int8"]["calibration"] == {
        "sampler": "ddim:3", "images": 2, "guidance_scale": 3.0, "unet_batch": "2x",
        "distilled_guidance_scale": None, "prompts": 2,
    }  # fmt: skip
    rows = _by_component(read_record(run, "parity").metrics["results"])
    assert set(rows) == {"unet", "text_to_image"}
    assert {r["conditioning"] for r in rows["unet"]} == {"class"}
    whole = {(r["model"], r["precision"]): r for r in rows["text_to_image"]}
    assert whole[("dense", "fp32")]["part"] == "class -> image (UNet graph)"
    assert whole[("dense", "fp32")]["sampler_psnr_db"] > 60
    assert whole[("pruned", "int8")]["graphs"] == ["export/pruned/unet.int8.onnx"]


def test_feature_reuse_of_a_conditional_model_exports_and_proves_both_passes(tmp_path):
    from tests.test_conditioning_data import class_tree

    model = write_model_folder(tmp_path / "model", {**TINY_UNET, "num_class_embeds": 5})
    cfg = _cfg(model, class_tree(tmp_path / "classes", {"a": 4}), ("fp32",), feature_reuse=True)
    run = tmp_path / "run"
    records = run_pipeline(cfg, run, ["prune", "export", "parity"])
    files = records["export"]["metrics"]["files"]
    for name in ("dense", "pruned"):
        full, shallow = (layout.onnx_path(run, name, "fp32", part, 0) for part in ("full", "shallow"))
        assert _inputs(full) == ["sample", "timestep", "class_labels"]
        assert _inputs(shallow) == ["sample", "timestep", "class_labels", "feature"]
        assert files[f"{name}.fp32.full"]["cache_level"] == 0
    rows = [r for r in records["parity"]["metrics"]["results"] if "pass" in r.get("part", "")]
    assert {(r["model"], r["part"]) for r in rows} == {
        (name, f"{part} pass (level 0)") for name in ("dense", "pruned") for part in ("full", "shallow")
    }
    for row in rows:  # per call fed the labels, and the guided sampler reusing features (interval 3)
        assert row["passed"] and row["conditioning"] == "class" and row["max_abs_error"] < 1e-4, row
        assert row["sampler_cache_interval"] == 3 and row["sampler_psnr_db"] > 60


def test_calibration_records_the_guided_conditioning():
    unet = build_unet({**TINY_UNET, "num_class_embeds": 5}, 0).eval()
    model = DiffusionModel(unet, dict(DDPM_SCHEDULER))
    cond = class_conditioning(model, [0, 3])
    sched = make_scheduler("ddim", DDPM_SCHEDULER)
    feeds = calibration_inputs(unet, sched, (3, 16, 16), 2, 2, conditioning=cond, guidance_scale=2.0)
    assert len(feeds) == 2 and set(feeds[0]) == {"sample", "timestep", "class_labels"}
    assert feeds[0]["sample"].shape == (4, 3, 16, 16)  # unconditional rows first, then the labels
    assert feeds[0]["class_labels"].tolist() == [4, 4, 0, 3] and feeds[0]["class_labels"].dtype == np.int64
    plain = calibration_inputs(unet, sched, (3, 16, 16), 2, 2, conditioning=cond, guidance_scale=1.0)
    assert plain[0]["sample"].shape == (2, 3, 16, 16) and plain[0]["class_labels"].tolist() == [0, 3]
    assert feeds[0]["timestep"][0] > feeds[1]["timestep"][0]  # one feed per step, noisiest first
