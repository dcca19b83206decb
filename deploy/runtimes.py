"""Backends behind one callable: ``unet(sample, timestep) -> noise``, built by one registry.

``torch`` (eager, fp32 / fp16 / bf16, optionally CUDA graphs or torch.compile),
``onnxruntime`` (CPU provider always; CUDA or TensorRT execution providers when
onnxruntime-gpu is installed and they actually load) and ``tensorrt`` (engines, see
:mod:`deploy.tensorrt_backend`). Every place that builds a backend by name calls
:func:`load_backend`; the bench's labelled variants (``torch-fp16+cudagraph``, ...) are
the literal mapping :data:`VARIANTS` of its arguments. Adding a backend is one entry in
:data:`LOADERS`, a precision or variant one entry in :data:`VARIANTS`. Each backend
reports what actually ran (e.g. the provider from the session, not the available list).

Long because it is the one registry: every backend (torch, ONNX Runtime, TensorRT) is built here,
each with its feature-reuse variant (two passes) and a conditioned model's inputs, so no other module
builds one (tests/test_faults.py holds that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor.components import DiffusionModel
from compressor.config import config_from_mapping
from compressor.errors import ArtifactError, UserError
from compressor.feature_reuse import FeatureReuseUNet
from compressor.models import ReusePredictor, load_model, predict_noise
from compressor.persist import load_unet
from deploy import tensorrt_backend
from export.onnx_export import CONDITION_INPUTS, INPUT_NAMES, INTERFACES, check_onnx, onnx_input_shapes
from rundir import layout
from rundir.records import final_model_dir, require_record


@dataclass
class Backend:
    """A loaded backend: the callable plus facts for records."""

    name: str
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    info: dict = field(default_factory=dict)


def check_backend_name(name: str) -> None:
    """Raise UserError for an unknown backend name."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def ort_providers(preference: str = "auto") -> list[str]:
    """Execution providers to ask for: GPU ones first when installed, CPU always last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = []
    if preference == "tensorrt" and "TensorrtExecutionProvider" in available:
        wanted.append("TensorrtExecutionProvider")
    if preference in ("auto", "cuda", "tensorrt") and "CUDAExecutionProvider" in available:
        wanted.append("CUDAExecutionProvider")
    wanted.append("CPUExecutionProvider")
    return wanted


def _ort_session(path: Path, threads: int | None, providers: str, part: str = "unet", spin: bool = True):
    """A checked ONNX Runtime session over ``path`` with ``part``'s interface (ArtifactError if not).

    ``spin=False`` stops the session's idle worker threads from spin-waiting after a run:
    two sessions called in turn (feature reuse's full and shallow passes) otherwise steal
    each other's cores (measured: each pass 1.7x slower on 2 cores).
    """
    import onnxruntime as ort

    check_onnx(path, part=part, inputs=_conditioned_inputs(path, part) if part in UNET_PARTS else None)
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ArtifactError(
            f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]}); rerun the export stage"
        ) from None
    return session


def graph_session(path: Path, part: str, threads: int | None = None, providers: str = "cpu"):
    """A checked ONNX Runtime session over a pipeline graph other than the UNet (``text_encoder``,
    ``vae_decoder``: :data:`export.onnx_export.INTERFACES`); ArtifactError for a missing or wrong file.
    Its idle threads do not spin: it runs between UNet calls, whose cores spinning threads would take
    (measured on 2 cores: the text encoder 27-31 ms spinning, 8-15 ms not)."""
    return _ort_session(Path(path), threads, providers, part, spin=False)


def graph_engine(path: Path):
    """A TensorRT engine runner over a shared pipeline graph's engine (``text_encoder``,
    ``vae_decoder``; :func:`rundir.layout.shared_engine_path`): ``runner.run(**inputs)`` returns its
    outputs by name. The registry's counterpart of :func:`graph_session` for engines."""
    return tensorrt_backend.EngineRunner(Path(path))


UNET_PARTS = ("unet", "full", "shallow")  # the UNet's graphs: the plain call, feature reuse's passes


