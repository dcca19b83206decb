"""Saving and loading (pruned) UNets without pickle.

A saved model is two files (names in :mod:`rundir.layout`): ``unet.safetensors``
(the weights) and the *structure file* ``unet.json`` (the dense diffusers config, the
torch-pruning history that rebuilds the pruned structure from it, the kept widths and
every parameter shape), plus a probe for the exact-reload check. Loading builds the
dense architecture, replays the history, checks every shape and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compressor.errors import ModelError
from compressor.guidance import distilled_scale
from compressor.models import build_unet, example_inputs, predict_noise
from compressor.pruning import pruned_heads, replay_history, set_attention_heads, sync_module_attributes
from compressor.stack import Stack
from rundir import layout
from rundir.records import RecordError, final_model_dir, read_metrics

FORMAT = "compress-deploy/unet"
FORMAT_VERSION = 1


def dense_config(unet: nn.Module) -> dict:
    """The diffusers config dict of ``unet`` (dense widths; pruning does not change it)."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(unet).__name__
    return json.loads(json.dumps(cfg, default=list))


def save_unet(
    unet: nn.Module,
    folder: Path,
    config: dict,
    history: list | None = None,
    kept_widths: dict | None = None,
    extra: dict | None = None,
) -> list[Path]:
    """Write ``unet.safetensors`` + ``unet.json`` into ``folder``; returns the files written.

    ``config`` is the dense diffusers config the pruning history applies to.
    Files are written under temporary names and renamed into place.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "unet_config": config,
        "history": history or [],
        "kept_widths": kept_widths or {},
        "shapes": {k: list(v.shape) for k, v in state.items()},
        **(extra or {}),
    }
    heads = pruned_heads(unet)
    if heads is not None:  # whole heads pruned: the counts the config does not say
        meta["attention_heads"] = heads
    weights, structure = layout.weights_file(folder), layout.structure_file(folder)
    probe = layout.probe_file(folder)
    tmp_w, tmp_p = weights.with_suffix(".safetensors.tmp"), structure.with_suffix(".json.tmp")
    save_file(state, str(tmp_w))
    tmp_p.write_text(json.dumps(meta, indent=1))
    save_file(probe_outputs(unet), str(probe.with_suffix(".tmp")))
    probe.with_suffix(".tmp").replace(probe)
    tmp_w.replace(weights)
    tmp_p.replace(structure)
    return [weights, structure, probe]


def probe_outputs(unet: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    """Fixed inputs and the model's outputs on them, to prove a reload is exact."""

    was_training = unet.training
    unet.eval()
    x = example_inputs(unet, batch, next(unet.parameters()).device)
    labels = {"class_labels": x["class_labels"]} if "class_labels" in x else {}  # a class-conditional UNet
    with torch.no_grad():
        noise = predict_noise(unet, x["sample"], x["timestep"], **labels)
    unet.train(was_training)
    out = {"sample": x["sample"].cpu(), "timestep": x["timestep"].cpu(), "noise": noise.contiguous().cpu()}
    return out | {k: v.cpu() for k, v in labels.items()}


def probe_difference(folder: Path, unet: nn.Module) -> float:
    """Max abs difference between ``unet`` and the outputs saved with it in ``folder``."""
    from safetensors.torch import load_file

    probe = load_file(str(layout.probe_file(folder)))
    device = next(unet.parameters()).device
    with torch.no_grad():
        labels = {"class_labels": probe["class_labels"].to(device)} if "class_labels" in probe else {}
        out = predict_noise(unet.eval(), probe["sample"].to(device), probe["timestep"].to(device), **labels)
    return float((out.cpu() - probe["noise"]).abs().max())


def read_structure(folder: Path) -> dict:
    """Read and check a saved model's structure file; raises ModelError when missing or foreign."""
    structure_file = layout.structure_file(folder)
    if not structure_file.is_file():
        raise ModelError(f"{folder}: no {structure_file.name}; run the stage that writes this model first")
    try:
        meta = json.loads(structure_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(
            f"{structure_file}: not valid JSON (truncated?); rerun the stage that wrote it"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{structure_file}: not a compress-deploy model file; rerun the stage that wrote it")
    return meta


def student_sampling(folder: Path) -> tuple[dict, int] | None:
    """(scheduler config, steps) a few-step student is sampled with; None for any other model.

    A ``distill_steps`` student records both in its structure file: the DDIM grid and
    ``prediction_type`` it was trained for, and its step count. A student of a guided model's
    scheduler config also holds the scale it was distilled at
    (:data:`compressor.guidance.DISTILLED_GUIDANCE`): sampled through
    :func:`compressor.sampling.make_scheduler` and the loop, it runs on the conditional half alone,
    once a step at the images' batch (:func:`student_guidance` reads the scale).
    """
    meta = read_structure(folder)
    steps = meta.get("student_steps")
    return (meta["scheduler_config"], int(steps)) if steps else None


def student_guidance(folder: Path) -> float | None:
    """The guidance scale a conditional model's few-step student was distilled at (it is then sampled
    unguided: one UNet call a step on the conditional half), None for any other model."""
    found = student_sampling(folder)
    return None if found is None else distilled_scale(found[0])


def load_unet(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved (pruned) UNet exactly; returns it (eval mode) and its metadata.

    Raises ModelError for a missing, truncated or mismatched model (e.g. a pruning
    history from another architecture).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_structure(folder)
    weights = layout.weights_file(folder)
    if not weights.is_file():
        raise ModelError(f"{folder}: no unet.safetensors; rerun the stage that writes this model")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"{weights}: unreadable weights ({str(exc)[:120]}); the file is truncated or corrupted, "
            "rerun the stage that wrote it"
        ) from None
    unet = build_unet(meta["unet_config"])
    if meta["history"]:
        try:
            replay_history(unet, meta["history"])
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError):
            raise ModelError(
                f"{layout.structure_file(folder)}: the pruning history does not fit its architecture "
                "(a history from another model?); rerun the prune stage"
            ) from None
    set_attention_heads(unet, meta.get("attention_heads"))
    sync_module_attributes(unet)
    expected = {k: list(v.shape) for k, v in unet.state_dict().items()}
    found = {k: list(v.shape) for k, v in state.items()}
    if expected != found:
        diff = _diff(expected, found)
        raise ModelError(
            f"{weights}: weights do not match the pruned architecture ({diff[0]}); the weights and "
            "structure file come from different runs, rerun the stage that wrote them"
        )
    unet.load_state_dict(state, strict=True)
    return unet.to(device).eval(), meta


def _diff(expected: dict, found: dict) -> list[str]:
    out = []
    for k in sorted(set(expected) | set(found)):
        if expected.get(k) != found.get(k):
            out.append(f"{k}: expected {expected.get(k)}, found {found.get(k)}")
    return out


def as_pipeline(unet: nn.Module, scheduler_config: dict, kind: str = "ddim"):
    """The UNet inside a diffusers DDIMPipeline/DDPMPipeline (unconditional UNets)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if kind == "ddim":
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))


def student_stack(run: Path) -> Stack | None:
    """The sampler of the run's few-step student (DDIM at its own steps, fp32, no reuse) when the
    final model is one (stage ``distill_steps``), else None."""
    try:
        stage, folder = final_model_dir(run)
    except RecordError:
        return None
    found = student_sampling(folder) if stage == "distill_steps" else None
    if found is None:
        return None
    ratio = read_metrics(run, "prune")
    return Stack(ratio.ratio if ratio else 0.0, "ddim", found[1], 1, "fp32", found[1])
