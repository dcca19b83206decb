"""Pruned models save as safetensors + JSON and reload exactly, also in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from compressor.config import PruneConfig
from compressor.errors import ModelError
from compressor.models import example_inputs, predict_noise
from compressor.persist import as_pipeline, dense_config, load_unet, save_unet
from compressor.pruning import prune_unet
from compressor.sampling import make_scheduler
from tests.conftest import DDPM_SCHEDULER


def _pruned(unet, method="magnitude", ratio=0.25):
    cfg_dense = dense_config(unet)
    result = prune_unet(
        unet, make_scheduler("ddpm", DDPM_SCHEDULER), None, PruneConfig(method=method, ratio=ratio), 0
    )
    return cfg_dense, result


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_reload_is_exact(which, request, tmp_path):
    unet = request.getfixturevalue(which)
    cfg, result = _pruned(unet)
    save_unet(unet, tmp_path / "m", cfg, result.history, result.kept_widths)
    again, meta = load_unet(tmp_path / "m")
    x = example_inputs(unet, 2)
    with torch.no_grad():
        a = predict_noise(unet, x["sample"], x["timestep"])
        b = predict_noise(again, x["sample"], x["timestep"])
    assert torch.equal(a, b)
    assert meta["kept_widths"] == result.kept_widths


def test_reload_in_a_fresh_process_is_exact(tiny_unet, tmp_path):
    cfg, result = _pruned(tiny_unet)
    save_unet(tiny_unet, tmp_path / "m", cfg, result.history, result.kept_widths)
    x = example_inputs(tiny_unet, 3)
    torch.save  # noqa: B018 - (never used: inputs travel as safetensors)
    from safetensors.torch import save_file

    save_file({"sample": x["sample"], "timestep": x["timestep"]}, str(tmp_path / "x.safetensors"))
    with torch.no_grad():
        expected = predict_noise(tiny_unet, x["sample"], x["timestep"])
    code = f"""
import torch, sys
from safetensors.torch import load_file, save_file
from compressor.persist import load_unet
from compressor.models import predict_noise
torch.set_num_threads({torch.get_num_threads()})  # same reduction order as this process
u, _ = load_unet({str(tmp_path / "m")!r})
x = load_file({str(tmp_path / "x.safetensors")!r})
with torch.no_grad():
    save_file({{"y": predict_noise(u, x["sample"], x["timestep"])}}, {str(tmp_path / "y.safetensors")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "y.safetensors"))["y"]
    assert (got - expected).abs().max().item() == 0.0


def test_weights_from_another_plan_are_refused(tiny_unet, tmp_path):
    from compressor.models import build_unet
    from tests.conftest import TINY_UNET

    cfg, result = _pruned(tiny_unet, ratio=0.25)
    save_unet(tiny_unet, tmp_path / "a", cfg, result.history, result.kept_widths)
    other = build_unet(TINY_UNET, 1)
    _, result_b = _pruned(other, ratio=0.5)
    save_unet(other, tmp_path / "b", cfg, result_b.history, result_b.kept_widths)
    (tmp_path / "b" / "unet.json").write_text((tmp_path / "a" / "unet.json").read_text())
    with pytest.raises(ModelError, match="do not match the pruned architecture"):
        load_unet(tmp_path / "b")


def test_foreign_pruning_history_is_refused(tiny_unet, tmp_path):
    cfg, result = _pruned(tiny_unet)
    save_unet(tiny_unet, tmp_path / "m", cfg, result.history, result.kept_widths)
    meta = json.loads((tmp_path / "m" / "unet.json").read_text())
    meta["history"] = [["no_such_layer", True, [0, 1]]]
    (tmp_path / "m" / "unet.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="pruning history does not fit"):
        load_unet(tmp_path / "m")


def test_truncated_weights_are_refused(tiny_unet, tmp_path):
    cfg, result = _pruned(tiny_unet)
    save_unet(tiny_unet, tmp_path / "m", cfg, result.history, result.kept_widths)
    w = tmp_path / "m" / "unet.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or corrupted"):
        load_unet(tmp_path / "m")


def test_pipeline_helper_samples(tiny_unet):
    cfg, _ = _pruned(tiny_unet)
    pipe = as_pipeline(tiny_unet, DDPM_SCHEDULER, "ddim")
    out = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3)
