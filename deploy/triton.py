"""Triton Inference Server model repositories and a local server for a finished run.

``write_repository`` lays out two models:

- ``unet`` (sample FP32 [C,H,W], timestep INT64 [1] -> noise FP32 [C,H,W]): the run's
  TensorRT plan (``platform: tensorrt_plan``) where the run built one, else its ONNX
  (``onnxruntime_onnx``), or, for servers whose only backend is Python (PyTriton's
  bundled ``tritonserver``), a Python-backend model running the run's ONNX Runtime,
  torch or TensorRT backend in process (``unet_kind="python"``).
- ``sampler`` (seed INT64 [1], optional steps INT32 [1], eta FP32 [1] and scheduler BYTES [1]
  -> image FP32 [C,H,W] in [0, 1]): a Python-backend model running the sampling loop and calling
  ``unet`` for every step.

Both use dynamic batching (``max_batch``, ``max_queue_delay_us``) and one instance group.
Every ``config.pbtxt`` written is parsed back with Triton's own model-config protobuf
(``tritonclient.grpc.model_config_pb2``) when tritonclient is installed.

``find_server`` locates a ``tritonserver`` binary (``$TRITONSERVER``, the PATH, or the
one PyTriton bundles) and ``server_command`` builds its command line and environment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from compressor.components import DenoiserInputs, ModelSpec
from compressor.errors import ArtifactError, UserError
from compressor.persist import read_structure
from rundir import layout
from rundir.layout import engine_info_path
from rundir.records import final_model_dir

MODELS_DIR = Path(__file__).parent / "triton_models"
UNET_KINDS = ("auto", "tensorrt", "onnxruntime", "python")


@dataclass
class RepoSettings:
    """What the repository serves and how requests are batched."""

    backend: str = "onnxruntime"  # the in-process backend of a Python-backend unet
    model: str = "pruned"
    unet_kind: str = "auto"
    max_batch: int = 16
    max_queue_delay_us: int = 2000
    dynamic_batching: bool = True
    instances: int = 1
    max_steps: int = 1000
    default_steps: int = 50
    scheduler: str = "ddim"
    gpu: bool = False
    threads: int | None = None  # CPU threads of an in-process UNet backend (default: all)


def _batching(s: RepoSettings) -> str:
    if not s.dynamic_batching:
        return ""
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {s.max_queue_delay_us}\n}}\n"


def _instances(s: RepoSettings, python: bool) -> str:
    kind = "KIND_GPU" if s.gpu and not python else "KIND_CPU"
    return f"instance_group [\n  {{\n    count: {s.instances}\n    kind: {kind}\n  }}\n]\n"


TRITON_TYPES = {"torch.float32": "TYPE_FP32", "torch.int64": "TYPE_INT64"}  # the denoiser inputs' dtypes


def _input_block(name: str, dtype: str, dims: tuple[int, ...]) -> str:
    """One entry of ``input [...]``; a per-item scalar (a timestep, a class label) is sent as [1]."""
    shown = ", ".join(str(d) for d in dims) or "1"
    reshape = "" if dims else "    reshape: { shape: [ ] }\n"
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {shown} ]\n{reshape}  }}'


def unet_config(
    shape: tuple[int, int, int], kind: str, s: RepoSettings, inputs: DenoiserInputs | None = None
) -> str:
    """config.pbtxt of the ``unet`` model; ``inputs``: the denoiser's (``ModelSpec.denoiser_inputs``;
    default: ``sample`` of ``shape`` and ``timestep``, an unconditional model's)."""
    platform = {
        "tensorrt": 'platform: "tensorrt_plan"',
        "onnxruntime": 'platform: "onnxruntime_onnx"',
        "python": 'backend: "python"',
    }[kind]
    if inputs is None:
        inputs = ModelSpec({"in_channels": shape[0], "sample_size": list(shape[1:])}).denoiser_inputs()
    blocks = [_input_block(i.name, TRITON_TYPES[str(i.dtype)], i.per_item) for i in inputs.inputs]
    dims = ", ".join(str(d) for d in shape)
    return (
        f'name: "unet"\n{platform}\nmax_batch_size: {s.max_batch}\n'
        "input [\n" + ",\n".join(blocks) + "\n]\n"
        f'output [\n  {{\n    name: "noise"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}\n]\n'
        + _batching(s)
        + _instances(s, kind == "python")
    )


