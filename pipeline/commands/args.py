"""Command-line parsing shared by the commands: flags validated by the config's own rules.

A flag declared with :func:`config_flag` is checked by the same typed validator as the
config key it mirrors (type, range, choices), so ``--steps 0`` fails exactly as
``sample.steps: 0`` would, naming the flag. Any other argparse error (an unknown flag, a
missing argument) is one line too: :class:`CommandParser` raises UserError instead of
printing usage and exiting.

Help has one style: every argument says what it is, and every option that takes a value ends
with its default as ``(default: X)`` - written by :class:`HelpFormatter` from the option's
default, or in words by the option itself where "not given" means something (``--steps``:
``(default: the pruned model's chosen stack or student, else 50)``). The positionals every
command shares (``CONFIG``, ``RUN``, ``key=value``) are declared once, by :func:`config_args`
and :func:`run_arg`.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from compressor.config import config_from_mapping, describe_field, field_spec, parse_value
from compressor.errors import UserError
from compressor.persist import student_stack
from rundir.records import chosen_stack, read_record

DEFAULT = "(default:"
"""How every option's help states its default: ``(default: X)``, last."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (tables stay tables); every option that takes a value and
    has a default gets `` (default: X)`` unless its help already says ``(default: ...)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if DEFAULT in text or action.nargs == 0 or not action.option_strings:
            return text
        if default is None or default is argparse.SUPPRESS or default == []:
            return text
        return f"{text} {DEFAULT} %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one UserError line (exit 2), never usage + SystemExit;
    its help is written by :class:`HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """Raise UserError("PROG: MESSAGE; see PROG --help")."""
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def config_args(parser: argparse.ArgumentParser) -> None:
    """The positionals ``CONFIG [key=value ...]`` of the pipeline and of the commands that take a config."""
    parser.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. configs/demo.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. prune.ratio=0.3 (may stand among the flags)",
    )


def run_arg(parser: argparse.ArgumentParser) -> None:
    """The positional ``RUN``: the directory a pipeline run wrote."""
    parser.add_argument(
        "run", metavar="RUN", type=Path, help="a run directory the pipeline wrote, e.g. runs/demo"
    )


def field_help(cls: type, name: str) -> str:
    """Config field ``cls.name``'s doc and allowed values, without its default (the option states its
    own, which may differ from the field's)."""
    _, default, _ = field_spec(cls, name)
    text = describe_field(cls, name)
    return text.removesuffix(f"; default {default})") + ")"


def config_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    cls: type,
    name: str,
    unset: str | None = None,
    **kwargs: Any,
) -> None:
    """Add ``flag`` mirroring config field ``cls.name``: same type, range, choices and default.

    ``default=`` in ``kwargs`` overrides the field's default (already-typed values are not
    re-parsed by argparse). ``unset`` says in words what applies when the flag is not given,
    for a flag whose default is None (e.g. "the run's acceptance.min_speedup"); it is required
    when the field itself has a default.
    """
    tp, default, _ = field_spec(cls, name)
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
    kwargs.setdefault("default", default)
    text = kwargs.pop("help", None) or field_help(cls, name)
    if kwargs["default"] is None and DEFAULT not in text:  # a field's doc may say what None means
        assert unset is not None or default is None, f"{flag}: say what applies when it is not given"
        text += f" {DEFAULT} {unset or 'none'})"
    kwargs["help"] = text
    if choices:
        kwargs.setdefault("metavar", "{" + ",".join(map(str, choices)) + "}")
    parser.add_argument(flag, type=lambda text: parse_value(flag, text, cls, name), **kwargs)


def stack_flag(parser: argparse.ArgumentParser, flag: str, cls: type, name: str, **kwargs: Any) -> None:
    """Add ``flag`` mirroring ``cls.name`` whose default :func:`stack_defaults` fills in: the stack a
    latency target chose for the pruned model (or its student's sampler), else the field's default."""
    default = field_spec(cls, name)[1]
    unset = f"the pruned model's chosen stack or student, else {default}"
    config_flag(parser, flag, cls, name, unset, default=None, **kwargs)


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

    parser = CommandParser(prog=f"compress-deploy {name}", description=description)
    run_arg(parser)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar=f"{section}.key=value",
        help=f"dotted {section}.* overrides of the settings the run's {name} stage last used",
    )
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

    stack = (chosen_stack(run) or student_stack(run)) if model == "pruned" else None
    out = {}
    for dest, key in names.items():
        value = getattr(args, dest)
        if value is None:
            value = getattr(stack, key) if stack else field_spec(cls, dest)[1]
        out[dest] = value
    return out
