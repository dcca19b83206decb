"""The model a run compresses, as one typed description: its components and what they imply.

Component names follow diffusers' pipelines: ``unet`` (the denoiser, always there), its
``scheduler`` config, and optionally ``vae`` (an ``AutoencoderKL``: the denoiser then works on
latents), ``text_encoder`` and ``tokenizer`` (CLIP: text conditioning); class conditioning is the
UNet's own (``num_class_embeds``). Two views of the same description:

- :class:`ModelSpec`: the components' configs alone, read without weights (preflight reads one
  from a model folder, the deploy side from a run's saved structure);
- :class:`DiffusionModel`: the loaded modules (what :func:`compressor.models.load_model` returns);
  its :attr:`~DiffusionModel.spec` is the :class:`ModelSpec` of those modules, so every derived
  fact (``conditioning``, ``latent``, ``sample_shape``, ``image_shape``, the denoiser's inputs) is
  computed in one place.

The denoiser's inputs (:meth:`ModelSpec.denoiser_inputs`) are what export and serving feed it:
``sample`` and ``timestep``, plus ``encoder_hidden_states`` (B, tokens, cross_attention_dim) with
text conditioning and ``class_labels`` (B,) with class conditioning. A ``UNet2DConditionModel``
without a text encoder is run unconditionally, its cross-attention fed a fixed null context
(zeros, :func:`compressor.models.null_context`) inside the call, so its inputs are the plain two.

Conditional and latent models run through every stage but ``train`` and ``distill_steps``
(:data:`compressor.preflight.CONDITIONAL_STAGES`); preflight refuses them there up front. The VAE
may be an ``AutoencoderKL`` (Stable Diffusion: latents times ``scaling_factor``) or a ``VQModel``
(LDMPipeline's ``vqvae``: latents unscaled, :func:`is_vq`).

Loading the optional components of a diffusers pipeline folder (``model_index.json`` with
``vae/``, ``text_encoder/``, ``tokenizer/``) is here too (:func:`load_components`); the UNet and
scheduler are loaded by :mod:`compressor.models`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compressor.errors import ModelError

Conditioning = Literal["none", "text", "class"]
CONTEXT_LENGTH = 77  # token count of the conditioning sequence when no tokenizer says otherwise
OPTIONAL_COMPONENTS = ("vae", "text_encoder", "tokenizer")
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
# model_index.json's class names this project loads, per component
COMPONENT_CLASSES = {
    "vae": ("AutoencoderKL", "VQModel"),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
# the config file that marks a component's folder as present
COMPONENT_FILES = {"vae": "config.json", "text_encoder": "config.json", "tokenizer": "tokenizer_config.json"}
# another name a pipeline gives a component: LDMPipeline's VQ autoencoder is its "vqvae"
COMPONENT_ALIASES = {"vae": ("vae", "vqvae")}


def is_vq(vae_config: Mapping | None) -> bool:
    """True for a VQ autoencoder (``VQModel``, the LDMs' ``vqvae``): LDMPipeline feeds its latents
    unscaled (no ``scaling_factor``) and decodes them through its quantizer."""
    return vae_config is not None and vae_config.get("_class_name") == "VQModel"


@dataclass(frozen=True)
class InputSpec:
    """One input of the denoiser: its name, shape for a batch (batch first), dtype and dynamic axes.

    ``role`` says how an example is made: ``sample`` and ``context`` standard normal, ``timestep``
    a constant step, ``label`` class indices below ``classes``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: Literal["sample", "timestep", "context", "label"]
    dynamic_axes: tuple[tuple[int, str], ...] = ((0, "batch"),)
    classes: int = 0

    @property
    def per_item(self) -> tuple[int, ...]:
        """The shape after the batch axis (what Triton's ``dims`` list)."""
        return self.shape[1:]

    def example(
        self,
        generator: torch.Generator | None = None,
        timestep: int = 10,
        shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """An example tensor (on the CPU); ``shape`` replaces this input's own (a smaller trace)."""
        shape = shape or self.shape
        if self.role == "timestep":
            return torch.full(shape, timestep, dtype=self.dtype)
        if self.role == "label":
            return torch.arange(shape[0], dtype=self.dtype).remainder(max(self.classes, 1))
        return torch.randn(shape, generator=generator, dtype=self.dtype)


@dataclass(frozen=True)
class DenoiserInputs:
    """The denoiser's inputs for one batch size, in call order (``sample``, ``timestep``, then the
    conditioning): what export traces with and serving declares."""

    inputs: tuple[InputSpec, ...]

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def conditions(self) -> tuple[InputSpec, ...]:
        """The inputs after ``sample`` and ``timestep`` (the conditioning, if any)."""
        return self.inputs[2:]

    def __getitem__(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` for the inputs."""
        return {i.name: dict(i.dynamic_axes) for i in self.inputs}

    def examples(
        self,
        generator: torch.Generator | None = None,
        timestep: int = 10,
        device: torch.device | str = "cpu",
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Example tensors, in order, drawn from ``generator`` (``shapes``: per-name overrides)."""
        shapes = shapes or {}
        return {i.name: i.example(generator, timestep, shapes.get(i.name)).to(device) for i in self.inputs}


def _size_hw(size: Any) -> tuple[int, int]:
    if size is None:
        raise ModelError("the UNet config has no sample_size; set model.sample_size")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def denoiser_sample_shape(unet_config: Mapping) -> tuple[int, int, int]:
    """(C, H, W) of one input sample of a UNet with this diffusers config."""
    conditional = unet_config.get("_class_name") == "UNet2DConditionModel"
    channels = unet_config.get("in_channels", 4 if conditional else 3)
    return (int(channels), *_size_hw(unet_config.get("sample_size")))


@dataclass(frozen=True)
class ModelSpec:
    """The model's components as configs (no weights), and every fact derived from them.

    ``unet``: the denoiser's diffusers config; ``scheduler``: its scheduler config; ``vae``,
    ``text_encoder``: their configs, None when absent; ``tokenizer``: its ``tokenizer_config``
    (``model_max_length``), None when absent.
    """

    unet: Mapping
    scheduler: Mapping = field(default_factory=dict)
    vae: Mapping | None = None
    text_encoder: Mapping | None = None
    tokenizer: Mapping | None = None

    @property
    def components(self) -> tuple[str, ...]:
        """The components present, ``unet`` first."""
        return ("unet", *(c for c in OPTIONAL_COMPONENTS if getattr(self, c) is not None))

    @property
    def text_components(self) -> tuple[str, ...]:
        return tuple(c for c in TEXT_COMPONENTS if getattr(self, c) is not None)

    @property
    def num_classes(self) -> int | None:
        """The UNet's class count (``num_class_embeds``), None without class embeddings."""
        n = self.unet.get("num_class_embeds")
        return None if n is None else int(n)

    @property
    def class_embed_type(self) -> str | None:
        return self.unet.get("class_embed_type")

    @property
    def conditioning(self) -> Conditioning:
        """``text`` with a text encoder or tokenizer, ``class`` with the UNet's class embeddings,
        else ``none`` (a ``UNet2DConditionModel`` alone is run with a fixed null context)."""
        if self.text_components:
            return "text"
        if self.num_classes is not None or self.class_embed_type is not None:
            return "class"
        return "none"

    @property
    def latent(self) -> bool:
        """True when a VAE is present: the denoiser works on latents, images are decoded."""
        return self.vae is not None

    @property
    def cross_attention_dim(self) -> int | None:
        """Width of the UNet's ``encoder_hidden_states`` (None for a UNet without cross-attention)."""
        if self.unet.get("_class_name") != "UNet2DConditionModel":
            return None
        dim = self.unet.get("cross_attention_dim", 1280)
        return int(dim if isinstance(dim, int) else dim[0])

    @property
    def tokens(self) -> int:
        """Length of the text conditioning sequence: the tokenizer's, else the text encoder's."""
        pairs = ((self.tokenizer, "model_max_length"), (self.text_encoder, "max_position_embeddings"))
        for source, key in pairs:
            value = (source or {}).get(key)
            if isinstance(value, int) and 0 < value < 1_000_000:  # transformers' "no limit" is 1e30
                return value
        return CONTEXT_LENGTH

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent spans per side: 2 ** (VAE levels - 1), as diffusers' pipelines
        compute it; 1 without a VAE."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.get("block_out_channels", (64,))) - 1)

    @property
    def latent_scaling(self) -> float:
        """The VAE's ``scaling_factor`` (latents are multiplied by it after encoding); 1 without one."""
        if self.vae is None or is_vq(self.vae):  # LDMPipeline does not scale a VQModel's latents
            return 1.0
        return float(self.vae.get("scaling_factor", 0.18215))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the denoiser's input: latents for a latent model, else the image."""
        return denoiser_sample_shape(self.unet)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the user sees: the denoiser's sample, VAE-decoded for a latent model."""
        c, h, w = self.sample_shape
        if self.vae is None:
            return (c, h, w)
        f = self.vae_scale_factor
        return (int(self.vae.get("out_channels", 3)), h * f, w * f)

    @classmethod
    def of(cls, unet: nn.Module, like: ModelSpec | None = None) -> ModelSpec:
        """The description of ``unet`` (e.g. a pruned copy) among the other components of ``like``
        (default: the UNet alone)."""
        config = {"_class_name": type(unet).__name__, **_config_dict(unet.config)}
        return cls(config) if like is None else replace(like, unet=config)

    def denoiser_inputs(self, batch: int = 1) -> DenoiserInputs:
        """The denoiser's inputs for ``batch`` samples (see the module docstring); ModelError where the
        conditioning cannot be described (a class embedding other than ``num_class_embeds``, text
        components beside a UNet without cross-attention)."""
        inputs = [
            InputSpec("sample", (batch, *self.sample_shape), torch.float32, "sample"),
            InputSpec("timestep", (batch,), torch.long, "timestep"),
        ]
        if self.conditioning == "text":
            dim = self.cross_attention_dim
            if dim is None:
                raise ModelError(
                    f"the model has {', '.join(self.text_components)} but its UNet "
                    f"({self.unet.get('_class_name', 'UNet2DModel')}) takes no encoder_hidden_states; "
                    "text conditioning needs a UNet2DConditionModel"
                )
            shape = (batch, self.tokens, dim)
            inputs.append(InputSpec("encoder_hidden_states", shape, torch.float32, "context"))
        if self.num_classes is not None or self.class_embed_type is not None:
            if self.class_embed_type is not None:
                raise ModelError(
                    f"class_embed_type={self.class_embed_type!r}: only class embeddings by label "
                    "(num_class_embeds) are described"
                )
            inputs.append(InputSpec("class_labels", (batch,), torch.long, "label", classes=self.num_classes))
        return DenoiserInputs(tuple(inputs))

    def refusal(self) -> str:
        """Why the unconditional pixel-space pipeline would get this model wrong ("" when it would not):
        e.g. ``has text conditioning (text_encoder, tokenizer) and works on latents (vae)``."""
        parts = []
        if self.conditioning == "text":
            parts.append(f"has text conditioning ({', '.join(self.text_components)})")
        if self.num_classes is not None or self.class_embed_type is not None:
            what = (
                f"num_class_embeds={self.num_classes}"
                if self.class_embed_type is None
                else f"class_embed_type={self.class_embed_type}"
            )
            parts.append(f"has class conditioning ({what})")
        if self.latent:
            parts.append("works on latents (vae)")
        return " and ".join(parts)


def _config_dict(config: Any) -> dict:
    """A module's config as a plain dict (diffusers' FrozenDict, transformers' PretrainedConfig)."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


@dataclass
class DiffusionModel:
    """The model a run compresses: the denoiser (``unet``), its scheduler config, where it came from,
    and the optional components of a diffusers pipeline (``vae``, ``text_encoder``, ``tokenizer``).

    The derived facts (:attr:`conditioning`, :attr:`latent`, :attr:`sample_shape`,
    :attr:`image_shape`, :meth:`denoiser_inputs`) come from :attr:`spec`, read from the modules'
    configs each time (so ``model.sample_size``, registered on the UNet, is seen).
    """

    unet: nn.Module
    scheduler_config: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None

    @property
    def spec(self) -> ModelSpec:
        """The description of these modules without their weights."""
        tokenizer = None
        if self.tokenizer is not None:
            tokenizer = {"model_max_length": getattr(self.tokenizer, "model_max_length", None),
                         "_class_name": type(self.tokenizer).__name__}  # fmt: skip
        return ModelSpec(
            unet=ModelSpec.of(self.unet).unet,
            scheduler=dict(self.scheduler_config),
            vae=None if self.vae is None else _config_dict(self.vae.config),
            text_encoder=None if self.text_encoder is None else _config_dict(self.text_encoder.config),
            tokenizer=tokenizer,
        )

    @property
    def components(self) -> tuple[str, ...]:
        return self.spec.components

    @property
    def conditioning(self) -> Conditioning:
        return self.spec.conditioning

    @property
    def num_classes(self) -> int | None:
        return self.spec.num_classes

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.spec.sample_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.image_shape

    def denoiser_inputs(self, batch: int = 1) -> DenoiserInputs:
        return self.spec.denoiser_inputs(batch)


# -- the optional components of a pipeline folder -------------------------------------------------


def model_index(folder: Path) -> dict | None:
    """A pipeline folder's ``model_index.json`` (None when there is none); ModelError if unreadable."""
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path}: not valid JSON; re-download or re-save the pipeline") from None
    if not isinstance(index, dict):
        raise ModelError(f"{path}: not a diffusers model index (a JSON object); re-save the pipeline")
    return index


def present_components(folder: Path) -> dict[str, Path]:
    """The optional components a pipeline folder holds: listed in its ``model_index.json`` and with
    their own folder and config file. ModelError for a class this project does not load."""
    index = model_index(folder)
    if index is None:
        return {}
    found = {}
    for name in OPTIONAL_COMPONENTS:
        key = next((k for k in COMPONENT_ALIASES.get(name, (name,)) if index.get(k)), name)
        entry = index.get(key)
        sub = folder / key
        if not entry or entry == [None, None]:  # not part of this pipeline
            continue
        if not (sub / COMPONENT_FILES[name]).is_file():
            raise ModelError(
                f"{folder}: model_index.json lists the {key} but {sub / COMPONENT_FILES[name]} is missing; "
                f"copy the pipeline's {key}/ folder too, or re-download the pipeline"
            )
        cls = entry[1] if isinstance(entry, list | tuple) and len(entry) == 2 else None
        if cls is not None and cls not in COMPONENT_CLASSES[name]:
            raise ModelError(
                f"{folder}: {name} is a {cls}; only {' or '.join(COMPONENT_CLASSES[name])} is loaded"
            )
        found[name] = sub
    return found


def read_component_configs(folder: Path) -> dict[str, dict]:
    """The configs of a pipeline folder's optional components, without their weights."""
    out = {}
    for name, sub in present_components(folder).items():
        path = sub / COMPONENT_FILES[name]
        try:
            out[name] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path}: not valid JSON; re-download or re-save the pipeline") from None
    return out


def _transformers(component: str):
    try:
        import transformers
    except ImportError:
        raise ModelError(
            f"the model has a {component} (text conditioning), which needs the transformers package; "
            "install it with `pip install transformers tokenizers`"
        ) from None
    return transformers


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def load_components(folder: Path, random_init: bool = False, seed: int = 0) -> dict[str, Any]:
    """Load the optional components present in a pipeline folder (see :func:`present_components`).

    ``random_init`` (``model.init=random``): the VAE and text encoder are built from their configs
    with seeded random weights, like the UNet; the tokenizer (no weights) is read as it is.
    """
    out: dict[str, Any] = {}
    for name, sub in present_components(folder).items():
        try:
            out[name] = _load_component(name, sub, random_init, seed)
        except ModelError:
            raise
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            raise ModelError(
                f"{sub}: cannot load the {name} ({_first_line(exc)}); only safetensors weights are loaded, "
                "re-save the pipeline with save_pretrained(..., safe_serialization=True)"
            ) from None
    return out


def _load_component(name: str, sub: Path, random_init: bool, seed: int) -> Any:
    if name == "tokenizer":
        return _transformers(name).CLIPTokenizer.from_pretrained(str(sub), local_files_only=True)
    if name == "vae":
        import diffusers

        config = diffusers.AutoencoderKL.load_config(str(sub))
        cls = diffusers.VQModel if is_vq(config) else diffusers.AutoencoderKL
        built = lambda: cls.from_config(config)  # noqa: E731
    else:
        tf = _transformers(name)
        cls, built = tf.CLIPTextModel, lambda: tf.CLIPTextModel(tf.CLIPTextConfig.from_pretrained(str(sub)))
    if not random_init:
        return cls.from_pretrained(str(sub), local_files_only=True, use_safetensors=True).eval()
    torch.manual_seed(seed + OPTIONAL_COMPONENTS.index(name) + 1)  # seeded apart from the UNet
    return built().eval()
