"""Triton serving of a text-to-image run: `triton-repo` declares `prompt`, `serve` answers prompts over
raw HTTP with the images local sampling gives, bad requests are refused one by one, the load test.

One tiny text-to-image run (prune, finetune, export) and one `compress-deploy serve` (PyTriton's
bundled tritonserver, on CPU) shared by the module; skipped with the reason where the serve extra
is not installed.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading

import numpy as np
import pytest

from deploy.sampler import load_sampler
from deploy.triton import parse_config
from pipeline.cli import main
from pipeline.runner import run_pipeline
from tests.conftest import conditional_config, text_to_image_folders
from tests.test_serve import MISSING, ROOT, image_of, infer, start_serve

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING), reason=MISSING or "installed")]
MODEL = "text_to_image"
STEPS = 3
TOKENS = 12  # the text encoder's max_length: "image 1" is 8 tokens with the tiny tokenizer
LONG = "image 1 image 2 image 3"  # over TOKENS


def text(name: str, values: list) -> dict:
    return {"name": name, "shape": [len(values), 1], "datatype": "BYTES", "data": values}


def number(name: str, values: list, datatype: str) -> dict:
    return {"name": name, "shape": [len(values), 1], "datatype": datatype, "data": values}


def ask(prompts: list[str], seeds: list[int], *extra: dict) -> list[dict]:
    return [
        text("prompt", prompts),
        number("seed", seeds, "INT64"),
        number("steps", [STEPS] * len(seeds), "INT32"),
        *extra,
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory, clip_tokenizer_folder):
    """(run directory, serve process, HTTP port) of a tiny text-to-image run."""
    root = tmp_path_factory.mktemp("conditional-serve")
    pipe, data = text_to_image_folders(root, clip_tokenizer_folder, tokens=TOKENS)
    run = root / "run"
    run_pipeline(conditional_config(pipe, data), run, ["prune", "finetune", "export"])
    proc, http, _ = start_serve(run, "--threads", "1")
    yield run, proc, http
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


@pytest.fixture(scope="module")
def local(served):
    return load_sampler(served[0], backend="onnxruntime")


def test_the_repository_declares_prompt_and_the_run_s_graphs(served, tmp_path, capsys):
    from tritonclient.grpc import model_config_pb2  # the serve extra (skipped without it)

    run = served[0]
    out = tmp_path / "repo"
    assert main(["triton-repo", str(run), str(out)]) == 0
    assert "text_to_image = Python backend with the run's tokenizer" in capsys.readouterr().out
    cfg = parse_config((out / MODEL / "config.pbtxt").read_text())
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in cfg.input}
    string, int64 = (model_config_pb2.DataType.Value(t) for t in ("TYPE_STRING", "TYPE_INT64"))
    assert inputs["prompt"] == (string, [1], False) and inputs["seed"] == (int64, [1], False)
    assert inputs["negative_prompt"][2] and inputs["guidance_scale"][2] and inputs["steps"][2]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("image", [3, 16, 16])]
    assert cfg.backend == "python" and cfg.dynamic_batching is not None
    unet = parse_config((out / "unet" / "config.pbtxt").read_text())
    assert [i.name for i in unet.input] == ["sample", "timestep", "encoder_hidden_states"]
    for graph in ("text_encoder", "vae_decoder", "unet"):  # the run's ONNX graphs, for onnxruntime_onnx
        assert parse_config((out / graph / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
        assert (out / graph / "1" / "model.onnx").is_file()
    assert (out / MODEL / "1" / "tokenizer" / "tokenizer_config.json").is_file()  # the tokenizer ships in it
    py = tmp_path / "repo-python"  # the variant PyTriton's binary loads: every graph a Python model
    assert main(["triton-repo", str(run), str(py), "--unet", "python"]) == 0
    assert json.loads((py / "unet" / "1" / "backend.json").read_text())["conditions"] == [
        "encoder_hidden_states"
    ]
    assert json.loads((py / "text_encoder" / "1" / "backend.json").read_text())["graph"] == "text_encoder"


def test_a_run_with_engines_gets_plans_for_all_three_graphs(tmp_path_factory, served):
    """Where the run built engines (placeholders here: nothing on a CPU runs them), the UNet, text encoder
    and VAE decoder are ``tensorrt_plan`` models, and ``--unet python --backend tensorrt`` carries each
    engine with its engine info; without the shared engines it names the build stage."""
    from deploy.engine_info import write_engine_info
    from rundir import layout
    from tests.conftest import placeholder_engines

    run = tmp_path_factory.mktemp("engines") / "run"
    shutil.copytree(served[0], run)
    assert main(["triton-repo", str(run), str(run.parent / "none"), "--unet", "tensorrt"]) == 2
    placeholder_engines(run)
    for graph in ("text_encoder", "vae_decoder"):
        plan = layout.shared_engine_path(run, graph)
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(b"placeholder")
        write_engine_info(
            plan, json.loads(layout.engine_info_path(layout.engine_path(run, "pruned")).read_text())
        )
    out = run.parent / "repo"
    assert main(["triton-repo", str(run), str(out)]) == 0  # auto: the plans
    for graph in ("unet", "text_encoder", "vae_decoder"):
        assert parse_config((out / graph / "config.pbtxt").read_text()).platform == "tensorrt_plan"
        assert (out / graph / "1" / "model.plan").is_file()
    py = run.parent / "repo-python"
    assert main(["triton-repo", str(run), str(py), "--unet", "python", "--backend", "tensorrt"]) == 0
    for graph in ("text_encoder", "vae_decoder"):
        assert json.loads((py / graph / "1" / "backend.json").read_text())["backend"] == "tensorrt"
        assert layout.engine_info_path(py / graph / "1" / "graph.plan").is_file()


def test_a_served_prompt_equals_local_sampling(served, local):
    _, _, http = served
    prompts = ["image 1", "image 2", "image 3"]
    want = local(num_images=3, steps=STEPS, seed=5, prompts=prompts).numpy()
    code, reply = infer(http, MODEL, ask(prompts, [5, 6, 7]))
    assert code == 200, reply
    together = image_of(reply)
    assert together.shape == (3, 3, 16, 16) and 0 <= together.min() and together.max() <= 1
    assert np.abs(together - want).max() <= 1e-4
    singles = {}

    def one(k: int) -> None:  # concurrent: the dynamic batcher mixes them with each other
        singles[k] = image_of(infer(http, MODEL, ask([prompts[k]], [5 + k]))[1])[0]

    threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(float(np.abs(singles[k] - want[k]).max()) for k in range(3)) <= 1e-4
    # the negative prompt and the guidance scale of the request, not the defaults
    steer = [text("negative_prompt", ["image 0"]), number("guidance_scale", [5.0], "FP32")]
    code, reply = infer(http, MODEL, ask(["image 1"], [5], *steer))
    ref = local(
        num_images=1, steps=STEPS, seed=5, prompts=["image 1"], guidance_scale=5.0, negative_prompt="image 0"
    )
    assert code == 200 and np.abs(image_of(reply) - ref.numpy()).max() <= 1e-4
    assert np.abs(image_of(reply) - want[:1]).max() > 1e-3


def _binary(http: int, prompt: bytes, scale: float | None = None) -> tuple[int, str]:
    """A request with tritonclient's binary tensors (JSON holds neither NaN nor bytes that are not UTF-8)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{http}")
    values = [("prompt", "BYTES", np.array([[prompt]], dtype=object)), ("seed", "INT64", np.array([[1]]))]
    if scale is not None:
        values.append(("guidance_scale", "FP32", np.array([[scale]], dtype=np.float32)))
    inputs = []
    for name, datatype, value in values:
        inputs.append(httpclient.InferInput(name, [1, 1], datatype))
        inputs[-1].set_data_from_numpy(value)
    try:
        client.infer(MODEL, inputs)
        return 200, ""
    except InferenceServerException as exc:
        return int(exc.status() or 0), exc.message()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (ask([""], [1]), "prompt is empty"),
        (ask(["  "], [1]), "prompt is empty"),
        (ask([LONG], [1]), f"the text encoder takes at most {TOKENS} (start and end tokens"),
        (ask(["image 1"], [1], text("negative_prompt", [LONG])), "negative_prompt is"),
        (ask(["image 1"], [1], number("guidance_scale", [-1.0], "FP32")), "guidance_scale must be a finite"),
        (
            [text("prompt", ["image 1"]), number("seed", [1], "INT64"), number("steps", [0], "INT32")],
            "steps must be in [1, 50], got 0",
        ),
        (
            [text("prompt", ["image 1"]), number("seed", [1], "INT64"), number("steps", [51], "INT32")],
            "got 51",
        ),
        (ask(["image 1"], [-3]), "seed must be >= 0, got -3"),
        ([number("seed", [1], "INT64")], "missing required input(s) ['prompt']"),  # Triton's own check
        ("non-utf-8", "prompt is not UTF-8 text"),
        ("nan", "guidance_scale must be a finite number >= 0 (1 = no guidance), got nan"),
    ],
)
def test_bad_requests_are_refused_and_the_next_good_one_served(served, inputs, message):
    _, proc, http = served
    if inputs == "non-utf-8":
        code, error = _binary(http, b"image \xff\xfe 1")
    elif inputs == "nan":
        code, error = _binary(http, b"image 1", float("nan"))
    else:
        code, reply = infer(http, MODEL, inputs)
        error = reply.get("error", "")
    assert code == 400 and message in error, (code, error)
    code, reply = infer(http, MODEL, ask(["image 2"], [2]))
    assert code == 200 and image_of(reply).shape == (1, 3, 16, 16)
    assert proc.poll() is None


