"""Triton serving of a finished run: `serve`, `triton-repo`, bad requests, load test, SIGTERM.

These start PyTriton's bundled tritonserver (the `serve` extra; it runs on CPU) on free
local ports; they skip, with the reason, where it is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from deploy.triton import server_ready
from pipeline.cli import main
from tests.conftest import finished_tiny_run

try:
    import pytriton  # noqa: F401
    import tritonclient.http  # noqa: F401

    MISSING = ""
except ImportError:
    MISSING = "the serve extra is not installed (pip install 'compress-deploy[serve]')"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING), reason=MISSING or "installed")]
ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_serve(run: Path, *extra: str) -> tuple[subprocess.Popen, int, int]:
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", str(run), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-steps", "50", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    began = time.monotonic()
    while not server_ready(http):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - began < 180, "server not ready in 180 s"
        time.sleep(0.5)
    proc.ports = (http, grpc, metrics)
    return proc, http, metrics


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (read from /proc/net/tcp{,6})."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # little-endian 32-bit words
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(raw)
            mapped = getattr(address, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
            found.add(str(mapped or address))
    return found


def infer(port: int, model: str, inputs: list[dict]) -> tuple[int, dict]:
    body = json.dumps({"inputs": inputs}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", data=body)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def seed_input(seeds: list[int], datatype: str = "INT64") -> dict:
    return {"name": "seed", "shape": [len(seeds), 1], "datatype": datatype, "data": seeds}


def steps_input(steps: int, n: int = 1) -> dict:
    return {"name": "steps", "shape": [n, 1], "datatype": "INT32", "data": [steps] * n}


def image_of(reply: dict) -> np.ndarray:
    out = reply["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    _, run = finished_tiny_run(root, "prune,export")
    proc, http, metrics = start_serve(run)
    yield run, proc, http, metrics
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads listening sockets from /proc/net/tcp")
def test_a_default_serve_listens_on_loopback_only(served):
    _, proc, _, _ = served
    for port in proc.ports:  # HTTP, gRPC and metrics
        assert listening_addresses(port) == {"127.0.0.1"}, (port, listening_addresses(port))


def test_a_request_may_choose_the_solver(served):
    from deploy.sampler import load_sampler

    run, _, http, _ = served
    local = load_sampler(run, backend="onnxruntime")(num_images=2, steps=4, seed=3, scheduler="dpmsolver++")
    solver = {"name": "scheduler", "shape": [2, 1], "datatype": "BYTES", "data": ["dpmsolver++"] * 2}
    code, reply = infer(http, "sampler", [seed_input([3, 4]), steps_input(4, 2), solver])
    assert code == 200, reply
    assert np.abs(image_of(reply) - local.numpy()).max() <= 1e-5
    ddim = load_sampler(run, backend="onnxruntime")(num_images=2, steps=4, seed=3)
    assert np.abs(image_of(reply) - ddim.numpy()).max() > 1e-3  # the request's solver, not the default
    bad = {**solver, "data": ["euler"] * 2}
    code, reply = infer(http, "sampler", [seed_input([3, 4]), bad])
    assert code != 200 and "scheduler must be one of" in json.dumps(reply)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_served_images_equal_local_sampling_and_ignore_batching(served, eta):
    from deploy.sampler import load_sampler

    run, _, http, _ = served
    eta_in = lambda n: {"name": "eta", "shape": [n, 1], "datatype": "FP32", "data": [eta] * n}  # noqa: E731
    local = load_sampler(run, backend="onnxruntime")(num_images=7, steps=4, seed=10, eta=eta).numpy()
    code, reply = infer(http, "sampler", [seed_input(list(range(10, 17))), steps_input(4, 7), eta_in(7)])
    assert code == 200, reply
    together = image_of(reply)
    assert together.shape == (7, 3, 16, 16) and 0 <= together.min() and together.max() <= 1
    assert np.abs(together - local).max() <= 1e-5
    singles = {}

    def one(seed: int) -> None:  # concurrent: the dynamic batcher mixes them with each other
        singles[seed] = image_of(infer(http, "sampler", [seed_input([seed]), steps_input(4), eta_in(1)])[1])[
            0
        ]

    threads = [threading.Thread(target=one, args=(s,)) for s in range(10, 17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(float(np.abs(singles[s] - local[s - 10]).max()) for s in range(10, 17)) <= 1e-5


def test_unet_model_serves_noise(served):
    from compressor.persist import load_unet
    from rundir.layout import model_dir

    run, _, http, _ = served
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    code, reply = infer(
        http,
        "unet",
        [
            {"name": "sample", "shape": [2, 3, 16, 16], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "timestep", "shape": [2, 1], "datatype": "INT64", "data": [10, 900]},
        ],
    )
    assert code == 200, reply
    import torch

    unet = load_unet(model_dir(run, "prune"))[0]
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.tensor([10, 900])).sample.numpy()
    assert np.abs(image_of(reply) - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        ("sampler", [seed_input([1], "FP32")], "data-type is 'FP32', but model 'sampler' expects 'INT64'"),
        ("sampler", [{"name": "seed", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}], "shape"),
        ("sampler", [seed_input([1]), steps_input(0)], "steps must be in [1, 50], got 0"),
        ("sampler", [seed_input([1]), steps_input(51)], "steps must be in [1, 50], got 51"),
        ("sampler", [seed_input([-4])], "seed must be >= 0, got -4"),
        ("sampler", [steps_input(3)], "missing required input 'seed'"),
        ("no-such-model", [seed_input([1])], "no-such-model"),
    ],
)
def test_bad_requests_get_errors_and_the_server_keeps_serving(served, model, inputs, message):
    _, proc, http, _ = served
    code, reply = infer(http, model, inputs)
    assert code >= 400 and message in reply.get("error", ""), (code, reply)
    code, reply = infer(http, "sampler", [seed_input([2]), steps_input(2)])
    assert code == 200 and image_of(reply).shape == (1, 3, 16, 16)
    assert proc.poll() is None


def test_a_bad_request_does_not_fail_the_good_ones_batched_with_it(served):
    _, _, http, _ = served
    results = {}

    def send(key, inputs):
        results[key] = infer(http, "sampler", inputs)

    plans = {"good1": [seed_input([5]), steps_input(3)], "bad": [seed_input([-1]), steps_input(3)],
             "good2": [seed_input([6]), steps_input(3)]}  # fmt: skip
    threads = [threading.Thread(target=send, args=item) for item in plans.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["good1"][0] == 200 and results["good2"][0] == 200
    assert results["bad"][0] >= 400


def test_metrics_endpoint_counts_requests(served):
    _, _, _, metrics = served
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="sampler",version="1"}' in text


def test_load_test_script_reports_and_verifies(served, tmp_path):
    run, _, http, _ = served
    sys.path.insert(0, str(ROOT / "scripts"))
    import load_test

    out = tmp_path / "load.json"
    argv = ["--url", f"127.0.0.1:{http}", "--clients", "3", "--requests", "2", "--steps", "3",
            "--verify", str(run), "--json", str(out)]  # fmt: skip
    assert load_test.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["answered"] == 6 and summary["errors"] == 0 and summary["max_abs_vs_local"] <= 1e-5
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] and summary["images_per_s"] > 0
    with pytest.raises(SystemExit):
        load_test.main(["--url", "example.com:8000"])  # localhost only


def test_triton_repo_configs_parse_and_load_in_tritonserver(served, tmp_path, capsys):
    from deploy.triton import (
        find_server,
        parse_config,
        python_backend_dir,
        server_command,
        server_environment,
    )

    run = served[0]
    out = tmp_path / "repo"
    assert main(["triton-repo", str(run), str(out)]) == 0
    assert (out / "unet" / "1" / "model.onnx").is_file()  # no engine in this run: ONNX for onnxruntime_onnx
    for name in ("unet", "sampler"):
        cfg = parse_config((out / name / "config.pbtxt").read_text())
        assert cfg.name == name and cfg.max_batch_size == 16 and cfg.dynamic_batching is not None
    assert parse_config((out / "unet" / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    assert main(["triton-repo", str(run), str(out)]) == 2  # not empty: refused, nothing overwritten
    assert "is not empty" in capsys.readouterr().err
    assert main(["triton-repo", str(run), str(tmp_path / "trt"), "--unet", "tensorrt"]) == 2
    # the variant PyTriton's binary can load (its only backend is Python), loaded by that binary
    py = tmp_path / "repo-python"
    assert main(["triton-repo", str(run), str(py), "--unet", "python", "--backend", "torch"]) == 0
    assert json.loads((py / "unet" / "1" / "backend.json").read_text())["backend"] == "torch"
    binary, bundled, libs = find_server()
    http, grpc, metrics = free_ports(3)
    backends = python_backend_dir(bundled, tmp_path / "backends")
    cmd = server_command(binary, py, backends, http, grpc, metrics)
    proc = subprocess.Popen(
        cmd, env=server_environment(libs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        began = time.monotonic()
        while not server_ready(http):
            assert proc.poll() is None and time.monotonic() - began < 180
            time.sleep(0.5)
        code, reply = infer(http, "sampler", [seed_input([3]), steps_input(2)])
        assert code == 200 and image_of(reply).shape == (1, 3, 16, 16)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0


def test_serve_refusals_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2


def test_sigterm_finishes_in_flight_requests_and_leaves_nothing_running(served):
    run, proc, http, _ = served
    answers = []

    def ask(seed: int) -> None:
        answers.append(infer(http, "sampler", [seed_input([seed]), steps_input(40)])[0])

    threads = [threading.Thread(target=ask, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=180)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 143, out
    assert answers and all(code in (200, 400, 503) for code in answers), answers
    assert "stopped (tritonserver exit status 0)" in out
    left = subprocess.run(["pgrep", "-f", f"--http-port={http}"], capture_output=True, text=True).stdout
    assert left.strip() == "", left
    assert os.path.isdir(run)
