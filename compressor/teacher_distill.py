"""The dense model as teacher in the finetune: output and block-output (feature) distillation.

The student is the pruned UNet; the teacher is the dense UNet it was pruned from, frozen
and in eval mode. Output distillation matches the two noise predictions on the same noisy
input (MSE); feature distillation matches the outputs of chosen down/mid/up blocks, as BK-SDM
matches stage outputs, through a learned 1x1 convolution where the student's width differs
from the teacher's (pruning narrows most blocks), each block's MSE relative to its teacher
output's mean square (blocks of every scale weigh alike). The projections live in
:class:`DistillStudent` beside the UNet so data-parallel training syncs their gradients
with the UNet's; they are saved in checkpoints (for exact resume) and never in the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from compressor.config import DistillConfig
from compressor.errors import ConfigError
from compressor.models import example_inputs, predict_noise


def block_points(unet: nn.Module) -> dict[str, nn.Module]:
    """Every matchable block of a diffusers UNet: ``down.I``, ``mid``, ``up.I`` -> module."""
    points = {f"down.{i}": block for i, block in enumerate(unet.down_blocks)}
    if getattr(unet, "mid_block", None) is not None:
        points["mid"] = unet.mid_block
    points.update({f"up.{i}": block for i, block in enumerate(unet.up_blocks)})
    return points


def resolve_points(unet: nn.Module, names: list[str]) -> list[str]:
    """The block names ``names`` select (``down``/``up`` expand to every block of that kind)."""
    available = list(block_points(unet))
    chosen: list[str] = []
    for name in names:
        found = [p for p in available if p.split(".")[0] == name] if name in ("down", "up") else [name]
        if not found or found[0] not in available:
            raise ConfigError(
                f"finetune.distill.feature_points: {name!r} is not a block of this UNet; "
                f"choose from {', '.join(available)} (or down, up for all of a kind)"
            )
        chosen += [p for p in found if p not in chosen]
    if not chosen:
        raise ConfigError("finetune.distill.feature_points is empty; name at least one block (e.g. mid)")
    return chosen


def _hidden(output) -> torch.Tensor:
    """A block's output feature map (down blocks return (hidden, skip tensors))."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def tapped(unet: nn.Module, points: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``unet``'s forward passes record the chosen blocks' outputs by name."""
    modules = block_points(unet)
    found: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: found.__setitem__(name, _hidden(out))
        )
        for name in points
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _key(point: str) -> str:
    return point.replace(".", "_")  # ModuleDict keys cannot hold dots


class DistillStudent(nn.Module):
    """The student UNet plus the 1x1 projections of its block outputs onto the teacher's widths.

    ``forward(noisy, timestep) -> (noise, {point: projected feature})``; a point whose widths
    agree has no projection (identity). Only ``unet`` is saved as the model.
    """

    def __init__(self, unet: nn.Module, teacher: nn.Module, points: list[str], seed: int) -> None:
        super().__init__()
        self.unet = unet
        self.points = points
        widths = {"student": block_widths(unet, points), "teacher": block_widths(teacher, points)}
        # a batch-1 forward per model, only where points are matched
        g = torch.Generator().manual_seed(seed * 1_000_033 + 17)
        projections = {}
        for point in points:
            s, t = widths["student"][point], widths["teacher"][point]
            if s != t:
                conv = nn.Conv2d(s, t, 1)
                with torch.no_grad():  # seeded like everything else in a finetune (resume, N processes)
                    bound = 1 / s**0.5
                    conv.weight.copy_((torch.rand(conv.weight.shape, generator=g) * 2 - 1) * bound)
                    conv.bias.copy_((torch.rand(conv.bias.shape, generator=g) * 2 - 1) * bound)
                projections[_key(point)] = conv
        self.projections = nn.ModuleDict(projections)
        device = next(unet.parameters()).device
        self.projections.to(device)
        self.train(unet.training)

    def train(self, mode: bool = True) -> DistillStudent:
        """Train mode, except that a UNet without active dropout computes in eval mode.

        Without dropout (p = 0 everywhere, as in every shipped architecture) the two modes
        are the same function, but not the same kernels: a p = 0 dropout copies its input
        into another memory layout, so convolutions round differently. In the teacher's
        mode, a student equal to its teacher gives exactly its outputs, hence exactly zero
        distillation loss and gradient (Adam would turn rounding-level gradients into
        full-size steps).
        """
        super().train(mode)
        if mode and not has_active_dropout(self.unet):
            self.unet.eval()
        return self

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor):
        """The student's noise and its (projected) block outputs; ``conditioning``: a conditional
        UNet's ``encoder_hidden_states`` / ``class_labels``."""
        with tapped(self.unet, self.points) as found:
            noise = predict_noise(self.unet, noisy, timestep, **conditioning)
        feats = {}
        for point in self.points:
            proj = self.projections[_key(point)] if _key(point) in self.projections else None
            feats[point] = found[point] if proj is None else proj(found[point].to(proj.weight.dtype))
        return noise, feats


def has_active_dropout(module: nn.Module) -> bool:
    """Whether any dropout layer of ``module`` drops anything (p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def block_widths(unet: nn.Module, points: list[str]) -> dict[str, int]:
    """Output channels of each chosen block, from one batch-1 forward (none without points)."""

    if not points:
        return {}
    device = next(unet.parameters()).device
    x = example_inputs(unet, 1)
    extra = {}
    if getattr(unet.config, "num_class_embeds", None):  # a class-conditional UNet needs a label
        extra["class_labels"] = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), tapped(unet, points) as found:
        predict_noise(unet, x["sample"].to(device), x["timestep"].to(device), **extra)
    return {p: int(found[p].shape[1]) for p in points}


def make_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The frozen teacher: its own copy on ``device``, eval mode, no gradients."""
    import copy

    teacher = copy.deepcopy(teacher).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's MSE over its teacher output's mean square."""
    dims = tuple(range(1, teacher.dim()))
    error = (student - teacher).pow(2).mean(dims)
    return (error / teacher.pow(2).mean(dims).clamp_min(1e-8)).mean()


def distill_losses(
    cfg: DistillConfig,
    noise: torch.Tensor,
    student: tuple[torch.Tensor, dict[str, torch.Tensor]],
    teacher: nn.Module,
    noisy: torch.Tensor,
    timestep: torch.Tensor,
    points: list[str],
    conditioning: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted total and each term (task, output, features) of one micro-batch; the teacher
    sees ``conditioning`` (a conditional model's, the same the student saw)."""
    pred, feats = student
    pred = pred.float()
    terms = {"task": F.mse_loss(pred, noise)}
    matched = points if cfg.weight_features > 0 else []
    with torch.no_grad(), tapped(teacher, matched) as found:
        target = predict_noise(teacher, noisy, timestep, **(conditioning or {})).float()
    terms["output"] = F.mse_loss(pred, target)
    if matched:
        # relative MSE: each block's error over its teacher output's mean square, so blocks of
        # any scale (deep ones run larger) weigh alike. Per sample, then averaged: a mean over
        # samples splits exactly over data-parallel processes (a batch-wide ratio would not)
        per_point = [_relative_mse(feats[p].float(), found[p].float()) for p in points]
        terms["features"] = torch.stack(per_point).mean()
    else:
        terms["features"] = torch.zeros((), device=pred.device)
    terms["total"] = (
        cfg.weight_task * terms["task"]
        + cfg.weight_output * terms["output"]
        + cfg.weight_features * terms["features"]
    )
    return terms
