"""The sweep engine: one slug, one key, one keyed record, the Markdown writer, and a cell that finished
under the same settings reused without starting its pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.digest import content_hash
from compressor.errors import UserError
from pipeline.cli import main
from pipeline.sweep import cells, engine


def test_one_slug_names_every_sweeps_cell_folders():
    # the folder names existing ablation and distillation-sweep runs were written with
    assert cells.slug("diff-pruning T=0.05") == "diff-pruning-T=0.05"
    assert cells.slug("taylor [independent]") == "taylor-independent"
    assert cells.slug("control: dense finetuned") == "control-dense-finetuned"
    assert cells.slug("macs-0.57") == "macs-0.57" and cells.slug("macs-1e-05") == "macs-1e-05"
    folder = cells.cell_folder(Path("R"), "diff-pruning T=0 [shared]", 2)
    assert folder == Path("R/diff-pruning-T=0-shared/seed-2")


def test_keys_are_the_content_hash_existing_caches_were_filed_under():
    parts = ({"b": [1, 2.5, None], "a": Path("/x")}, "ddim", 16)
    assert cells.key_of(*parts) == content_hash(list(parts), 16)  # the frontier's fingerprints
    assert cells.key_of(*parts, length=12) == content_hash(list(parts), 12)  # the distillation scores


def test_a_cached_record_counts_only_under_its_key_and_when_intact(tmp_path):
    path = tmp_path / "point.json"
    assert cells.cached(path, "k") is None  # missing
    path.write_text("{half")
    assert cells.cached(path, "k") is None  # half-written: measured again
    path.write_text(json.dumps({"fingerprint": "k", "fd": 3.0, "fd_ci": [2.0, 4.0]}))
    assert cells.cached(path, "k")["fd"] == 3.0
    assert cells.cached(path, "other") is None
    assert cells.cached(path) is not None and cells.cached(path, needs=["fd_replicates"]) is None
    path.write_text(json.dumps({"fingerprint": "k", "fd": 3.0, "fd_ci": [4.0, 2.0]}))
    with pytest.raises(UserError, match="point.fd_ci is \\[4, 2\\].*delete the file"):
        cells.cached(path, "k")


def test_the_markdown_writer():
    text = engine.document(
        "Title", "A paragraph.", engine.table(["a", "b"], [[1, "x"], [2, "y"]]), "", "- a note"
    )
    assert text == "# Title\n\nA paragraph.\n\n| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |\n\n- a note\n"


def test_the_spread_over_seeds_and_paired_verdicts():
    from compressor.intervals import Resampling

    assert engine.spread([1.0, None, 3.0], "fd", keep="fd") == {
        "fd": [1.0, None, 3.0], "fd_mean": 2.0, "fd_std": pytest.approx(2**0.5)
    }  # fmt: skip
    boot = Resampling(resamples=4)
    a = {"fd": 3.0, "fd_replicates": [3.0, 3.1, 2.9, 3.0]}
    b = {"fd": 1.0, "fd_replicates": [1.0, 1.1, 0.9, 1.0]}
    low, high = engine.paired_difference(boot, a, b)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert engine.paired_difference(boot, a, {"fd": 1.0}) is None
    assert engine.compare(a, b, None) == "higher" and engine.compare(b, a, None) == "lower"
    assert engine.tally([a, b], [b, b], None) == "0 lower, 1 within noise, 1 higher (of 2 seeds)"


@pytest.mark.slow
def test_a_finished_cell_is_reused_and_a_changed_one_runs_again(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    argv = ["ablate", str(tiny_config), "quality.feature=digits", "--seeds", "0", "--thresholds", "0.05",
            "--methods", "magnitude", "--no-finetune", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    root = run / "ablation"
    summary = json.loads((root / "summary.json").read_text())
    assert [r["variant"] for r in summary["variants"]] == ["diff-pruning T=0.05", "magnitude"]
    assert (root / "summary.png").stat().st_size > 0 and (root / "diagnostics.png").stat().st_size > 0
    cell = root / "magnitude" / "seed-0"
    assert json.loads((cell / "sweep-cell.json").read_text())["stages"].keys() == {"prune", "quality"}
    capsys.readouterr()
    assert main(["verify", str(cell)]) == 0  # the cell's key is bookkeeping, not an extra artifact
    capsys.readouterr()
    assert main(argv) == 0  # finished under the same settings: no pipeline starts
    err = capsys.readouterr().err
    assert "[ablate] magnitude, seed 0" in err and "[prune]" not in err and "[quality]" not in err
    assert json.loads((root / "summary.json").read_text()) == summary
    changed = [*argv[:2], "quality.chunk_samples=64", *argv[2:]]
    assert main(changed) == 0  # another key: the runner decides, stage by stage
    err = capsys.readouterr().err
    assert "[prune] cached: config and inputs unchanged" in err
    assert "[quality] start (its config changed" in err
    # --only: the others are summarised when they finished under the current settings
    assert main([*changed, "--only", "magnitude"]) == 0
    rows = json.loads((root / "summary.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == ["diff-pruning T=0.05", "magnitude"]
    assert main([*argv, "--only", "magnitude"]) == 0  # diff-pruning finished under other settings
    rows = json.loads((root / "summary.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == ["magnitude"]
