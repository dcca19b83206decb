"""Backends behind one callable: ``unet(sample, timestep) -> noise``, built by one registry.

``torch`` (eager, fp32 / fp16 / bf16, optionally CUDA graphs or torch.compile),
``onnxruntime`` (CPU provider always; CUDA or TensorRT execution providers when
onnxruntime-gpu is installed and they actually load) and ``tensorrt`` (engines, see
:mod:`deploy.tensorrt_backend`). Every place that builds a backend by name calls
:func:`load_backend`; the bench's labelled variants (``torch-fp16+cudagraph``, ...) are
the literal mapping :data:`VARIANTS` of its arguments. Adding a backend is one entry in
:data:`LOADERS`, a precision or variant one entry in :data:`VARIANTS`. Each backend
reports what actually ran (e.g. the provider from the session, not the available list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor import runlayout
from compressor.errors import ArtifactError, UserError


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


def onnxruntime_backend(path: Path, threads: int | None = None, providers: str = "auto") -> Backend:
    """An ONNX Runtime session over ``path`` as a noise predictor (torch tensors in and out)."""
    import onnxruntime as ort

    from export.onnx_export import check_onnx

    check_onnx(path)
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ArtifactError(
            f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]}); rerun the export stage"
        ) from None
    used = session.get_providers()  # what the session really uses, not what is installed
    on_gpu = used[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    if on_gpu:
        binding_device = "cuda"

        def predict(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            io = session.io_binding()
            s = sample.contiguous().float().to(binding_device)
            t = timestep.contiguous().long().to(binding_device)
            io.bind_input("sample", "cuda", 0, np.float32, list(s.shape), s.data_ptr())
            io.bind_input("timestep", "cuda", 0, np.int64, list(t.shape), t.data_ptr())
            out = torch.empty_like(s)
            io.bind_output("noise", "cuda", 0, np.float32, list(out.shape), out.data_ptr())
            session.run_with_iobinding(io)
            return out.to(sample.device)

    else:

        def predict(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            feeds = {
                "sample": sample.detach().float().cpu().numpy(),
                "timestep": timestep.detach().long().cpu().numpy(),
            }
            return torch.from_numpy(session.run(["noise"], feeds)[0]).to(sample.device)

    return Backend("onnxruntime", predict, {"provider": used[0], "providers": used, "path": str(path)})


PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in PRECISIONS.items()}


def torch_backend(
    unet: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    cuda_graph: bool = False,
    compile: bool = False,
) -> Backend:
    """The torch UNet (eager) in ``dtype`` on ``device``, on a private copy.

    The model handed in is never changed (device, dtype and train/eval mode stay
    as they were), so backends of several precisions can be built from one model.
    ``cuda_graph`` captures one CUDA graph per input shape and replays it (CUDA
    only: static shapes, no Python per step); ``compile`` wraps the copy in
    ``torch.compile``. Inputs and outputs are float32 whatever ``dtype`` is.
    """
    import copy

    from compressor.models import predict_noise

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

    def eager(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return predict_noise(forward, sample.to(device=device, dtype=dtype), timestep.to(device)).float()

    predict = _cuda_graph_replayer(eager, device) if cuda_graph else eager
    info = {
        "device": str(device),
        "precision": PRECISIONS[dtype],
        "cuda_graph": cuda_graph,
        "compile": compile,
    }
    return Backend("torch", predict, info)


def _cuda_graph_replayer(
    eager: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Capture ``eager`` once per input shape as a CUDA graph, then replay it on copied inputs."""
    graphs: dict[tuple, tuple] = {}

    def predict(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        key = (tuple(sample.shape), tuple(timestep.shape))
        if key not in graphs:
            static_sample = sample.detach().to(device, torch.float32).clone()
            static_t = timestep.detach().to(device).clone()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                    eager(static_sample, static_t)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = eager(static_sample, static_t)
            graphs[key] = (graph, static_sample, static_t, static_out)
        graph, static_sample, static_t, static_out = graphs[key]
        static_sample.copy_(sample)
        static_t.copy_(timestep)
        graph.replay()
        return static_out.clone().to(sample.device)

    return predict


# -- the registry -----------------------------------------------------------------------------


def load_run_unet(
    run_dir: Path, model: str = "pruned", device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """A finished run's UNet in torch: the final compressed model, or the dense one it came from."""
    from compressor.persist import load_unet
    from compressor.records import final_model_dir, require_record

    if model == "dense":
        from compressor.config import config_from_mapping
        from compressor.models import load_model

        rec = require_record(Path(run_dir), "prune", "loading the dense model")
        try:  # the recorded sections, validated as a config again
            cfg = config_from_mapping({"model": rec.section("model"), "seed": rec.config.get("seed", 0)})
        except UserError as exc:
            raise ArtifactError(f"{rec.path}: damaged record ({exc}); rerun the prune stage") from None
        return load_model(cfg.model, cfg.seed).unet.to(device).eval()
    return load_unet(final_model_dir(Path(run_dir))[1], device)[0]


def _source(kind: str, file: Path | None, run_dir: Path | None, model: str, precision: str) -> Path:
    """The file a deployed backend loads: ``file``, else the run's ONNX export or engine."""
    if file is not None:
        return Path(file)
    if run_dir is None:
        raise UserError(f"{kind} backend: pass file= or run_dir=")
    if kind == "onnxruntime":
        path = runlayout.onnx_path(run_dir, model, precision)
        if not path.is_file():
            raise ArtifactError(f"{path} not found; run `compress-deploy CONFIG --stages export` first")
        return path
    return runlayout.engine_path(run_dir, model)


def _load_torch(unet, file, run_dir, model, precision, device, threads, cuda_graph, compile) -> Backend:
    if precision not in DTYPES:
        raise UserError(f"torch backend: precision {precision!r}; choose one of {', '.join(DTYPES)}")
    if unet is None:
        if file is not None:
            from compressor.persist import load_unet

            unet = load_unet(Path(file))[0]
        elif run_dir is not None:
            unet = load_run_unet(run_dir, model)
        else:
            raise UserError("torch backend: pass unet=, file= (a saved model folder) or run_dir=")
    return torch_backend(unet, torch.device(device), DTYPES[precision], cuda_graph, compile)


def _load_onnxruntime(unet, file, run_dir, model, precision, device, threads, cuda_graph, compile) -> Backend:
    if cuda_graph or compile:
        raise UserError("onnxruntime backend: CUDA graphs and torch.compile are torch/TensorRT options")
    return onnxruntime_backend(_source("onnxruntime", file, run_dir, model, precision), threads)


def _load_tensorrt(unet, file, run_dir, model, precision, device, threads, cuda_graph, compile) -> Backend:
    from deploy import tensorrt_backend

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
) -> Backend:
    """Build backend ``name`` from a module (torch), a file (ONNX, engine, saved model) or a run.

    ``run_dir`` + ``model`` (dense|pruned) resolve the run's own files through the run
    layout: the final model (torch), ``export/<model>/unet.<precision>.onnx`` or
    ``build/<model>/unet.engine``. Torch backends work on a private copy of ``unet``.
    Raises UserError for an unknown name or option, ArtifactError for missing files.
    """
    check_backend_name(name)
    return LOADERS[name](unet, file, run_dir, model, precision, device, threads, cuda_graph, compile)


def load_variant(label: str, **kwargs) -> Backend:
    """The bench variant ``label`` (see :data:`VARIANTS`) built by :func:`load_backend`."""
    if label not in VARIANTS:
        raise UserError(f"unknown backend variant {label!r}; choose one of {', '.join(VARIANTS)}")
    name, options = VARIANTS[label]
    return load_backend(name, **{**kwargs, **options})