def test_a_bad_request_does_not_fail_the_good_ones_batched_with_it(served, local):
    _, _, http = served
    results = {}
    plans = {"good1": ask(["image 1"], [8]), "bad": ask([""], [9]), "good2": ask(["image 2"], [10])}

    def send(key: str, inputs: list[dict]) -> None:
        results[key] = infer(http, MODEL, inputs)

    threads = [threading.Thread(target=send, args=item) for item in plans.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["bad"][0] == 400
    want = local(num_images=1, steps=STEPS, seed=10, prompts=["image 2"]).numpy()
    assert results["good1"][0] == 200 and np.abs(image_of(results["good2"][1]) - want).max() <= 1e-4


def test_the_load_test_drives_the_text_to_image_model(served, tmp_path):
    run, _, http = served
    sys.path.insert(0, str(ROOT / "scripts"))
    import load_test

    out = tmp_path / "load.json"
    argv = ["--url", f"127.0.0.1:{http}", "--clients", "2", "--requests", "2", "--steps", str(STEPS),
            "--prompt", "image 1", "--prompt", "image 3", "--verify", str(run),
            "--json", str(out)]  # fmt: skip
    assert load_test.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["model"] == MODEL and summary["prompts"] == ["image 1", "image 3"]
    assert summary["answered"] == 4 and summary["errors"] == 0 and summary["max_abs_vs_local"] <= 1e-4
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] and summary["images_per_s"] > 0
