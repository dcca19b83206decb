"""DDPM training and finetuning (epsilon-prediction loss) on Hugging Face Accelerate.

The same loop trains the demo's dense base model and finetunes pruned models, on
one CPU or many GPUs (``accelerate launch`` / ``torchrun``). Every step draws its
batch indices, noise, timesteps and dropout from generators seeded by
``(seed, step)``, so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run would take, and N processes see the same global batch as one.
Checkpoints are safetensors plus JSON (no pickle), written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compressor.conditional_batches import ConditionedSamples, NullCondition, drop_conditions, null_condition
from compressor.config import FinetuneConfig
from compressor.errors import ConfigError, ModelError
from compressor.models import predict_noise
from compressor.teacher_distill import DistillStudent, distill_losses, make_teacher, resolve_points
from rundir import layout

CKPT_PREFIX = "step-"


@dataclass
class TrainResult:
    """The trained weights (raw and EMA) and the loss curve."""

    unet: nn.Module
    ema_unet: nn.Module
    losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    loss_terms: list[list[float]] = field(default_factory=list)  # [step, task, output, features]
    resumed_from: int | None = None
    steps_per_second: float = 0.0
    world_size: int = 1


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for everything random in one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def draw_batch(
    images, num_images: int, batch: int, sample_shape: tuple, num_train_timesteps: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of step ``step``: (clean images, noise, timesteps)."""
    g = step_generator(seed, step)
    idx = torch.randint(num_images, (batch,), generator=g)
    noise = torch.randn((batch, *sample_shape), generator=g)
    t = torch.randint(0, num_train_timesteps, (batch,), generator=g)
    x0 = torch.stack([images[int(i)] for i in idx])
    return x0, noise, t


