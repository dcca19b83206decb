"""Check the TensorRT API this project (and Polygraphy's runner path) uses against ``import tensorrt``.

Run in a subprocess with ``PYTHONPATH`` pointing at NVIDIA's real bindings made importable
without a GPU (``../shared/tools/trt-api/setup DIR 10|11``); prints one JSON object:
the version, how many names were checked, and every missing name or mismatched signature.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
from pathlib import Path

import tensorrt as trt

ROOT = Path(__file__).resolve().parent.parent

# Members used on TensorRT objects by deploy/tensorrt_backend.py and the bundle runtime's
# deploy/bundle_runtime/engines.py (objects are untyped there, so
# they are listed here by class), with the parameter names the project passes or relies on.
PROJECT_API: dict[str, dict[str, list[str] | None]] = {
    "Logger": {"WARNING": None, "ERROR": None},
    "Builder": {
        "create_network": ["flags"],
        "create_builder_config": [],
        "create_optimization_profile": [],
        "build_serialized_network": ["network", "config"],
    },
    "OnnxParser": {"parse_from_file": ["model"], "num_errors": None, "get_error": ["index"]},
    "IBuilderConfig": {
        "set_memory_pool_limit": ["pool", "pool_size"],
        "builder_optimization_level": None,
        "add_optimization_profile": ["profile"],
        "create_timing_cache": ["serialized_timing_cache"],
        "set_timing_cache": ["cache", "ignore_mismatch"],
        "get_timing_cache": [],
        "progress_monitor": None,
    },
    "ITimingCache": {"serialize": []},
    "IOptimizationProfile": {"set_shape": ["input", "min", "opt", "max"]},
    "MemoryPoolType": {"WORKSPACE": None},
    "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED": None},
    "IProgressMonitor": {
        "phase_start": ["phase_name", "parent_phase", "num_steps"],
        "step_complete": ["phase_name", "step"],
        "phase_finish": ["phase_name"],
    },
    "Runtime": {"deserialize_cuda_engine": ["serialized_engine"]},
    "ICudaEngine": {
        "create_execution_context": [],
        "num_io_tensors": None,
        "get_tensor_name": ["index"],
        "get_tensor_mode": ["name"],
        "get_tensor_dtype": ["name"],
        "get_device_memory_size_for_profile_v2": ["profile_index"],
    },
    "IExecutionContext": {
        "set_input_shape": ["name", "shape"],
        "get_tensor_shape": ["name"],
        "set_tensor_address": ["name", "memory"],
        "execute_async_v3": ["stream_handle"],
    },
}

# What Polygraphy's EngineFromBytes + TrtRunner (the parity stage's engine path) use on TensorRT >= 10
# (ICudaEngine.get_aliased_input_tensor, absent from 10.13, is guarded there by AttributeError).
POLYGRAPHY_API: dict[str, dict[str, list[str] | None]] = {
    "Runtime": {"deserialize_cuda_engine": None, "engine_host_code_allowed": None},
    "ILogger": {"log": None},
    "Logger": {"INTERNAL_ERROR": None, "ERROR": None, "WARNING": None, "INFO": None, "VERBOSE": None},
    "ICudaEngine": {
        "create_execution_context": None,
        "num_io_tensors": None,
        "get_tensor_name": None,
        "get_tensor_mode": None,
        "get_tensor_dtype": None,
        "get_tensor_format": None,
        "is_shape_inference_io": None,
        "get_device_memory_size_for_profile_v2": None,
    },
    "IExecutionContext": {
        "engine": None,
        "set_optimization_profile_async": None,
        "active_optimization_profile": None,
        "get_tensor_shape": None,
        "set_input_shape": None,
        "get_tensor_address": None,
        "set_tensor_address": None,
        "set_output_allocator": None,
        "update_device_memory_size_for_shapes": None,
        "set_device_memory": None,
        "execute_async_v3": None,
    },
    "IOutputAllocator": {"__init__": None},  # Polygraphy subclasses it and defines the callbacks
    "ExecutionContextAllocationStrategy": {"USER_MANAGED": None},
    "TensorIOMode": {"INPUT": None, "OUTPUT": None},
    "TensorFormat": {"LINEAR": None, "HWC": None, "CHW16": None},
    "": {"init_libnvinfer_plugins": None},
}


def parameter_names(member) -> list[str] | None:
    """Parameter names (without self) from a pybind11 signature line, or Python's inspect."""
    doc = getattr(member, "__doc__", None) or ""
    match = re.search(r"\w+\((.*?)\)\s*->", doc)
    if match:
        names = [p.split(":")[0].strip() for p in re.split(r",\s*(?![^\[]*\])", match.group(1)) if p.strip()]
        return [n for n in names if n and n != "self" and not n.startswith("*")]
    try:
        return [p for p in inspect.signature(member).parameters if p != "self"]
    except (TypeError, ValueError):
        return None


