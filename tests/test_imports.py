"""No circle of imports anywhere in the project's packages, and no long module without a reason."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_there_is_no_circle_of_imports():
    edges = import_graph.graph(ROOT)
    assert "pipeline.runner" in edges and "pipeline.frontier.target" in edges
    assert import_graph.cycles(edges) == []


def test_the_graph_finds_a_circle_and_the_package_inits_an_import_runs(tmp_path):
    """The check can fail: a circle through a package's __init__ is found."""
    pkg = tmp_path / "pipeline"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "inner" / "__init__.py").write_text("from pipeline.inner.light import x\n")
    (pkg / "inner" / "light.py").write_text("x = 1\n")
    (pkg / "inner" / "heavy.py").write_text("def f():\n    from pipeline.runner import go\n")
    (pkg / "runner.py").write_text("from pipeline.stage import s\n")
    (pkg / "stage.py").write_text("from pipeline.inner.light import x\ns = 1\n")
    edges = import_graph.graph(tmp_path)
    assert import_graph.cycles(edges) == []  # the stage imports the light module: no circle
    (pkg / "inner" / "__init__.py").write_text("from pipeline.inner.heavy import f\n")
    assert import_graph.cycles(import_graph.graph(tmp_path)) == [
        ["pipeline.inner", "pipeline.inner.heavy", "pipeline.runner", "pipeline.stage"]
    ]


def test_a_long_module_says_why():
    for n, name in import_graph.lengths(ROOT):
        if n <= import_graph.LONG:
            break
        path = import_graph.modules(ROOT)[name]
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Long because" in doc, f"{name} has {n} lines; split it or say why in its docstring"


def test_the_run_bookkeeping_imports_without_torch():
    """``write_json``, the manifest, the progress bar and the content hash serve every command's
    bookkeeping: importing them must not pull in torch."""
    code = (
        "import sys, rundir.artifacts, compressor.digest, compressor.progress; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_no_two_modules_share_a_file_name():
    """Where one would look for the other: a stage, a command and a library module never share a name
    (``__init__``/``__main__`` aside)."""
    seen: dict[str, list[str]] = {}
    for name, path in import_graph.modules(ROOT).items():
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.name, []).append(name)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}
    assert not (ROOT / "pipeline" / "stages" / "export.py").exists()  # would shadow the export package


LAZY_IMPORTS = 16  # imports of project modules inside functions, each with its reason (was 132)


def test_imports_of_project_modules_are_at_the_top_unless_a_reason_says_why():
    """A lazy import of the project's own code keeps a light module light (torch, an optional
    dependency) or respects a layering rule; each says which beside it, and their number only falls."""
    lazy = import_graph.function_imports(ROOT)
    assert [x for x in lazy if not x[3]] == [], "lazy imports without a reason comment beside them"
    assert len(lazy) <= LAZY_IMPORTS, f"{len(lazy)} lazy imports of project modules; move new ones to the top"


def test_the_lazy_import_count_sees_an_import_without_a_reason(tmp_path):
    pkg = tmp_path / "compressor"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "def f():\n    from compressor.b import x\n    # heavy: torch\n    from compressor.c import y\n"
    )
    found = import_graph.function_imports(tmp_path)
    assert [(m, line, reason) for m, line, _, reason in found] == [
        ("compressor.a", 2, ""),
        ("compressor.a", 4, "heavy: torch"),
    ]
