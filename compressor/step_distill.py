"""Progressive distillation of the sampler's steps (Salimans and Ho, ICLR 2022).

A student learns to take in one DDIM step what its teacher takes in two. The grid is
DDIM's "trailing" spacing of the training timesteps (``t_k = round(T - k T / N) - 1``, then
the clean image), so the grid of N steps is every other point of the grid of 2N and the
student's steps start at the last training timestep. Each training step draws clean
images, noise and a student step ``k``; the teacher takes its two DDIM steps from
``z_t`` (through the midpoint) to ``z_s``, and the target is the clean image ``x~`` for which
one DDIM step from ``z_t`` lands exactly on ``z_s``::

    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

(``x~ = z_s`` on the last step). The student's output is compared with the epsilon or v
that yields ``x~`` from ``z_t`` (its ``prediction_type``). Rounds chain: the EMA weights of
each round's student are the next round's teacher and its starting point. The dense model
sampled at ``start_steps`` is the first teacher.

Guided models (Meng et al., CVPR 2023, "On Distillation of Guided Diffusion Models"): a conditional
model sampled under classifier-free guidance calls its UNet on both halves each step. Stage one
(:class:`GuidedTarget`, :func:`guided_round`) distils the guided teacher at the run's FIXED scale ``w``
into a student called once on the conditional half; the halving rounds then run as above, on the
same conditioned data, teacher and student both fed the conditions. The student keeps the UNet's
signature (no ``w`` input), so it exports to the same graph and runs on the same engines, Triton model
and bundle as any UNet, at half the UNet work per step; another scale needs another student. Its
scheduler config carries ``w`` (:data:`compressor.guidance.DISTILLED_GUIDANCE`), which makes every
sampler call it unguided.

Training runs on :func:`compressor.training.train` (Accelerate: one CPU or many GPUs,
checkpoints, exact resume): each round is one call with its own checkpoint folder, and
every random draw is seeded by (seed, round, step), so a run killed mid-round and rerun
ends with the same weights, and N processes match one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.conditional_batches import NullCondition, drop_conditions
from compressor.config import FinetuneConfig, StepDistillConfig
from compressor.errors import ConfigError
from compressor.guidance import DISTILLED_GUIDANCE, combine
from compressor.models import predict_noise
from compressor.sampling import make_scheduler
from compressor.training import train

PREDICTION_TYPES = ("epsilon", "v_prediction")


def trailing_grid(num_train_timesteps: int, steps: int) -> np.ndarray:
    """DDIM's trailing timesteps for ``steps`` steps (diffusers' ``timestep_spacing="trailing"``)."""
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1


def student_scheduler_config(
    scheduler_config: dict, prediction_type: str, distilled_guidance: float | None = None
) -> dict:
    """The scheduler config saved with a student: trailing DDIM grid, its prediction type,
    and the last step landing on the clean image (``set_alpha_to_one``); a student of a guided
    teacher also the scale it was distilled at (:data:`compressor.guidance.DISTILLED_GUIDANCE`), which
    makes every sampler call it on the conditional half alone."""
    out = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    out.update(timestep_spacing="trailing", prediction_type=prediction_type, set_alpha_to_one=True)
    if distilled_guidance is not None:
        out[DISTILLED_GUIDANCE] = float(distilled_guidance)
    return out


def check_target(num_train_timesteps: int, target_steps: int) -> None:
    """The student's steps must divide the training timesteps: diffusers' DDIM then visits
    exactly the grid the student was trained on (its step goes to ``t - T // N``)."""
    if num_train_timesteps % target_steps:
        divisors = [n for n in (1, 2, 4, 5, 8, 10, 20, 25) if num_train_timesteps % n == 0]
        raise ConfigError(
            f"distill_steps.target_steps={target_steps} does not divide the model's {num_train_timesteps} "
            f"training timesteps, so DDIM would not visit the student's grid; use one of "
            f"{', '.join(map(str, divisors))}"
        )


class PairTarget(nn.Module):
    """The progressive-distillation objective of one round: ``(model, x0, noise, k) -> loss``.

    Holds the frozen teacher and the schedule. ``k`` indexes the student's grid of
    ``student_steps`` steps (``train`` draws it in ``[0, student_steps)``).
    """

    def __init__(
        self,
        teacher: nn.Module,
        alphas_cumprod: torch.Tensor,
        student_steps: int,
        teacher_prediction: str,
        student_prediction: str,
        clip_sample: bool,
    ):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        T = alphas_cumprod.shape[0]
        grid = trailing_grid(T, 2 * student_steps)  # the teacher's grid; the student's is every other
        a = torch.cat([alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])  # a[-1]: clean
        idx = torch.as_tensor(grid)
        nxt = torch.cat([idx[1:], torch.tensor([-1])])
        self.register_buffer("t", idx[0::2].clone())  # student timesteps
        self.register_buffer("t_mid", idx[1::2].clone())
        self.register_buffer("t_next", nxt[1::2].clone())
        self.register_buffer("abar", a.float())
        self.teacher_prediction, self.student_prediction = teacher_prediction, student_prediction
        self.clip = clip_sample

    def _coef(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.abar[t].view(-1, 1, 1, 1)  # index -1 picks the clean image's 1.0
        return ab.sqrt(), (1 - ab).clamp(min=0).sqrt()

    def _split(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, kind: str):
        """(x0, eps) a model output means at ``t``: x0 clipped as DDIM clips it, eps not (diffusers'
        DDIM steps with the unclipped noise, ``use_clipped_model_output=False``)."""
        alpha, sigma = self._coef(t)
        if kind == "v_prediction":
            x0, eps = alpha * z - sigma * out, alpha * out + sigma * z
        else:
            x0, eps = (z - sigma * out) / alpha, out
        return (x0.clamp(-1, 1) if self.clip else x0), eps

    @torch.no_grad()
    def _ddim(self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step of the teacher from ``t`` to ``s`` (diffusers' rule)."""
        out = predict_noise(self.teacher, z, t, **cond).float()
        x0, eps = self._split(out, z, t, self.teacher_prediction)
        alpha_s, sigma_s = self._coef(s)
        return alpha_s * x0 + sigma_s * eps

    def forward(
        self, model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, k: torch.Tensor, **cond: torch.Tensor
    ) -> torch.Tensor:
        """The round's loss on one micro-batch; ``cond``: a conditioned model's inputs (the prompts'
        embeddings or labels), which teacher and student both take (the teacher a student of the
        guided model after :class:`GuidedTarget`'s stage: one call on the conditional half)."""
        t, t_mid, s = self.t[k], self.t_mid[k], self.t_next[k]
        alpha_t, sigma_t = self._coef(t)
        z = alpha_t * x0 + sigma_t * noise
        z_s = self._ddim(self._ddim(z, t, t_mid, **cond), t_mid, s, **cond)
        alpha_s, sigma_s = self._coef(s)
        ratio = sigma_s / sigma_t
        x_target = (z_s - ratio * z) / (alpha_s - ratio * alpha_t)  # ratio = 0 on the last step: z_s
        out = predict_noise(model, z, t, **cond).float()
        if self.student_prediction == "v_prediction":
            target = alpha_t * noise_of(z, x_target, alpha_t, sigma_t) - sigma_t * x_target
        else:
            target = noise_of(z, x_target, alpha_t, sigma_t)
        return F.mse_loss(out, target)


class GuidedTarget(nn.Module):
    """Stage one of guided distillation (Meng et al., CVPR 2023): ``(model, x0, noise, t, **cond) ->
    loss``, the student called once on the conditional inputs regressing the guided teacher's output.

    The teacher runs both halves at once (the null condition's rows first, as the sampler does) and
    combines them at ``guidance_scale``: ``uncond + w (cond - uncond)``; the student is trained to
    predict that (converted to its ``student_prediction``) from the conditional half alone, at every
    training timestep ``t``. The scale is fixed: the student keeps the UNet's inputs (no ``w`` input),
    so its graph, engines and servers are the plain UNet's.
    """

    def __init__(
        self,
        teacher: nn.Module,
        alphas_cumprod: torch.Tensor,
        guidance_scale: float,
        null: NullCondition,
        teacher_prediction: str,
        student_prediction: str,
    ):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.register_buffer("abar", alphas_cumprod.float().clone())
        self.scale, self.null = float(guidance_scale), null
        self.teacher_prediction, self.student_prediction = teacher_prediction, student_prediction

    @torch.no_grad()
    def guided(self, z: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """The teacher's classifier-free-guided output at ``(z, t)`` for conditions ``cond``."""
        text = None if self.null.text is None else self.null.text.to(z.device)
        null = NullCondition(text, self.null.label)
        uncond = drop_conditions(cond, torch.ones(z.shape[0], dtype=torch.bool, device=z.device), null)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        out = predict_noise(self.teacher, torch.cat([z, z]), torch.cat([t, t]), **both).float()
        return combine(out, self.scale)

    def forward(
        self, model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor
    ) -> torch.Tensor:
        """The stage's loss on one micro-batch."""
        ab = self.abar[t].view(-1, 1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        z = alpha * x0 + sigma * noise
        out = self.guided(z, t, **cond)
        if self.teacher_prediction == "v_prediction":  # (x0, eps) the guided output means, unclipped
            x_hat, eps = alpha * z - sigma * out, alpha * out + sigma * z
        else:
            x_hat, eps = (z - sigma * out) / alpha, out
        target = alpha * eps - sigma * x_hat if self.student_prediction == "v_prediction" else eps
        return F.mse_loss(predict_noise(model, z, t, **cond).float(), target)


def noise_of(z: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The epsilon for which ``z = alpha x0 + sigma eps``."""
    return (z - alpha * x0) / sigma


@dataclass
class RoundResult:
    """One finished round: the student's steps, its loss curve and its cost."""

    steps: int
    student: nn.Module
    losses: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    optimizer_steps: int = 0
    resumed_from: int | None = None
    steps_per_second: float = 0.0
    processes: int = 1
    guidance_scale: float | None = None  # stage one of guided distillation: the teacher's scale

    def record(self) -> dict:
        """The round's entry in ``metrics.rounds`` (stage one of guided distillation also says
        ``guidance_scale``: its teacher ran guided at the same steps)."""
        guided = {} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale}
        return {
            "steps": self.steps,
            "teacher_steps": self.steps if guided else self.steps * 2,
            **guided,
            "losses": self.losses,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "wall_s": round(self.seconds, 2),
            "optimizer_steps": self.optimizer_steps,
            "resumed_from": self.resumed_from,
            "steps_per_second": self.steps_per_second,
            "processes": self.processes,
        }


def round_recipe(cfg: StepDistillConfig) -> FinetuneConfig:
    """The training recipe of one round, in the finetune loop's terms (a conditioned model's conditions
    are never dropped: the student learns the conditional half, the guided teacher gives the rest)."""
    return dataclasses.replace(
        FinetuneConfig(),
        cond_dropout=0.0,
        steps=cfg.steps_per_round,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay,
        grad_clip=cfg.grad_clip,
        grad_accum=cfg.grad_accum,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        distill=dataclasses.replace(FinetuneConfig().distill, weight_output=0.0, weight_features=0.0),
    )


def distill_round(
    student: nn.Module,
    teacher: nn.Module,
    scheduler_config: dict,
    images,
    cfg: StepDistillConfig,
    student_steps: int,
    round_index: int,
    teacher_prediction: str,
    checkpoint_dir: Path,
    seed: int,
    device: torch.device,
    on_step: Callable[[int, float, float], None] | None = None,
    stop_after: int | None = None,
) -> RoundResult:
    """Train ``student`` (in place) to take ``student_steps`` steps where ``teacher`` takes twice as many.

    Returns the round's EMA student. Resumes the newest checkpoint in ``checkpoint_dir``.
    """

    noise_scheduler = make_scheduler("ddpm", scheduler_config)
    objective = PairTarget(
        teacher,
        noise_scheduler.alphas_cumprod,
        student_steps,
        teacher_prediction,
        cfg.prediction_type,
        bool(scheduler_config.get("clip_sample", False)),
    ).to(device)
    batch_seed = seed * 1_009 + round_index  # every round draws its own batches, reproducibly
    return _train_round(student, noise_scheduler, images, cfg, objective, student_steps, checkpoint_dir,
                        batch_seed, device, on_step, stop_after, draw_range=student_steps)  # fmt: skip


def _train_round(
    student: nn.Module,
    noise_scheduler,
    data,
    cfg: StepDistillConfig,
    objective: nn.Module,
    steps: int,
    checkpoint_dir: Path,
    batch_seed: int,
    device: torch.device,
    on_step: Callable[[int, float, float], None] | None,
    stop_after: int | None,
    draw_range: int | None = None,
    guidance_scale: float | None = None,
) -> RoundResult:
    """One round of ``cfg.steps_per_round`` optimizer steps of ``student`` towards ``objective``
    (resumed from the newest checkpoint in ``checkpoint_dir``), as the round sampled at ``steps``."""
    began = time.perf_counter()
    result = train(
        student,
        noise_scheduler,
        data,
        round_recipe(cfg),
        checkpoint_dir,
        batch_seed,
        device,
        resume=True,
        on_step=on_step,
        stop_after=stop_after,
        objective=objective,
        draw_range=draw_range,
    )
    return RoundResult(
        steps,
        result.ema_unet,
        result.losses,
        time.perf_counter() - began,
        cfg.steps_per_round - (result.resumed_from or 0),
        result.resumed_from,
        result.steps_per_second,
        result.world_size,
        guidance_scale,
    )


def guided_round(
    student: nn.Module,
    teacher: nn.Module,
    scheduler_config: dict,
    data,
    cfg: StepDistillConfig,
    guidance_scale: float,
    null: NullCondition,
    steps: int,
    teacher_prediction: str,
    checkpoint_dir: Path,
    seed: int,
    device: torch.device,
    on_step: Callable[[int, float, float], None] | None = None,
    stop_after: int | None = None,
) -> RoundResult:
    """Stage one of guided distillation: train ``student`` (in place) on conditioned ``data`` to give in
    one call on the conditional half what ``teacher`` gives guided at ``guidance_scale`` over both
    (:class:`GuidedTarget`), at every training timestep; ``steps``: the DDIM steps the result is
    sampled at before the halving rounds (its teacher's). Returns the EMA student."""
    noise_scheduler = make_scheduler("ddpm", scheduler_config)
    objective = GuidedTarget(
        teacher, noise_scheduler.alphas_cumprod, guidance_scale, null, teacher_prediction, cfg.prediction_type
    ).to(device)
    batch_seed = seed * 1_009 - 1  # its own batches, apart from every halving round's
    return _train_round(student, noise_scheduler, data, cfg, objective, steps, checkpoint_dir, batch_seed,
                        device, on_step, stop_after, guidance_scale=float(guidance_scale))  # fmt: skip
