"""The CLI: stage wiring, the run-directory record contract, exit codes and clear errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.stages import STAGES
from tests.conftest import tree_hashes, write_config, write_images


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_prune_stage_writes_the_record_contract(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(tiny_config, "--stages", "prune", "--run-dir", run_dir) == 0
    rec = json.loads((run_dir / "prune" / "record.json").read_text())
    for key in ("stage", "status", "config", "metrics", "versions", "seconds"):
        assert key in rec
    assert rec["stage"] == "prune" and rec["status"] == "ok"
    assert rec["config"]["prune"]["method"] == "diff-pruning"
    m = rec["metrics"]
    for key in (
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "method",
        "timesteps_used",
        "kept_widths",
    ):
        assert key in m
    assert m["params_after"] < m["params_before"] and m["macs_after"] < m["macs_before"]
    assert m["timesteps_used"][0] == 0 and all(t % 100 == 0 for t in m["timesteps_used"])
    assert m["kept_widths"]["conv_in"] == [16, 12]
    assert "torch" in rec["versions"] and "torch-pruning" in rec["versions"]
    assert (run_dir / "prune" / "model" / "unet.safetensors").is_file()


def test_default_run_dir_is_runs_config_name(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(tiny_config, "--stages", "prune") == 0
    assert (tmp_path / "runs" / "tiny" / "prune" / "record.json").is_file()


def test_overrides_reach_the_stage(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    code = run_cli(
        tiny_config, "prune.method=magnitude", "prune.ratio=0.5", "--stages", "prune", "--run-dir", run_dir
    )
    assert code == 0
    m = json.loads((run_dir / "prune" / "record.json").read_text())["metrics"]
    assert m["method"] == "magnitude" and m["ratio"] == 0.5 and m["timesteps_used"] == []


def test_samples_grid_after_prune_with_progress_lines(tiny_config, tmp_path, capsys):
    """Off a terminal (pytest's stderr) every bar is a few plain lines, no carriage returns; the Taylor
    pass counts against every candidate timestep and stops at the threshold, samples count images."""
    from PIL import Image

    from tests.conftest import DDPM_SCHEDULER

    run_dir = tmp_path / "run"
    assert run_cli(tiny_config, "--stages", "prune,samples", "--run-dir", run_dir) == 0
    img = Image.open(run_dir / "samples" / "grid.png")
    assert img.width > 64 and img.height > 64
    err = capsys.readouterr().err
    assert "\r" not in err
    taylor = re.findall(r"^\[prune\] Taylor pass: (\d+)/(\d+) timestep", err, re.M)
    used = json.loads((run_dir / "prune" / "record.json").read_text())["metrics"]["timesteps_used"]
    candidates = len(range(0, DDPM_SCHEDULER["num_train_timesteps"], 100))
    assert taylor and taylor[-1] == (str(len(used)), str(candidates)), taylor
    assert f"Taylor pass: {len(used)} of {candidates} candidate timesteps" in err
    assert re.search(r"^\[samples\] dense: 4/4 image \(100%\)", err, re.M), err


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected a message on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


BAD_CONFIGS = {
    "malformed YAML": ("prune: [unclosed\n", "malformed YAML"),
    "unknown key": ("prune:\n  ratioo: 0.3\n", "prune.ratioo: unknown key"),
    "ratio outside [0, 1)": (
        "prune:\n  ratio: 1.5\n",
        "prune.ratio: expected a number in [0.0, 1.0), got 1.5",
    ),
    "negative threshold": ("prune:\n  ratio: 0.3\n  threshold: -1\n", "prune.threshold: expected a number"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line(case, tmp_path, capsys):
    text, message = BAD_CONFIGS[case]
    cfg = write_config(tmp_path / "bad.yaml", text)
    assert run_cli(cfg, "--run-dir", tmp_path / "run") == 2
    line = _error_line(capsys)
    assert message in line and line.startswith("error: ")


def _finished_run(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(tiny_config, "--stages", "prune", "--run-dir", run_dir) == 0
    return run_dir, tree_hashes(run_dir)


def test_user_errors_leave_earlier_results_untouched(tiny_config, tmp_path, capsys, model_folder):
    run_dir, before = _finished_run(tiny_config, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken"
    paths = write_images(broken, 4)
    paths[2].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cases = [
        (["prune.ratio=null", "prune.target_macs=0.0001"], "not reachable"),
        ([f"model.name={tmp_path / 'missing-model'}"], "does not exist"),
        ([f"data.source={empty}"], "no PNG/JPEG images found"),
        ([f"data.source={texts}"], "no PNG/JPEG images found"),
        ([f"data.source={broken}"], "img002.png: cannot decode image"),
        (["prune.ratio=2"], "prune.ratio: expected a number in [0.0, 1.0)"),
    ]
    for overrides, message in cases:
        capsys.readouterr()
        code = run_cli(tiny_config, *overrides, "--stages", "prune", "--run-dir", run_dir)
        assert code == 2, overrides
        assert message in _error_line(capsys), overrides
        assert tree_hashes(run_dir) == before, overrides


def test_unknown_stage_lists_known_ones(tiny_config, tmp_path, capsys):
    assert run_cli(tiny_config, "--stages", "prune,polish", "--run-dir", tmp_path / "r") == 2
    line = _error_line(capsys)
    assert "unknown stage 'polish'" in line and "prune" in line
    assert not (tmp_path / "r").exists()


def test_stage_needing_missing_output_says_what_to_run(tiny_config, tmp_path, capsys):
    assert run_cli(tiny_config, "--stages", "finetune", "--run-dir", tmp_path / "r") == 2
    assert "needs the prune stage's output" in _error_line(capsys)


def test_run_dir_of_another_config_is_refused(tiny_config, tmp_path, capsys):
    run_dir, before = _finished_run(tiny_config, tmp_path)
    other = write_config(tmp_path / "other.yaml", tiny_config.read_text())
    assert run_cli(other, "--stages", "prune", "--run-dir", run_dir) == 2
    assert "belongs to config 'tiny'" in _error_line(capsys)
    assert tree_hashes(run_dir) == before


def test_missing_config_file(tmp_path, capsys):
    assert run_cli(tmp_path / "nope.yaml") == 2
    assert "not found" in _error_line(capsys)


def test_stage_mapping_is_the_documented_order():
    assert list(STAGES)[:5] == ["train", "prune", "finetune", "distill_steps", "samples"]


def test_console_script_exit_code(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config file") and "Traceback" not in proc.stderr


def _parsers(monkeypatch) -> dict[str | None, argparse.ArgumentParser]:
    """Every command's parser (None: the pipeline run), captured as it starts to parse."""
    from pipeline import cli
    from pipeline.commands import COMMANDS
    from pipeline.commands.args import CommandParser

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(CommandParser, "parse_known_args", capture)
    parsers = {}
    for name in [None, *COMMANDS]:
        with pytest.raises(Captured) as got:
            (cli._main_run if name is None else COMMANDS[name].main)([])
        parsers[name] = got.value.args[0]
    return parsers


def test_every_argument_has_help_and_every_option_states_its_default_once(monkeypatch):
    from pipeline.commands.args import HelpFormatter

    for name, parser in _parsers(monkeypatch).items():
        formatter = HelpFormatter(parser.prog)
        assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class, HelpFormatter)
        for action in parser._actions:
            where = f"{name or 'the pipeline run'} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action) if action.help else ""
            assert text.strip(), f"{where}: no help"
            if action.option_strings and action.nargs != 0:  # an option that takes a value
                assert text.count("(default: ") == 1, f"{where}: {text!r} should state its default once"
                assert text.endswith(")") and "(default None" not in text and "; default " not in text, where
            if not action.option_strings:  # shown as RUN, CONFIG, OUT, key=value: never a dest name
                assert action.metavar in ("RUN", "CONFIG", "OUT") or "key=value" in action.metavar, where