def sampler_config(shape: tuple[int, int, int], s: RepoSettings) -> str:
    """config.pbtxt of the ``sampler`` model (Python backend)."""
    dims = ", ".join(str(d) for d in shape)
    optional = [("steps", "TYPE_INT32"), ("eta", "TYPE_FP32"), ("scheduler", "TYPE_STRING")]
    inputs = ['  {\n    name: "seed"\n    data_type: TYPE_INT64\n    dims: [ 1 ]\n  }'] + [
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ 1 ]\n    optional: true\n  }}'
        for n, t in optional
    ]
    return (
        f'name: "sampler"\nbackend: "python"\nmax_batch_size: {s.max_batch}\n'
        "input [\n" + ",\n".join(inputs) + "\n]\n"
        f'output [\n  {{\n    name: "image"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}\n]\n'
        + _batching(s)
        + _instances(s, True)
    )


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's model-config protobuf; UserError when it does not parse."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise UserError(f"generated config.pbtxt does not parse as Triton's ModelConfig: {exc}") from None


def _choose_unet(run_dir: Path, s: RepoSettings) -> str:
    engine = layout.engine_path(run_dir, s.model)
    if s.unet_kind == "auto":
        return "tensorrt" if engine.is_file() else "onnxruntime"
    return s.unet_kind


def write_repository(run_dir: Path, out: Path, s: RepoSettings) -> dict:
    """Write ``out/{unet,sampler}`` for ``run_dir``; returns facts (what each model serves)."""

    if s.unet_kind not in UNET_KINDS:
        raise UserError(f"unknown unet kind {s.unet_kind!r}; choose one of {', '.join(UNET_KINDS)}")
    folder = final_model_dir(run_dir)[1]
    structure = read_structure(folder)
    model = ModelSpec(structure["unet_config"])
    shape = model.sample_shape  # the denoiser's input: the image of the pixel-space models runs hold
    kind = _choose_unet(run_dir, s)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass a new folder (nothing was written)")
    unet_dir = out / "unet" / "1"
    unet_dir.mkdir(parents=True, exist_ok=True)
    onnx = layout.onnx_path(run_dir, s.model, "fp32")
    engine = layout.engine_path(run_dir, s.model)

    def need(path: Path, stage: str) -> Path:
        if not path.is_file():
            shutil.rmtree(out)
            raise ArtifactError(f"{path} not found; run the {stage} stage of {run_dir} first")
        return path

    served = ""
    if kind == "tensorrt":
        shutil.copy2(need(engine, "build"), unet_dir / "model.plan")
        served = f"TensorRT plan {engine}"
    elif kind == "onnxruntime":
        shutil.copy2(need(onnx, "export"), unet_dir / "model.onnx")
        served = f"ONNX {onnx}"
    else:
        shutil.copy2(MODELS_DIR / "unet_model.py", unet_dir / "model.py")
        if s.backend == "onnxruntime":
            shutil.copy2(need(onnx, "export"), unet_dir / "unet.onnx")
            spec = {"backend": "onnxruntime", "file": "unet.onnx"}
        elif s.backend == "torch":
            if s.model == "dense":
                shutil.rmtree(out)
                raise UserError("--backend torch serves the pruned model; use onnxruntime for dense")
            shutil.copytree(folder, unet_dir / "pruned_unet")
            spec = {"backend": "torch", "file": "pruned_unet"}
        else:
            shutil.copy2(need(engine, "build"), unet_dir / layout.ENGINE_FILE)
            shutil.copy2(
                need(engine_info_path(engine), "build"), engine_info_path(unet_dir / layout.ENGINE_FILE)
            )
            spec = {"backend": "tensorrt", "file": layout.ENGINE_FILE}
        (unet_dir / "backend.json").write_text(json.dumps({**spec, "threads": s.threads}, indent=1))
        served = f"Python backend running {s.backend} in process"
    sampler_dir = out / "sampler" / "1"
    sampler_dir.mkdir(parents=True)
    schedule, default_steps = structure["scheduler_config"], s.default_steps
    student = structure.get("student_steps") if s.model == "pruned" else None
    if student:  # a few-step student: its own DDIM grid and prediction type, its steps by default
        default_steps = int(student)
    elif s.model == "dense":  # a student's structure file keeps the dense model's schedule apart
        schedule = structure.get("dense_scheduler_config", schedule)
    shutil.copy2(MODELS_DIR / "sampler_model.py", sampler_dir / "model.py")
    (sampler_dir / "sampler.json").write_text(
        json.dumps(
            {
                "image_shape": list(shape),
                "scheduler_config": schedule,
                "scheduler": s.scheduler,
                "max_steps": s.max_steps,
                "default_steps": default_steps,
                "unet_max_batch": s.max_batch,
            },
            indent=1,
        )
    )
    configs = {
        "unet": unet_config(shape, kind, s, model.denoiser_inputs()),
        "sampler": sampler_config(shape, s),
    }
    for name, text in configs.items():
        try:
            parse_config(text)
        except ImportError:
            pass  # tritonclient missing: written unchecked (the `serve` extra installs it)
        (out / name / "config.pbtxt").write_text(text)
    return {"unet": served, "unet_kind": kind, "image_shape": list(shape), "model": s.model}


