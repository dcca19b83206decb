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

from compressor.config import FinetuneConfig, StepDistillConfig
from compressor.errors import ConfigError
from compressor.models import predict_noise
from compressor.sampling import make_scheduler
from compressor.training import train

PREDICTION_TYPES = ("epsilon", "v_prediction")


def trailing_grid(num_train_timesteps: int, steps: int) -> np.ndarray:
    """DDIM's trailing timesteps for ``steps`` steps (diffusers' ``timestep_spacing="trailing"``)."""
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1


def student_scheduler_config(scheduler_config: dict, prediction_type: str) -> dict:
    """The scheduler config saved with a student: trailing DDIM grid, its prediction type,
    and the last step landing on the clean image (``set_alpha_to_one``)."""
    out = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    out.update(timestep_spacing="trailing", prediction_type=prediction_type, set_alpha_to_one=True)
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
    def _ddim(self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step of the teacher from ``t`` to ``s`` (diffusers' rule)."""
        out = predict_noise(self.teacher, z, t).float()
        x0, eps = self._split(out, z, t, self.teacher_prediction)
        alpha_s, sigma_s = self._coef(s)
        return alpha_s * x0 + sigma_s * eps

    def forward(
        self, model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        """The round's loss on one micro-batch."""
        t, t_mid, s = self.t[k], self.t_mid[k], self.t_next[k]
        alpha_t, sigma_t = self._coef(t)
        z = alpha_t * x0 + sigma_t * noise
        z_s = self._ddim(self._ddim(z, t, t_mid), t_mid, s)
        alpha_s, sigma_s = self._coef(s)
        ratio = sigma_s / sigma_t
        x_target = (z_s - ratio * z) / (alpha_s - ratio * alpha_t)  # ratio = 0 on the last step: z_s
        out = predict_noise(model, z, t).float()
        if self.student_prediction == "v_prediction":
            target = alpha_t * noise_of(z, x_target, alpha_t, sigma_t) - sigma_t * x_target
        else:
            target = noise_of(z, x_target, alpha_t, sigma_t)
        return F.mse_loss(out, target)


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

    def record(self) -> dict:
        """The round's entry in ``metrics.rounds``."""
        return {
            "steps": self.steps,
            "teacher_steps": self.steps * 2,
            "losses": self.losses,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "wall_s": round(self.seconds, 2),
            "optimizer_steps": self.optimizer_steps,
            "resumed_from": self.resumed_from,
            "steps_per_second": self.steps_per_second,
            "processes": self.processes,
        }


def round_recipe(cfg: StepDistillConfig) -> FinetuneConfig:
    """The training recipe of one round, in the finetune loop's terms."""
    return dataclasses.replace(
        FinetuneConfig(),
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
    began = time.perf_counter()
    result = train(
        student,
        noise_scheduler,
        images,
        round_recipe(cfg),
        checkpoint_dir,
        seed * 1_009 + round_index,  # every round draws its own batches, reproducibly
        device,
        resume=True,
        on_step=on_step,
        stop_after=stop_after,
        objective=objective,
        draw_range=student_steps,
    )
    done = cfg.steps_per_round - (result.resumed_from or 0)
    return RoundResult(
        student_steps,
        result.ema_unet,
        result.losses,
        time.perf_counter() - began,
        done,
        result.resumed_from,
        result.steps_per_second,
        result.world_size,
    )
