"""The ``distill_steps`` stage: a few-step student by progressive distillation (off by default).

The student starts from the run's compressed model (or the dense one) and the dense model,
sampled with DDIM at ``distill_steps.start_steps``, teaches the first round; each round
halves the steps. The last round's student is the run's final model from then on
(``RUN/distill_steps/model``, sampled with DDIM at its own steps: its structure file carries
``student_steps`` and the scheduler config it was trained for); every round's student is
kept in ``RUN/distill_steps/rounds/<steps>/``.

A conditional model (text or classes) is distilled at the run's fixed guidance scale
(``sample.guidance_scale``, Meng et al. CVPR 2023): when it guides (> 1), stage one first trains the
student to give, in one call on the conditional half, what the dense teacher gives guided over both
halves (``RUN/distill_steps/rounds/<start_steps>/``); the halving rounds follow on the encoded training
data (latents and text embeddings, or labels), teacher and student fed the conditions. The student
keeps the UNet's inputs (the same graph, engines, Triton model and bundle as any UNet) and its
schedule carries the scale (``distilled_guidance_scale``), so every sampler calls it once a step at the
images' batch, unguided; the record says ``guidance.distilled_scale``.
"""

from __future__ import annotations

import json
import shutil

import torch

from compressor.conditional_batches import null_condition
from compressor.guidance import model_decoder
from compressor.models import as_noise_predictor
from compressor.persist import dense_config, load_unet, read_structure, save_unet
from compressor.sampling import generate, make_scheduler
from compressor.step_distill import check_target, distill_round, guided_round, student_scheduler_config
from pipeline.context import RunContext, StageCall, StageResult, log
from pipeline.fitting import checkpoint_dir, drop_stale_checkpoints, step_bar
from rundir import layout

SECTIONS = ["distill_steps", "data", "seed"]
GUIDED = "guided"  # stage one's checkpoint folder (a conditional model under guidance)
INPUTS = ["prune", "finetune"]
SOURCES = ("finetune", "prune")  # where the student starts (newest first), unless student: dense
EVAL_IMAGES = 64  # images compared with the dense teacher's samples after every round


# what a conditional model's student depends on besides its sections: the scale it is distilled at,
# and the prompts and seeds its rounds are evaluated with
PROMPT_KEYS = ("guidance_scale", "prompts", "prompt_file", "negative_prompt", "seed")


def key_extra(ctx: RunContext) -> dict:
    """A conditional model's student also depends on ``sample.guidance_scale`` (distilled into it) and
    the prompts its rounds are scored with; an unconditional model's key is as before."""
    if not ctx.cfg.distill_steps.active:
        return {}
    if ctx.at_stage(StageCall("distill_steps", "")).dense.conditioning == "none":  # loaded once, shared
        return {}
    return {f"sample.{k}": getattr(ctx.cfg.sample, k) for k in PROMPT_KEYS}


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
    scale = _distilled_scale(ctx)
    student_sched = student_scheduler_config(sched_cfg, cfg.prediction_type, scale)
    # the first teacher's images on the same grid, read with its own prediction type (guided)
    reference = _samples(
        ctx, teacher, student_scheduler_config(sched_cfg, teacher_prediction), cfg.start_steps
    )
    root = checkpoint_dir(ctx, "distill_steps")
    plan = [(f"round-{index}", steps) for index, steps in enumerate(cfg.round_steps())]
    if scale is not None and scale > 1:  # stage one: the guided teacher into one conditional call
        plan.insert(0, (GUIDED, cfg.start_steps))
    rounds: list[dict] = []
    log(
        "distill_steps",
        f"progressive distillation of {source}: DDIM {cfg.start_steps} -> "
        f"{' -> '.join(map(str, cfg.round_steps()))} steps, {cfg.steps_per_round} steps a round, "
        f"predicting {cfg.prediction_type}"
        + (f"; stage one distils guidance {scale:g} first" if plan[0][0] == GUIDED else ""),
    )
    for name, steps in plan:
        folder = root / name
        done = folder / "student"
        if layout.structure_file(done).is_file():  # finished before an interruption
            student = load_unet(done, ctx.device)[0]
            entry = json.loads((folder / "round.json").read_text())
            log("distill_steps", f"{_what(name, steps)}: finished earlier (resumed)")
        else:
            result = _round(ctx, student, teacher, name, steps, teacher_prediction, folder, len(plan))
            student = result.student
            entry = result.record()
            entry["mse_vs_teacher"] = _gap(ctx, student, student_sched, steps, reference)
            if ctx.is_main:
                _save(student, done, structure, student_sched, steps, source, sched_cfg, scale)
                (folder / "round.json").write_text(json.dumps(entry))
                for old in folder.glob("step-*"):  # a finished round resumes from its student alone
                    shutil.rmtree(old)
        rounds.append(entry)
        teacher, teacher_prediction = student, cfg.prediction_type  # the next round's teacher
        student = _copy(student)
    drop_stale_checkpoints(ctx, "distill_steps")
    if not ctx.is_main:
        return StageResult(_metrics(ctx, source, rounds, scale))
    ctx.stage_dir("distill_steps")
    files = []
    for name, steps in plan:
        src = root / name / "student"
        dst = layout.student_round_dir(ctx.run_dir, steps)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        files += [layout.weights_file(dst), layout.structure_file(dst)]  # the frontier samples them
    final = layout.model_dir(ctx.run_dir, "distill_steps")
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(root / plan[-1][0] / "student", final)
    files += [layout.weights_file(final), layout.structure_file(final), layout.probe_file(final)]
    return StageResult(_metrics(ctx, source, rounds, scale), files)