def check_table(table: dict) -> tuple[int, list[str]]:
    """(names checked, problems) for a {class: {member: parameter names or None}} table."""
    checked, problems = 0, []
    for cls_name, members in table.items():
        owner = trt if not cls_name else getattr(trt, cls_name, None)
        if owner is None:
            problems.append(f"trt.{cls_name} is missing")
            continue
        checked += 1
        for name, params in members.items():
            checked += 1
            where = f"trt.{cls_name}.{name}" if cls_name else f"trt.{name}"
            if not hasattr(owner, name):
                problems.append(f"{where} is missing")
                continue
            if params is not None:
                found = parameter_names(getattr(owner, name))
                if found is None or any(p not in found for p in params):
                    problems.append(f"{where}: expected parameters {params}, TensorRT has {found}")
    return checked, problems


def module_attribute_chains(path: Path) -> set[str]:
    """Every ``trt.A.B...`` chain written in a source file."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                chains.add(".".join(reversed(parts)))
    return chains


def check_chains(chains: set[str]) -> tuple[int, list[str]]:
    """Resolve each chain on the module; the longest chains cover their prefixes."""
    problems = []
    for chain in sorted(chains):
        obj = trt
        for part in chain.split("."):
            if not hasattr(obj, part):
                problems.append(f"trt.{chain} does not resolve (at {part!r})")
                break
            obj = getattr(obj, part)
    return len(chains), problems


def check_behaviour() -> list[str]:
    """The project's TensorRT helpers against this TensorRT: flags, monitor, refusal without libraries."""
    import torch

    from deploy import tensorrt_backend as tb

    problems = []
    major = tb.major_version(trt)
    flags = tb.network_flags(trt)
    expected = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if flags != expected:
        problems.append(f"network_flags: {flags}, expected {expected} on TensorRT {major}")
    monitor = tb._progress_monitor(trt, "check")
    if not isinstance(monitor, trt.IProgressMonitor):
        problems.append("the progress monitor is not a trt.IProgressMonitor")
    else:
        for name in ("phase_start", "step_complete", "phase_finish"):
            ours = [p for p in inspect.signature(getattr(type(monitor), name)).parameters if p != "self"]
            theirs = PROJECT_API["IProgressMonitor"][name]
            if ours != theirs:
                problems.append(f"IProgressMonitor.{name}: ours {ours}, TensorRT's {theirs}")
        monitor.phase_start("Building engine", None, 10)
        if monitor.step_complete("Building engine", 5) is not True:
            problems.append("IProgressMonitor.step_complete must return True to continue the build")
        monitor.phase_finish("Building engine")
    expected_types = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64}
    expected_types["INT32"] = torch.int32
    for name, dtype in expected_types.items():
        if tb.torch_dtype(trt, getattr(trt.DataType, name)) != dtype:
            problems.append(f"torch_dtype(trt.DataType.{name}) is not {dtype}")
    try:
        tb.torch_dtype(trt, trt.DataType.INT8)
        problems.append("torch_dtype accepted an int8 I/O tensor (the project's graphs have none)")
    except Exception as exc:  # noqa: BLE001 - the check reports any exception type
        if type(exc).__name__ != "ArtifactError":
            problems.append(f"torch_dtype(INT8) raised {type(exc).__name__}, expected ArtifactError")
    from deploy.bundle_runtime import engines as bundle_engines

    for name, dtype in {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32"}.items():
        if str(bundle_engines.numpy_dtype(trt, getattr(trt.DataType, name))) != dtype:
            problems.append(f"bundle runtime numpy_dtype(trt.DataType.{name}) is not {dtype}")
    reason = tb.unavailable_reason()
    if not reason or "\n" in reason:
        problems.append(f"unavailable_reason on a host without a usable TensorRT: {reason!r}")
    tb.libraries_reason.cache_clear()
    torch.cuda.is_available = lambda: True  # as on a GPU host whose TensorRT libraries are missing
    reason = tb.unavailable_reason()
    if "libraries cannot be loaded" not in reason:
        problems.append(f"unavailable_reason with CUDA but no TensorRT libraries: {reason!r}")
    return problems


# -- the project's build and run code against stand-ins of TensorRT's factories ----------------------
#
# The API-only bindings raise TypeError from Builder, Runtime and OnnxParser. To run build_engine,
# build_run_engines and EngineRunner anyway, those three are replaced by stand-ins whose objects
# only have the members the real classes have: every member read, set or called is looked up on the
# real class, and every call is bound to one of the real pybind11 signatures (parameter names,
# defaults, and the argument types the signature names: str, int, bool, Dims, buffers, TensorRT's
# enums and classes). Values returned are the stand-ins' (an engine reporting the ONNX graph's I/O).

REAL: dict[str, type] = {}  # the real classes, kept before the factories are replaced
BOUND: dict[str, set[str]] = {"checked": set(), "unchecked": set()}  # calls held to a real signature or not


def _split_params(text: str) -> list[str]:
    """Top-level comma-separated parts of a signature's parameter list."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[(" else -1 if ch in "])" else 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur] if p.strip()]


def overloads(member, name: str) -> list[list[tuple[str, str, bool]]]:
    """Each pybind11 overload of ``member``: [(parameter, annotation, has a default)], without self."""
    doc = getattr(member, "__doc__", None) or ""
    found = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", doc):
        depth, i = 1, match.end()
        while i < len(doc) and depth:
            depth += {"(": 1, ")": -1}.get(doc[i], 0)
            i += 1
        if not doc[i:].lstrip().startswith("->"):
            continue
        params = []
        for part in _split_params(doc[match.end() : i - 1]):
            head, _, default = part.partition("=")
            pname, _, annotation = head.partition(":")
            params.append((pname.strip(), annotation.strip(), bool(default.strip())))
        if params and params[0][0] == "self":
            params = params[1:]
        if not any(p[0].startswith("*") for p in params):
            found.append(params)
    return found


def type_problem(value, annotation: str) -> str:
    """Why ``value`` does not fit a pybind11 annotation ('' when it does, or when unchecked)."""
    short = annotation.rsplit(".", 1)[-1]
    plain = {"str": str, "bool": bool, "int": int, "float": (int, float), "tuple": (tuple, list)}
    if short in plain:
        ok = isinstance(value, plain[short]) and not (short == "int" and isinstance(value, bool))
        return "" if ok else f"{type(value).__name__} for {annotation}"
    if short == "Dims":
        ok = isinstance(value, tuple | list) and all(isinstance(d, int) and d > 0 for d in value)
        return "" if ok or isinstance(value, REAL.get("Dims", ())) else f"{value!r} for Dims"
    if short in ("buffer", "Buffer"):
        return (
            ""
            if isinstance(value, bytes | bytearray | memoryview)
            else f"{type(value).__name__} for a buffer"
        )
    cls = REAL.get(short) or getattr(trt, short, None)
    if isinstance(cls, type) and annotation.startswith("tensorrt"):
        if isinstance(value, Fake):
            return "" if issubclass(REAL.get(value.cls, object), cls) else f"a {value.cls} for {short}"
        return "" if isinstance(value, cls) else f"{type(value).__name__} for {short}"
    return ""


def bind_problem(member, name: str, args: tuple, kwargs: dict, where: str = "") -> str:
    """'' when the call binds to one of the member's real overloads, else why none does (``where``
    names the call in :data:`BOUND`)."""
    why = []
    found = overloads(member, name)
    BOUND["checked" if found else "unchecked"].add(where or name)
    for params in found or [None]:
        if params is None:
            return ""  # no signature to hold the call to (listed as unchecked)
        names = [p[0] for p in params]
        if len(args) > len(params):
            why.append(f"{len(args)} positional for {names}")
            continue
        given = dict(zip(names, args, strict=False)) | kwargs
        unknown = sorted(set(kwargs) - set(names))
        missing = [p[0] for p in params if p[0] not in given and not p[2]]
        types = [
            f"{p[0]}: {t}" for p in params if p[0] in given for t in [type_problem(given[p[0]], p[1])] if t
        ]
        if not unknown and not missing and not types:
            return ""
        why.append(f"unknown {unknown}, missing {missing}, types {types} for {names}")
    return "; ".join(why)


class Fake:
    """A stand-in for an object of the real TensorRT class ``cls``: members resolve on that class only,
    calls are bound to its signatures (``problems`` collects what does not), results from ``returns``."""

    def __init__(self, cls: str, problems: list[str], returns: dict | None = None) -> None:
        object.__setattr__(self, "cls", cls)
        object.__setattr__(self, "problems", problems)
        object.__setattr__(self, "returns", returns or {})
        object.__setattr__(self, "calls", [])

    def _real(self, name: str):
        real = getattr(REAL[self.cls], name, None)
        if real is None:
            self.problems.append(f"trt.{self.cls}.{name} does not exist")
        return real

    def __getattr__(self, name: str):
        real = self._real(name)
        produce = self.returns.get(name, lambda *a, **k: None)
        if isinstance(real, property) or real is None:
            return produce()

        def call(*args, **kwargs):
            why = bind_problem(real, name, args, kwargs, f"{self.cls}.{name}")
            if why:
                self.problems.append(f"trt.{self.cls}.{name}{args!r}{kwargs!r}: {why}")
            self.calls.append((name, args, kwargs))
            return produce(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value) -> None:
        real = self._real(name)
        if not isinstance(real, property) or real.fset is None:
            self.problems.append(f"trt.{self.cls}.{name} is not a settable property")
        self.calls.append((f"set {name}", (value,), {}))


def factory(cls: str, problems: list[str], make) -> object:
    """A stand-in for the real class ``cls``'s constructor (bound to its ``__init__``): ``make(*args)``."""

    def construct(*args, **kwargs):
        why = bind_problem(REAL[cls].__init__, "__init__", args, kwargs, f"{cls}.__init__")
        if why:
            problems.append(f"trt.{cls}{args!r}: {why}")
        return make(*args)

    return construct


ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64"}
DEVICE_MEMORY = 3 << 20  # what the stand-in engines report they need


