"""Export a (pruned) diffusers UNet to ONNX: ``(sample, timestep) -> noise``.

- Inputs ``sample`` (float32, N x C x H x W) and ``timestep`` (int64, N); output
  ``noise``; dynamic batch axis; opset 18. The inputs' names, example tensors and dynamic axes
  come from the model's description (:meth:`compressor.components.ModelSpec.denoiser_inputs`),
  so a conditioned model's plain call also takes ``encoder_hidden_states`` (N x tokens x D) or
  ``class_labels`` (int64, N); so do feature reuse's two passes (their ``feature`` after them).
- fp32 always; an fp16 variant whose weights and activations are float16 while every
  normalisation (GroupNorm, LayerNorm) runs in float32 (fp16 overflows there), with
  float32 inputs and outputs; attentions that diffusers marks ``upcast_softmax`` (the
  UNet2D blocks) keep their softmax in float32 too. TensorRT builds strongly typed
  networks, so these types are the engine's.
- The fp16 graph is traced at a small spatial size with dynamic height/width, then pinned
  to the model's size: CPUs have no fast float16 convolution (a 128-channel 3x3 conv at
  256x256 takes 95 s in fp16 vs 0.46 s in fp32 on 2 cores), so tracing the 256-pixel
  CelebA-HQ UNet at full size took over 24 minutes. The graph is the same at every size
  (shapes flow through Shape ops); parity checks the pinned file at full size.
- Constant folding and graph clean-up through Polygraphy's ``FoldConstants``.
- External data (one file, relative, beside the .onnx) for models over 2 GiB.
- ``onnx.checker`` runs on every file written.

Exporter: the TorchScript-based exporter (``dynamo=False``), the one NVIDIA's diffusion
tooling uses. Measured with ``python scripts/bench_exporters.py`` on the ddpm-cifar10-32
architecture (1 CPU thread): TorchScript 1.9 s, 1,640 nodes, max abs error 1.9e-6; dynamo
9.2 s, 789 nodes, max abs error 1.9e-6. Same accuracy, 5x faster export, and Polygraphy's
constant folding removes most of the extra nodes (920 -> 520 on the demo model).
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compressor.components import ModelSpec
from compressor.errors import ArtifactError
from compressor.feature_reuse import FeatureReuseUNet
from compressor.models import predict_noise, sample_shape
from rundir.artifacts import verify_against_manifest

INPUT_NAMES = ["sample", "timestep"]
OUTPUT_NAMES = ["noise"]
# The graphs a UNet exports as: the plain call, and DeepCache's two passes (feature reuse).
INTERFACES: dict[str, tuple[list[str], list[str]]] = {
    "unet": (INPUT_NAMES, OUTPUT_NAMES),
    "full": (INPUT_NAMES, ["noise", "feature"]),
    "shallow": ([*INPUT_NAMES, "feature"], OUTPUT_NAMES),
    # a text-to-image pipeline's other graphs (export.pipeline_graphs), exported once per run
    "text_encoder": (["input_ids"], ["last_hidden_state"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
}
# the conditioning inputs a UNet graph may take after sample and timestep, in this order
CONDITION_INPUTS = ("encoder_hidden_states", "class_labels")
TWO_GIB = 2**31
OPSET = 18


class NoisePredictorModule(nn.Module):
    """Wraps a UNet so it returns a plain tensor; fp16 variants cast at the edges.

    ``conditions``: the names of the conditioning inputs that follow ``sample`` and ``timestep``
    (``encoder_hidden_states``, ``class_labels``; none for an unconditional model).
    """

    def __init__(
        self, unet: nn.Module, dtype: torch.dtype = torch.float32, conditions: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.unet = unet
        self.dtype = dtype
        self.conditions = tuple(conditions)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, *conditions: torch.Tensor
    ) -> torch.Tensor:
        given = {
            name: c.to(self.dtype) if c.is_floating_point() else c
            for name, c in zip(self.conditions, conditions, strict=True)
        }
        return predict_noise(self.unet, sample.to(self.dtype), timestep, **given).float()


class FullPassModule(nn.Module):
    """The full pass of a feature-reuse split as a graph: (sample, timestep[, conditions]) -> (noise,
    feature). ``conditions``: the conditioning inputs' names after ``timestep`` (as the plain call's)."""

    def __init__(
        self, split: nn.Module, dtype: torch.dtype = torch.float32, conditions: tuple[str, ...] = ()
    ):
        super().__init__()
        self.split = split
        self.dtype = dtype
        self.conditions = tuple(conditions)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, *conditions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        given = _typed(self.conditions, conditions, self.dtype)
        noise, feature = self.split.full(sample.to(self.dtype), timestep, **given)
        return noise.float(), feature.float()


class ShallowPassModule(nn.Module):
    """The shallow pass as a graph: (sample, timestep[, conditions], feature) -> noise (float32 at the
    edges); the conditioning inputs sit where the plain call has them, the cached feature last."""

    def __init__(
        self, split: nn.Module, dtype: torch.dtype = torch.float32, conditions: tuple[str, ...] = ()
    ):
        super().__init__()
        self.split = split
        self.dtype = dtype
        self.conditions = tuple(conditions)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *conditions, feature = rest
        given = _typed(self.conditions, conditions, self.dtype)
        return self.split.shallow(sample.to(self.dtype), timestep, feature.to(self.dtype), **given).float()


def _typed(names: tuple[str, ...], values, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Conditioning inputs by name, embeddings in ``dtype`` (labels stay integers)."""
    return {n: v.to(dtype) if v.is_floating_point() else v for n, v in zip(names, values, strict=True)}


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the surrounding dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the surrounding dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def half_with_fp32_norms(unet: nn.Module) -> nn.Module:
    """A float16 copy of ``unet``: normalisations, and softmax where the model upcasts it, in float32.

    diffusers' SDPA attention ignores ``Attention.upcast_softmax``; the classic processor
    honours it (scores in fp16, softmax in fp32), so attentions asking for it get that one.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    model = copy.deepcopy(unet).half()
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = Float32GroupNorm
        elif type(module) is nn.LayerNorm:
            module.__class__ = Float32LayerNorm
        elif isinstance(module, Attention) and module.upcast_softmax:
            module.set_processor(AttnProcessor())
    return model


def export_unet(
    unet: nn.Module,
    path: Path,
    precision: str = "fp32",
    batch: int = 2,
    fold: bool = True,
    part: str = "unet",
    level: int = 0,
    spec: ModelSpec | None = None,
) -> dict:
    """Export ``unet`` to ``path`` (written atomically); returns facts for the record.

    ``part``: ``unet`` (one call), or the ``full`` / ``shallow`` pass of feature reuse
    split at ``level`` (see :mod:`compressor.feature_reuse`; the interfaces are
    :data:`INTERFACES`, float32 at the edges whatever ``precision`` is).

    ``spec``: the description of the model ``unet`` belongs to (``DiffusionModel.spec``), whose
    denoiser inputs the graph takes; by default the UNet alone. A conditioned model's passes take its
    conditioning inputs after ``timestep`` too (the shallow pass's ``feature`` last).
    """

    unet = copy.deepcopy(unet).eval().cpu()  # the caller's model keeps its device and mode
    described = ModelSpec.of(unet, spec).denoiser_inputs(batch)
    conditions = tuple(i.name for i in described.conditions)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = half_with_fp32_norms(unet) if precision == "fp16" else unet
    if part == "unet":
        wrapper: nn.Module = NoisePredictorModule(model, dtype, conditions).eval()
    else:
        split = FeatureReuseUNet(model, level)
        wrapper = (FullPassModule if part == "full" else ShallowPassModule)(split, dtype, conditions).eval()
    inputs, outputs = INTERFACES[part]
    inputs = [*described.names, *inputs[len(INPUT_NAMES) :]]  # the described inputs, then a pass's own
    g = torch.Generator().manual_seed(0)
    full = described["sample"].shape
    traced = (*full[:2], *fp16_trace_size(unet)) if precision == "fp16" else full
    examples = described.examples(g, timestep=500, shapes={"sample": traced})
    sample, timestep = examples["sample"], examples["timestep"]
    # traced below the model's size (fp16): every input/output's full size, to pin afterwards
    given = {name: examples[name] for name in conditions}
    shapes = _io_shapes(unet, part, level, full, given) if traced != full else {}
    args: tuple = tuple(examples.values())
    if part == "shallow":
        with torch.no_grad():
            feature = FeatureReuseUNet(unet, level).full(sample, timestep, **given)[1]
        args = (*args, feature)
    dynamic = {name: {0: "batch"} for name in (*inputs, *outputs)}
    dynamic.update(described.dynamic_axes())
    for name, shape in shapes.items():
        if len(shape) == 4:
            dynamic[name].update({2: f"{name}_height", 3: f"{name}_width"})
    facts = trace_to_onnx(wrapper, args, path, part, (inputs, outputs), dynamic, shapes or None, fold, inputs)
    return {
        "path": facts["path"],
        "part": part,
        **({"cache_level": level} if part != "unet" else {}),
        "precision": precision,
        **{k: facts[k] for k in ("opset", "exporter", "export_seconds")},
        "traced_size": list(traced[2:]),
        **{k: facts[k] for k in ("nodes_exported", "nodes", "external_data", "bytes")},
    }


def trace_to_onnx(
    wrapper: nn.Module,
    args: tuple,
    path: Path,
    part: str,
    names: tuple[list[str], list[str]],
    dynamic: dict,
    pin: dict[str, tuple] | None = None,
    fold: bool = True,
    check_inputs: list[str] | None = None,
) -> dict:
    """Trace ``wrapper`` on ``args`` to ``path`` (through a temporary file, so a failed export leaves the
    previous graph), pin the input/output sizes ``pin`` gives (a graph traced below its size), fold
    constants, save (external data past 2 GiB) and check it against ``part``'s interface; the facts
    every exported graph's record holds. ``names``: (input names, output names)."""
    import onnx

    inputs, outputs = names
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.onnx")
    began = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape checks
        torch.onnx.export(
            wrapper,
            args,
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    export_seconds = time.perf_counter() - began
    proto = onnx.load(str(tmp))
    nodes_exported = len(proto.graph.node)
    if pin:
        pin_spatial_size(proto, pin)
    if fold:
        from polygraphy.backend.onnx import fold_constants

        proto = fold_constants(proto, error_ok=True)
    external = proto.ByteSize() > TWO_GIB - (1 << 20)
    tmp.unlink()
    save_onnx(proto, path, external)
    check_onnx(path, against_manifest=False, part=part, inputs=check_inputs)  # the manifest lists the old one
    return {
        "path": path.name,
        "part": part,
        "opset": OPSET,
        "exporter": "torchscript (dynamo=False)",
        "export_seconds": round(export_seconds, 3),
        "nodes_exported": nodes_exported,
        "nodes": len(proto.graph.node),
        "external_data": external,
        "bytes": path.stat().st_size,
    }


def fp16_trace_size(unet: nn.Module) -> tuple[int, int]:
    """Smallest (H, W) to trace the fp16 graph at: every level at least 2 px, never above the model's."""
    _, _, h, w = sample_shape(unet, 1)
    least = 2 * 2 ** (len(unet.config.down_block_types) - 1)
    return min(h, max(least, 8)), min(w, max(least, 8))


def _io_shapes(
    unet: nn.Module, part: str, level: int, full: tuple, conditions: dict | None = None
) -> dict[str, tuple]:
    """The shape of every graph input and output at the model's own size (batch ``full[0]``);
    ``conditions``: a conditioned model's example conditioning inputs (for the pass's feature)."""
    shapes = {"sample": full, "timestep": (full[0],), "noise": full}
    if part != "unet":
        with torch.no_grad():
            x, t = torch.zeros(full), torch.zeros(full[0], dtype=torch.long)
            feature = FeatureReuseUNet(unet, level).full(x, t, **(conditions or {}))[1]
        shapes["feature"] = tuple(feature.shape)
    return shapes


def pin_spatial_size(proto, shapes: dict[str, tuple]) -> None:
    """Fix the dynamic height/width of every 4-D input and output to its full size (in place)."""
    for value in (*proto.graph.input, *proto.graph.output):
        shape = shapes.get(value.name)
        if shape is None or len(shape) != 4:
            continue
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_value, dims[3].dim_value = shape[2], shape[3]
    del proto.graph.value_info[:]  # inferred again, now with the fixed size


def save_onnx(proto, path: Path, external: bool) -> None:
    """Save an ONNX model atomically; big models keep weights in one relative external file."""
    import onnx

    tmp = path.with_name(path.stem + ".tmp.onnx")
    if external:
        data_name = path.name + ".data"
        onnx.save_model(
            proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
        )
    else:
        onnx.save_model(proto, str(tmp))
    tmp.replace(path)


def check_onnx(
    path: Path, against_manifest: bool = True, part: str | None = None, inputs: list[str] | None = None
) -> None:
    """Manifest hash, ``onnx.checker`` and the interface contract; ArtifactError on a bad file.

    ``part`` (unet|full|shallow) names the interface; by default it follows the file name
    (``unet-full-*``, ``unet-shallow-*``, else the plain call). ``inputs``: the input names
    expected instead of the interface's (a conditioned model's, from its description).
    """
    import onnx

    if not path.is_file():
        raise ArtifactError(f"{path} not found; run the export stage first")
    if against_manifest:
        verify_against_manifest(path)
    check_external_data(path)
    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several error types
        raise ArtifactError(
            f"{path}: not a valid ONNX model ({str(exc).strip().splitlines()[0][:160]}); "
            "rerun the export stage"
        ) from None
    names = [i.name for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    part = part or graph_part(path)
    want_in, want_out = INTERFACES[part]
    want_in = want_in if inputs is None else inputs
    if names != want_in or outs != want_out:
        raise ArtifactError(
            f"{path}: inputs {names} / outputs {outs} do not match {want_in} -> {want_out}; "
            "export it with `compress-deploy CONFIG --stages export`"
        )


def graph_part(path: Path) -> str:
    """Which interface an exported file has, from its name (see rundir.layout.onnx_path and
    shared_onnx_path)."""
    name = Path(path).name
    for part in ("text_encoder", "vae_decoder"):
        if name.startswith(f"{part}."):
            return part
    for part in ("full", "shallow"):
        if name.startswith(f"unet-{part}-"):
            return part
    return "unet"


def check_external_data(path: Path) -> None:
    """Refuse external-data locations that are absolute, escape the folder or are symlinks out."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}); rerun the export"
        ) from None
    root = path.parent.resolve()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            loc = Path(entry.value)
            target = (path.parent / loc).resolve()
            if loc.is_absolute() or ".." in loc.parts or root not in (target, *target.parents):
                raise ArtifactError(
                    f"{path}: external data location {entry.value!r} points outside its folder; "
                    "re-export the model instead of editing it"
                )


def onnx_input_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each input of an exported graph and its per-sample shape (the dims after the batch axis).

    ``sample`` -> (C, H, W), ``timestep`` -> (), a shallow pass's ``feature`` -> (C', H', W').
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        value.name: tuple(int(d.dim_value) for d in value.type.tensor_type.shape.dim[1:])
        for value in proto.graph.input
    }


def onnx_sample_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of an exported model's ``sample`` input."""
    return onnx_input_shapes(path)["sample"]  # type: ignore[return-value]
