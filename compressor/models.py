"""Loading diffusers UNets and their schedulers, and calling them uniformly.

A model is named by ``model.name``: a local diffusers folder, a hub id, or one of
the shipped architecture names (JSON files in ``compressor/architectures``). With
``model.init=random`` a shipped architecture is built offline with seeded random
weights; with ``pretrained`` it loads the local copy shipped in
``compressor/assets`` (the demo model) or the architecture's hub id.

What is loaded is a :class:`~compressor.components.DiffusionModel`: the UNet, its scheduler
config and, from a diffusers pipeline folder (``model_index.json``), the VAE, text encoder and
tokenizer it holds. A shipped architecture names a UNet alone (``sd-v1-unet`` is Stable
Diffusion's UNet), so only the UNet and its scheduler are loaded for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.components import (
    CONTEXT_LENGTH,
    DiffusionModel,
    ModelSpec,
    denoiser_sample_shape,
    load_components,
    read_component_configs,
)
from compressor.config import ModelConfig
from compressor.errors import ConfigError, ModelError

ARCH_DIR = Path(__file__).parent / "architectures"
ASSET_DIR = Path(__file__).parent / "assets"
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ReusePredictor:
    """A noise predictor with DeepCache's two passes (see :mod:`compressor.feature_reuse`).

    ``full(sample, timestep, **conditioning) -> (noise, feature)``, ``shallow(sample, timestep,
    feature, **conditioning) -> noise`` (``conditioning``: a conditional model's
    ``encoder_hidden_states`` or ``class_labels``). Called like a plain predictor it runs the full
    pass, so a backend built for feature reuse also serves every sampler that does not reuse.
    """

    full: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    shallow: Callable[..., torch.Tensor]
    level: int = 0

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
    ) -> torch.Tensor:
        """The full pass's noise."""
        return self.full(sample, timestep, **conditioning)[0]


def shipped_architectures() -> list[str]:
    """Names of the architecture configs that ship with the package."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def architecture_spec(name: str) -> dict:
    """The shipped JSON for ``name`` (keys: unet, scheduler, hub_id)."""
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelError(
            f"model.name={name!r} is not a shipped architecture; choose one of "
            f"{', '.join(shipped_architectures())}"
        )
    return json.loads(path.read_text())


def unet_class(class_name: str) -> type:
    """The diffusers class for a config's ``_class_name``."""
    import diffusers

    if class_name not in SUPPORTED_CLASSES:
        raise ModelError(
            f"model class {class_name!r} is not supported; use a UNet2DModel or UNet2DConditionModel"
        )
    return getattr(diffusers, class_name)


