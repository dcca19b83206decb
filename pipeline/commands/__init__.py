"""The commands that are not pipeline stages, in one literal mapping: name -> module with ``main``.

Each is a small module with one entry point ``main(argv) -> exit code``. The CLI dispatches
through :data:`COMMANDS` and lists :data:`SUMMARIES` in ``compress-deploy --help``;
``tests/test_cli.py`` keeps the mappings, the modules, their parsers and the README in sync. A
command never imports a stage module (what both need lives a floor lower).
"""

from __future__ import annotations

from types import ModuleType

from pipeline.commands import (
    ablate,
    build_engines,
    bundle,
    check_run,
    frontier_sweep,
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
    "build": build_engines,
    "sample": sample,
    "check": check_run,
    "verify": verify,
    "bundle": bundle,
    "frontier": frontier_sweep,
}

SUMMARIES: dict[str, tuple[str, str]] = {
    "ablate": ("CONFIG", "pruning-method, threshold and distillation sweeps over seeds"),
    "plan": ("CONFIG", "time every pruning ratio (or search the frontier) before pruning"),
    "serve": ("RUN", "serve the run's sampler with Triton Inference Server"),
    "triton-repo": ("RUN OUT", "write a Triton model repository for the stock server"),
    "build": ("RUN", "(re)build the run's TensorRT engines on this GPU"),
    "sample": ("RUN", "sample the run's model on any backend, solver, reuse, precision"),
    "check": ("RUN", "re-decide the acceptance gates of a finished run"),
    "verify": ("RUN", "check every artifact of a run against its recorded sha256"),
    "bundle": ("RUN OUT", "a self-contained sampler folder for a device"),
    "frontier": ("CONFIG", "measure the speed-quality frontier over the levers, choose a stack"),
}
"""Command -> (what it takes: a config or a finished run, and the other positionals; one line on
what it does), for ``compress-deploy --help``."""
