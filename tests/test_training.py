"""Training: exact resume from checkpoints, 2-process data parallel, EMA warm-up, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.config import FinetuneConfig
from compressor.errors import ConfigError, ModelError
from compressor.models import build_unet
from compressor.sampling import make_scheduler
from compressor.training import latest_checkpoint, lr_factor, make_ema, train
from tests.conftest import DDPM_SCHEDULER, TINY_UNET

ROOT = Path(__file__).parent.parent


def _images(n=16):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _train(tmp, steps=4, stop_after=None, resume=True, **kw):
    cfg = FinetuneConfig(steps=steps, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=1, **kw)
    unet = build_unet(TINY_UNET, seed=0)
    return train(
        unet,
        make_scheduler("ddpm", DDPM_SCHEDULER),
        _images(),
        cfg,
        tmp,
        0,
        torch.device("cpu"),
        resume=resume,
        stop_after=stop_after,
    )


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = _train(tmp_path / "a")
    part = _train(tmp_path / "b", stop_after=2)
    assert part.resumed_from is None and latest_checkpoint(tmp_path / "b").name == "step-00000002"
    resumed = _train(tmp_path / "b")  # a new process would do exactly this
    assert resumed.resumed_from == 2
    for (k, a), (_, b) in zip(full.unet.state_dict().items(), resumed.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema_unet.parameters(), resumed.ema_unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert full.losses == resumed.losses


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    _train(tmp_path, steps=2)
    other = dict(TINY_UNET, block_out_channels=[8, 16])
    cfg = FinetuneConfig(steps=4, batch_size=4, checkpoint_every=2)
    with pytest.raises(ModelError, match="different architecture"):
        train(
            build_unet(other),
            make_scheduler("ddpm", DDPM_SCHEDULER),
            _images(),
            cfg,
            tmp_path,
            0,
            torch.device("cpu"),
        )


def test_corrupted_checkpoint_is_refused(tmp_path):
    _train(tmp_path, steps=2)
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ModelError, match="corrupted or incomplete"):
        _train(tmp_path)


def test_dataset_smaller_than_a_batch_is_refused(tmp_path):
    cfg = FinetuneConfig(steps=2, batch_size=32)
    with pytest.raises(ConfigError, match="fewer than one micro-batch"):
        train(
            build_unet(TINY_UNET),
            make_scheduler("ddpm", DDPM_SCHEDULER),
            _images(8),
            cfg,
            tmp_path,
            0,
            torch.device("cpu"),
        )


def test_lr_warmup_and_schedules():
    cfg = FinetuneConfig(steps=100, warmup_steps=10, schedule="cosine", lr=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) < 0.01


def test_ema_warmup_lets_short_runs_move():
    unet = build_unet(TINY_UNET)
    warm = make_ema(unet, FinetuneConfig(ema_decay=0.9999, ema_warmup=True, ema_power=0.75))
    # 1 - (1 + step)^-0.75: far below 0.9999 early, capped at the configured decay late
    assert warm.get_decay(51) == pytest.approx(1 - 51**-0.75)  # diffusers: step = optimization_step - 1
    assert warm.get_decay(10**9) == pytest.approx(0.9999)


@pytest.mark.slow
@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distilled"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, distill):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    flag = ["--distill"] if distill else []
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dp_train.py"), str(one), *flag], check=True, env=env, cwd=ROOT
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29512",
            str(ROOT / "tests" / "dp_train.py"),
            str(two),
            *flag,
        ],
        check=True,
        env=env,
        cwd=ROOT,
    )
    meta_one = json.loads((one / "losses.json").read_text())
    meta_two = json.loads((two / "losses.json").read_text())
    assert meta_one["world"] == 1 and meta_two["world"] == 2
    # The last rank's weights equal rank 0's checkpoint: the ranks ended identical.
    w2 = load_file(str(two / "weights.safetensors"))
    ckpt = load_file(str(latest_checkpoint(two / "ckpt") / "model.safetensors"))
    assert all(torch.equal(w2[k], ckpt[k]) for k in w2)
    # Same loss curve and weights as one process, up to float summation order (all-reduce).
    for (s1, l1), (s2, l2) in zip(meta_one["losses"], meta_two["losses"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-7)
    assert len(meta_one["terms"]) == (4 if distill else 0)  # each process distils its own micro-batches
    for t1, t2 in zip(meta_one["terms"], meta_two["terms"], strict=True):
        assert t1 == pytest.approx(t2, rel=1e-5, abs=1e-7)
    # Adam divides by sqrt(v): for parameters with near-zero gradients the float-order noise of
    # the all-reduce is amplified, so weights agree to a tenth of one lr=1e-3 step, not to 1e-7.
    w1 = load_file(str(one / "weights.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
