"""The ``distill_steps`` stage: a few-step student by progressive distillation (off by default).

The student starts from the run's compressed model (or the dense one) and the dense model,
sampled with DDIM at ``distill_steps.start_steps``, teaches the first round; each round
halves the steps. The last round's student is the run's final model from then on
(``RUN/distill_steps/model``, sampled with DDIM at its own steps: its structure file carries
``student_steps`` and the scheduler config it was trained for); every round's student is
kept in ``RUN/distill_steps/rounds/<steps>/``.
"""

from __future__ import annotations

import json
import shutil

import torch

from compressor.models import as_noise_predictor
from compressor.persist import dense_config, load_unet, read_structure, save_unet
from compressor.sampling import generate, make_scheduler
from compressor.step_distill import check_target, distill_round, student_scheduler_config
from pipeline.context import RunContext, StageResult, log
from pipeline.fitting import checkpoint_dir, drop_stale_checkpoints, step_bar
from rundir import layout

SECTIONS = ["distill_steps", "data", "seed"]
INPUTS = ["prune", "finetune"]
SOURCES = ("finetune", "prune")  # where the student starts (newest first), unless student: dense
EVAL_IMAGES = 64  # images compared with the dense teacher's samples after every round


def run(ctx: RunContext) -> StageResult:
    """Distil the sampler's steps into the run's model; writes ``RUN/distill_steps/model``."""
    cfg = ctx.cfg.distill_steps
    if not cfg.active:
        reason = "distill_steps.target_steps is not set (no few-step student asked for)"
        log("distill_steps", f"skipped: {reason}")
        return StageResult(status="skipped", reason=reason)
    sched_cfg = ctx.dense.scheduler_config
    check_target(int(sched_cfg.get("num_train_timesteps", 1000)), cfg.target_steps)
    source, student, structure = _source(ctx)
    teacher = ctx.dense_on()
    teacher_prediction = sched_cfg.get("prediction_type", "epsilon")
    student_sched = student_scheduler_config(sched_cfg, cfg.prediction_type)
    # the first teacher's images on the same grid, read with its own prediction type
    reference = _samples(
        ctx, teacher, student_scheduler_config(sched_cfg, teacher_prediction), cfg.start_steps
    )
    root = checkpoint_dir(ctx, "distill_steps")
    rounds: list[dict] = []
    log(
        "distill_steps",
        f"progressive distillation of {source}: DDIM {cfg.start_steps} -> "
        f"{' -> '.join(map(str, cfg.round_steps()))} steps, {cfg.steps_per_round} steps a round, "
        f"predicting {cfg.prediction_type}",
    )
    for index, steps in enumerate(cfg.round_steps()):
        folder = root / f"round-{index}"
        done = folder / "student"
        if layout.structure_file(done).is_file():  # finished before an interruption
            student = load_unet(done, ctx.device)[0]
            entry = json.loads((folder / "round.json").read_text())
            log("distill_steps", f"round {index + 1}: {steps} steps, finished earlier (resumed)")
        else:
            result = _round(ctx, student, teacher, index, steps, teacher_prediction, folder)
            student = result.student
            entry = result.record()
            entry["mse_vs_teacher"] = _gap(ctx, student, student_sched, steps, reference)
            if ctx.is_main:
                _save(student, done, structure, student_sched, steps, source, sched_cfg)
                (folder / "round.json").write_text(json.dumps(entry))
                for old in folder.glob("step-*"):  # a finished round resumes from its student alone
                    shutil.rmtree(old)
        rounds.append(entry)
        teacher, teacher_prediction = student, cfg.prediction_type  # the next round's teacher
        student = _copy(student)
    drop_stale_checkpoints(ctx, "distill_steps")
    if not ctx.is_main:
        return StageResult(_metrics(ctx, source, rounds))
    ctx.stage_dir("distill_steps")
    files = []
    for index, steps in enumerate(cfg.round_steps()):
        src = root / f"round-{index}" / "student"
        dst = layout.student_round_dir(ctx.run_dir, steps)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        files += [layout.weights_file(dst), layout.structure_file(dst)]  # the frontier samples them
    final = layout.model_dir(ctx.run_dir, "distill_steps")
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(root / f"round-{len(rounds) - 1}" / "student", final)
    files += [layout.weights_file(final), layout.structure_file(final), layout.probe_file(final)]
    return StageResult(_metrics(ctx, source, rounds), files)


