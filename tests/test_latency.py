"""Latency-targeted pruning: the search, the prune record's trials, the check, `plan`, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.config import LatencyTarget
from compressor.errors import ConfigError
from compressor.models import count_macs_params
from compressor.pruning import (
    allocate_levels,
    level_blocks,
    prune_structure,
    pruned_copy,
    search_latency,
    time_ratios,
)
from deploy.latency import LatencyProbe, ProbeTimer
from pipeline.cli import main
from tests.conftest import TINY_CONFIG, write_config, write_images, write_model_folder


class MacsTimer:
    """A timer whose 'latency' is MACs / 1e6 ms plus a fixed overhead: the search logic, deterministic,
    with nothing from deploy (the search needs only a :class:`compressor.pruning.Timer`)."""

    overhead_ms = 0.0

    def describe(self) -> str:  # noqa: D102
        return "MACs, UNet call at batch 2"

    def cache_facts(self) -> dict:  # noqa: D102
        return {"probe": ["macs"], "device": "cpu"}

    def time(self, dense, candidate, label):  # noqa: D102
        ms = lambda m: count_macs_params(m)[0] / 1e6 + self.overhead_ms  # noqa: E731
        return ms(dense), ms(candidate)


def test_search_takes_the_mildest_ratio_that_meets_the_target(tiny_unet):
    timer = MacsTimer()
    dense = count_macs_params(tiny_unet)[0]
    rows = time_ratios(tiny_unet, [0.25, 0.5, 0.75], timer, None)
    speedups = [r["speedup"] for r in rows]
    assert speedups == sorted(speedups) and speedups[0] > 1.0
    assert rows[0]["speedup"] == pytest.approx(dense / rows[0]["macs"])
    # a target between the first and second trial's speed-up: the second ratio, and the walk stops there
    goal = (speedups[0] + speedups[1]) / 2
    ratio, trials = search_latency(tiny_unet, LatencyTarget(speedup=goal, margin=0.0), timer, None)
    assert ratio == 0.5 and [t["ratio"] for t in trials] == [0.25, 0.5]
    assert [t["meets"] for t in trials] == [False, True]
    assert {"ratio", "macs", "params", "median_ms", "speedup"} <= set(trials[0])
    # the margin turns a bare pass into a miss
    ratio, _ = search_latency(tiny_unet, LatencyTarget(speedup=speedups[1], margin=0.01), timer, None)
    assert ratio == 0.75


def test_fine_search_bisects_below_the_first_passing_ratio(tiny_unet):
    timer = MacsTimer()
    first = time_ratios(tiny_unet, [0.25], timer, None)[0]
    target = LatencyTarget(speedup=first["speedup"] * 0.999, margin=0.0)
    ratio, trials = search_latency(tiny_unet, target, timer, None, mode="fine", iterations=3)
    assert ratio <= 0.25 and len(trials) == 4
    assert all(t["meets"] == (t["speedup"] >= target.speedup) for t in trials)
    assert min(t["ratio"] for t in trials if t["meets"]) == ratio


def test_unreachable_target_names_the_best_reachable_figure(tiny_unet):
    timer = MacsTimer()
    timer.overhead_ms = 1000.0  # fixed cost dominates: pruning cannot reach 2x
    with pytest.raises(ConfigError, match=r"not reachable: the most aggressive pruning allowed \(ratio 0.75"):
        search_latency(tiny_unet, LatencyTarget(speedup=2.0), timer, None)
    with pytest.raises(ConfigError, match=r"measured 1.02x \(1001.11 ms vs dense 1016.40 ms\)"):
        search_latency(tiny_unet, LatencyTarget(ms=1.0), timer, None)


def test_real_probe_times_a_structure_not_weights(tiny_unet):
    timer = ProbeTimer(LatencyProbe("onnxruntime", 2, repeat=3, warmup=1), (3, 16, 16))
    a = pruned_copy(tiny_unet, 0.5, None)
    rows = time_ratios(tiny_unet, [0.5], timer, None)
    assert rows[0]["macs"] == count_macs_params(a)[0]
    assert rows[0]["dense_ms"] > 0 and rows[0]["median_ms"] > 0
    assert next(tiny_unet.parameters()).device.type == "cpu"  # the dense model was not moved


def _tiny(tmp_path, prune: str) -> tuple:
    model = write_model_folder(tmp_path / "model")
    write_images(tmp_path / "images", 8)
    text = TINY_CONFIG.format(model=model, data=tmp_path / "images").replace("  ratio: 0.25\n", prune)
    return write_config(tmp_path / "tiny.yaml", text), tmp_path / "run"


def test_prune_stage_records_trials_and_check_verifies_with_bench(tmp_path):
    prune = (
        "  method: magnitude\n  target_latency:\n    backend: torch\n    batch: 2\n    ms: 100000\n"
        "    repeat: 3\n    warmup: 1\n"
    )
    cfg, run = _tiny(tmp_path, prune)
    stages = "prune,bench,check"
    assert main([str(cfg), "bench.backends=[torch]", "bench.batch_sizes=[2]", "--stages", stages,
                 "--run-dir", str(run)]) == 0  # fmt: skip
    rec = json.loads((run / "prune" / "record.json").read_text())["metrics"]
    assert rec["ratio"] == 0.25 and len(rec["trials"]) == 1  # a generous target: the mildest ratio
    assert rec["trials"][0]["meets"] and rec["target"]["target_latency"]["chosen"]["ratio"] == 0.25
    check = json.loads((run / "check" / "record.json").read_text())["metrics"]
    (row,) = [c for c in check["checks"] if c["name"] == "prune.target_latency.ms"]
    assert row["passed"] and "measured by bench" in row["detail"]
    # the check reads the bench's own figure: a batch the bench did not time fails, naming the fix
    assert main(["check", str(run)]) == 0
    assert main([str(cfg), "bench.backends=[torch]", "bench.batch_sizes=[1]", "--stages", "bench,check",
                 "--run-dir", str(run)]) == 3  # fmt: skip
    check = json.loads((run / "check" / "record.json").read_text())["metrics"]
    assert "add torch to bench.backends and 2 to bench.batch_sizes" in check["checks"][0]["detail"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prune.target_latency.speedup=1000", "not reachable: the most aggressive pruning allowed (ratio"),
        ("prune.target_latency.backend=tpu", "prune.target_latency.backend: expected one of"),
        ("prune.target_latency.speedup=0.5", "prune.target_latency.speedup: expected"),
    ],
)
def test_bad_latency_targets_exit_2_with_one_line(tmp_path, capsys, override, message):
    cfg, run = _tiny(tmp_path, "  method: magnitude\n  target_latency:\n    backend: torch\n    repeat: 3\n")
    code = main([str(cfg), override, "--stages", "prune", "--run-dir", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]  # stage progress lines come before it
    assert code == 2 and errors == [err[-1]] and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_tensorrt_target_refused_where_tensorrt_is_missing(tmp_path, capsys):
    from deploy.tensorrt_backend import unavailable_reason

    if not unavailable_reason():
        pytest.skip("TensorRT is installed here: the refusal cannot happen")
    cfg, run = _tiny(tmp_path, "  target_latency:\n    backend: tensorrt\n    speedup: 1.5\n")
    assert main([str(cfg), "--stages", "prune", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: latency on tensorrt: not measurable here"), err


def test_two_targets_are_refused(tmp_path, capsys):
    cfg, run = _tiny(tmp_path, "  ratio: 0.25\n  target_latency:\n    speedup: 1.5\n")
    assert main([str(cfg), "--stages", "prune", "--run-dir", str(run)]) == 2
    assert "prune.ratio, prune.target_latency.speedup are all set" in capsys.readouterr().err


def test_plan_writes_table_chart_and_json(tmp_path, capsys):
    cfg, _ = _tiny(tmp_path, "  ratio: 0.25\n")
    out = tmp_path / "plan"
    code = main(["plan", str(cfg), "--backends", "torch,onnxruntime", "--batches", "1,2", "--repeat", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = json.loads((out / "plan.json").read_text())["rows"]
    assert {(r["backend"], r["batch"]) for r in rows} == {
        (b, n) for b in ("torch", "onnxruntime") for n in (1, 2)
    }
    assert all(r["median_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert (out / "plan.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| backend | batch | what | ratio |" in printed and "| onnxruntime | 2 | unet | 0.25 |" in printed
    assert main(["plan", str(cfg), "--backends", "tpu"]) == 2
    assert main(["plan", str(cfg), "--batches", "0"]) == 2


def test_torch_backend_timing_keeps_dense_model_untouched(tiny_unet):
    before = [p.detach().clone() for p in tiny_unet.parameters()]
    time_ratios(
        tiny_unet, [0.25], ProbeTimer(LatencyProbe("torch", 1, repeat=3, warmup=0), (3, 16, 16)), None
    )
    assert all(torch.equal(p, q) for p, q in zip(tiny_unet.parameters(), before, strict=True))


def test_level_ratios_prune_each_resolution_level_on_its_own(tiny_unet):
    dense = {n: m.out_channels for n, m in tiny_unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    imp = __import__("torch_pruning").importance.GroupMagnitudeImportance(p=1)
    prune_structure(tiny_unet, imp, 0.0, None, level_ratios={1: 0.5})
    assert sorted(level_blocks(tiny_unet)) == [0, 1]
    after = {n: m.out_channels for n, m in tiny_unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert after["down_blocks.0.resnets.0.conv1"] == dense["down_blocks.0.resnets.0.conv1"]  # level 0 kept
    assert after["down_blocks.1.resnets.0.conv1"] == dense["down_blocks.1.resnets.0.conv1"] // 2
    assert after["up_blocks.0.resnets.0.conv1"] == dense["up_blocks.0.resnets.0.conv1"] // 2  # level 1 up
    assert after["up_blocks.1.resnets.0.conv1"] == dense["up_blocks.1.resnets.0.conv1"]
    x = torch.randn(2, 3, 16, 16)
    assert tiny_unet(x, torch.tensor([1, 2])).sample.shape == x.shape
    # a level left out keeps its width even when the stem's ratio (level 0's) is not zero
    other = __import__("copy").deepcopy(tiny_unet)
    prune_structure(other, imp, 0.5, None, level_ratios={0: 0.5})
    assert other.down_blocks[1].resnets[0].conv1.out_channels == after["down_blocks.1.resnets.0.conv1"]
    assert other.down_blocks[0].resnets[0].conv1.out_channels == dense["down_blocks.0.resnets.0.conv1"] // 2


def test_allocation_keeps_more_importance_than_uniform_at_the_same_predicted_latency():
    # level 0 is cheap to prune but important; level 1 saves a lot and matters little
    table = [
        {"level": 0, "ratio": 0.5, "dense_ms": 10.0, "median_ms": 9.0, "saving": 0.1},
        {"level": 1, "ratio": 0.5, "dense_ms": 10.0, "median_ms": 6.0, "saving": 0.4},
    ]
    importance = {0: {"total": 10.0, "removed": {0.5: 4.0}}, 1: {"total": 10.0, "removed": {0.5: 1.0}}}
    best = allocate_levels(table, importance, LatencyTarget(speedup=1.6, margin=0.0))
    assert best[0]["levels"] == {0: 0.0, 1: 0.5} and best[0]["importance_kept"] == pytest.approx(0.95)
    assert best[0]["predicted_speedup"] == pytest.approx(1 / 0.6)
    uniform = [c for c in best if c["uniform"]]
    assert uniform and uniform[0]["importance_kept"] == pytest.approx(0.75)
    assert allocate_levels(table, importance, LatencyTarget(speedup=3.0)) == []  # nothing predicted to reach


def test_hardware_aware_prune_stage_records_table_allocation_and_caches(tmp_path, capsys):
    prune = (
        "  method: magnitude\n  search: latency\n  target_latency:\n    backend: torch\n    batch: 2\n"
        "    ms: 100000\n    repeat: 3\n    warmup: 1\n"
    )
    cfg, run = _tiny(tmp_path, prune)
    assert main([str(cfg), "--stages", "prune", "--run-dir", str(run)]) == 0
    rec = json.loads((run / "prune" / "record.json").read_text())["metrics"]
    lat = rec["target"]["target_latency"]
    assert lat["search"] == "latency" and not lat["table_cached"]
    assert {(r["level"], r["ratio"]) for r in lat["table"]} == {
        (lvl, r) for lvl in (0, 1) for r in (0.25, 0.5, 0.75)
    }
    # a generous target: the allocation keeping all importance (nothing pruned) would do, but a
    # level at ratio 0 everywhere is allowed, so the first measured candidate keeps everything
    assert (
        rec["trials"]
        and rec["trials"][0]["meets"]
        and rec["trials"][0]["importance_kept"] == pytest.approx(1.0)
    )
    assert set(rec["level_ratios"]) == {"0", "1"}
    assert main([str(cfg), "prune.target_latency.ms=50000", "--stages", "prune", "--run-dir", str(run)]) == 0
    rec = json.loads((run / "prune" / "record.json").read_text())["metrics"]
    assert rec["target"]["target_latency"]["table_cached"]  # same architecture, backend, host
    assert "rows from the cache" in capsys.readouterr().err


def test_search_latency_needs_a_latency_target(tmp_path, capsys):
    cfg, run = _tiny(tmp_path, "  ratio: 0.25\n  search: latency\n")
    assert main([str(cfg), "--stages", "prune", "--run-dir", str(run)]) == 2
    assert (
        "prune.search=latency allocates channels under a measured latency target" in capsys.readouterr().err
    )
