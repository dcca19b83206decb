"""The README and docs/ stay true to the code: every ``compress-deploy ...`` line they show names a
command that exists and only flags it accepts, and every dotted config key they name exists."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from compressor.config import RunConfig
from pipeline import cli
from pipeline.commands import COMMANDS
from pipeline.commands.args import CommandParser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"json", "md", "png", "py", "yaml", "yml", "html", "onnx", "engine", "safetensors", "npz",
                 "npy", "tar", "gz", "pbtxt", "txt", "lock"}  # fmt: skip


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _flags(command: str | None, monkeypatch) -> set[str]:
    """The option strings of ``command``'s parser (None: the pipeline run), captured as it parses."""

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    monkeypatch.setattr(CommandParser, "parse_known_args", capture)
    try:
        if command is None:
            cli._main_run([])
        else:
            COMMANDS[command].main([])
    except _Captured as got:
        return set(got.parser._option_string_actions)
    raise AssertionError(f"{command or 'the pipeline run'} built no CommandParser")


def _command_lines(text: str) -> list[str]:
    """Every ``compress-deploy ...`` invocation: whole lines in fenced blocks (``\\`` continued) and
    inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        found += [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("compress-deploy ")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span for span in re.findall(r"`([^`]+)`", prose.replace("\n", " ")) if span.startswith(
        "compress-deploy ")]  # fmt: skip
    return [" ".join(line.split()) for line in found]


def _key_exists(path: list[str]) -> bool:
    cls: typing.Any = RunConfig
    for i, name in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return False
        hints = typing.get_type_hints(cls)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif i < len(path) - 1:
            return False
    return True


SECTIONS = {name for name, tp in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(tp)}
KEY = re.compile(r"(?<![\w/.-])(" + "|".join(sorted(SECTIONS)) + r")((?:\.[a-z_][a-z0-9_]*)+)(?![\w/-])")


def _config_keys(text: str) -> list[str]:
    keys = []
    for section, rest in KEY.findall(text):
        parts = rest.strip(".").split(".")
        if parts[-1] in FILE_SUFFIXES or parts == ["key"]:
            continue  # a file name such as frontier.json or quality.md
        keys.append(".".join([section, *parts]))
    return keys


def test_the_docs_exist_and_the_readme_is_a_short_door():
    assert len(DOCS) > 5
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+\.md)", doc.read_text()):
            assert (doc.parent / target).resolve().is_file(), f"{doc.name} links to a missing {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_line_in_the_docs_parses_against_the_cli(doc, monkeypatch):
    lines = _command_lines(doc.read_text())
    cache: dict = {}
    for line in lines:
        words = line.split()
        command = words[1] if len(words) > 1 and words[1] in COMMANDS else None
        if command is None and len(words) > 1 and not re.match(r"^(CONFIG|configs/|\$|--|\[)", words[1]):
            if not words[1].endswith((".yaml", ".yml")):
                pytest.fail(f"{doc.name}: `{line}` names no command ({', '.join(COMMANDS)}) nor a config")
        if command not in cache:
            cache[command] = _flags(command, monkeypatch)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
            assert flag in cache[command], f"{doc.name}: `{line}`: {command or 'the run'} has no {flag}"
        for key in re.findall(r"(?<![\w.])([a-z_]+(?:\.[a-z_][a-z0-9_]*)+)=", line):
            if key.endswith(".key"):
                continue  # the placeholder SECTION.key=value
            assert _key_exists(key.split(".")), f"{doc.name}: `{line}` overrides unknown key {key}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_key_the_docs_name_exists(doc):
    bad = sorted({k for k in _config_keys(doc.read_text()) if not _key_exists(k.split("."))})
    assert not bad, f"{doc.name} names config keys that compressor/config/ does not declare: {bad}"


def test_the_doc_checks_catch_drift(monkeypatch):
    """The checks above can fail: an unknown flag, key or command is caught."""
    assert "--num-images" in _flags("sample", monkeypatch)
    assert "--no-such-flag" not in _flags("sample", monkeypatch)
    assert "--run-dir" in _flags(None, monkeypatch)
    assert _key_exists(["prune", "target_latency", "speedup"]) and _key_exists(["quality", "num_samples"])
    assert not _key_exists(["prune", "target_latency", "no_such_key"]) and not _key_exists(
        ["quality", "nope"]
    )
    text = "set `quality.num_sample` and `prune.ratio`, see `frontier.json` and pipeline/stages/prune.py"
    assert _config_keys(text) == ["quality.num_sample", "prune.ratio"]
    block = "```bash\ncompress-deploy sample RUN \\\n    --steps 4\n```\nand `compress-deploy check RUN`"
    assert _command_lines(block) == ["compress-deploy sample RUN --steps 4", "compress-deploy check RUN"]


def test_the_layout_map_names_every_module():
    """docs/layout.md's "Where is X" table has a row for every module of the four packages (a package's
    ``__init__`` only when it holds more than a docstring's worth)."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    rows = set(re.findall(r"^\| `([\w/]+\.py)` \|", layout, flags=re.M))
    modules = {
        str(p.relative_to(ROOT))
        for package in ("compressor", "rundir", "pipeline", "deploy", "export")
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts and (p.name != "__init__.py" or p.stat().st_size >= 200)
    }
    assert len(modules) > 80
    assert sorted(modules - rows) == [], "modules missing from docs/layout.md's Where is X table"
    assert sorted(rows - modules) == [], "docs/layout.md names modules that no longer exist"