def graph_io(onnx_path: Path) -> tuple[list, list]:
    """(inputs, outputs) of an ONNX graph: [(name, TensorRT DataType name, per-item dims)]."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def rows(values):
        return [
            (
                v.name,
                ONNX_TYPES[v.type.tensor_type.elem_type],
                [d.dim_value for d in v.type.tensor_type.shape.dim[1:]],
            )
            for v in values
        ]

    return rows(proto.graph.input), rows(proto.graph.output)


def fake_tensorrt(problems: list[str], built: dict) -> None:
    """Replace trt.Builder, trt.OnnxParser and trt.Runtime by stand-ins (see :class:`Fake`); ``built``
    collects, per engine bytes, the ONNX parsed and the profile's shapes set."""
    for name in ("Builder", "OnnxParser", "Runtime", "INetworkDefinition", "IBuilderConfig", "ITimingCache"):
        REAL[name] = getattr(trt, name)
    for name in ("IOptimizationProfile", "ICudaEngine", "IExecutionContext", "Dims", "IHostMemory"):
        REAL[name] = getattr(trt, name)
    state: dict = {}

    def builder(logger):
        cache = Fake("ITimingCache", problems, {"serialize": lambda: b"timing cache"})
        profiles = []

        def make_profile():
            profile = Fake("IOptimizationProfile", problems)
            profiles.append(profile)
            return profile

        def serialize(network, config):
            data = f"engine of {state['onnx']}".encode()
            shapes = {
                c[1][0]: [list(x) for x in c[1][1:]] for p in profiles for c in p.calls if c[0] == "set_shape"
            }
            built[data] = {"onnx": state["onnx"], "shapes": shapes, "flags": state["flags"]}
            return data

        def network(flags=0):
            state["flags"] = flags
            return Fake("INetworkDefinition", problems)

        config = {
            "create_timing_cache": lambda *a: cache,
            "get_timing_cache": lambda: cache,
        }
        returns = {
            "create_network": network,
            "create_builder_config": lambda: Fake("IBuilderConfig", problems, config),
            "create_optimization_profile": make_profile,
            "build_serialized_network": serialize,
        }
        return Fake("Builder", problems, returns)

    def parser(network, logger):
        def parse(model):
            state["onnx"] = model
            return True

        return Fake("OnnxParser", problems, {"parse_from_file": parse, "num_errors": lambda: 0})

    def runtime(logger):
        def deserialize(serialized_engine):
            onnx_path = Path(built[bytes(serialized_engine)]["onnx"])
            return engine(*graph_io(onnx_path))

        return Fake("Runtime", problems, {"deserialize_cuda_engine": deserialize})

    def engine(inputs, outputs):
        io = [(n, t, dims, trt.TensorIOMode.INPUT) for n, t, dims in inputs]
        io += [(n, t, dims, trt.TensorIOMode.OUTPUT) for n, t, dims in outputs]
        by_name = {row[0]: row for row in io}
        shapes: dict = {}

        def context():
            def set_input_shape(name, shape):
                shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(name):
                batch = next(iter(shapes.values()))[0]
                return (batch, *by_name[name][2])

            returns = {
                "set_input_shape": set_input_shape,
                "get_tensor_shape": get_tensor_shape,
                "set_tensor_address": lambda name, memory: True,
                "execute_async_v3": lambda stream_handle: True,
            }
            return Fake("IExecutionContext", problems, returns)

        returns = {
            "get_device_memory_size_for_profile_v2": lambda profile_index: DEVICE_MEMORY,
            "num_io_tensors": lambda: len(io),
            "get_tensor_name": lambda index: io[index][0],
            "get_tensor_mode": lambda name: by_name[name][3],
            "get_tensor_dtype": lambda name: getattr(trt.DataType, by_name[name][1]),
            "create_execution_context": context,
        }
        return Fake("ICudaEngine", problems, returns)

    trt.Builder = factory("Builder", problems, builder)
    trt.OnnxParser = factory("OnnxParser", problems, parser)
    trt.Runtime = factory("Runtime", problems, runtime)


