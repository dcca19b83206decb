"""TensorRT engines and the TensorRT backend. The only module that imports ``tensorrt``.

One build path for TensorRT 10 and 11: strongly typed networks, so an engine's
precision is the ONNX file's (the fp16 ONNX, with its normalisations kept in fp32,
for fp16 engines; the fp32 ONNX for fp32 engines) and no precision builder flag is
ever set. TensorRT 10 needs the STRONGLY_TYPED creation flag for that; on 11 every
network is strongly typed and the flag is deprecated, so it is not passed.
Checked against NVIDIA's real 10.13 and 11.4 Python bindings by tests/test_tensorrt_api.py.
Imports cleanly without TensorRT; :func:`unavailable_reason` says why it cannot run.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compressor import runlayout
from compressor.config import BuildConfig
from compressor.errors import ArtifactError, UserError
from deploy.engines import (
    Profile,
    check_compatible,
    check_integrity,
    profile_of,
    read_engine_info,
    write_engine_info,
)

INSTALL_HINT = (
    "install TensorRT (pip install 'compress-deploy[gpu]' on a CUDA host) or run inside the "
    "project's Docker image (see Dockerfile), which ships it"
)


def unavailable_reason() -> str:
    """Empty when TensorRT and a CUDA device are usable here, else why not (one line)."""
    try:
        import tensorrt as trt
    except ImportError:
        return f"TensorRT is not installed; {INSTALL_HINT}"
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything from its loader
        return f"TensorRT does not import ({type(exc).__name__}: {str(exc)[:120]}); {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return f"TensorRT {trt.__version__} needs a CUDA GPU and no CUDA device is visible"
    return libraries_reason()


@functools.cache
def libraries_reason() -> str:
    """Empty when TensorRT's libraries load (a Builder can be made), else why not; probed once.

    The Python bindings can be installed without the libraries behind them.
    """
    import tensorrt as trt

    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except (TypeError, RuntimeError, OSError) as exc:
        return f"TensorRT {trt.__version__}'s libraries cannot be loaded ({str(exc)[:120]}); {INSTALL_HINT}"
    return ""


def require_tensorrt():
    """The ``tensorrt`` module, or a UserError saying what to install."""
    reason = unavailable_reason()
    if reason:
        raise UserError(reason)
    import tensorrt as trt

    return trt


def major_version(trt) -> int:
    """TensorRT's major version (10, 11, ...)."""
    return int(trt.__version__.split(".")[0])


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network: STRONGLY_TYPED on 10, none on 11 (always typed)."""
    if major_version(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of device 0."""
    props = torch.cuda.get_device_properties(0)
    return props.name, f"{props.major}.{props.minor}"