def build_unet(unet_config: dict, seed: int = 0) -> nn.Module:
    """Instantiate a UNet from a diffusers config dict with seeded random weights."""
    cls = unet_class(unet_config.get("_class_name", "UNet2DModel"))
    torch.manual_seed(seed)
    try:
        return cls.from_config(unet_config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid UNet config: {exc}; check the architecture JSON") from None


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _load_folder(folder: Path, components: bool = True) -> DiffusionModel:
    """Load a diffusers UNet + scheduler from a local folder (pipeline or model layout), and with
    ``components`` the VAE, text encoder and tokenizer a pipeline folder holds."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    sched_file = next(
        (
            p
            for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
            if p.is_file()
        ),
        None,
    )
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise ModelError(
            f"{folder}: no config.json (or unet/config.json); point model.name at a diffusers model folder"
        )
    try:
        unet_cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{cfg_file}: not valid JSON; re-download or re-save the model") from None
    cls = unet_class(unet_cfg.get("_class_name", ""))
    try:
        unet = cls.from_pretrained(str(unet_dir), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{unet_dir}: cannot load UNet weights ({first[:200]}); only safetensors weights are loaded, "
            "re-save the model with save_pretrained(..., safe_serialization=True)"
        ) from None
    if sched_file is None:
        raise ModelError(f"{folder}: no scheduler_config.json; save the scheduler beside the UNet")
    scheduler_config = json.loads(sched_file.read_text())
    parts = load_components(folder) if components else {}
    return DiffusionModel(unet, scheduler_config, {"kind": "folder", "path": str(folder)}, **parts)


def _load_hub(hub_id: str, components: bool = True) -> DiffusionModel:
    """Download (or read from the local cache) a hub model; fails clearly offline. ``components``:
    a pipeline's VAE, text encoder and tokenizer too (the tokenizer's merges are a .txt file)."""
    patterns = ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors"] + (
        ["*/*.txt"] if components else []
    )
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hub_id, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise ModelError(
            f"cannot fetch {hub_id!r} from the Hugging Face hub ({type(exc).__name__}); without network, "
            "download it elsewhere and set model.name to the local folder, or use model.init=random"
        ) from None
    loaded = _load_folder(Path(path), components)
    loaded.source = {"kind": "hub", "hub_id": hub_id}
    return loaded


def _shipped(folder: Path, name: str, suffix: str = "") -> bool:
    """True when ``name`` is a plain name (not a path) of an entry in ``folder``."""
    return re.fullmatch(r"[\w.-]+", name) is not None and (folder / f"{name}{suffix}").exists()


def load_model(cfg: ModelConfig, seed: int = 0) -> DiffusionModel:
    """Load the model named by ``cfg`` (see module docstring); raises ModelError."""
    name = cfg.name
    path = Path(name).expanduser()
    if cfg.init == "random":
        parts: dict = {}
        if _shipped(ARCH_DIR, name, ".json"):
            spec = architecture_spec(name)
            unet_cfg, sched = spec["unet"], spec["scheduler"]
        elif path.is_dir():
            loaded_cfg = _read_folder_configs(path)
            unet_cfg, sched = loaded_cfg
            parts = load_components(path, random_init=True, seed=seed)
        else:
            raise ModelError(
                f"model.name={name!r}: model.init=random needs a shipped architecture "
                f"({', '.join(shipped_architectures())}) or a local diffusers folder"
            )
        if cfg.sample_size is not None:
            unet_cfg = {**unet_cfg, "sample_size": cfg.sample_size}
        unet = build_unet(unet_cfg, seed)
        source = {"kind": "random", "architecture": name, "seed": seed}
        return DiffusionModel(unet, dict(sched), source, **parts)
    if _shipped(ASSET_DIR, name):
        loaded = _load_folder(ASSET_DIR / name)
        loaded.source = {"kind": "shipped", "name": name}
    elif _shipped(ARCH_DIR, name, ".json"):
        spec = architecture_spec(name)
        loaded = _load_hub(spec["hub_id"], components=False)  # the architecture is the UNet alone
    elif path.is_dir():
        loaded = _load_folder(path)
    elif path.exists():
        raise ModelError(f"model.name={name!r} is a file, not a diffusers model folder")
    elif _looks_like_hub_id(name) and not name.startswith((".", "/", "~")):
        loaded = _load_hub(name)
    else:
        raise ModelError(
            f"model folder {name!r} does not exist; give a local diffusers folder, a hub id "
            f"(org/name) or one of {', '.join(shipped_architectures())}"
        )
    if cfg.sample_size is not None:
        loaded.unet.register_to_config(sample_size=cfg.sample_size)
    return loaded


def read_model_configs(cfg: ModelConfig) -> tuple[dict, dict] | None:
    """(UNet config, scheduler config) of the model ``cfg`` names, read without its weights, with
    ``model.sample_size`` applied: what settings that depend on the model are checked against
    before any stage runs (:mod:`compressor.preflight`).

    None where that is not cheap (a hub id that is not a shipped architecture) or the model
    cannot be found (its loader then says why). Raises ModelError for an unreadable config.
    """
    spec = read_model_spec(cfg)
    return None if spec is None else (dict(spec.unet), dict(spec.scheduler))


def read_model_spec(cfg: ModelConfig) -> ModelSpec | None:
    """The description of the model ``cfg`` names from its components' configs alone (see
    :func:`read_model_configs`; a pipeline folder's VAE, text encoder and tokenizer included)."""
    name = cfg.name
    path = Path(name).expanduser()
    parts: dict = {}
    if cfg.init == "pretrained" and _shipped(ASSET_DIR, name):  # digits-sd is a whole pipeline
        found = _read_folder_configs(ASSET_DIR / name)
        parts = read_component_configs(ASSET_DIR / name)
    elif _shipped(ARCH_DIR, name, ".json"):  # random init, or the hub model the architecture names
        spec = architecture_spec(name)
        found = spec["unet"], spec["scheduler"]
    elif path.is_dir():
        found = _read_folder_configs(path)
        parts = read_component_configs(path)
    else:
        return None
    unet_cfg, sched = found
    if cfg.sample_size is not None:
        unet_cfg = {**unet_cfg, "sample_size": cfg.sample_size}
    return ModelSpec(unet_cfg, dict(sched), **parts)


