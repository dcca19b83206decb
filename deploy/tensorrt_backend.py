"""TensorRT engines and the TensorRT backend. The only module that imports ``tensorrt``.

One build path for TensorRT 10 and 11: strongly typed networks, so an engine's
precision is the ONNX file's (the fp16 ONNX, with its normalisations kept in fp32,
for fp16 engines; the fp32 ONNX for fp32 engines) and no precision builder flag is
ever set. TensorRT 10 needs the STRONGLY_TYPED creation flag for that; on 11 every
network is strongly typed and the flag is deprecated, so it is not passed.
Checked against NVIDIA's real 10.13 and 11.4 Python bindings by tests/test_tensorrt_api.py.
Imports cleanly without TensorRT; :func:`unavailable_reason` says why it cannot run.

A run's engines (:func:`deploy.engine_info.run_graphs`, built by :func:`build_run_engines`): the
dense and the compressed UNet (and feature reuse's passes); for a conditional model the UNets
take their conditioning (``encoder_hidden_states``: batch x tokens x width, ``class_labels``:
batch) and, under classifier-free guidance (``sample.guidance_scale`` > 1), their profile counts
UNet rows, twice the images (``build.*_batch`` x 2: the sampler calls the UNet on the
unconditional and conditional halves at once); the shared text encoder (``input_ids``, batch x
tokens, int64 as exported) and VAE decoder (``latent_sample``) graphs get engines of their own
over ``build.*_batch`` images, ``RUN/build/shared/<graph>.plan``. Every input's per-item shape is
the graph's (only the batch varies); the engine keeps each input's declared type (int64 ids and
timesteps included: TensorRT 10 and 11 take INT64 I/O), and :class:`EngineRunner` feeds each
input in its engine type.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compressor.config import BuildConfig
from compressor.errors import ArtifactError, UserError
from compressor.models import ReusePredictor
from deploy.engine_info import (
    Profile,
    check_compatible,
    check_integrity,
    check_shapes,
    profile_of,
    read_engine_info,
    run_graphs,
    write_engine_info,
)
from export.onnx_export import check_onnx
from rundir import layout
from rundir.artifacts import sha256_bytes, sha256_file, verify_against_manifest

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
    input_shapes: dict[str, tuple[int, ...]],
    precision: str,
    workspace_gib: float,
    optimization_level: int,
    timing_cache: Path,
    label: str,
) -> dict:
    """Build and serialise a strongly typed engine from ``onnx_path``; writes engine, info, cache.

    ``onnx_path`` must be the ONNX of ``precision`` (the fp16 ONNX for fp16 engines, the QDQ
    ONNX for int8 ones, on 10 and 11 alike): the network is strongly typed, so the engine
    computes in the file's types. ``input_shapes``: each input's per-sample shape
    (:func:`export.onnx_export.onnx_input_shapes`), stretched over the profile's batches.
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
    workspace = int(workspace_gib * (1 << 30))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = optimization_level
    opt_profile = builder.create_optimization_profile()
    shapes = profile.shapes(input_shapes)
    for name, (lo, opt, hi) in shapes.items():
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
    memory = device_memory(trt, logger, data)
    info = {
        "onnx": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_bytes(data),
        "tensorrt_version": trt.__version__,
        "gpu_name": name,
        "compute_capability": capability,
        "profile": profile.record(),
        **({"sample_shape": list(input_shapes["sample"])} if "sample" in input_shapes else {}),
        "inputs": {k: list(v) for k, v in input_shapes.items()},
        "precision": precision,
        "strongly_typed": True,
        "build_seconds": round(seconds, 2),
        **engine_facts(profile, shapes, len(data), workspace, memory),
    }
    write_engine_info(engine_path, info)
    return info