def find_server() -> tuple[Path, Path | None, Path | None]:
    """(tritonserver binary, its own backends folder or None, its bundled library folder or None)."""
    env = os.environ.get("TRITONSERVER")
    if env:
        binary = Path(env)
        if not binary.is_file():
            raise UserError(f"TRITONSERVER={env} is not a file; point it at a tritonserver binary")
        return binary, None, None
    try:
        import pytriton

        root = Path(pytriton.__file__).parent / "tritonserver"
        libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
        return root / "bin" / "tritonserver", root, libs if libs.is_dir() else None
    except ImportError:
        pass
    found = shutil.which("tritonserver")
    if found:
        return Path(found), None, None
    raise UserError(
        "no tritonserver found: install the serve extra (pip install 'compress-deploy[serve]', which "
        "brings PyTriton's bundled server), put tritonserver on the PATH, or set TRITONSERVER"
    )


def python_backend_dir(bundled: Path, where: Path) -> Path:
    """A backends folder for ``bundled`` (PyTriton's server) with the Python stub of this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundled / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"PyTriton ships no Python backend stub for Python {version}; use 3.8-3.13")
    target = where / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in (bundled / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(stub, target / "triton_python_backend_stub")
    (target / "triton_python_backend_stub").chmod(0o755)
    return where


def server_environment(libs: Path | None) -> dict[str, str]:
    """Environment for tritonserver: this interpreter's libpython and site-packages for the stubs."""
    env = dict(os.environ)
    lib_dirs = [str(p) for p in (libs, sysconfig.get_config_var("LIBDIR")) if p]
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    root = str(Path(__file__).resolve().parent.parent)
    env["COMPRESS_DEPLOY_SYSPATH"] = os.pathsep.join([root, *[p for p in sys.path if "site-packages" in p]])
    return env


def server_ready(port: int, host: str = "127.0.0.1") -> bool:
    """True when a Triton on ``host:port`` answers ``/v2/health/ready`` with 200."""
    import urllib.error
    import urllib.request

    where = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{where}:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def server_command(
    binary: Path,
    repo: Path,
    backends: Path | None,
    http: int,
    grpc: int,
    metrics: int,
    host: str = "127.0.0.1",
) -> list[str]:
    """tritonserver's command line for ``repo``: explicit ports, every endpoint bound to ``host``.

    Triton binds 0.0.0.0 by default and authenticates no one, so the address is always
    given; a clean exit waits for in-flight work.
    """
    cmd = [
        str(binary),
        f"--model-repository={repo}",
        f"--http-address={host}",
        f"--http-port={http}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics}",
        "--exit-timeout-secs=60",
        "--log-verbose=0",
    ]
    if backends is not None:
        cmd.append(f"--backend-directory={backends}")
    return cmd
