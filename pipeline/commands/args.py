"""Command-line parsing shared by the commands: flags validated by the config's own rules.

A flag declared with :func:`config_flag` is checked by the same typed validator as the
config key it mirrors (type, range, choices), so ``--steps 0`` fails exactly as
``sample.steps: 0`` would, naming the flag. Any other argparse error (an unknown flag, a
missing argument) is one line too: :class:`CommandParser` raises UserError instead of
printing usage and exiting.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from compressor.config import describe_field, field_spec, parse_value
from compressor.errors import UserError


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one UserError line (exit 2), never usage + SystemExit."""

    def error(self, message: str) -> typing.NoReturn:
        """Raise UserError("PROG: MESSAGE; see PROG --help")."""
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def config_flag(parser: argparse.ArgumentParser, flag: str, cls: type, name: str, **kwargs: Any) -> None:
    """Add ``flag`` mirroring config field ``cls.name``: same type, range, choices and default.

    ``default=`` in ``kwargs`` overrides the field's default (already-typed values are not
    re-parsed by argparse).
    """
    tp, default, _ = field_spec(cls, name)
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
    kwargs.setdefault("default", default)
    kwargs.setdefault("help", describe_field(cls, name))
    if choices:
        kwargs.setdefault("metavar", "{" + ",".join(map(str, choices)) + "}")
    parser.add_argument(flag, type=lambda text: parse_value(flag, text, cls, name), **kwargs)


def run_dir_arg(path: Path) -> Path:
    """A finished run's directory; UserError when it does not exist."""
    if not path.is_dir():
        raise UserError(f"run directory {path} not found; pass the folder a run wrote")
    return path


def int_list(text: str | None, flag: str, minimum: int = 1) -> list[int] | None:
    """``"1,16"`` -> [1, 16] (None for None); UserError naming ``flag`` otherwise."""
    if text is None:
        return None
    try:
        values = [int(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. {flag} 1,16") from None
    if not values:
        raise UserError(f"{flag}: empty list")
    bad = [v for v in values if v < minimum]
    if bad:
        raise UserError(f"{flag} {text!r}: every value must be >= {minimum}, got {bad[0]}")
    return values


def run_settings(name: str, section: str, argv: list[str], description: str) -> tuple[Path, Any]:
    """Parse ``RUN [section.key=value ...]`` into (run, config).

    ``section`` starts from what RUN's last record of the command's stage used; ``check``
    also takes the latency target the run pruned for from the prune record.
    """
    from compressor.config import config_from_mapping
    from compressor.records import read_record

    parser = CommandParser(prog=f"compress-deploy {name}", description=description)
    parser.add_argument("run", type=Path)
    parser.add_argument("overrides", nargs="*", help=f"{section}.key=value to change settings")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit among the flags
    run = run_dir_arg(args.run)
    for o in args.overrides:
        if not o.startswith(f"{section}."):
            raise UserError(f"override {o!r}: {name} only takes {section}.* overrides")
    base = {}
    own = read_record(run, name, done_only=False)
    if own is not None:
        base[section] = own.section(section)
    prune = read_record(run, "prune") if name == "check" else None
    if prune is not None:  # the latency target the run pruned for
        base["prune"] = prune.section("prune")
    return run, config_from_mapping(base, args.overrides)


STACK_FLAGS = {"scheduler": "scheduler", "steps": "steps", "cache_interval": "cache_interval",
               "precision": "precision"}  # fmt: skip


def stack_defaults(args: Any, run: Path, model: str, names: dict[str, str], cls: type) -> dict[str, Any]:
    """Sampler settings for a command on ``run``: each flag as given, else (for the compressed model)
    the stack a latency target over levers chose, or the few-step student's own sampler (DDIM at
    its steps), else the config field's default.

    ``names``: argparse dest -> stack key; ``cls``: the config class the flags mirror. The flags
    must have been declared with ``default=None`` so that "not given" is visible.
    """
    from compressor.records import chosen_stack, student_stack

    stack = (chosen_stack(run) or student_stack(run)) if model == "pruned" else None
    out = {}
    for dest, key in names.items():
        value = getattr(args, dest)
        if value is None:
            value = stack[key] if stack else field_spec(cls, dest)[1]
        out[dest] = value
    return out
