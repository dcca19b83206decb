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


def main() -> int:
    """Print the JSON report; exit 0 (the test reads the report)."""
    sys.path.insert(0, str(ROOT))
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
