"""The edge bundle of a text-to-image run: its tokenizer tokenizes as Stable Diffusion does, `generate`
gives the images of `sample` on ONNX Runtime, `check` re-decides the whole call's parity and the build
host's gates, tampering is refused, and it all runs where only numpy, onnxruntime and tokenizers are."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.encoded_cache import padded_tokens
from compressor.errors import UserError
from deploy.conditional_bundle import bundle_tokenizer, checked_token_ids, probe_texts
from deploy.edge_bundle import BundleSpec, make_bundle
from pipeline.cli import main
from pipeline.runner import run_pipeline
from tests.conftest import conditional_config, text_to_image_folders
from tests.test_bundle import _runtime

PROMPTS = ["image 1", "image 2"]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, clip_tokenizer_folder):
    """A tiny text-to-image run through prune, finetune, export, parity and quality (fp32 graphs)."""
    root = tmp_path_factory.mktemp("t2i-bundle")
    pipe, data = text_to_image_folders(root, clip_tokenizer_folder)
    small = {
        "quality": {"num_samples": 4, "steps": 3, "resamples": 20, "compare_pruned": False,
                    "compare_raw": False},
        "parity": {"batches": [1], "timesteps": [0, 999], "sampler_steps": 2, "sampler_images": 2},
        "export": {"precisions": ["fp32"]},
    }  # fmt: skip
    run = root / "run"
    run_pipeline(
        conditional_config(pipe, data, **small), run, ["prune", "finetune", "export", "parity", "quality"]
    )
    return run


def _clip(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_the_bundled_tokenizer_tokenizes_as_padded_tokens(clip_tokenizer_folder, tmp_path):
    """Converted from CLIP's vocab.json + merges.txt (no tokenizer.json), then read back from a
    tokenizer.json: the ids of every text, odd and over-long ones too, are padded_tokens' ids."""
    for length in (6, 16):
        hf = _clip(clip_tokenizer_folder(length))
        assert not (Path(hf.name_or_path) / "tokenizer.json").exists()
        tok = bundle_tokenizer(hf)
        texts = probe_texts(["a handwritten digit seven", "a cat on a mat"], "blurry")
        texts += ["a handwritten digit seven " * 30, "UNSEEN words, ZEBRA-like!", "\t\n  spaces \u00a0 "]
        ids = checked_token_ids(tok, hf, texts)
        expected = padded_tokens(hf, texts).input_ids.numpy()
        assert ids.shape == (len(texts), length) and np.array_equal(ids, expected)
        long = tok.encode("a handwritten digit seven " * 30).ids
        assert long[0] == hf.bos_token_id and long[-1] == hf.eos_token_id and len(long) == length
        folder = tmp_path / f"with-json-{length}"  # a pipeline whose tokenizer ships its tokenizer.json
        shutil.copytree(clip_tokenizer_folder(length), folder)
        tok.save(str(folder / "tokenizer.json"))
        (folder / "vocab.json").unlink()
        again = bundle_tokenizer(type("T", (), {**{k: getattr(hf, k) for k in (
            "model_max_length", "pad_token_id", "pad_token")}, "name_or_path": str(folder)})())  # fmt: skip
        assert np.array_equal(np.array([e.ids for e in again.encode_batch(texts)]), expected)