def test_help_lists_every_command_with_what_it_takes_and_the_exit_codes(monkeypatch, capsys):
    from pipeline.acceptance import EXIT_FAIL, EXIT_INCONCLUSIVE
    from pipeline.commands import COMMANDS, SUMMARIES

    assert list(SUMMARIES) == list(COMMANDS)
    parsers = _parsers(monkeypatch)
    monkeypatch.undo()
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out.split("commands (")[1].split("exit codes:")[0]
    for name, (takes, what) in SUMMARIES.items():
        positionals = [a.metavar for a in parsers[name]._actions if not a.option_strings]
        assert positionals[: len(takes.split())] == takes.split(), name  # CONFIG, RUN or RUN OUT
        assert re.search(rf"^  {re.escape(f'{name} {takes}')} +{re.escape(what)}$", commands, re.M), name
    codes = out.split("exit codes:")[1]
    for code in (0, 1, 2, EXIT_FAIL, EXIT_INCONCLUSIVE, 130, 143):
        assert re.search(rf"^  [\d, ]*\b{code}\b", codes, re.M), code
    assert "--version" in out


def test_version(capsys, monkeypatch):
    from importlib import metadata

    import tomllib

    from pipeline import cli

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"compress-deploy \d+\.\d+\.\d+\S*\n", out), out
    assert out == f"compress-deploy {metadata.version('compress-deploy')}\n"

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)  # a source checkout without installed metadata
    pyproject = tomllib.loads((Path(cli.__file__).parent.parent / "pyproject.toml").read_text())
    assert cli.package_version() == pyproject["project"]["version"]