def draw_conditioned_batch(
    data: ConditionedSamples,
    batch: int,
    num_train_timesteps: int,
    cond_dropout: float,
    null: NullCondition,
    seed: int,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The global batch of step ``step`` from conditioned data: (clean samples, noise, timesteps,
    conditioning), each image's condition dropped to ``null`` with probability ``cond_dropout``.

    Indices, noise and timesteps are drawn as :func:`draw_batch` draws them, the dropout mask next,
    all from the step's own generator (a resumed run drops the same conditions).
    """
    g = step_generator(seed, step)
    idx = torch.randint(len(data), (batch,), generator=g)
    x0 = data.samples(idx).float()
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, num_train_timesteps, (batch,), generator=g)
    drop = torch.rand(batch, generator=g) < cond_dropout
    return x0, noise, t, drop_conditions(data.conditions(idx), drop, null)


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then constant, cosine or linear decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def make_optimizer(unet: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the UNet's parameters."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_ema(unet: nn.Module, cfg: FinetuneConfig):
    """diffusers' EMAModel; with warm-up the decay grows as 1 - (1 + step)^-power."""
    from diffusers.training_utils import EMAModel

    return EMAModel(
        unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, power=cfg.ema_power
    )


# -- checkpoints -------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    step: int,
    unet: nn.Module,
    opt,
    ema,
    losses: list,
    projections: nn.Module | None = None,
    loss_terms: list | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary folder renamed into place).

    ``projections``: distillation's 1x1 projections (``projections.safetensors``), kept for an
    exact resume and never part of the model.
    """
    from safetensors.torch import save_file

    final = checkpoint_at(folder, step)
    tmp = folder / f".tmp-{CKPT_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    ema_state = ema.state_dict()
    shadow = ema_state.pop("shadow_params")
    save_file(
        {f"{i}": p.detach().contiguous().cpu() for i, p in enumerate(shadow)}, str(tmp / "ema.safetensors")
    )
    opt_state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    if projections is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in projections.state_dict().items()}
        save_file(state, str(tmp / "projections.safetensors"))
    meta = {
        "step": step,
        "losses": losses,
        "loss_terms": loss_terms or [],
        "ema": {k: v for k, v in ema_state.items() if not torch.is_tensor(v)},
        "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
    }
    layout.trainer_state(tmp).write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder, if any."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob(f"{CKPT_PREFIX}*") if layout.trainer_state(p).is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, unet: nn.Module, opt, ema, projections: nn.Module | None = None
) -> tuple[int, list, list]:
    """Restore model, optimizer, EMA (and projections) from ``path``; (step, losses, loss terms)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads(layout.trainer_state(path).read_text())
        model_state = load_file(str(path / "model.safetensors"))
        ema_tensors = load_file(str(path / "ema.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        proj_state = load_file(str(path / "projections.safetensors")) if projections is not None else None
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"checkpoint {path} is corrupted or incomplete ({type(exc).__name__}); delete it to resume "
            "from the previous one, or rerun with --force STAGE to start afresh"
        ) from None
    own = {k: list(v.shape) for k, v in unet.state_dict().items()}
    if own != {k: list(v.shape) for k, v in model_state.items()}:
        raise ModelError(
            f"checkpoint {path} belongs to a different architecture; delete the checkpoints folder "
            "or rerun with --force STAGE to start afresh"
        )
    unet.load_state_dict(model_state)
    if projections is not None:
        projections.load_state_dict(proj_state)
    state: dict = {}
    for key, val in opt_tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    for key, val in meta["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    ema_state = dict(meta["ema"])
    ema_state["shadow_params"] = [ema_tensors[str(i)] for i in range(len(ema_tensors))]
    ema.load_state_dict(ema_state)
    return int(meta["step"]), meta["losses"], meta.get("loss_terms", [])


def checkpoint_at(folder: Path, step: int) -> Path:
    """The checkpoint folder of ``step`` (complete or not)."""
    return folder / f"{CKPT_PREFIX}{step:08d}"


def ema_model(checkpoint: Path, unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` holding the EMA weights saved in ``checkpoint`` (in eval mode)."""
    from safetensors.torch import load_file

    try:
        shadow = load_file(str(checkpoint / "ema.safetensors"))
    except (OSError, ValueError) as exc:
        why = type(exc).__name__
        raise ModelError(f"checkpoint {checkpoint} has no readable EMA weights ({why})") from None
    model = copy.deepcopy(unet).eval()
    params = list(model.parameters())
    if len(shadow) != len(params) or any(shadow[str(i)].shape != p.shape for i, p in enumerate(params)):
        raise ModelError(f"checkpoint {checkpoint} belongs to a different architecture")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[str(i)])
    return model


# -- the loop ----------------------------------------------------------------------------


def train(
    unet: nn.Module,
    noise_scheduler,
    images,
    cfg: FinetuneConfig,
    checkpoint_dir: Path,
    seed: int,
    device: torch.device,
    resume: bool = True,
    on_step: Callable[[int, float, float], None] | None = None,
    stop_after: int | None = None,
    teacher: nn.Module | None = None,
    objective: nn.Module | None = None,
    draw_range: int | None = None,
) -> TrainResult:
    """Train ``unet`` on ``images`` (indexable, items (C, H, W) in [-1, 1]) for ``cfg.steps``.

    ``images`` may instead be conditioned data (:class:`~compressor.conditional_batches.ConditionedSamples`:
    an :class:`~compressor.encoded_cache.EncodedData` of latents, or
    :class:`~compressor.conditional_batches.PixelConditions` for a pixel-space model): each batch then
    feeds the UNet (and the teacher) its ``encoder_hidden_states`` / ``class_labels``, each image's
    condition dropped to the empty prompt or the null class with probability ``cfg.cond_dropout``
    (:func:`draw_conditioned_batch`). A plain dataset trains exactly as before (same weights).
    The finetune stage passes :attr:`pipeline.context.RunContext.training_data`: the dataset
    encoded once on the main process (:func:`~compressor.encoded_cache.encode_dataset`), an
    ``EncodedData`` (latent model) or ``PixelConditions(images, encoded)`` (pixel model) in place of
    the images, with the dense model as ``teacher``.

    Data-parallel when started under ``accelerate launch``/``torchrun``: the global
    batch ``cfg.batch_size`` is split evenly over processes and gradient
    accumulation micro-batches. ``stop_after`` ends early (tests of resume).
    ``teacher`` (with ``cfg.distill`` active): distil from it (see :mod:`compressor.teacher_distill`);
    every process holds its own frozen copy and computes its own micro-batches' targets.
    ``objective`` (``(model, x0, noise, t, **conditions) -> loss``, e.g. step distillation's): replaces
    the denoising loss; ``t`` is then drawn from ``[0, draw_range)`` instead of the timesteps (all of
    them without ``draw_range``), and conditioned data's conditions are passed to it by keyword.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=cfg.mixed_precision if device.type == "cuda" else "no",
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"finetune.batch_size={cfg.batch_size} must be divisible by processes x grad_accum = {per_step}"
        )
    micro = cfg.batch_size // per_step
    conditioned = isinstance(images, ConditionedSamples)
    null = null_condition(unet, images) if conditioned else None
    num_images = len(images)
    if num_images < micro:
        raise ConfigError(
            f"the dataset has {num_images} images, fewer than one micro-batch ({micro}); "
            "lower finetune.batch_size or add images"
        )
    unet = unet.to(accelerator.device)
    unet.train()
    distill = cfg.distill if teacher is not None and cfg.distill.active else None
    student: nn.Module = unet
    points: list[str] = []
    if distill is not None:
        teacher = make_teacher(teacher, accelerator.device)
        points = resolve_points(unet, distill.feature_points) if distill.weight_features > 0 else []
        student = DistillStudent(unet, teacher, points, seed)
    projections = student.projections if distill is not None else None
    opt = make_optimizer(student, cfg)
    ema = make_ema(unet, cfg)
    start, losses, loss_terms, resumed_from = 0, [], [], None
    ckpt = latest_checkpoint(checkpoint_dir) if resume else None
    if ckpt is not None:
        start, losses, loss_terms = load_checkpoint(ckpt, unet, opt, ema, projections)
        resumed_from = start
    model, opt = accelerator.prepare(student, opt)
    ema.to(accelerator.device)
    sample_shape = None if conditioned else tuple(images[0].shape)
    num_t = draw_range or noise_scheduler.config.num_train_timesteps
    if objective is not None:
        objective = objective.to(accelerator.device)
    began, done = time.perf_counter(), 0
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        cond: dict[str, torch.Tensor] = {}
        if conditioned:
            x0, noise, t, cond = draw_conditioned_batch(
                images, cfg.batch_size, num_t, cfg.cond_dropout, null, seed, step
            )
        else:
            x0, noise, t = draw_batch(images, num_images, cfg.batch_size, sample_shape, num_t, seed, step)
        lo = rank * cfg.grad_accum * micro
        torch.manual_seed(seed * 7_919 + step * world + rank)  # dropout, if the model has any
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        step_loss = torch.zeros((), device=accelerator.device)
        step_terms = torch.zeros(3, device=accelerator.device)
        for k in range(cfg.grad_accum):
            sl = slice(lo + k * micro, lo + (k + 1) * micro)
            xb, nb, tb = (v[sl].to(accelerator.device) for v in (x0, noise, t))
            cb = {name: v[sl].to(accelerator.device) for name, v in cond.items()}
            sync = accelerator.no_sync(model) if k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                if objective is not None:  # a conditioned model's conditions go to it by keyword
                    loss = objective(model, xb, nb, tb, **cb) / cfg.grad_accum
                elif distill is None:
                    noisy = noise_scheduler.add_noise(xb, nb, tb)
                    loss = F.mse_loss(predict_noise(model, noisy, tb, **cb).float(), nb) / cfg.grad_accum
                else:
                    noisy = noise_scheduler.add_noise(xb, nb, tb)
                    student_out = model(noisy, tb, **cb)
                    terms = distill_losses(distill, nb, student_out, teacher, noisy, tb, points, cb)
                    loss = terms["total"] / cfg.grad_accum
                    parts = [terms["task"], terms["output"], terms["features"]]
                    step_terms += torch.stack(parts).detach() / cfg.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        mean_loss = float(accelerator.reduce(step_loss, "mean"))
        done += 1
        if (step + 1) % cfg.log_every == 0 or step == start:
            losses.append([step + 1, mean_loss])
            if distill is not None:
                loss_terms.append([step + 1, *accelerator.reduce(step_terms, "mean").tolist()])
        if on_step and accelerator.is_main_process:
            on_step(step + 1, mean_loss, done / (time.perf_counter() - began))
        last = step + 1 == end
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            if accelerator.is_main_process:
                save_checkpoint(checkpoint_dir, step + 1, unet, opt, ema, losses, projections, loss_terms)
            accelerator.wait_for_everyone()
    raw = unet  # the UNet module itself (DDP and the distillation wrapper only hold it)
    raw.eval()
    ema_unet = copy.deepcopy(raw)
    ema.copy_to(ema_unet.parameters())
    elapsed = time.perf_counter() - began
    return TrainResult(
        raw, ema_unet.eval(), losses, loss_terms, resumed_from, done / elapsed if elapsed > 0 else 0.0, world
    )
