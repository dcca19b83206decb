"""The commands that are not pipeline stages, in one literal mapping: name -> module with ``main``.

Each is a small module with one entry point ``main(argv) -> exit code``. The CLI dispatches
through :data:`COMMANDS` and ``tests/test_cli.py`` keeps the mapping, the modules and the
README in sync. A command never imports a stage module (what both need lives a floor lower).
"""

from __future__ import annotations

from types import ModuleType

from pipeline.commands import (
    ablate,
    build,
    bundle,
    check,
    frontier,
    plan,
    sample,
    serve,
    triton_repo,
    verify,
)

COMMANDS: dict[str, ModuleType] = {
    "ablate": ablate,
    "plan": plan,
    "serve": serve,
    "triton-repo": triton_repo,
    "build": build,
    "sample": sample,
    "check": check,
    "verify": verify,
    "bundle": bundle,
    "frontier": frontier,
}