class _Stream:
    """torch.cuda's stream on a host without CUDA (the runner's calls on it are no-ops here)."""

    cuda_stream = 0

    def wait_stream(self, other) -> None:
        pass


def check_run_build(run_dir: Path, guidance_scale: float, shapes: str = "dynamic") -> tuple[dict, list[str]]:
    """The build of ``run_dir``'s engines (build_run_engines -> build_engine, ``build.shapes=shapes``) and
    EngineRunner on each, on stand-ins of TensorRT's factories; then, for a text-to-image run, the
    TensorRT sampler over the three engines (:func:`check_sampler`); (what was built and run, problems)."""
    import torch

    from compressor.config import BuildConfig
    from deploy import tensorrt_backend as tb
    from deploy.engine_info import run_graphs
    from rundir import layout

    problems: list[str] = []
    built: dict = {}
    fake_tensorrt(problems, built)
    torch.cuda.is_available = lambda: True
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    tb.libraries_reason.cache_clear()
    tb.libraries_reason = lambda: ""
    tb.gpu_identity = lambda: ("stand-in GPU", "9.0")
    sizes = None
    if shapes.startswith("sizes:"):  # a size range: the graphs of any side first, as the build stage does
        from deploy.runtimes import load_run_model, load_run_unet
        from export.sized_graphs import export_run_sized_graphs

        sizes = [int(v) for v in shapes.removeprefix("sizes:").split(",")]
        dense = load_run_model(run_dir)
        unets = {"dense": dense.unet, "pruned": load_run_unet(run_dir, "pruned")}
        export_run_sized_graphs(run_dir, "fp32", unets, dense.spec, dense.vae)
        shapes = "dynamic"
    cfg = BuildConfig(precision="fp32", min_batch=1, opt_batch=2, max_batch=3, shapes=shapes, sizes=sizes)
    engines, files = tb.build_run_engines(run_dir, cfg, lambda m: None, None, guidance_scale)
    report: dict = {"engines": {}, "files": sorted(str(Path(f).relative_to(run_dir)) for f in files)}
    expected_flags = tb.network_flags(trt)
    for graph in run_graphs(run_dir, cfg, None, guidance_scale):
        data = graph.engine.read_bytes()
        made = built[data]
        if made["flags"] != expected_flags:
            problems.append(f"{graph.key}: network flags {made['flags']}, expected {expected_flags}")
        want = {n: [list(s) for s in shapes] for n, shapes in graph.profile.shapes(graph.inputs).items()}
        if made["shapes"] != want:
            problems.append(f"{graph.key}: profile shapes {made['shapes']}, expected {want}")
        if graph.profile.sizes is not None:  # the stand-in engines cannot say an output's side: built only
            info = engines[graph.key]
            report["engines"][graph.key] = {
                "onnx": str(graph.onnx.relative_to(run_dir)),
                **{k: info[k] for k in ("profile", "profile_shapes", "shapes", "engine_bytes")},
            }
            continue
        runner = tb.EngineRunner(graph.engine)
        runner.device = torch.device("cpu")
        inputs, outputs = graph_io(graph.onnx)
        batch = graph.profile.opt_batch
        feeds = {}
        for name, kind, dims in inputs:  # what callers hand over: float32 tensors, int64 ids and steps
            feeds[name] = torch.zeros(
                (batch, *dims), dtype=torch.float32 if kind in ("FLOAT", "HALF") else torch.long
            )
        out = runner.run(**feeds)
        types = {n: str(t).removeprefix("torch.") for n, t in runner.inputs.items()}
        fed = {n: str(t.dtype).removeprefix("torch.") for n, t in runner.feeds(feeds).items()}
        if fed != types:
            problems.append(f"{graph.key}: fed {fed}, the engine takes {types}")
        shapes = {n: list(t.shape) for n, t in out.items()}
        if shapes != {n: [batch, *dims] for n, _, dims in outputs}:
            problems.append(f"{graph.key}: outputs {shapes}")
        if graph.part == "unet":
            noise = runner(**feeds)
            if list(noise.shape) != list(feeds["sample"].shape):
                problems.append(f"{graph.key}: the UNet call gave {list(noise.shape)}")
        try:
            runner.run(**{**feeds, "unexpected": feeds[inputs[0][0]]})
            problems.append(f"{graph.key}: an input the engine does not take was accepted")
        except Exception as exc:  # noqa: BLE001 - the check reports any exception type
            if type(exc).__name__ != "UserError":
                problems.append(f"{graph.key}: an unknown input raised {type(exc).__name__}")
        polygraphy_runner, profile = tb.make_trt_runner(graph.engine, f"trt-{graph.key}")
        if profile != graph.profile:
            problems.append(f"{graph.key}: make_trt_runner's profile {profile}, built {graph.profile}")
        info = engines[graph.key]
        if info["profile_shapes"] != made["shapes"]:
            problems.append(f"{graph.key}: recorded {info['profile_shapes']}, set {made['shapes']}")
        report["engines"][graph.key] = {
            "engine": str(graph.engine.relative_to(run_dir)),
            "profile": info["profile"],
            "inputs": info["inputs"],
            "engine_types": types,
            "outputs": shapes,
            "precision": info["precision"],
            **{k: info[k] for k in ("shapes", "profile_shapes", "engine_bytes", "workspace_bytes")},
            "device_memory_bytes": info["device_memory_bytes"],
            "engine_file_bytes": graph.engine.stat().st_size,
        }
    if layout.timing_cache(run_dir).read_bytes() != b"timing cache":
        problems.append("the timing cache was not written from ITimingCache.serialize")
    if "shared.text_encoder" in engines and sizes is None:
        report["sampler"] = check_sampler(run_dir, problems)
    report["calls_checked"] = sorted(BOUND["checked"])
    report["calls_unchecked"] = sorted(BOUND["unchecked"])
    return report, problems