def device_memory(trt, logger, data: bytes) -> int | None:
    """The device memory TensorRT says the engine's (only) profile needs besides its weights, in bytes:
    ``ICudaEngine.get_device_memory_size_for_profile_v2(0)`` (10.x and 11.x alike); None when the engine
    does not deserialize here."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        return None
    return int(engine.get_device_memory_size_for_profile_v2(0))


def engine_facts(
    profile: Profile, shapes: dict, engine_bytes: int | None, workspace: int, memory: int | None
) -> dict:
    """What the build record says of an engine beside its profile: ``shapes`` (static or dynamic), the
    shapes set on the optimisation profile per input ([min, opt, max]), the file's size, the builder's
    workspace limit and the device memory the engine needs (bytes)."""
    return {
        "shapes": "static" if profile.static else "dynamic",
        "profile_shapes": {n: [list(s) for s in rows] for n, rows in shapes.items()},
        "engine_bytes": engine_bytes,
        "workspace_bytes": workspace,
        "device_memory_bytes": memory,
    }


def torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of an engine I/O tensor's ``trt.DataType``."""
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT32: torch.int32,
    }
    if dtype not in table:
        raise ArtifactError(f"engine I/O tensor of TensorRT type {dtype}; rebuild from the project's ONNX")
    return table[dtype]


