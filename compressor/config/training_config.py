"""Config sections of training: ``finetune`` (:class:`FinetuneConfig`) with its teacher
(:class:`DistillConfig`, ``finetune.distill``), and ``distill_steps`` (:class:`StepDistillConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from compressor.config.fields import _spec


@dataclass
class DistillConfig:
    """The dense model as teacher in the finetune (on by default; off when both weights are 0).

    The loss is ``weight_task`` x the plain denoising loss + ``weight_output`` x MSE(student
    noise, teacher noise) + ``weight_features`` x the mean over ``feature_points`` of the relative
    MSE (over the teacher output's mean square) of the student's block output, projected by a
    learned 1x1 convolution where widths differ, against the teacher's. The teacher is frozen,
    in eval mode, without gradients; each process holds its own copy. Projections are trained
    with the student and saved in its checkpoints (so a resume is exact), never in the model.
    The defaults (output and feature weights 1) come from the demo's budget sweep (README).
    """

    weight_task: float = _spec(1.0, "weight of the plain denoising loss", ge=0.0)
    weight_output: float = _spec(1.0, "weight of the MSE between student and teacher noise", ge=0.0)
    weight_features: float = _spec(1.0, "weight of the block-output matching loss", ge=0.0)
    feature_points: list[str] = _spec(
        ["mid", "up"], "blocks whose outputs are matched: down.I, mid, up.I, or down/up for all of a kind"
    )

    @property
    def active(self) -> bool:
        """True when the teacher is used (an output or feature weight above 0)."""
        return self.weight_output > 0 or self.weight_features > 0


@dataclass
class FinetuneConfig:
    """Finetuning after pruning (epsilon-prediction DDPM loss)."""

    steps: int = _spec(200, "optimizer steps", ge=0)
    batch_size: int = _spec(64, "global batch size", ge=1)
    lr: float = _spec(2e-4, "peak learning rate", gt=0.0)
    optimizer: Literal["adam", "adamw"] = _spec("adam", "optimizer")
    weight_decay: float = _spec(0.0, "weight decay", ge=0.0)
    warmup_steps: int = _spec(0, "linear learning-rate warm-up steps", ge=0)
    schedule: Literal["constant", "cosine", "linear"] = _spec("constant", "lr after warm-up")
    grad_clip: float = _spec(1.0, "max gradient norm (0 disables)", ge=0.0)
    ema_decay: float = _spec(0.9999, "EMA decay", ge=0.0, lt=1.0)
    ema_warmup: bool = _spec(True, "EMA warm-up: decay grows from 0 to ema_decay")
    ema_power: float = _spec(0.75, "EMA warm-up power (diffusers EMAModel)", gt=0.0)
    grad_accum: int = _spec(1, "gradient accumulation steps", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = _spec("no", "autocast on GPU")
    checkpoint_every: int = _spec(100, "steps between checkpoints", ge=1)
    log_every: int = _spec(10, "steps between loss log rows", ge=1)
    cond_dropout: float = _spec(
        0.0,
        "conditional models: probability that an image's caption becomes the empty prompt or its class "
        "the null class (classifier-free guidance; Stable Diffusion and BK-SDM use 0.1)",
        ge=0.0,
        le=1.0,
    )
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class StepDistillConfig:
    """Step distillation (stage ``distill_steps``): train the run's model to take few steps.

    Progressive distillation (Salimans and Ho 2022): the dense model sampled with DDIM at
    ``start_steps`` is the first teacher; each round trains a student whose one DDIM step
    matches two of its teacher's, halving the steps, until ``target_steps``; each round's
    student (EMA weights) teaches the next. Off while ``target_steps`` is null.
    """

    target_steps: int | None = _spec(
        None, "the student's sampling steps (null: off); must divide the training timesteps (8, 4, 2)", ge=1
    )
    method: Literal["progressive"] = _spec(
        "progressive", "recipe: progressive distillation (each round halves the steps)"
    )
    start_steps: int = _spec(32, "the dense teacher's DDIM steps: target_steps x 2^k, k >= 1", ge=2)
    student: Literal["final", "dense"] = _spec(
        "final", "the student starts from the run's compressed model (final) or from the dense one"
    )
    prediction_type: Literal["epsilon", "v_prediction"] = _spec(
        "epsilon", "what the student predicts (saved in its scheduler config; every sampler honours it)"
    )
    steps_per_round: int = _spec(150, "optimizer steps per round", ge=1)
    batch_size: int = _spec(64, "global batch size", ge=1)
    lr: float = _spec(2e-4, "learning rate (constant after warm-up)", gt=0.0)
    warmup_steps: int = _spec(10, "linear warm-up steps of each round", ge=0)
    ema_decay: float = _spec(
        0.995, "EMA decay of each round's student (the next round's teacher)", ge=0.0, lt=1.0
    )
    grad_clip: float = _spec(1.0, "max gradient norm (0 disables)", ge=0.0)
    grad_accum: int = _spec(1, "gradient accumulation steps", ge=1)
    checkpoint_every: int = _spec(50, "steps between checkpoints (a resume restarts mid-round)", ge=1)
    log_every: int = _spec(10, "steps between loss log rows", ge=1)

    @property
    def active(self) -> bool:
        """True when a student is asked for (``target_steps`` set)."""
        return self.target_steps is not None

    def round_steps(self) -> list[int]:
        """The student's steps after each round, e.g. [16, 8, 4] from 32 to 4."""
        out, n = [], self.start_steps
        while self.target_steps is not None and n > self.target_steps:
            n //= 2
            out.append(n)
        return out
