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

A conditional run (a text-to-image pipeline, or a class-conditioned model) gets a
``text_to_image`` model instead of ``sampler``, beside the ``unet`` (which then also takes
``encoder_hidden_states`` FP32 [tokens, D] or ``class_labels`` INT64 [1]) and the run's shared
graphs as models of their own, the way ``sampler`` calls ``unet``:

- ``text_encoder`` (input_ids INT64 [tokens] -> last_hidden_state FP32 [tokens, D]) and
  ``vae_decoder`` (latent_sample FP32 [C,h,w] -> sample FP32 [3,H,W] in [-1, 1]): the run's
  ``RUN/export/shared/*.fp32.onnx`` (``onnxruntime_onnx``), its engines ``RUN/build/shared/*.plan``
  where the UNet is served as a plan, or Python-backend models running them in process.
- ``text_to_image`` (prompt BYTES [1], optional negative_prompt BYTES [1], seed INT64 [1],
  optional steps INT32 [1], guidance_scale FP32 [1], eta FP32 [1], scheduler BYTES [1] ->
  image FP32 [C,H,W] in [0, 1]): a Python-backend model holding the run's tokenizer
  (``text_to_image/1/tokenizer/``), which tokenizes as :func:`compressor.encoded_cache.padded_tokens`,
  calls ``text_encoder``, runs the guided loop calling ``unet`` and decodes through
  ``vae_decoder`` (Triton's BLS). A class-conditioned model takes the class index as ``prompt``.

All use dynamic batching (``max_batch``, ``max_queue_delay_us``) and one instance group.
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
from dataclasses import dataclass, replace
from pathlib import Path

from compressor.components import DenoiserInputs, DiffusionModel, ModelSpec
from compressor.config import ModelConfig
from compressor.errors import ArtifactError, UserError
from compressor.models import read_model_spec
from compressor.persist import read_structure
from deploy.runtimes import load_run_model
from deploy.sampler import run_guidance_scale
from rundir import layout
from rundir.layout import engine_info_path
from rundir.records import final_model_dir, read_record

MODELS_DIR = Path(__file__).parent / "triton_models"
UNET_KINDS = ("auto", "tensorrt", "onnxruntime", "python")
TEXT_TO_IMAGE = "text_to_image"  # the entry model of a conditional run (``sampler`` of an unconditional one)


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
    optional = [("steps", "TYPE_INT32"), ("eta", "TYPE_FP32"), ("scheduler", "TYPE_STRING")]
    return _image_model_config("sampler", [("seed", "TYPE_INT64")], optional, shape, s)


def _image_model_config(
    name: str, required: list, optional: list, shape: tuple[int, int, int], s: RepoSettings
) -> str:
    """config.pbtxt of a Python-backend model taking ``[1]`` inputs (``(name, type)``: ``required``,
    then ``optional``) and giving ``image`` FP32 of ``shape``, batched as ``s`` says."""
    dims = ", ".join(str(d) for d in shape)
    inputs = [f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ 1 ]\n  }}' for n, t in required] + [
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ 1 ]\n    optional: true\n  }}'
        for n, t in optional
    ]
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {s.max_batch}\n'
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


def run_spec(run_dir: Path, unet_config: dict) -> ModelSpec:
    """The served UNet (``unet_config``) among the run's other components (text encoder, tokenizer, VAE),
    read from their configs alone; the UNet by itself where the prune record names no readable model."""
    rec = read_record(run_dir, "prune")
    section = rec.config.get("model") if rec is not None else None
    spec = None
    if isinstance(section, dict):
        spec = read_model_spec(ModelConfig(**{k: v for k, v in section.items() if k in ("name", "init")}))
    return ModelSpec(unet_config) if spec is None else replace(spec, unet=unet_config)


def write_repository(run_dir: Path, out: Path, s: RepoSettings) -> dict:
    """Write ``out/{unet,sampler}`` for ``run_dir`` (a conditional run: ``out/{unet,text_to_image}`` and
    its ``text_encoder`` / ``vae_decoder``); returns facts (what each model serves, ``entry``: the
    model a client asks for images)."""

    if s.unet_kind not in UNET_KINDS:
        raise UserError(f"unknown unet kind {s.unet_kind!r}; choose one of {', '.join(UNET_KINDS)}")
    folder = final_model_dir(run_dir)[1]
    structure = read_structure(folder)
    model = run_spec(run_dir, structure["unet_config"])
    shape = model.sample_shape  # the denoiser's input: the image of the pixel-space models runs hold
    kind = _choose_unet(run_dir, s)
    conditional = model.conditioning != "none"
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
        if conditional:
            spec["conditions"] = [i.name for i in model.denoiser_inputs().conditions]
        (unet_dir / "backend.json").write_text(json.dumps({**spec, "threads": s.threads}, indent=1))
        served = f"Python backend running {s.backend} in process"
    schedule, default_steps = structure["scheduler_config"], s.default_steps
    student = structure.get("student_steps") if s.model == "pruned" else None
    if student:  # a few-step student: its own DDIM grid and prediction type, its steps by default
        default_steps = int(student)
    elif s.model == "dense":  # a student's structure file keeps the dense model's schedule apart
        schedule = structure.get("dense_scheduler_config", schedule)
    loop = {
        "scheduler_config": schedule,
        "scheduler": s.scheduler,
        "max_steps": s.max_steps,
        "default_steps": default_steps,
        "unet_max_batch": s.max_batch,
    }
    configs = {"unet": unet_config(shape, kind, s, model.denoiser_inputs())}
    facts = {
        "unet": served,
        "unet_kind": kind,
        "image_shape": list(shape),
        "model": s.model,
        "entry": "sampler",
    }
    if conditional:
        graphs = _write_graphs(run_dir, out, model, kind, s, need)
        configs.update({name: text for name, (text, _) in graphs.items()})
        configs[TEXT_TO_IMAGE] = _write_text_to_image(run_dir, out, model, loop, s)
        facts.update(
            entry=TEXT_TO_IMAGE,
            image_shape=list(model.image_shape),
            conditioning=model.conditioning,
            graphs={name: where for name, (_, where) in graphs.items()},
        )
    else:
        sampler_dir = out / "sampler" / "1"
        sampler_dir.mkdir(parents=True)
        shutil.copy2(MODELS_DIR / "sampler_model.py", sampler_dir / "model.py")
        (sampler_dir / "sampler.json").write_text(json.dumps({"image_shape": list(shape), **loop}, indent=1))
        configs["sampler"] = sampler_config(shape, s)
    for name, text in configs.items():
        try:
            parse_config(text)
        except ImportError:
            pass  # tritonclient missing: written unchecked (the `serve` extra installs it)
        (out / name / "config.pbtxt").write_text(text)
    return facts


def graph_config(name: str, kind: str, s: RepoSettings, inputs: list[tuple], outputs: list[tuple]) -> str:
    """config.pbtxt of a shared pipeline graph served as a model of its own (``text_encoder``,
    ``vae_decoder``); ``inputs`` / ``outputs``: (name, Triton type, per-item dims)."""
    platform = {
        "tensorrt": 'platform: "tensorrt_plan"',
        "onnxruntime": 'platform: "onnxruntime_onnx"',
        "python": 'backend: "python"',
    }[kind]

    def block(entries: list[tuple]) -> str:
        return ",\n".join(_input_block(n, t, tuple(d)) for n, t, d in entries)

    return (
        f'name: "{name}"\n{platform}\nmax_batch_size: {s.max_batch}\n'
        f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"
        + _batching(s)
        + _instances(s, kind == "python")
    )


def _write_graphs(run_dir: Path, out: Path, model: ModelSpec, kind: str, s: RepoSettings, need) -> dict:
    """The conditional run's shared graphs as models: {name: (config text, what serves it)}. Their
    engines where the UNet is a plan, else their fp32 ONNX (Python-backend wrappers for ``python``)."""
    interfaces = {}
    if model.conditioning == "text":
        width = int((model.text_encoder or {}).get("hidden_size") or model.cross_attention_dim)
        interfaces["text_encoder"] = (
            [("input_ids", "TYPE_INT64", (model.tokens,))],
            [("last_hidden_state", "TYPE_FP32", (model.tokens, width))],
        )
    if model.latent:
        interfaces["vae_decoder"] = (
            [("latent_sample", "TYPE_FP32", model.sample_shape)],
            [("sample", "TYPE_FP32", model.image_shape)],
        )
    found = {}
    for name, (inputs, outputs) in interfaces.items():
        where = out / name / "1"
        where.mkdir(parents=True)
        onnx = layout.shared_onnx_path(run_dir, name, "fp32")
        if kind == "tensorrt":
            plan = layout.shared_engine_path(run_dir, name)
            shutil.copy2(need(plan, "build"), where / "model.plan")
            served = f"TensorRT plan {plan}"
        elif kind == "onnxruntime":
            shutil.copy2(need(onnx, "export"), where / "model.onnx")
            served = f"ONNX {onnx}"
        else:
            shutil.copy2(MODELS_DIR / "graph_model.py", where / "model.py")
            if s.backend == "tensorrt":
                plan = layout.shared_engine_path(run_dir, name)
                shutil.copy2(need(plan, "build"), where / "graph.plan")
                shutil.copy2(need(engine_info_path(plan), "build"), engine_info_path(where / "graph.plan"))
                spec = {"backend": "tensorrt", "file": "graph.plan"}
            else:  # torch serves the UNet alone in torch; the shared graphs run on ONNX Runtime
                shutil.copy2(need(onnx, "export"), where / "graph.onnx")
                spec = {"backend": "onnxruntime", "file": "graph.onnx"}
            io = {"inputs": [i[0] for i in inputs], "outputs": [o[0] for o in outputs]}
            (where / "backend.json").write_text(
                json.dumps({"graph": name, **spec, **io, "threads": s.threads})
            )
            served = f"Python backend running {spec['backend']} in process"
        found[name] = (graph_config(name, kind, s, inputs, outputs), served)
    return found


def text_to_image_config(image_shape: tuple[int, int, int], s: RepoSettings) -> str:
    """config.pbtxt of the ``text_to_image`` model (Python backend): ``prompt`` and ``seed`` required."""
    required = [("prompt", "TYPE_STRING"), ("seed", "TYPE_INT64")]
    optional = [
        ("negative_prompt", "TYPE_STRING"),
        ("steps", "TYPE_INT32"),
        ("guidance_scale", "TYPE_FP32"),
        ("eta", "TYPE_FP32"),
        ("scheduler", "TYPE_STRING"),
    ]
    return _image_model_config(TEXT_TO_IMAGE, required, optional, image_shape, s)


def _write_text_to_image(run_dir: Path, out: Path, model: ModelSpec, loop: dict, s: RepoSettings) -> str:
    """``out/text_to_image/1``: the model file, the run's tokenizer (a text model) and
    ``text_to_image.json`` (the loop's settings, shapes, the guidance default, the VAE's scaling)."""
    where = out / TEXT_TO_IMAGE / "1"
    where.mkdir(parents=True)
    shutil.copy2(MODELS_DIR / "text_to_image_model.py", where / "model.py")
    if model.conditioning == "text":
        dense: DiffusionModel = load_run_model(run_dir)
        dense.tokenizer.save_pretrained(str(where / "tokenizer"))
    vae = None
    if model.latent:
        vae = {"scaling_factor": model.latent_scaling, "shift_factor": (model.vae or {}).get("shift_factor")}
    spec = {
        **loop,
        "conditioning": model.conditioning,
        "latent_shape": list(model.sample_shape),
        "image_shape": list(model.image_shape),
        "tokens": model.tokens,
        "num_classes": model.num_classes,
        "vae": vae,
        "guidance_scale": run_guidance_scale(run_dir),
    }
    (where / "text_to_image.json").write_text(json.dumps(spec, indent=1))
    return text_to_image_config(model.image_shape, s)


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