def _progress_monitor(trt, label: str):
    """A TensorRT IProgressMonitor printing phases with elapsed time (TensorRT >= 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.began = time.perf_counter()
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                print(f"[build] {label}: {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            total = self.steps.get(phase_name, 0)
            if total and phase_name.startswith("Building") and step % max(1, total // 10) == 0:
                elapsed = time.perf_counter() - self.began
                eta = elapsed / max(1, step) * (total - step)
                print(f"[build] {label}: {step}/{total}, ETA {eta:.0f} s", file=sys.stderr, flush=True)
            return True

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: Profile,
    sample_shape: tuple[int, int, int],
    precision: str,
    workspace_gib: float,
    optimization_level: int,
    timing_cache: Path,
    label: str,
) -> dict:
    """Build and serialise a strongly typed engine from ``onnx_path``; writes engine, info, cache.

    ``onnx_path`` must be the ONNX of ``precision`` (the fp16 ONNX for fp16 engines, on 10
    and 11 alike): the network is strongly typed, so the engine computes in the file's types.
    """
    trt = require_tensorrt()
    profile.validate()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}; re-export the model")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes(sample_shape).items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    monitor = _progress_monitor(trt, label)
    if monitor is not None:
        config.progress_monitor = monitor
    began = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - began
    if serialized is None:
        raise UserError(
            f"TensorRT failed to build {label} (see the log above); lower build.max_batch or raise "
            "build.workspace_gib"
        )
    data = bytes(serialized)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(engine_path)
    cache_tmp = timing_cache.with_name(timing_cache.name + ".tmp")
    cache_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    cache_tmp.replace(timing_cache)
    name, capability = gpu_identity()
    info = {
        "onnx": onnx_path.name,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "tensorrt_version": trt.__version__,
        "gpu_name": name,
        "compute_capability": capability,
        "profile": {
            "min_batch": profile.min_batch,
            "opt_batch": profile.opt_batch,
            "max_batch": profile.max_batch,
        },
        "sample_shape": list(sample_shape),
        "precision": precision,
        "strongly_typed": True,
        "build_seconds": round(seconds, 2),
    }
    write_engine_info(engine_path, info)
    return info


class EngineRunner:
    """A deserialised engine called as ``(sample, timestep) -> noise`` on CUDA tensors."""

    def __init__(self, engine_path: Path, cuda_graph: bool = False) -> None:
        from compressor.artifacts import verify_against_manifest

        trt = require_tensorrt()
        verify_against_manifest(engine_path)
        info = read_engine_info(engine_path)
        data = engine_path.read_bytes()
        check_integrity(info, engine_path, hashlib.sha256(data).hexdigest())
        check_compatible(info, engine_path, trt.__version__, *gpu_identity())
        self.profile = profile_of(info)
        self.path = engine_path
        self.info = info
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(
                f"{engine_path}: TensorRT cannot deserialize it; rebuild with `compress-deploy build RUN`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        self.graphs: dict[int, tuple] = {}

    def _bind(self, sample: torch.Tensor, timestep: torch.Tensor, out: torch.Tensor) -> None:
        self.context.set_input_shape("sample", tuple(sample.shape))
        self.context.set_input_shape("timestep", tuple(timestep.shape))
        self.context.set_tensor_address("sample", sample.data_ptr())
        self.context.set_tensor_address("timestep", timestep.data_ptr())
        self.context.set_tensor_address("noise", out.data_ptr())

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        self.profile.check_batch(batch, self.path)
        sample = sample.to("cuda", torch.float32).contiguous()
        timestep = timestep.to("cuda", torch.int64).contiguous()
        if self.cuda_graph:
            return self._graph_call(sample, timestep)
        out = torch.empty_like(sample)
        self._bind(sample, timestep, out)
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.path}")
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _graph_call(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Replay a CUDA graph captured once per batch size (static shapes and buffers)."""
        batch = sample.shape[0]
        if batch not in self.graphs:
            s_in, t_in, out = sample.clone(), timestep.clone(), torch.empty_like(sample)
            self._bind(s_in, t_in, out)
            with torch.cuda.stream(self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
            self.graphs[batch] = (graph, s_in, t_in, out)
        graph, s_in, t_in, out = self.graphs[batch]
        s_in.copy_(sample)
        t_in.copy_(timestep)
        graph.replay()
        return out.clone()


def make_trt_runner(engine_file: Path, name: str):
    """Polygraphy's TensorRT runner over a run's engine (its engine info checked first)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = EngineRunner(engine_file)  # engine info, integrity and version checks
    return TrtRunner(EngineFromBytes(engine_file.read_bytes()), name=name), runner.profile


def build_run_engines(run_dir: Path, cfg: BuildConfig, log: Callable[[str], None]) -> tuple[dict, list[Path]]:
    """Build dense and pruned engines from ``RUN/export``; needs only the ONNX files.

    Returns (engine info per model, files written).
    """
    from export.onnx_export import check_onnx, onnx_sample_shape

    profile = Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    profile.validate()
    require_tensorrt()
    source = cfg.precision  # strongly typed on 10 and 11: the engine's precision is the ONNX file's
    cache = runlayout.timing_cache(run_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    engines, files = {}, []
    for model in ("dense", "pruned"):
        src = runlayout.onnx_path(run_dir, model, source)
        if not src.is_file():
            raise ArtifactError(
                f"{src} not found; run the export stage (with export.precisions incl. {source})"
            )
        check_onnx(src)
        dst = runlayout.engine_path(run_dir, model)
        log(f"{model}: {src.name} -> {dst} ({cfg.precision}, batch {cfg.min_batch}..{cfg.max_batch})")
        info = build_engine(
            src,
            dst,
            profile,
            onnx_sample_shape(src),
            cfg.precision,
            cfg.workspace_gib,
            cfg.optimization_level,
            cache,
            model,
        )
        log(f"{model}: built in {info['build_seconds']:.1f} s")
        engines[model] = info
        files += [dst, runlayout.engine_info_path(dst)]
    return engines, files + [cache]
