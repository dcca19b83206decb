"""Figures of the house: how a setting travels, the caches and sweeps, the longest modules, lazy imports.

    python scripts/house_figures.py [ROOT]     # ROOT: another checkout (e.g. a git worktree of an old commit)

- the walk of ``prune.target_latency``: the modules whose code reads the setting (``target_latency``)
  or carries the stack it chooses to the stages (the names that channel used and uses), and the
  places a module assigns to a run context's attribute (a side door: state set mid-run);
- caches and sweeps: sites that hash with ``hashlib`` outside the one content-hash helper and the
  artifact/manifest hashing of files, and copies of the sweep helpers (``_slug``, ``mean_std``,
  ``markdown``, chart functions outside the charts module);
- the five longest modules, modules over 400 lines, file names that occur twice, and imports of
  project modules inside functions (with how many say why).
"""

from __future__ import annotations

import collections
import importlib.util
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("import_graph", HERE / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

SETTING = re.compile(r"target_latency")
CHANNEL = re.compile(r"\bctx\.(chosen|frontier_choice|stack|choice)\b|chosen_stack|stack_choice|apply_stack")
SIDE_DOOR = re.compile(r"^\s*ctx\.\w+\s*=[^=]")
HASHING = re.compile(r"hashlib\.sha256\(")
SWEEP_COPIES = {
    "_slug": re.compile(r"^def _?slug\("),
    "mean_std": re.compile(r"^def _?mean_std\("),
    "markdown": re.compile(r"^def markdown\("),
    "chart": re.compile(r"^def plot\w*\("),
}


def figures(root: Path) -> dict:
    """The figures for the checkout at ``root``."""
    mods = import_graph.modules(root)
    texts = {name: path.read_text(encoding="utf-8") for name, path in mods.items()}
    walk = sorted(n for n, t in texts.items() if SETTING.search(t) or CHANNEL.search(t))
    carriers = sorted(n for n, t in texts.items() if CHANNEL.search(t))
    lazy_all = import_graph.function_imports(root)
    on_route = [x for x in lazy_all if x[0] in carriers]
    runner = next((t for n, t in texts.items() if n == "pipeline.runner"), "")
    branches = len(re.findall(r"name\s*[!=]=\s*\"\w+\"", runner))
    doors = [
        (n, i + 1) for n, t in texts.items() for i, line in enumerate(t.splitlines()) if SIDE_DOOR.match(line)
    ]
    hashing = [(n, t.count("hashlib.sha256(")) for n, t in texts.items() if HASHING.search(t)]
    copies = {
        k: sorted(
            n for n, t in texts.items() for line in t.splitlines() if rx.match(line) and n != "pipeline.plots"
        )
        for k, rx in SWEEP_COPIES.items()
    }
    names = collections.Counter(p.name for p in mods.values() if p.name != "__init__.py")
    lazy = lazy_all
    lengths = import_graph.lengths(root)
    return {
        "walk": walk,
        "carriers": carriers,
        "route_lazy": len(on_route),
        "runner_branches": branches,
        "side_doors": doors,
        "hashing": hashing,
        "copies": copies,
        "longest": lengths[:5],
        "over_400": [m for n, m in lengths if n > 400],
        "repeated_names": sorted(k for k, v in names.items() if v > 1),
        "lazy": len(lazy),
        "lazy_with_reason": sum(1 for x in lazy if x[3]),
        "modules": len(mods),
        "lines": sum(n for n, _ in lengths),
    }


def main() -> int:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE.parent
    f = figures(root)
    print(f"{f['modules']} modules, {f['lines']} lines in {root}")
    print(
        f"walk of prune.target_latency: {len(f['walk'])} modules read it or carry its stack: "
        + ", ".join(f["walk"])
    )
    print(f"  of them carry the chosen stack to the stages: {len(f['carriers'])} "
          f"({', '.join(f['carriers'])}); lazy imports of project modules in those: {f['route_lazy']}; "
          f"stage-name branches in the runner: {f['runner_branches']}")  # fmt: skip
    print(f"  assignments to a run context's attribute (side doors): {len(f['side_doors'])}"
          + "".join(f"\n    {n}:{line}" for n, line in f["side_doors"]))  # fmt: skip
    print(f"hashing sites (hashlib.sha256): {sum(c for _, c in f['hashing'])} in "
          + ", ".join(f"{n} ({c})" for n, c in f["hashing"]))  # fmt: skip
    for k, where in f["copies"].items():
        print(f"copies of {k}: {len(where)}" + (f" ({', '.join(where)})" if where else ""))
    print("longest modules: " + ", ".join(f"{m} {n}" for n, m in f["longest"]))
    print(f"modules over 400 lines: {len(f['over_400'])}")
    print(f"file names that occur twice: {len(f['repeated_names'])} ({', '.join(f['repeated_names'])})")
    print(f"imports of project modules inside functions: {f['lazy']} ({f['lazy_with_reason']} say why)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
