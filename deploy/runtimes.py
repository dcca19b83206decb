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


def torch_backend(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> Backend:
    """The torch UNet itself (eager), optionally in fp16 on CUDA."""
    from compressor.models import predict_noise

    model = unet.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()

    def predict(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return predict_noise(model, sample.to(device=device, dtype=dtype), timestep.to(device)).float()

    precision = "fp16" if dtype == torch.float16 else "fp32"
    return Backend("torch", predict, {"device": str(device), "precision": precision})