def _read_folder_configs(path: Path) -> tuple[dict, dict]:
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json; point model.name at a diffusers model folder")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        sched_file = path / "scheduler_config.json"
    try:
        sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
        return json.loads(cfg_file.read_text()), sched
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(
            f"{path}: a config file is not valid JSON; re-download or re-save the model"
        ) from None


def is_conditional(unet: nn.Module) -> bool:
    """True for UNets that take ``encoder_hidden_states`` (cross-attention)."""
    return type(unet).__name__ == "UNet2DConditionModel"


def sample_shape(unet: nn.Module, batch: int) -> tuple[int, int, int, int]:
    """Shape of one batch of the UNet's input samples (see ``denoiser_sample_shape``)."""
    return (batch, *denoiser_sample_shape({"_class_name": type(unet).__name__, **unet.config}))


def null_context(unet: nn.Module, batch: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The fixed conditioning used for unconditional use of a conditional UNet (zeros)."""
    if not is_conditional(unet):
        return None
    return torch.zeros(batch, CONTEXT_LENGTH, unet.config.cross_attention_dim, device=device)


def class_embeds(unet: nn.Module) -> int | None:
    """The UNet's class count when it embeds class labels by index (``num_class_embeds``), else None."""
    n = getattr(unet.config, "num_class_embeds", None) if hasattr(unet, "config") else None
    return None if n is None or getattr(unet, "class_embedding", None) is None else int(n)


def example_inputs(
    unet: nn.Module, batch: int = 1, device: torch.device | str = "cpu", tokens: int | None = None
) -> dict:
    """Keyword inputs for tracing/counting one UNet call: sample, timestep, and the conditioning the
    UNet takes: a null context (zeros, ``tokens`` long, 77 by default) with cross-attention, class 0
    with class embeddings (``num_class_embeds``)."""
    g = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {
        "sample": torch.randn(sample_shape(unet, batch), generator=g).to(device),
        "timestep": torch.full((batch,), 10, dtype=torch.long, device=device),
    }
    ctx = null_context(unet, batch, device)
    if ctx is not None:
        if tokens is not None and tokens != ctx.shape[1]:
            ctx = torch.zeros(batch, tokens, ctx.shape[2], device=device)
        inputs["encoder_hidden_states"] = ctx
    if class_embeds(unet) is not None:
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    return inputs


def predict_noise(
    unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
) -> torch.Tensor:
    """Call a diffusers UNet as ``(sample, timestep) -> noise`` (plain tensor out).

    ``conditioning``: ``encoder_hidden_states`` and/or ``class_labels`` of a conditional model (see
    :meth:`compressor.components.ModelSpec.denoiser_inputs`); without them a conditional UNet gets
    the fixed null context (:func:`null_context`).
    """
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    kwargs = dict(conditioning)
    ctx = kwargs.get("encoder_hidden_states")
    if ctx is None:
        ctx = null_context(unet, sample.shape[0], sample.device)
    if ctx is not None:
        kwargs["encoder_hidden_states"] = ctx.to(sample.dtype)
    return unet(sample, timestep, return_dict=False, **kwargs)[0]


def as_noise_predictor(unet: nn.Module) -> NoisePredictor:
    """Wrap a torch UNet as the backend-agnostic ``unet(sample, timestep) -> noise`` callable; a
    conditional model's ``encoder_hidden_states`` / ``class_labels`` pass through by keyword."""

    def call(sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return predict_noise(unet, sample, timestep, **conditioning)

    return call


def count_macs_params(unet: nn.Module, tokens: int | None = None) -> tuple[int, int]:
    """MACs of one batch-1 UNet call with its conditioning and the parameter count (torch-pruning's
    counter).

    The count is per call: a conditional UNet is counted with its ``encoder_hidden_states``
    (``tokens`` long, 77 by default: :func:`example_inputs`) and/or ``class_labels``. Under
    classifier-free guidance the sampler calls the UNet at twice the batch (the conditioned and the
    unconditioned half), so one guided step costs twice this count per image.
    """
    import torch_pruning as tp

    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # its batch-size notice is noise
        macs, params = tp.utils.count_ops_and_params(unet, example_inputs(unet, 1, device, tokens))
    unet.train(was_training)
    return int(macs), int(params)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
