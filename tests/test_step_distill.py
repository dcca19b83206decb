"""Few-step students (stage ``distill_steps``): the progressive-distillation target, the stage, its
record and resume, and every sampler honouring the student's prediction type."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import StepDistillConfig, load_config
from compressor.errors import ConfigError
from compressor.models import build_unet, predict_noise
from compressor.sampling import make_scheduler
from compressor.step_distill import PairTarget, student_scheduler_config, trailing_grid
from rundir import layout
from tests.conftest import DDPM_SCHEDULER, TINY_UNET, write_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _ddim(prediction: str, steps: int, clip: bool = True):
    cfg = {**student_scheduler_config(DDPM_SCHEDULER, prediction), "clip_sample": clip}
    sched = make_scheduler("ddim", cfg)
    sched.set_timesteps(steps)
    return sched


def test_the_trailing_grid_nests_and_is_what_diffusers_ddim_visits():
    for n in (2, 4, 8):
        assert list(trailing_grid(1000, 2 * n)[0::2]) == list(trailing_grid(1000, n))
        assert list(_ddim("epsilon", n).timesteps.numpy()) == list(trailing_grid(1000, n))
    assert list(trailing_grid(1000, 4)) == [999, 749, 499, 249]


@pytest.mark.parametrize("teacher_kind", ["epsilon", "v_prediction"])
def test_the_teachers_two_steps_are_diffusers_ddim_steps(teacher_kind):
    teacher = build_unet(TINY_UNET, seed=1).eval()
    target = PairTarget(teacher, _ddim("epsilon", 8).alphas_cumprod, 4, teacher_kind, "epsilon", True)
    sched = _ddim(teacher_kind, 8)  # the teacher's grid: 8 steps
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        t, mid = int(target.t[k]), int(target.t_mid[k])
        assert [t, mid] == [int(v) for v in sched.timesteps[2 * k : 2 * k + 2]]
        tt = torch.full((2,), t)
        mine = target._ddim(z, tt, torch.full((2,), mid))
        with torch.no_grad():
            ref = sched.step(predict_noise(teacher, z, tt), t, z).prev_sample
        assert torch.allclose(mine, ref, atol=1e-5)


@pytest.mark.parametrize("student_kind", ["epsilon", "v_prediction"])
def test_a_student_hitting_its_target_lands_one_diffusers_step_on_the_teachers_two(student_kind):
    """The regression target: one DDIM step of the student (diffusers', by its prediction type) from
    z_t equals two DDIM steps of the teacher, on every step of the grid including the last."""
    teacher = build_unet(TINY_UNET, seed=1).eval()
    alphas = _ddim("epsilon", 4).alphas_cumprod
    target = PairTarget(teacher, alphas, 4, "epsilon", student_kind, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8, torch.randn(2, 3, 16, 16, generator=g)
    captured = {}

    class Oracle(torch.nn.Module):  # a "student" that outputs whatever the loss compares it with
        def forward(self, sample, timestep, return_dict=False):
            return (captured["out"],)

    for k in range(4):
        kk = torch.full((2,), k)
        t, s = target.t[kk], target.t_next[kk]
        alpha, sigma = target._coef(t)
        z = alpha * x0 + sigma * noise
        z_s = target._ddim(target._ddim(z, t, target.t_mid[kk]), target.t_mid[kk], s)
        sched = _ddim(student_kind, 4, clip=False)
        t_int = int(t[0])
        # the output whose diffusers step lands on z_s, solved here from diffusers' own tables:
        # the loss there is ~0
        a_s = sched.alphas_cumprod[int(s[0])] if int(s[0]) >= 0 else sched.final_alpha_cumprod
        ratio = (1 - a_s).sqrt() / sigma
        x_t = (z_s - ratio * z) / (a_s.sqrt() - ratio * alpha)
        eps = (z - alpha * x_t) / sigma
        out = alpha * eps - sigma * x_t if student_kind == "v_prediction" else eps
        captured["out"] = out
        assert target(Oracle(), x0, noise, kk).item() < 1e-9
        landed = sched.step(out, t_int, z).prev_sample
        assert torch.allclose(landed, z_s, atol=2e-4), k


def test_config_rules():
    assert StepDistillConfig(target_steps=4, start_steps=32).round_steps() == [16, 8, 4]
    assert StepDistillConfig().round_steps() == [] and not StepDistillConfig().active
    from compressor.config import config_from_mapping

    with pytest.raises(ConfigError, match="times a power of two"):
        config_from_mapping({"distill_steps": {"target_steps": 3, "start_steps": 32}})
    with pytest.raises(ConfigError, match="times a power of two"):
        config_from_mapping({"distill_steps": {"target_steps": 4, "start_steps": 4}})


STUDENT_CONFIG = """
distill_steps:
  target_steps: 2
  start_steps: 8
  steps_per_round: {steps}
  batch_size: 4
  checkpoint_every: {every}
  log_every: 1
  prediction_type: {prediction}
"""


def _student_config(
    tiny_config: Path, steps: int = 3, every: int = 2, prediction: str = "v_prediction"
) -> Path:
    text = tiny_config.read_text() + STUDENT_CONFIG.format(steps=steps, every=every, prediction=prediction)
    return write_config(tiny_config.with_name("student.yaml"), text)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run): a tiny run with a 2-step v-prediction student, exported and scored."""
    from pipeline.cli import main
    from tests.conftest import TINY_CONFIG, write_images, write_model_folder

    root = tmp_path_factory.mktemp("student")
    model = write_model_folder(root / "model")
    write_images(root / "images", 8)
    tiny = write_config(root / "tiny.yaml", TINY_CONFIG.format(model=model, data=root / "images"))
    cfg = _student_config(tiny)
    run = root / "run"
    stages = "prune,finetune,distill_steps,samples,export,quality,bench,check"
    over = ["quality.compare_pruned=false", "bench.backends=[onnxruntime]", "bench.batch_sizes=[2]",
            "bench.repeat=3", "bench.sampler_repeat=1", "acceptance.batch=2",
            "acceptance.min_sampler_speedup=1.01", "acceptance.min_ssim=null", "acceptance.max_fd_ratio=null",
            "acceptance.min_speedup=null"]  # fmt: skip
    main([str(cfg), "--stages", stages, "--run-dir", str(run), *over])  # the gates' verdict: any
    return cfg, run


@pytest.mark.slow
def test_the_stage_writes_the_student_its_rounds_and_the_final_model(student_run, tmp_path):
    from compressor.persist import student_sampling, student_stack
    from pipeline.cli import main
    from rundir.records import final_model_dir, read_metrics, read_record

    cfg, run = student_run
    rec = read_record(run, "distill_steps")
    rounds = rec.metrics["rounds"]
    assert [r["steps"] for r in rounds] == [4, 2] and [r["teacher_steps"] for r in rounds] == [8, 4]
    for r in rounds:
        assert len(r["losses"]) == 3 and r["wall_s"] > 0 and r["optimizer_steps"] == 3
        assert all(np.isfinite(loss) for _, loss in r["losses"]) and r["mse_vs_teacher"] >= 0
    assert rec.metrics["student"] == "finetune/model" and rec.metrics["prediction_type"] == "v_prediction"
    assert final_model_dir(run) == ("distill_steps", layout.model_dir(run, "distill_steps"))
    sched_cfg, steps = student_sampling(layout.model_dir(run, "distill_steps"))
    assert steps == 2 and sched_cfg["prediction_type"] == "v_prediction"
    assert sched_cfg["timestep_spacing"] == "trailing"
    assert student_sampling(layout.student_round_dir(run, 4))[1] == 4
    assert student_stack(run).steps == student_stack(run).student_steps == 2
    quality = read_metrics(run, "quality")
    assert quality.compressed_label() == "student" and quality.student_steps == 2
    assert "finetuned" not in quality.models  # only the final model is scored (compare_pruned off)
    # bench times the student at its steps against the dense reference sampler; check gates that
    bench = read_metrics(run, "bench")
    (row,) = bench.student
    facts = (row["backend"], row["batch"], row["student_steps"], row["reference"])
    assert facts == ("onnxruntime", 2, 2, "ddim:3:1")
    check = json.loads(layout.record_path(run, "check").read_text())["metrics"]["checks"]
    (gate,) = [c for c in check if c["name"] == "min_sampler_speedup"]
    assert gate["measured"] == pytest.approx(row["speedup"]) and "student ddim:2" in gate["detail"]
    # the exported "pruned" graph is the student: ONNX Runtime samples it at its own steps
    out = tmp_path / "s.npy"
    argv = ["sample", str(run), "--backend", "onnxruntime", "--num-images", "2", "--out", str(out)]
    assert main(argv) == 0
    from deploy.sampler import load_sampler

    torch_images = load_sampler(run, "torch")(num_images=2, seed=0)
    assert np.abs(np.load(out) - torch_images.numpy()).max() < 1e-4  # 2 steps, v prediction, ORT
    # a rerun is a cache hit; a new target reruns the stage
    assert main([str(cfg), "--stages", "distill_steps", "--run-dir", str(run)]) == 0
    assert read_record(run, "distill_steps").metrics["rounds"] == rounds


@pytest.mark.slow
def test_a_killed_round_resumes_to_identical_weights(tmp_path, tiny_config):
    cfg = _student_config(tiny_config, steps=40, every=5)
    base = [sys.executable, "-m", "pipeline.cli", str(cfg)]
    subprocess.run([*base, "--stages", "prune,finetune,distill_steps", "--run-dir", str(tmp_path / "ref")],
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    run = tmp_path / "run"
    subprocess.run([*base, "--stages", "prune,finetune", "--run-dir", str(run)], env=ENV, check=True,
                   capture_output=True)  # fmt: skip
    proc = subprocess.Popen([*base, "--stages", "distill_steps", "--run-dir", str(run)], env=ENV,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    ckpts = layout.checkpoints_dir(run, "distill_steps")
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("*/round-1/step-00000010/trainer.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-way through the second round
    proc.wait(timeout=60)
    assert not layout.structure_file(layout.model_dir(run, "distill_steps")).exists()
    subprocess.run([*base, "--stages", "distill_steps", "--run-dir", str(run)], env=ENV, check=True,
                   capture_output=True)  # fmt: skip
    rec = json.loads(layout.record_path(run, "distill_steps").read_text())
    assert rec["metrics"]["rounds"][1]["resumed_from"] is not None
    for folder in ("model", "rounds/4", "rounds/2"):
        mine = run / "distill_steps" / folder / layout.WEIGHTS_FILE
        assert (
            mine.read_bytes()
            == (tmp_path / "ref" / "distill_steps" / folder / layout.WEIGHTS_FILE).read_bytes()
        )


def test_a_target_that_does_not_divide_the_timesteps_is_one_line(tmp_path, tiny_config, capsys):
    from pipeline.cli import main

    text = tiny_config.read_text() + "distill_steps:\n  target_steps: 3\n  start_steps: 12\n"
    cfg = write_config(tmp_path / "bad.yaml", text)
    code = main([str(cfg), "--stages", "prune,distill_steps", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "does not divide" in err[-1] and "Traceback" not in "\n".join(err)


def test_the_stage_is_off_by_default(tmp_path, tiny_config):
    from pipeline.cli import main
    from rundir.records import read_record

    assert "distill_steps" in load_config(tiny_config).stages
    assert main([str(tiny_config), "--stages", "distill_steps", "--run-dir", str(tmp_path / "r")]) == 0
    rec = read_record(tmp_path / "r", "distill_steps", done_only=False)
    assert rec.status == "skipped" and "target_steps" in rec.reason


def _model(x: np.ndarray, t: int) -> np.ndarray:
    """A smooth "model" of sorts (as tests/test_bundle.py drives the solvers): the scheduler alone
    is compared, not a random UNet's amplification of float rounding."""
    weight = np.linspace(-0.5, 0.9, 3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    return (0.8 * x + weight * np.float32(t / 1000)).astype(np.float32)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "kind, steps", [("ddim", 1), ("ddim", 2), ("ddim", 4), ("ddim", 8), ("dpmsolver++", 6)]
)
def test_the_bundle_runtime_follows_diffusers_for_a_student(prediction, kind, steps):
    """Whole trajectories of the bundle's numpy solvers (the student's trailing grid and its
    prediction type) against diffusers' schedulers driven by the same model: max abs <= 1e-5."""
    from deploy.bundle_runtime.core import SOLVERS, seed_noise
    from deploy.edge_bundle import scheduler_tables

    cfg = student_scheduler_config(DDPM_SCHEDULER, prediction)
    settings, arrays = scheduler_tables(kind, cfg, steps)
    assert settings["prediction_type"] == prediction
    ours = SOLVERS[kind](settings, arrays)
    theirs = make_scheduler(kind, cfg)
    theirs.set_timesteps(steps)
    assert [int(t) for t in theirs.timesteps] == arrays["timesteps"].tolist()
    if kind == "ddim":
        assert int(theirs.timesteps[0]) == 999  # trailing: a student starts at the last timestep
    x = seed_noise((2, 3, 8, 8), 7)
    xt = torch.from_numpy(x.copy())
    for i, t in enumerate(theirs.timesteps):
        x = ours.step(i, _model(x, int(t)), x)
        xt = theirs.step(torch.from_numpy(_model(xt.numpy(), int(t))), t, xt).prev_sample
        assert np.abs(x - xt.numpy()).max() <= 1e-5, (i, int(t))


def _bare_runtime(folder: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, "-m", "bundle_runtime", *args], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_the_students_bundle_samples_its_steps_and_passes_check(student_run, tmp_path):
    """`bundle RUN OUT` on a student: its steps and v prediction by default, the dense model at its own
    DDIM steps; the bundle's images are `sample`'s through ONNX Runtime; `check` passes."""
    from pipeline.cli import main

    _, run = student_run
    out = tmp_path / "bundle"
    assert main(["bundle", str(run), str(out), "--batch", "2"]) == 0
    settings = json.loads((out / "scheduler.json").read_text())
    assert settings["steps"] == 2 and settings["prediction_type"] == "v_prediction"
    assert settings["dense"]["steps"] == 3 and settings["dense"]["prediction_type"] == "epsilon"  # quality's
    with np.load(out / "scheduler.npz") as tables:
        assert tables["timesteps"].tolist() == [999, 499] and len(tables["dense.timesteps"]) == 3
    done = _bare_runtime(
        out, "generate", "--seed", "3", "--num-images", "3", "--out", str(tmp_path / "b.npy")
    )
    assert done.returncode == 0, done.stderr
    argv = ["sample", str(run), "--backend", "onnxruntime", "--seed", "3", "--num-images", "3",
            "--out", str(tmp_path / "s.npy")]  # fmt: skip
    assert main(argv) == 0  # the student's own steps and schedule by default
    assert np.abs(np.load(tmp_path / "b.npy") - np.load(tmp_path / "s.npy")).max() <= 1e-5
    done = _bare_runtime(
        out, "check", "--repeat", "3", "--sampler-repeat", "3", "--record", str(tmp_path / "r")
    )
    # parity must pass; the speed gate is re-decided from a few milliseconds per call on a shared
    # machine (a timing, not a unit-test assertion: benchmarks hold speed), so it may fail alone (exit 3)
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("PASS") and "parity" in line], done.stdout + done.stderr
    failed = [line for line in lines if line.startswith("FAIL ")]
    assert all("speed-up" in line for line in failed), done.stdout + done.stderr
    assert done.returncode == (3 if failed else 0), done.stdout + done.stderr
    assert "sampler speed-up vs dense" in done.stdout


@pytest.mark.slow
def test_the_triton_repository_serves_the_student_at_its_steps(student_run, tmp_path):
    from pipeline.cli import main

    _, run = student_run
    for model, steps, prediction in (("pruned", 2, "v_prediction"), ("dense", 50, "epsilon")):
        out = tmp_path / model
        assert main(["triton-repo", str(run), str(out), "--model", model, "--unet", "onnxruntime"]) == 0
        spec = json.loads((out / "sampler" / "1" / "sampler.json").read_text())
        schedule = spec["scheduler_config"]
        assert spec["default_steps"] == steps and schedule.get("prediction_type", "epsilon") == prediction
        assert (schedule.get("timestep_spacing") == "trailing") == (model == "pruned")


@pytest.mark.slow
def test_two_processes_distil_a_round_as_one_does(tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    helper = str(ROOT / "tests" / "dp_train.py")
    subprocess.run([sys.executable, helper, str(one), "--student"], check=True, env=ENV, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29514", helper, str(two), "--student"], check=True, env=ENV, cwd=ROOT)  # fmt: skip
    meta_one, meta_two = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert meta_one["world"] == 1 and meta_two["world"] == 2 and len(meta_one["losses"]) == 4
    for (s1, l1), (s2, l2) in zip(meta_one["losses"], meta_two["losses"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-8)
    w1, w2 = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4  # float order of the all-reduce
