"""TensorRT engines in a bundle: numpy in and out through TensorRT and cuda-python, nothing else.

A bundle made with ``compress-deploy bundle RUN OUT --engine`` carries the run's engines
(``engines/<model>/*.engine`` with their engine info ``*.engine.json``) beside the ONNX
graphs. :class:`Engines` has the interface of the ONNX Runtime :class:`~.core.Graphs`
(``unet``, ``full``, ``shallow``, ``reuse``) so the sampler and ``check`` run either.

Each call copies its numpy inputs to device buffers (kept and grown per tensor), runs
``execute_async_v3`` on a private stream and copies the outputs back: the solver loop stays
in numpy on the host, as on ONNX Runtime, so the two backends' latencies compare like for
like. An engine runs only under the TensorRT version and GPU architecture that built it:
both are checked against its engine info first, with one line saying what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bundle_errors import BundleError

REBUILD = (
    "rebuild the engines with `compress-deploy build RUN` on this device and bundle again, or pass --fallback"
)


def cuda_runtime():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (>= 12.6) or the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BundleError(
                "cuda-python is not installed; the bundle's engines need `pip install tensorrt cuda-python` "
                "(or pass --backend onnxruntime)"
            ) from None
    return runtime


def _call(cudart, name: str, *args):
    """``cudart.<name>(*args)``, its values without the error code; BundleError on a CUDA error."""
    result = getattr(cudart, name)(*args)
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != cudart.cudaError_t.cudaSuccess:
        raise BundleError(
            f"CUDA {name} failed: {getattr(err, 'name', err)}; is a CUDA GPU and driver present?"
        )
    return values[0] if len(values) == 1 else values


def numpy_dtype(trt, dtype) -> np.dtype:
    """The numpy dtype of an engine I/O tensor's ``trt.DataType``."""
    table = {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT64: np.int64,
        trt.DataType.INT32: np.int32,
    }
    if dtype not in table:
        raise BundleError(f"engine I/O tensor of TensorRT type {dtype}; rebuild from the project's ONNX")
    return np.dtype(table[dtype])


def device_identity(cudart) -> tuple[str, str]:
    """(name, compute capability 'major.minor') of the current CUDA device."""
    device = _call(cudart, "cudaGetDevice")
    props = _call(cudart, "cudaGetDeviceProperties", device)
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


class Engine:
    """One deserialised engine called with numpy arrays by I/O name."""

    def __init__(self, trt, cudart, runtime, path: Path, info: dict) -> None:
        self.path, self.cudart, self.trt = path, cudart, trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BundleError(f"{path}: TensorRT cannot deserialize it; {REBUILD}")
        self.inputs: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.dtype] = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dtype = numpy_dtype(trt, self.engine.get_tensor_dtype(name))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = dtype
        self.context = self.engine.create_execution_context()
        self.stream = _call(cudart, "cudaStreamCreate")
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        profile = info["profile"]
        self.batches = (int(profile["min_batch"]), int(profile["max_batch"]))

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for tensor ``name`` (grown when too small)."""
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _call(self.cudart, "cudaFree", pointer)
            pointer = int(_call(self.cudart, "cudaMalloc", max(nbytes, 1)))
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Execute on host arrays (one per engine input); the outputs as host arrays by name."""
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        batch = feeds["sample"].shape[0]
        if not self.batches[0] <= batch <= self.batches[1]:
            raise BundleError(
                f"batch {batch} is outside {self.path.name}'s profile {self.batches[0]}..{self.batches[1]}; "
                "generate with --batch in that range"
            )
        hosts = []
        for name, dtype in self.inputs.items():
            host = np.ascontiguousarray(feeds[name], dtype=dtype)
            hosts.append(host)  # alive until the stream is synchronised
            pointer = self._buffer(name, host.nbytes)
            self.context.set_input_shape(name, host.shape)
            self.context.set_tensor_address(name, pointer)
            _call(cudart, "cudaMemcpyAsync", pointer, host.ctypes.data, host.nbytes, h2d, self.stream)
        outputs = {}
        for name, dtype in self.outputs.items():
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype)
            self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
            outputs[name] = out
        if not self.context.execute_async_v3(int(self.stream)):
            raise BundleError(f"TensorRT execution failed for {self.path}")
        for name, out in outputs.items():
            pointer = self.buffers[name][0]
            _call(cudart, "cudaMemcpyAsync", out.ctypes.data, pointer, out.nbytes, d2h, self.stream)
        _call(cudart, "cudaStreamSynchronize", self.stream)
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream."""
        for pointer, _ in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.buffers.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class Engines:
    """One model's engines: the plain call, or the two feature-reuse passes (as :class:`~.core.Graphs`)."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BundleError(
                "TensorRT is not installed; the bundle's engines need `pip install tensorrt cuda-python` "
                "(or pass --backend onnxruntime)"
            ) from None
        cudart = cuda_runtime()
        gpu, capability = device_identity(cudart)
        self.engines = {}
        runtime = None
        for part, name in files.items():
            path = root / name
            info = json.loads(path.with_name(path.name + ".json").read_text())
            if info["tensorrt_version"] != trt.__version__:
                raise BundleError(
                    f"{path} was built with TensorRT {info['tensorrt_version']}, this is TensorRT "
                    f"{trt.__version__}; {REBUILD}"
                )
            if info["compute_capability"] != capability and not info.get("hardware_compatible"):
                raise BundleError(
                    f"{path} was built for {info['gpu_name']} (compute capability "
                    f"{info['compute_capability']}), this is {gpu} ({capability}); {REBUILD}"
                )
            if runtime is None:
                self.logger = trt.Logger(trt.Logger.WARNING)
                runtime = trt.Runtime(self.logger)
            self.engines[part] = Engine(trt, cudart, runtime, path, info)
        self.runtime = runtime
        self.reuse = "full" in files
        self.label = f"TensorRT {trt.__version__} on {gpu}"

    def unet(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """The plain UNet call (the full pass's noise when reusing features)."""
        part = "full" if self.reuse else "unet"
        return self.engines[part].run(sample=sample, timestep=timestep)["noise"]

    def full(self, sample: np.ndarray, timestep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full pass: noise and the cached feature."""
        out = self.engines["full"].run(sample=sample, timestep=timestep)
        return out["noise"], out["feature"]

    def shallow(self, sample: np.ndarray, timestep: np.ndarray, feature: np.ndarray) -> np.ndarray:
        """The shallow pass on a cached feature."""
        return self.engines["shallow"].run(sample=sample, timestep=timestep, feature=feature)["noise"]