def check_sampler(run_dir: Path, problems: list[str]) -> dict:
    """``load_sampler(RUN, backend="tensorrt")`` on the stand-in engines: a guided call from two prompts
    (every engine's inputs as fed, by engine file) and the refusal of a batch outside the profiles."""
    import torch

    from compressor.errors import UserError
    from deploy import sampler as sampler_module
    from deploy import tensorrt_backend as tb

    fed: dict[str, list] = {}
    run = tb.EngineRunner.run

    def logged(self, **feeds):
        fed.setdefault(self.path.name, []).append({n: list(t.shape) for n, t in feeds.items()})
        self.device = torch.device("cpu")  # the stand-in engines' outputs live on this host
        return run(self, **feeds)

    tb.EngineRunner.run = logged
    sampler_module.engine_device = lambda device: "cpu"
    sampler = sampler_module.load_sampler(run_dir, backend="tensorrt")
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    images = sampler(num_images=2, steps=2, batch_size=2, prompts=prompts, seeds=None)
    out = {"fed": fed, "images": list(images.shape), "engines": sorted(sampler.engines)}
    out["info"] = {k: v for k, v in sampler.info.items() if k in ("text_encoder", "vae_decoder")}
    try:
        sampler(num_images=4, steps=2, batch_size=4, prompts=prompts)
        problems.append("the tensorrt sampler took 4 images on engines built for 1..3")
    except UserError as exc:
        out["refusal"] = str(exc)
    return out


def main() -> int:
    """Print the JSON report; exit 0 (the test reads the report).

    ``trt_api_check.py RUN GUIDANCE [static|dynamic|sizes:MIN,OPT,MAX]``: instead, build RUN's engines on
    stand-ins of the factories (:func:`check_run_build`) and print what was built and run, and every
    problem (with sizes: the graphs of any side exported first, the engines built, not run).
    """
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) in (3, 4):
        report, problems = check_run_build(Path(sys.argv[1]), float(sys.argv[2]), *sys.argv[3:])
        print(json.dumps({"version": trt.__version__, **report, "problems": problems}))
        return 0
    n1, p1 = check_table(PROJECT_API)
    n2, p2 = check_table(POLYGRAPHY_API)
    chains = module_attribute_chains(ROOT / "deploy" / "tensorrt_backend.py")
    chains |= module_attribute_chains(ROOT / "deploy" / "bundle_runtime" / "engines.py")
    n3, p3 = check_chains(chains)
    p4 = check_behaviour()
    report = {
        "version": trt.__version__,
        "api_only": bool(getattr(trt, "API_ONLY", False)),
        "project_checked": n1 + n3,
        "polygraphy_checked": n2,
        "problems": p1 + p2 + p3 + p4,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
