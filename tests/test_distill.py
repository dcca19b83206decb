"""Distillation from the dense model in the finetune: losses, projections, resume, the stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from compressor.config import ConfigError, DistillConfig, FinetuneConfig, load_config
from compressor.models import build_unet
from compressor.pruning import pruned_copy
from compressor.sampling import make_scheduler
from compressor.teacher_distill import DistillStudent, block_widths, distill_losses, resolve_points
from compressor.training import train
from pipeline.cli import main
from rundir import layout
from tests.conftest import DDPM_SCHEDULER, TINY_UNET, write_config, write_images, write_model_folder

OUTPUT_ONLY = DistillConfig(weight_task=0.0, weight_output=1.0, weight_features=0.0)
OFF = DistillConfig(weight_output=0.0, weight_features=0.0)
BOTH = DistillConfig(weight_output=1.0, weight_features=0.5, feature_points=["down", "mid", "up"])


def _images(n=16):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _train(tmp, student, teacher, distill, steps=4, stop_after=None):
    cfg = FinetuneConfig(steps=steps, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=1, distill=distill)
    scheduler = make_scheduler("ddpm", DDPM_SCHEDULER)
    return train(
        student,
        scheduler,
        _images(),
        cfg,
        tmp,
        0,
        torch.device("cpu"),
        stop_after=stop_after,
        teacher=teacher,
    )


def test_a_student_identical_to_its_teacher_has_zero_loss_and_zero_gradient(tmp_path):
    teacher = build_unet(TINY_UNET, seed=0).eval()
    noisy, t, noise = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 16, 16)
    student = DistillStudent(copy.deepcopy(teacher), teacher, [], seed=0).train()
    assert not student.unet.training  # no dropout: computed in the teacher's mode (same kernels)
    terms = distill_losses(OUTPUT_ONLY, noise, student(noisy, t), teacher, noisy, t, [])
    assert terms["total"].item() == 0.0 and terms["output"].item() == 0.0
    assert terms["task"].item() > 0.1  # the plain loss is not zero: only its weight is
    terms["total"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in student.unet.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # through the whole loop: zero losses, and the weights never move (Adam steps on zero gradients)
    result = _train(tmp_path, copy.deepcopy(teacher), teacher, OUTPUT_ONLY, steps=3)
    assert [loss for _, loss in result.losses] == [0.0, 0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(result.unet.parameters(), teacher.parameters(), strict=True))
    dropout = build_unet({**TINY_UNET, "dropout": 0.1}, seed=0)
    assert DistillStudent(dropout, teacher, [], seed=0).train().unet.training  # real dropout: train mode


def test_projections_exist_exactly_where_the_pruned_widths_differ():
    teacher = build_unet(TINY_UNET, seed=0).eval()
    pruned = pruned_copy(teacher, 0.25, None)
    points = resolve_points(pruned, ["down", "mid", "up"])
    assert points == ["down.0", "down.1", "mid", "up.0", "up.1"]
    ws, wt = block_widths(pruned, points), block_widths(teacher, points)
    student = DistillStudent(pruned, teacher, points, seed=0)
    differ = {p.replace(".", "_") for p in points if ws[p] != wt[p]}
    assert differ and set(student.projections) == differ
    for point in points:
        key = point.replace(".", "_")
        if key in student.projections:
            assert tuple(student.projections[key].weight.shape[:2]) == (wt[point], ws[point])
    _, feats = student(torch.randn(2, 3, 16, 16), torch.tensor([3, 700]))
    with torch.no_grad():
        _, teacher_feats = DistillStudent(teacher, teacher, points, seed=0)(
            torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
        )
    assert all(feats[p].shape == teacher_feats[p].shape for p in points)
    assert not DistillStudent(copy.deepcopy(teacher), teacher, points, seed=0).projections  # same widths
    with pytest.raises(ConfigError, match="'up.7' is not a block of this UNet; choose from down.0"):
        resolve_points(pruned, ["up.7"])


def test_resume_with_distillation_is_bit_identical(tmp_path):
    teacher = build_unet(TINY_UNET, seed=0).eval()
    pruned = pruned_copy(teacher, 0.25, None)
    full = _train(tmp_path / "a", copy.deepcopy(pruned), teacher, BOTH)
    part = _train(tmp_path / "b", copy.deepcopy(pruned), teacher, BOTH, stop_after=2)
    assert part.resumed_from is None
    ckpt = tmp_path / "b" / "step-00000002"
    assert (ckpt / "projections.safetensors").is_file()
    resumed = _train(tmp_path / "b", copy.deepcopy(pruned), teacher, BOTH)
    assert resumed.resumed_from == 2
    for a, b in zip(full.unet.state_dict().values(), resumed.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.ema_unet.parameters(), resumed.ema_unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert full.losses == resumed.losses and full.loss_terms == resumed.loss_terms
    assert len(full.loss_terms) == 4 and all(row[3] > 0 for row in full.loss_terms)  # features matched
    plain = _train(tmp_path / "c", copy.deepcopy(pruned), teacher, OFF)
    assert plain.loss_terms == [] and plain.losses != full.losses  # off: the plain loop, untouched


def test_the_finetune_stage_distils_records_the_terms_and_saves_no_projection(tmp_path, capsys):
    model = write_model_folder(tmp_path / "model")
    write_images(tmp_path / "images", 8)
    text = (
        f"seed: 0\ndevice: cpu\nmodel: {{name: {model}, init: pretrained}}\n"
        f"data: {{source: {tmp_path / 'images'}}}\n"
        "prune: {method: magnitude, ratio: 0.25}\n"
        "finetune: {steps: 3, batch_size: 4, log_every: 1, checkpoint_every: 2,\n"
        "  distill: {weight_output: 1.0, weight_features: 1.0, feature_points: [mid, up]}}\n"
    )
    cfg = write_config(tmp_path / "distill.yaml", text)
    run = tmp_path / "run"
    assert main([str(cfg), "--stages", "prune,finetune", "--run-dir", str(run)]) == 0
    assert (
        "distilling from the dense model: task x 1, output x 1, features x 1 at mid, up"
        in capsys.readouterr().err
    )
    record = json.loads(layout.record_path(run, "finetune").read_text())
    assert [len(row) for row in record["metrics"]["loss_terms"]] == [4, 4, 4]
    assert record["config"]["finetune"]["distill"]["weight_features"] == 1.0
    for folder in (layout.model_dir(run, "finetune"), layout.model_dir(run, "finetune", raw=True)):
        keys = load_file(str(layout.weights_file(folder))).keys()
        assert keys and not any("projection" in k for k in keys)
    pruned_keys = load_file(str(layout.weights_file(layout.model_dir(run, "prune")))).keys()
    assert set(keys) == set(pruned_keys)  # the finetuned model is the pruned architecture, nothing more
    with pytest.raises(ConfigError, match="finetune.distill: weight_task, weight_output and weight_features"):
        zero = ["weight_task=0", "weight_output=0", "weight_features=0"]
        load_config(cfg, [f"finetune.distill.{k}" for k in zero])
    assert (
        main(
            [
                str(cfg),
                "finetune.distill.feature_points=[up.9]",
                "--stages",
                "finetune",
                "--run-dir",
                str(run),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err  # refused up front, before the stage starts (compressor/preflight.py)
    assert "finetune.distill.feature_points has up.9, not blocks of this UNet" in err and "up.1" in err


def test_a_budget_is_a_checkpoint_of_the_longer_finetune_under_a_constant_schedule(tmp_path):
    from compressor.training import checkpoint_at, ema_model

    teacher = build_unet(TINY_UNET, seed=0).eval()
    pruned = pruned_copy(teacher, 0.25, None)
    long = _train(tmp_path / "long", copy.deepcopy(pruned), teacher, BOTH, steps=4)
    short = _train(tmp_path / "short", copy.deepcopy(pruned), teacher, BOTH, steps=2)
    assert long.loss_terms[:2] == short.loss_terms
    at_two = ema_model(checkpoint_at(tmp_path / "long", 2), pruned)
    assert all(
        torch.equal(a, b) for a, b in zip(at_two.parameters(), short.ema_unet.parameters(), strict=True)
    )


def test_the_sweep_verdicts_answer_the_aims_seed_by_seed_from_paired_intervals():
    from pipeline.sweep.distillation import summarize, verdicts

    def cells(**modes):  # mode -> {budget: per-seed fd}
        return {
            (0.3, m, b): [{"fd": f, "ssim_vs_dense": 0.9} for f in fds]
            for m, by_budget in modes.items()
            for b, fds in by_budget.items()
        }

    def difference(a, b):  # a paired interval of half-width 1 around the difference
        return [a["fd"] - b["fd"] - 1, a["fd"] - b["fd"] + 1]

    plain = {2: [90.0, 90.0, 90.0], 4: [40.0, 50.0, 60.0]}
    found = cells(off=plain, output={2: [45.0, 51.0, 52.0], 4: [39.0, 49.0, 61.0]})
    (line,) = verdicts(summarize(found, 30.0), [2, 4], found, difference)
    # at 2 steps vs plain's 4: +5 (clearly higher), +1 (its interval touches 0), -8 (clearly lower);
    # at 4 steps every difference is +-1: within noise, so the mode matches plain from 4 steps
    assert line == (
        "MACs 0.3, output: matches plain's 4-step FD 50.00 within noise on every seed from 4 steps; "
        "at 2 steps vs plain at 4: 1 lower, 1 within noise, 1 higher (of 3 seeds); "
        "at 4 steps vs plain: 0 lower, 3 within noise, 0 higher (of 3 seeds)"
    )
    found = cells(off=plain, output={2: [95.0, 95.0, 95.0], 4: [55.0, 55.0, 55.0]})
    (line,) = verdicts(summarize(found, 30.0), [2, 4], found, difference)
    assert line.startswith("MACs 0.3, output: is clearly worse than plain's 4-step FD 50.00 on some seed")
    assert line.endswith("at 4 steps vs plain: 1 lower, 0 within noise, 2 higher (of 3 seeds)")
    # without intervals the bare figures decide (a tie is within noise)
    (line,) = verdicts(summarize(found, 30.0), [2, 4], found)
    assert line.endswith("at 4 steps vs plain: 1 lower, 0 within noise, 2 higher (of 3 seeds)")


def test_the_sweep_reads_paired_differences_from_the_cells_replicates():
    from compressor.intervals import Resampling
    from pipeline.sweep.distillation import Scorer

    scorer = Scorer.__new__(Scorer)  # only its bootstrap is needed to pair two scored cells
    scorer.boot = Resampling(resamples=200)
    reps = torch.linspace(-1, 1, 200)
    a = {"fd": 30.0, "fd_replicates": (30 + reps).tolist()}
    b = {"fd": 20.0, "fd_replicates": (20 + reps).tolist()}
    low, high = scorer.difference(a, b)  # the shared resampling noise cancels in the difference
    assert low == pytest.approx(10.0) and high == pytest.approx(10.0)
    assert scorer.difference(a, {"fd": 20.0}) is None


@pytest.mark.slow
def test_the_distillation_sweep_scores_every_budget_and_resumes(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    argv = ["ablate", str(tiny_config), "--distill", "off,output+features", "--finetune-steps", "2,4",
            "--ratios", "0.8", "--seeds", "0,1", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 2  # no torch-fidelity / Inception weights here: one line, no traceback
    err = capsys.readouterr().err
    assert "FID cannot run here" in err and "Traceback" not in err
    argv[2:2] = ["quality.feature=digits", "prune.method=magnitude"]  # digits features: channels averaged
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run / "ablation" / "distill" / "summary.json").read_text())
    cells = {(r["ratio"], r["mode"], r["budget"]): r for r in summary["rows"]}
    assert set(cells) == {(0.8, m, b) for m in ("off", "output+features") for b in (2, 4)}
    assert all(len(r["fd_per_seed"]) == 2 and r["fd_mean"] > 0 for r in cells.values())
    assert cells[(0.8, "off", 4)]["fd_per_seed"] != cells[(0.8, "output+features", 4)]["fd_per_seed"]
    assert len(summary["verdicts"]) == 1 and "MACs 0.8, output+features" in summary["verdicts"][0]
    assert (run / "ablation" / "distill" / "summary.png").stat().st_size > 0
    capsys.readouterr()
    assert main(argv) == 0  # rerun: the prunes, finetunes and scores are all reused
    assert ": finetune 4 steps" not in capsys.readouterr().err
    assert json.loads((run / "ablation" / "distill" / "summary.json").read_text())["rows"] == summary["rows"]
    capsys.readouterr()
    assert main([*argv[:2], "finetune.distill.weight_output=1", *argv[2:]]) == 0  # the modes set the weights
    assert ": finetune 4 steps" not in capsys.readouterr().err
    assert main([*argv[:2], "quality.compare_raw=false", *argv[2:]]) == 0  # raw weights: not scored here
    assert ": finetune 4 steps" not in capsys.readouterr().err
    assert main([*argv[:5], "off,teacher", *argv[6:]]) == 2
    assert "--distill: unknown mode 'teacher'" in capsys.readouterr().err
