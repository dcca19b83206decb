"""Helper for test_training and test_step_distill: train a tiny UNet (1 process or torchrun), save it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from compressor.config import DistillConfig, FinetuneConfig
from compressor.models import build_unet
from compressor.sampling import make_scheduler
from compressor.training import train
from tests.conftest import DDPM_SCHEDULER, TINY_UNET


def student_round(out: Path) -> None:
    """One progressive-distillation round (8 -> 4 steps), 4 optimizer steps, as the stage runs it."""
    import copy

    from compressor.config import StepDistillConfig
    from compressor.step_distill import distill_round

    torch.set_num_threads(1)
    teacher = build_unet(TINY_UNET, seed=0)
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = StepDistillConfig(target_steps=4, start_steps=8, steps_per_round=4, batch_size=4, log_every=1)
    result = distill_round(copy.deepcopy(teacher), teacher, DDPM_SCHEDULER, images, cfg, 4, 0, "epsilon",
                           out / "ckpt", 0, torch.device("cpu"))  # fmt: skip
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        state = {k: v.contiguous() for k, v in result.student.state_dict().items()}
        save_file(state, str(out / "weights.safetensors"))
        (out / "losses.json").write_text(json.dumps({"losses": result.losses, "world": result.processes}))


def main(out: Path, distill: bool = False) -> None:
    """Train 4 steps; ``distill``: a pruned student taught by the dense UNet (outputs and features)."""
    torch.set_num_threads(1)
    unet = build_unet(TINY_UNET, seed=0)
    teacher = None
    if distill:
        from compressor.pruning import pruned_copy

        teacher, unet = unet, pruned_copy(unet, 0.25, None)
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = FinetuneConfig(steps=4, batch_size=4, lr=1e-3, checkpoint_every=100, log_every=1, grad_clip=1.0)
    if distill:
        cfg.distill = DistillConfig(
            weight_output=1.0, weight_features=0.5, feature_points=["down", "mid", "up"]
        )
    result = train(
        unet,
        make_scheduler("ddpm", DDPM_SCHEDULER),
        images,
        cfg,
        out / "ckpt",
        0,
        torch.device("cpu"),
        teacher=teacher,
    )
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        # the last rank writes (with 2 processes: not the checkpoint writer), proving ranks agree
        save_file(
            {k: v.contiguous() for k, v in result.unet.state_dict().items()}, str(out / "weights.safetensors")
        )
        meta = {"losses": result.losses, "terms": result.loss_terms, "world": result.world_size}
        (out / "losses.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    if "--student" in sys.argv[2:]:
        student_round(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), "--distill" in sys.argv[2:])