def _conditioned_inputs(path: Path, part: str = "unet") -> list[str] | None:
    """A UNet graph's input names when they are ``sample``, ``timestep``, conditioning inputs
    (:data:`export.onnx_export.CONDITION_INPUTS`, in that order) and the pass's own (the shallow
    pass's ``feature``); None otherwise (the plain interface is then checked, and a missing or
    unreadable file reported by check_onnx)."""
    try:
        names = list(onnx_input_shapes(path))
    except Exception:  # noqa: BLE001 - onnx raises several error types; check_onnx reports them
        return None
    own = INTERFACES[part][0][len(INPUT_NAMES) :]  # the shallow pass's feature
    if own and names[-len(own) :] != own:
        return None
    extra = names[len(INPUT_NAMES) : len(names) - len(own)]
    ordered = [c for c in CONDITION_INPUTS if c in extra]
    if names[: len(INPUT_NAMES)] == INPUT_NAMES and extra and extra == ordered:
        return names
    return None


def _condition_feeds(
    wanted: list[str], given: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """The conditioning tensors a UNet graph takes (``wanted``), typed as its inputs are: float32
    ``encoder_hidden_states``, int64 ``class_labels``. UserError when one is missing or not an input."""
    unknown = sorted(set(given) - set(wanted))
    missing = [name for name in wanted if name not in given]
    if unknown or missing:
        what = f"takes no {', '.join(unknown)}" if unknown else f"needs {', '.join(missing)}"
        has = ", ".join(wanted) or "no conditioning"
        raise UserError(f"onnxruntime backend: {path.name} {what} (its conditioning inputs: {has})")
    return {
        name: given[name].detach().contiguous().long()
        if name == "class_labels"
        else given[name].detach().contiguous().float()
        for name in wanted
    }


def onnxruntime_reuse_backend(
    full_path: Path, shallow_path: Path, level: int, threads: int | None = None, providers: str = "auto"
) -> Backend:
    """Feature reuse on ONNX Runtime: the full and shallow graphs as a ReusePredictor. A conditioned
    model's passes take its conditioning by keyword, as the plain graph does (each pass requires every
    conditioning input it has; an unconditional pass refuses any: UserError)."""

    full_s = _ort_session(full_path, threads, providers, "full", spin=False)
    shallow_s = _ort_session(shallow_path, threads, providers, "shallow", spin=False)
    full_conditions = [i.name for i in full_s.get_inputs()][len(INPUT_NAMES) :]
    shallow_conditions = [i.name for i in shallow_s.get_inputs()][len(INPUT_NAMES) : -1]

    def run(session, names: list[str], **feeds: torch.Tensor) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        return [torch.from_numpy(a) for a in session.run(names, arrays)]

    def full(
        sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        named = _condition_feeds(full_conditions, conditioning, full_path)
        noise, feature = run(
            full_s, ["noise", "feature"], sample=sample.float(), timestep=timestep.long(), **named
        )
        return noise.to(sample.device), feature

    def shallow(
        sample: torch.Tensor, timestep: torch.Tensor, feature: torch.Tensor, **conditioning: torch.Tensor
    ) -> torch.Tensor:
        named = _condition_feeds(shallow_conditions, conditioning, shallow_path)
        (noise,) = run(
            shallow_s,
            ["noise"],
            sample=sample.float(),
            timestep=timestep.long(),
            feature=feature.float(),
            **named,
        )
        return noise.to(sample.device)

    used = full_s.get_providers()
    info = {"provider": used[0], "providers": used, "path": str(full_path), "cache_level": level}
    if full_conditions:
        info["conditioning"] = full_conditions
    return Backend("onnxruntime", ReusePredictor(full, shallow, level), info)


def onnxruntime_backend(path: Path, threads: int | None = None, providers: str = "auto") -> Backend:
    """An ONNX Runtime session over ``path`` as a noise predictor (torch tensors in and out).

    A conditioned UNet's graph (inputs ``sample``, ``timestep``, then ``encoder_hidden_states``
    and/or ``class_labels``) takes those by keyword, as the sampling loop's guided steps pass them
    (``predict(x, t, encoder_hidden_states=...)``); each of its conditioning inputs is required,
    and an unconditional graph refuses any (UserError)."""
    session = _ort_session(path, threads, providers)
    used = session.get_providers()  # what the session really uses, not what is installed
    on_gpu = used[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    conditions = [i.name for i in session.get_inputs()][len(INPUT_NAMES) :]  # checked by _ort_session

    if on_gpu:
        binding_device = "cuda"
        numpy_types = {torch.float32: np.float32, torch.int64: np.int64}

        def predict(
            sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
        ) -> torch.Tensor:
            io = session.io_binding()
            s = sample.contiguous().float().to(binding_device)
            t = timestep.contiguous().long().to(binding_device)
            named = {
                k: v.to(binding_device) for k, v in _condition_feeds(conditions, conditioning, path).items()
            }
            for name, x in {"sample": s, "timestep": t, **named}.items():  # alive until the run ends
                io.bind_input(name, "cuda", 0, numpy_types[x.dtype], list(x.shape), x.data_ptr())
            out = torch.empty_like(s)
            io.bind_output("noise", "cuda", 0, np.float32, list(out.shape), out.data_ptr())
            session.run_with_iobinding(io)
            return out.to(sample.device)

    else:

        def predict(
            sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
        ) -> torch.Tensor:
            feeds = {
                "sample": sample.detach().float().cpu().numpy(),
                "timestep": timestep.detach().long().cpu().numpy(),
            }
            for name, x in _condition_feeds(conditions, conditioning, path).items():
                feeds[name] = x.cpu().numpy()
            return torch.from_numpy(session.run(["noise"], feeds)[0]).to(sample.device)

    info = {"provider": used[0], "providers": used, "path": str(path)}
    if conditions:
        info["conditioning"] = conditions
    return Backend("onnxruntime", predict, info)


PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in PRECISIONS.items()}


def torch_backend(
    unet: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    cuda_graph: bool = False,
    compile: bool = False,
    cache_level: int | None = None,
) -> Backend:
    """The torch UNet (eager) in ``dtype`` on ``device``, on a private copy.

    The model handed in is never changed (device, dtype and train/eval mode stay
    as they were), so backends of several precisions can be built from one model.
    ``cuda_graph`` captures one CUDA graph per input shape and replays it (CUDA
    only: static shapes, no Python per step); ``compile`` wraps the copy in
    ``torch.compile``. ``cache_level`` (feature reuse) makes ``predict`` a
    :class:`compressor.models.ReusePredictor` whose full and shallow passes split the
    UNet at that level (each captured as its own CUDA graph). Inputs and outputs are
    float32 whatever ``dtype`` is.
    """
    import copy

    device = torch.device(device)
    if dtype not in PRECISIONS:
        raise UserError(f"torch backend: unsupported dtype {dtype}; use float32, float16 or bfloat16")
    if cuda_graph and device.type != "cuda":
        raise UserError("torch backend: CUDA graphs need a CUDA device")
    # nn.Module.to, not ModelMixin.to: the latter warns on every cast to half precision
    model = torch.nn.Module.to(copy.deepcopy(unet), device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forward = torch.compile(model) if compile else model

    def eager(sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        given = {  # embeddings in the model's dtype, class labels as they are
            k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in conditioning.items()
        }
        with torch.inference_mode():
            x = sample.to(device=device, dtype=dtype)
            return predict_noise(forward, x, timestep.to(device), **given).float()

    info = {
        "device": str(device),
        "precision": PRECISIONS[dtype],
        "cuda_graph": cuda_graph,
        "compile": compile,
    }
    if cache_level is not None:
        split = FeatureReuseUNet(model, cache_level)

        def typed(conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {  # embeddings in the model's dtype, class labels as they are
                k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                for k, v in conditioning.items()
            }

        def full(
            sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                x = sample.to(device=device, dtype=dtype)
                noise, feature = split.full(x, timestep.to(device), **typed(conditioning))
                return noise.float(), feature.float()

        def shallow(
            sample: torch.Tensor, timestep: torch.Tensor, feature: torch.Tensor, **conditioning: torch.Tensor
        ) -> torch.Tensor:
            with torch.inference_mode():
                x, f = sample.to(device=device, dtype=dtype), feature.to(device=device, dtype=dtype)
                return split.shallow(x, timestep.to(device), f, **typed(conditioning)).float()

        if cuda_graph:
            full, shallow = _cuda_graph_replayer(full, device), _cuda_graph_replayer(shallow, device)
        predict: Callable = ReusePredictor(full, shallow, cache_level)
        return Backend("torch", predict, {**info, "cache_level": cache_level})
    predict = _cuda_graph_replayer(eager, device) if cuda_graph else eager
    return Backend("torch", predict, info)


def _cuda_graph_replayer(eager: Callable, device: torch.device) -> Callable:
    """Capture ``eager`` once per input shape as a CUDA graph, then replay it on copied inputs.

    ``eager`` takes tensors (and keyword tensors: a conditioned UNet's conditioning) and returns a
    tensor or a tuple of tensors; so does the replayer. One graph per shape of every input.
    """
    graphs: dict[tuple, tuple] = {}

    def predict(*inputs: torch.Tensor, **named: torch.Tensor):
        names = sorted(named)
        every = [*inputs, *(named[k] for k in names)]
        key = (tuple(names), tuple(tuple(x.shape) for x in every))

        def call(static: list[torch.Tensor]):
            return eager(*static[: len(inputs)], **dict(zip(names, static[len(inputs) :], strict=True)))

        if key not in graphs:
            static_in = [x.detach().to(device).clone() for x in every]
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                    call(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = call(static_in)
            graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = graphs[key]
        for dst, src in zip(static_in, every, strict=True):
            dst.copy_(src)
        graph.replay()
        if isinstance(static_out, tuple):
            return tuple(o.clone().to(inputs[0].device) for o in static_out)
        return static_out.clone().to(inputs[0].device)

    return predict


# -- the registry -----------------------------------------------------------------------------


def load_run_model(run_dir: Path) -> DiffusionModel:
    """The dense model a finished run compressed (UNet, scheduler config, VAE, text encoder,
    tokenizer), loaded as the prune stage's record names it (its ``model`` section and seed)."""
    rec = require_record(Path(run_dir), "prune", "loading the dense model")
    try:  # the recorded sections, validated as a config again
        cfg = config_from_mapping({"model": rec.section("model"), "seed": rec.config.get("seed", 0)})
    except UserError as exc:
        raise ArtifactError(f"{rec.path}: damaged record ({exc}); rerun the prune stage") from None
    return load_model(cfg.model, cfg.seed)


def load_run_unet(
    run_dir: Path, model: str = "pruned", device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """A finished run's UNet in torch: the final compressed model, or the dense one it came from."""

    if model == "dense":
        return load_run_model(run_dir).unet.to(device).eval()
    return load_unet(final_model_dir(Path(run_dir))[1], device)[0]


def _source(
    kind: str,
    file: Path | None,
    run_dir: Path | None,
    model: str,
    precision: str,
    part: str = "unet",
    level: int = 0,
) -> Path:
    """The file a deployed backend loads: ``file``, else the run's ONNX export (``part``) or engine."""
    if file is not None:
        return Path(file)
    if run_dir is None:
        raise UserError(f"{kind} backend: pass file= or run_dir=")
    if kind == "onnxruntime":
        path = layout.onnx_path(run_dir, model, precision, part, level)
        if not path.is_file():
            hint = "" if part == "unet" else f"export.feature_reuse=true sample.cache_level={level} "
            raise ArtifactError(f"{path} not found; run `compress-deploy CONFIG {hint}--stages export` first")
        return path
    path = layout.engine_path(run_dir, model, part, level)
    if part != "unet" and not path.is_file():
        raise ArtifactError(
            f"{path} not found; export the passes (export.feature_reuse=true sample.cache_level={level}) "
            "and rebuild with `compress-deploy build RUN`"
        )
    return path


def _load_torch(
    unet, file, run_dir, model, precision, device, threads, cuda_graph, compile, level
) -> Backend:
    if precision not in DTYPES:
        raise UserError(
            f"torch backend: precision {precision!r}; choose one of {', '.join(DTYPES)} "
            "(int8 runs on onnxruntime or tensorrt)"
        )
    if unet is None:
        if file is not None:
            unet = load_unet(Path(file))[0]
        elif run_dir is not None:
            unet = load_run_unet(run_dir, model)
        else:
            raise UserError("torch backend: pass unet=, file= (a saved model folder) or run_dir=")
    return torch_backend(unet, torch.device(device), DTYPES[precision], cuda_graph, compile, level)


def _load_onnxruntime(
    unet, file, run_dir, model, precision, device, threads, cuda_graph, compile, level
) -> Backend:
    if cuda_graph or compile:
        raise UserError("onnxruntime backend: CUDA graphs and torch.compile are torch/TensorRT options")
    if level is not None:
        full = _source("onnxruntime", None, run_dir, model, precision, "full", level)
        shallow = _source("onnxruntime", None, run_dir, model, precision, "shallow", level)
        return onnxruntime_reuse_backend(full, shallow, level, threads)
    return onnxruntime_backend(_source("onnxruntime", file, run_dir, model, precision), threads)


PASSES = ("full", "shallow")  # feature reuse's two graphs (export.onnx_export.INTERFACES)


def _load_tensorrt(
    unet, file, run_dir, model, precision, device, threads, cuda_graph, compile, level
) -> Backend:

    if level is not None:
        engines = [_source("tensorrt", None, run_dir, model, precision, p, level) for p in PASSES]
        predict, runner = tensorrt_backend.reuse_predictor(*engines, level, cuda_graph)
        info = {k: runner.info[k] for k in ("tensorrt_version", "gpu_name", "precision")}
        return Backend("tensorrt", predict, {**info, "cuda_graph": cuda_graph, "cache_level": level})
    runner = tensorrt_backend.EngineRunner(_source("tensorrt", file, run_dir, model, precision), cuda_graph)
    info = {k: runner.info[k] for k in ("tensorrt_version", "gpu_name", "precision")}
    return Backend("tensorrt", runner, {**info, "cuda_graph": cuda_graph})


LOADERS: dict[str, Callable[..., Backend]] = {
    "torch": _load_torch,
    "onnxruntime": _load_onnxruntime,
    "tensorrt": _load_tensorrt,
}
BACKENDS = tuple(LOADERS)

# Labelled variants the bench times and acceptance gates read: label -> (backend, options).
VARIANTS: dict[str, tuple[str, dict]] = {
    "torch": ("torch", {}),
    "torch-fp16": ("torch", {"precision": "fp16"}),
    "torch-bf16": ("torch", {"precision": "bf16"}),
    "torch-fp16+cudagraph": ("torch", {"precision": "fp16", "cuda_graph": True}),
    "torch-fp16+compile": ("torch", {"precision": "fp16", "compile": True}),
    "onnxruntime": ("onnxruntime", {}),
    "onnxruntime-int8": ("onnxruntime", {"precision": "int8"}),
    "tensorrt": ("tensorrt", {}),
    "tensorrt+cudagraph": ("tensorrt", {"cuda_graph": True}),
}


def load_backend(
    name: str,
    *,
    unet: torch.nn.Module | None = None,
    file: Path | None = None,
    run_dir: Path | None = None,
    model: str = "pruned",
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    threads: int | None = None,
    cuda_graph: bool = False,
    compile: bool = False,
    cache_level: int | None = None,
) -> Backend:
    """Build backend ``name`` from a module (torch), a file (ONNX, engine, saved model) or a run.

    ``run_dir`` + ``model`` (dense|pruned) resolve the run's own files through the run
    layout: the final model (torch), ``export/<model>/unet.<precision>.onnx`` or
    ``build/<model>/unet.engine``. Torch backends work on a private copy of ``unet``.
    ``cache_level`` builds the two feature-reuse passes split at that level (torch: from
    the module; ONNX Runtime: the run's ``unet-full-l<k>`` / ``unet-shallow-l<k>`` graphs)
    and makes ``predict`` a ReusePredictor. Raises UserError for an unknown name or
    option, ArtifactError for missing files.
    """
    check_backend_name(name)
    return LOADERS[name](
        unet, file, run_dir, model, precision, device, threads, cuda_graph, compile, cache_level
    )


def load_variant(label: str, **kwargs) -> Backend:
    """The bench variant ``label`` (see :data:`VARIANTS`) built by :func:`load_backend`."""
    if label not in VARIANTS:
        raise UserError(f"unknown backend variant {label!r}; choose one of {', '.join(VARIANTS)}")
    name, options = VARIANTS[label]
    return load_backend(name, **{**kwargs, **options})