def _source(ctx: RunContext) -> tuple[str, torch.nn.Module, dict]:
    """(label, the student's starting model, its structure file) by ``distill_steps.student``."""
    if ctx.cfg.distill_steps.student == "dense":
        unet = ctx.dense_on()
        return "the dense model", unet, {"unet_config": dense_config(unet), "history": [], "kept_widths": {}}
    for stage in SOURCES:
        rec = ctx.record(stage)
        folder = layout.model_dir(ctx.run_dir, stage)
        if rec is not None and rec.ok and layout.structure_file(folder).is_file():
            return f"{stage}/model", load_unet(folder, ctx.device)[0], read_structure(folder)
    ctx.require("prune", "distill_steps")  # raises: no compressed model
    raise AssertionError("unreachable")


def _round(ctx: RunContext, student, teacher, index: int, steps: int, teacher_prediction: str, folder):
    cfg = ctx.cfg.distill_steps
    desc = f"[distill_steps] round {index + 1}/{len(cfg.round_steps())}: {steps * 2} -> {steps} steps"
    with step_bar(ctx, cfg.steps_per_round, desc) as on_step:
        result = distill_round(
            student,
            teacher,
            ctx.dense.scheduler_config,
            ctx.dataset,
            cfg,
            steps,
            index,
            teacher_prediction,
            folder,
            ctx.cfg.seed,
            ctx.device,
            on_step=on_step,
        )
    if result.resumed_from is not None:
        log("distill_steps", f"round {index + 1}: resumed from the checkpoint at step {result.resumed_from}")
    log(
        "distill_steps",
        f"round {index + 1}: {steps} steps, final loss {result.losses[-1][1]:.5f}, {result.seconds:.1f} s",
    )
    return result


def _samples(ctx: RunContext, unet, sched_cfg: dict, steps: int) -> torch.Tensor:

    return generate(
        as_noise_predictor(unet.eval()),
        make_scheduler("ddim", sched_cfg),
        ctx.image_shape(),
        EVAL_IMAGES,
        steps,
        seed=ctx.cfg.sample.seed,
        batch_size=EVAL_IMAGES,
        device=ctx.device,
    )


def _gap(ctx: RunContext, student, sched_cfg: dict, steps: int, reference: torch.Tensor) -> float:
    """Mean squared difference of the student's samples at ``steps`` from the first teacher's."""
    return float(((_samples(ctx, student, sched_cfg, steps) - reference) ** 2).mean())


def _save(
    student, folder, structure: dict, sched_cfg: dict, steps: int, source: str, dense_sched: dict
) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_unet(
        _copy(student).cpu().eval(),
        tmp,
        structure["unet_config"],
        structure.get("history"),
        structure.get("kept_widths"),
        extra={
            "scheduler_config": sched_cfg,
            "student_steps": steps,
            "distilled_from": source,
            "dense_scheduler_config": structure.get("scheduler_config") or dense_sched,
        },
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _copy(unet):
    import copy

    return copy.deepcopy(unet).train()


def _metrics(ctx: RunContext, source: str, rounds: list[dict]) -> dict:
    cfg = ctx.cfg.distill_steps
    return {
        "method": cfg.method,
        "target_steps": cfg.target_steps,
        "start_steps": cfg.start_steps,
        "student": source,
        "prediction_type": cfg.prediction_type,
        "rounds": rounds,
        "wall_s": round(sum(r["wall_s"] for r in rounds), 2),
        "optimizer_steps": sum(r["optimizer_steps"] for r in rounds),
        "eval_images": EVAL_IMAGES,
    }