def test_a_text_to_image_bundle_generates_the_images_of_sample_and_passes_its_check(t2i_run, tmp_path):
    out = tmp_path / "bundle"
    assert main(["bundle", str(t2i_run), str(out), "--steps", "3", "--batch", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["conditioning"] == "text" and manifest["requires"] == [
        "numpy",
        "onnxruntime",
        "tokenizers",
    ]
    assert set(manifest["shared"]) == {"text_encoder", "vae_decoder"}
    files = {"tokenizer/tokenizer.json", "pipeline.json", "graphs/shared/text_encoder.fp32.onnx",
             "graphs/shared/vae_decoder.fp32.onnx", "graphs/model/unet.fp32.onnx"}  # fmt: skip
    assert files <= set(manifest["files"])
    assert manifest["sample_shape"] == [4, 8, 8] and manifest["image_shape"] == [3, 16, 16]
    pipe = json.loads((out / "pipeline.json").read_text())
    assert pipe["guidance_scale"] == 3.0 and pipe["scaling_factor"] > 0 and pipe["max_length"] == 6
    seen = []
    for extra in ([], ["--negative-prompt", "image 3", "--guidance-scale", "5", "--steps", "2"]):
        b, s = tmp_path / "b.npy", tmp_path / "s.npy"
        prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
        done = _runtime(
            out, "generate", *prompts, "--seed", "3", "--num-images", "3", "--out", str(b), *extra
        )
        assert done.returncode == 0, done.stderr
        assert "3 images for 2 prompts" in done.stdout
        argv = ["sample", str(t2i_run), "--backend", "onnxruntime", "--steps", "3", "--seed", "3",
                "--num-images", "3", *prompts, "--out", str(s), *extra]  # fmt: skip
        assert main(argv) == 0
        ours, theirs = np.load(b), np.load(s)
        assert ours.shape == theirs.shape == (3, 3, 16, 16) and np.abs(ours - theirs).max() <= 1e-5
        seen.append(ours)
    assert not np.allclose(*seen)  # the flags reach the sampler
    record = tmp_path / "check.json"
    done = _runtime(out, "check", "--repeat", "2", "--sampler-repeat", "1", "--record", str(record))
    assert done.returncode == 0, done.stdout + done.stderr
    whole = "whole call (prompt -> image)"
    for part in ("PASS tokenizer", "PASS text encoder parity", "PASS unet parity", "PASS VAE decoder parity",
                 "PASS whole call parity (max abs", "PASS whole call parity (prompt -> image PSNR dB",
                 f"{whole} latency per image", f"{whole} speed-up"):  # fmt: skip
        assert part in done.stdout, (part, done.stdout)
    assert "build host" in done.stdout  # the parity stage's own whole-call PSNR beside the device's
    facts = json.loads(record.read_text())
    assert facts["verdict"] == "pass" and facts["batch"] == 2
    info = _runtime(out, "info")
    assert (
        info.returncode == 0
        and "conditioning: text (tokenizer -> text encoder -> UNet -> VAE decoder)" in info.stdout
    )


def test_a_student_distilled_at_a_fixed_scale_is_sampled_on_the_conditional_half(
    t2i_run, tmp_path, monkeypatch
):
    """A guided student's schedule says the scale it was distilled at: the bundle samples it with one UNet
    call a step on the conditional rows (guiding it again would apply the scale twice), whatever
    --guidance-scale says, as compress-deploy sample does."""
    import deploy.edge_bundle

    monkeypatch.setattr(deploy.edge_bundle, "distilled_scale", lambda config: 3.0)
    out = tmp_path / "bundle"
    make_bundle(t2i_run, out, BundleSpec(steps=3, with_dense=False))
    assert json.loads((out / "scheduler.json").read_text())["distilled_guidance_scale"] == 3.0
    b, s = tmp_path / "b.npy", tmp_path / "s.npy"
    done = _runtime(out, "generate", "--prompt", PROMPTS[0], "--num-images", "2", "--out", str(b))
    assert done.returncode == 0, done.stderr
    argv = ["sample", str(t2i_run), "--backend", "onnxruntime", "--steps", "3", "--prompt", PROMPTS[0],
            "--num-images", "2", "--guidance-scale", "1", "--out", str(s)]  # fmt: skip
    assert main(argv) == 0
    assert np.abs(np.load(b) - np.load(s)).max() <= 1e-5


def test_bad_input_tampering_and_failed_gates_exit_2_3_and_4(t2i_run, tmp_path):
    out = tmp_path / "bundle"
    make_bundle(t2i_run, out, BundleSpec(steps=2, with_dense=False), {"max_image_ms": 1e-6})
    record = str(tmp_path / "r.json")
    done = _runtime(out, "check", "--repeat", "1", "--sampler-repeat", "1", "--record", record)
    assert done.returncode == 3 and "FAIL whole call (prompt -> image) latency per image" in done.stdout
    for args, says in (([], "pass --prompt"), (["--prompt", "x", "--steps", "77"], "--steps 77"),
                       (["--prompt", "x", "--guidance-scale", "nan"], "--guidance-scale nan")):  # fmt: skip
        done = _runtime(out, "generate", *args, "--out", str(tmp_path / "x.npy"))
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    for name in ("tokenizer/tokenizer.json", "graphs/shared/text_encoder.fp32.onnx", "pipeline.json"):
        path = out / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        done = _runtime(out, "check")
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            f"error: {path} does not match its sha256 in manifest.json; the bundle was altered"
        ]
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    unsure = {"name": "min_adherence_ratio", "measured": 0.95, "interval": [0.85, 1.02], "limit": 0.9,
              "direction": ">=", "samples": 40, "level": 0.95, "sampler": "ddim 2 steps"}  # fmt: skip
    out4 = tmp_path / "inconclusive"
    make_bundle(t2i_run, out4, BundleSpec(steps=2, with_dense=False), {"quality": [unsure]})
    done = _runtime(out4, "check", "--repeat", "1", "--sampler-repeat", "1", "--record", record)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "INCONCLUSIVE min_adherence_ratio: 0.95, 95% interval [0.85, 1.02] >= 0.9" in done.stdout
    with pytest.raises(UserError, match="feature reuse is not supported with conditioning"):
        make_bundle(t2i_run, tmp_path / "reuse", BundleSpec(steps=2, cache_interval=2))


@pytest.mark.slow
def test_the_bundle_runs_in_a_venv_with_only_numpy_onnxruntime_and_tokenizers(t2i_run, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "numpy", "onnxruntime", "tokenizers"],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    for name in ("torch", "diffusers", "transformers", "compressor"):
        probe = subprocess.run([python, "-c", f"import {name}"], capture_output=True, text=True, cwd=tmp_path)
        assert probe.returncode != 0, f"{name} is importable in the bare venv"
    out = tmp_path / "bundle"
    make_bundle(t2i_run, out, BundleSpec(steps=3, batch=2))
    args = ["--prompt", PROMPTS[1], "--seed", "0", "--num-images", "2", "--out", str(tmp_path / "b.npy")]
    done = _runtime(out, "generate", *args, python=python)
    assert done.returncode == 0, done.stderr
    argv = ["sample", str(t2i_run), "--backend", "onnxruntime", "--steps", "3", "--prompt", PROMPTS[1],
            "--num-images", "2", "--out", str(tmp_path / "s.npy")]  # fmt: skip
    assert main(argv) == 0
    assert np.abs(np.load(tmp_path / "b.npy") - np.load(tmp_path / "s.npy")).max() <= 1e-5
    record = str(tmp_path / "r.json")
    done = _runtime(out, "check", "--repeat", "2", "--sampler-repeat", "1", "--record", record, python=python)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_class_conditioned_bundle_takes_class_indices(tmp_path):
    """A class-conditioned pixel model: --prompt is a class index (the null class is the table's last
    row); the images are sample's, and a class outside the model's is refused in one line."""
    from tests.conftest import TINY_UNET, write_model_folder
    from tests.test_conditioning_data import class_tree

    model = write_model_folder(tmp_path / "model", {**TINY_UNET, "num_class_embeds": 3})
    data = class_tree(tmp_path / "classes", {"a": 4, "b": 4})
    cfg = conditional_config(model, data, sample={"prompts": ["1", "0"]}, export={"precisions": ["fp32"]})
    run = tmp_path / "run"
    run_pipeline(cfg, run, ["prune", "samples", "export"])  # the pruned model is the final one
    out = tmp_path / "bundle"
    manifest = make_bundle(run, out, BundleSpec(steps=3, with_dense=False))
    assert manifest["conditioning"] == "class" and "tokenizer" not in manifest and manifest["shared"] == {}
    b, s = tmp_path / "b.npy", tmp_path / "s.npy"
    done = _runtime(out, "generate", "--prompt", "1", "--prompt", "0", "--num-images", "3", "--out", str(b))
    assert done.returncode == 0, done.stderr
    argv = ["sample", str(run), "--backend", "onnxruntime", "--steps", "3", "--prompt", "1", "--prompt", "0",
            "--num-images", "3", "--out", str(s)]  # fmt: skip
    assert main(argv) == 0
    assert np.load(b).shape == (3, 3, 16, 16) and np.abs(np.load(b) - np.load(s)).max() <= 1e-5
    done = _runtime(out, "generate", "--prompt", "2", "--out", str(b))
    assert done.returncode == 2 and "the model's classes are 0..1" in done.stderr
    done = _runtime(
        out, "check", "--repeat", "1", "--sampler-repeat", "1", "--record", str(tmp_path / "r.json")
    )
    assert done.returncode == 0 and "PASS whole call parity (max abs" in done.stdout, (
        done.stdout + done.stderr
    )