def _distilled_scale(ctx: RunContext) -> float | None:
    """The guidance scale a conditional model's student is distilled at (``sample.guidance_scale``);
    None for an unconditional model."""
    return None if ctx.dense.conditioning == "none" else float(ctx.cfg.sample.guidance_scale)


def _what(name: str, steps: int) -> str:
    if name == GUIDED:
        return f"stage one (guidance distilled at {steps} steps)"
    return f"round {int(name.split('-')[1]) + 1}: {steps} steps"


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


def _round(
    ctx: RunContext, student, teacher, name: str, steps: int, teacher_prediction: str, folder, total: int
):
    cfg = ctx.cfg.distill_steps
    common = {"checkpoint_dir": folder, "seed": ctx.cfg.seed, "device": ctx.device}
    if name == GUIDED:
        scale = ctx.cfg.sample.guidance_scale
        desc = f"[distill_steps] stage one: guidance {scale:g} into one call a step"
        data = ctx.training_data
        with step_bar(ctx, cfg.steps_per_round, desc) as on_step:
            result = guided_round(
                student, teacher, ctx.dense.scheduler_config, data, cfg, scale, null_condition(student, data),
                steps, teacher_prediction, on_step=on_step, **common,
            )  # fmt: skip
    else:
        index = int(name.split("-")[1])
        desc = f"[distill_steps] round {index + 1}/{len(cfg.round_steps())}: {steps * 2} -> {steps} steps"
        with step_bar(ctx, cfg.steps_per_round, desc) as on_step:
            result = distill_round(
                student, teacher, ctx.dense.scheduler_config, ctx.training_data, cfg, steps, index,
                teacher_prediction, on_step=on_step, **common,
            )  # fmt: skip
    if result.resumed_from is not None:
        log(
            "distill_steps",
            f"{_what(name, steps)}: resumed from the checkpoint at step {result.resumed_from}",
        )
    log(
        "distill_steps",
        f"{_what(name, steps)}, final loss {result.losses[-1][1]:.5f}, {result.seconds:.1f} s",
    )
    return result


def _samples(ctx: RunContext, unet, sched_cfg: dict, steps: int) -> torch.Tensor:
    """The evaluation images (a conditional model: the run's prompts under ``sample.guidance_scale``,
    which a guidance-distilled student's schedule turns off, decoded by the dense VAE)."""
    conditional: dict = {}
    if ctx.dense.conditioning != "none":
        conditional = {
            "conditioning": ctx.prompts.conditioning(ctx.dense, EVAL_IMAGES, 0, ctx.device),
            "guidance_scale": ctx.cfg.sample.guidance_scale,
            "decode": model_decoder(ctx.dense),
        }
    return generate(
        as_noise_predictor(unet.eval()),
        make_scheduler("ddim", sched_cfg),
        ctx.image_shape(),
        EVAL_IMAGES,
        steps,
        seed=ctx.cfg.sample.seed,
        batch_size=EVAL_IMAGES,
        device=ctx.device,
        **conditional,
    )


def _gap(ctx: RunContext, student, sched_cfg: dict, steps: int, reference: torch.Tensor) -> float:
    """Mean squared difference of the student's samples at ``steps`` from the first teacher's."""
    return float(((_samples(ctx, student, sched_cfg, steps) - reference) ** 2).mean())


def _save(
    student,
    folder,
    structure: dict,
    sched_cfg: dict,
    steps: int,
    source: str,
    dense_sched: dict,
    scale: float | None = None,
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
            **({} if scale is None else {"guidance": _guidance(scale)}),
        },
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _copy(unet):
    import copy

    return copy.deepcopy(unet).train()


def _guidance(scale: float) -> dict:
    """What the record and the structure file say about a conditional model's student: the scale its
    guided teacher was distilled at, and that it is sampled once a step on the conditional half."""
    return {"distilled_scale": scale, "unet_calls_per_step": 1, "sampled_guidance_scale": 1.0}


def _metrics(ctx: RunContext, source: str, rounds: list[dict], scale: float | None = None) -> dict:
    cfg = ctx.cfg.distill_steps
    guidance = {} if scale is None else {"guidance": _guidance(scale)}
    return {
        **guidance,
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