class EngineRunner:
    """A deserialised engine called on CUDA tensors by I/O name (``run``), or as a UNet call.

    The engine's own I/O list (names, modes, types) drives the bindings, so one runner
    serves the plain UNet (``sample, timestep -> noise``), a conditioned one (``encoder_hidden_states``
    / ``class_labels`` too), both feature-reuse passes (``-> noise, feature`` and
    ``sample, timestep, feature -> noise``) and the shared graphs (``input_ids -> last_hidden_state``,
    ``latent_sample -> sample``); each input is cast to its engine type (int64 ids stay int64).
    """

    def __init__(self, engine_path: Path, cuda_graph: bool = False) -> None:

        trt = require_tensorrt()
        verify_against_manifest(engine_path)
        info = read_engine_info(engine_path)
        data = engine_path.read_bytes()
        check_integrity(info, engine_path, sha256_bytes(data))
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
        self.inputs: dict[str, torch.dtype] = {}
        self.outputs: dict[str, torch.dtype] = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dtype = torch_dtype(trt, self.engine.get_tensor_dtype(name))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = dtype
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        self.graphs: dict[int, tuple] = {}

    def _bind(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Point the context at ``feeds`` and at fresh output buffers (returned)."""
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name, dtype in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def feeds(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``feeds`` checked (every engine input given, nothing else, the batch in the profile) and
        cast to the engine's types on its device, in the engine's input order."""
        missing = sorted(set(self.inputs) - set(feeds))
        unknown = sorted(set(feeds) - set(self.inputs))
        if missing or unknown:
            takes = ", ".join(self.inputs)
            what = f"inputs {', '.join(missing)} not given" if missing else f"no input {', '.join(unknown)}"
            raise UserError(f"{self.path}: {what} (it takes {takes})")
        self.profile.check_batch(feeds[next(iter(self.inputs))].shape[0], self.path)
        check_shapes(self.info, {n: tuple(t.shape) for n, t in feeds.items()}, self.path)
        return {n: feeds[n].to(self.device, dtype).contiguous() for n, dtype in self.inputs.items()}

    def run(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Execute on ``feeds`` (one tensor per engine input); the outputs by name."""
        feeds = self.feeds(feeds)
        if self.cuda_graph:
            return self._graph_run(feeds)
        outputs = self._bind(feeds)
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.path}")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, **conditions: torch.Tensor
    ) -> torch.Tensor:
        """The UNet call: noise for ``sample`` at ``timestep`` (``conditions``: a conditioned engine's
        ``encoder_hidden_states`` / ``class_labels``)."""
        return self.run(sample=sample, timestep=timestep, **conditions)["noise"]

    def _graph_run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replay a CUDA graph captured once per batch size (static shapes and buffers)."""
        batch = next(iter(feeds.values())).shape[0]
        if batch not in self.graphs:
            inputs = {n: t.clone() for n, t in feeds.items()}
            outputs = self._bind(inputs)
            with torch.cuda.stream(self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
            self.graphs[batch] = (graph, inputs, outputs)
        graph, inputs, outputs = self.graphs[batch]
        for name, tensor in feeds.items():
            inputs[name].copy_(tensor)
        graph.replay()
        return {n: t.clone() for n, t in outputs.items()}


def reuse_predictor(full_engine: Path, shallow_engine: Path, level: int, cuda_graph: bool = False):
    """Feature reuse on TensorRT: the two pass engines as a ReusePredictor (and the full runner); a
    conditional model's passes take its ``encoder_hidden_states`` or ``class_labels`` by keyword."""

    full_runner = EngineRunner(full_engine, cuda_graph)
    shallow_runner = EngineRunner(shallow_engine, cuda_graph)
    for runner, needed in ((full_runner, {"noise", "feature"}), (shallow_runner, {"noise"})):
        if not needed <= set(runner.outputs):
            raise ArtifactError(
                f"{runner.path}: outputs {sorted(runner.outputs)}, expected {sorted(needed)}; rebuild it"
            )

    def full(
        sample: torch.Tensor, timestep: torch.Tensor, **cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = full_runner.run(sample=sample, timestep=timestep, **cond)
        return out["noise"], out["feature"]

    def shallow(sample: torch.Tensor, timestep: torch.Tensor, feature: torch.Tensor, **cond: torch.Tensor):
        return shallow_runner.run(sample=sample, timestep=timestep, feature=feature, **cond)["noise"]

    return ReusePredictor(full, shallow, level), full_runner


def make_trt_runner(engine_file: Path, name: str):
    """Polygraphy's TensorRT runner over a run's engine (its engine info checked first)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = EngineRunner(engine_file)  # engine info, integrity and version checks
    return TrtRunner(EngineFromBytes(engine_file.read_bytes()), name=name), runner.profile


def _sizes_text(info: dict) -> str:
    """', 12.3 MiB engine, 45.6 MiB device memory (workspace limit 8.0 GiB)' from an engine info."""
    if "engine_bytes" not in info:
        return ""
    memory = info.get("device_memory_bytes")
    need = "device memory not reported" if memory is None else f"{memory / (1 << 20):.1f} MiB device memory"
    return (
        f": {info['engine_bytes'] / (1 << 20):.1f} MiB engine, {need} "
        f"(workspace limit {info['workspace_bytes'] / (1 << 30):.1f} GiB)"
    )


def build_run_engines(
    run_dir: Path,
    cfg: BuildConfig,
    log: Callable[[str], None],
    reuse_level: int | None = None,
    guidance_scale: float = 1.0,
) -> tuple[dict, list[Path]]:
    """Build the run's engines (:func:`deploy.engine_info.run_graphs`) from ``RUN/export``; needs only
    the ONNX files.

    ``reuse_level``: also build the feature-reuse passes split there (``unet-full-l<k>`` and
    ``unet-shallow-l<k>``, from the export stage's graphs of the build precision; the
    passes are exported in fp32/fp16, so an int8 build skips them and says so).
    ``guidance_scale``: the sampler's (``sample.guidance_scale``); above 1 a conditioned UNet's
    profile counts twice the images. Returns (engine info per key: ``dense``, ``dense.full``,
    ``shared.text_encoder``, ...; files written).
    """

    cfg.check_shapes()
    require_tensorrt()
    if reuse_level is not None and cfg.precision == "int8":
        log("feature-reuse passes: not built at int8 (their graphs are exported in fp32/fp16 only)")
    graphs = run_graphs(run_dir, cfg, reuse_level, guidance_scale)
    cache = layout.timing_cache(run_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    engines, files = {}, []
    for graph in graphs:
        src, dst, profile = graph.onnx, graph.engine, graph.profile
        check_onnx(src, part=graph.part, inputs=list(graph.inputs) if graph.part == "unet" else None)
        rows = (profile.min_batch, profile.opt_batch, profile.max_batch) != cfg.profile_batches()
        batch = f"batch {profile.min_batch}..{profile.max_batch}" + (
            ": UNet rows, 2 per image under guidance" if rows else ""
        )
        if profile.static:
            batch = f"static: batch {profile.opt_batch}" + (", UNet rows" if rows else "")
        if profile.sizes is not None:
            batch += f", side {profile.sizes[0]}..{profile.sizes[2]} (opt {profile.sizes[1]})"
        log(f"{graph.label}: {src.name} -> {dst} ({graph.precision}, {batch})")
        info = build_engine(
            src,
            dst,
            profile,
            graph.inputs,
            graph.precision,
            cfg.workspace_gib,
            cfg.optimization_level,
            cache,
            graph.label,
        )
        log(f"{graph.label}: built in {info['build_seconds']:.1f} s{_sizes_text(info)}")
        engines[graph.key] = info
        files += [dst, layout.engine_info_path(dst)]
    return engines, files + [cache]
