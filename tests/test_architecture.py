"""The shape of the house: stage order, typed records, the commands mapping, the serve address."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressor.config import load_config
from compressor.errors import UserError
from pipeline.cli import main
from pipeline.commands import COMMANDS
from pipeline.runner import run_pipeline
from rundir import records
from rundir.artifacts import note_record
from tests.conftest import TINY_CONFIG, finished_tiny_run, tree_hashes, write_config, write_images

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {
    "seconds",
    "steps_per_second",
    "export_seconds",
    "seconds_per_timestep",
    "search_seconds",
    "finished",
}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_stage_order_in_one_process_does_not_change_results(tmp_path, model_folder):
    """Stages get private copies of the shared dense model, so the order they run in cannot matter.

    ``train`` used to train the cached dense model in place; a later ``prune`` in the same
    process then pruned the trained weights, and ``quality`` moved the model to its device.
    """
    images = tmp_path / "images"
    write_images(images, 8)
    cfg_file = write_config(tmp_path / "tiny.yaml", TINY_CONFIG.format(model=model_folder, data=images))
    cfg = load_config(cfg_file, ["quality.num_samples=4", "quality.compare_raw=false"])
    first = run_pipeline(cfg, tmp_path / "a", ["train", "prune", "quality", "samples"])
    second = run_pipeline(cfg, tmp_path / "b", ["prune", "samples", "quality", "train"])
    for stage in ("train", "prune", "quality", "samples"):
        assert _without_timings(first[stage]["metrics"]) == _without_timings(second[stage]["metrics"]), stage
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "prune/model/unet.safetensors").read_bytes() == (
        b / "prune/model/unet.safetensors"
    ).read_bytes()


def test_typed_readers_and_one_final_model_rule(tmp_path):
    _, run = finished_tiny_run(tmp_path, "prune")
    prune = records.read_metrics(run, "prune")
    assert isinstance(prune, records.PruneMetrics) and 0 < prune.macs_kept < 1
    assert prune.macs_reduction == pytest.approx(prune.macs_before / prune.macs_after)
    assert records.read_metrics(run, "finetune") is None
    assert records.final_model_dir(run) == ("prune", run / "prune" / "model")
    with pytest.raises(records.RecordError, match="bench needs the finetune stage's output"):
        records.require_record(run, "finetune", "bench")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda text: text[: len(text) // 2], "damaged record (not valid JSON)"),
        (lambda text: "[1, 2]", "damaged record (not a JSON object)"),
        (lambda text: json.dumps({**json.loads(text), "metrics": []}), "damaged record (no metrics)"),
        (
            lambda text: json.dumps({**json.loads(text), "metrics": {"method": "magnitude"}}),
            "damaged record (no metrics.ratio)",
        ),
    ],
    ids=["truncated", "not-an-object", "metrics-not-a-mapping", "field-missing"],
)
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, capsys, damage, expected):
    _, base = finished_tiny_run(tmp_path, "prune")
    run = tmp_path / "copy"
    shutil.copytree(base, run)
    path = run / "prune" / "record.json"
    path.write_text(damage(path.read_text()))
    note_record(run, path)  # as if written so (an edit after writing: refused by its hash, test_reliability)
    with pytest.raises(records.RecordError, match=r"prune/record.json: damaged record") as info:
        records.read_metrics(run, "prune")
    assert expected in str(info.value) and "--force prune" in str(info.value)
    if "metrics." in expected:
        return  # the record is whole; only the typed view of its metrics misses a field
    before = tree_hashes(run)
    capsys.readouterr()
    assert (
        main(["sample", str(run), "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "s.png")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged record" in err[0] and "Traceback" not in err[0], err
    assert tree_hashes(run) == before


def test_commands_are_one_literal_mapping_of_small_modules():
    folder = ROOT / "pipeline" / "commands"
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "args"}
    assert {m.__name__.rsplit(".", 1)[1] for m in COMMANDS.values()} == modules
    for name, module in COMMANDS.items():  # named for the command, or for what it does where the
        # command's name would repeat another module's (check -> check_run, build -> build_engines)
        assert module.__name__.rsplit(".", 1)[1].startswith(name.replace("-", "_")), (name, module.__name__)
    readme = (ROOT / "README.md").read_text()
    for name, module in COMMANDS.items():
        assert callable(module.main) and module.__doc__, name
        assert f"compress-deploy {name} " in readme, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help_and_refuses_an_unknown_flag(name, capsys):
    assert main([name, "--help"]) == 0
    assert f"compress-deploy {name}" in capsys.readouterr().out
    assert main([name, "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_serve_binds_every_endpoint_to_the_host_given():
    from deploy.triton import server_command

    default = server_command(Path("tritonserver"), Path("repo"), None, 8000, 8001, 8002)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(
        default
    )
    wide = server_command(Path("tritonserver"), Path("repo"), None, 8000, 8001, 8002, "0.0.0.0")
    assert "--http-address=0.0.0.0" in wide and "--metrics-address=0.0.0.0" in wide


def test_flags_are_checked_by_the_config_rules():
    from compressor.config import SampleConfig, ServeConfig, parse_value

    assert parse_value("--steps", "7", SampleConfig, "steps") == 7
    assert parse_value("--threads", "none", ServeConfig, "threads") is None
    for flag, text, cls, name in (
        ("--steps", "0", SampleConfig, "steps"),
        ("--eta", "inf", SampleConfig, "eta"),
        ("--grpc-port", "0", ServeConfig, "grpc_port"),
        ("--scheduler", "euler", SampleConfig, "scheduler"),
    ):
        with pytest.raises(UserError, match=f"^{flag}: expected"):
            parse_value(flag, text, cls, name)
