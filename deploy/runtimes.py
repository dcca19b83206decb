"""Backends behind one callable: ``unet(sample, timestep) -> noise``.

``torch`` (eager, fp32 or fp16 on CUDA), ``onnxruntime`` (CPU provider always; CUDA or
TensorRT execution providers when onnxruntime-gpu is installed and they actually load)
and ``tensorrt`` (engines, see :mod:`deploy.tensorrt_backend`). Each backend reports
what actually ran (e.g. the provider from the session, not the available list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor.errors import ArtifactError, UserError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


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
