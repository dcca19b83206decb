"""The speed-quality frontier: stacks, Pareto flags, the choice under a target, the command, Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from compressor.config import load_config
from compressor.errors import UserError
from pipeline import frontier as fr
from pipeline.cli import main
from tests.conftest import TINY_CONFIG, write_config, write_images, write_model_folder


def _point(name: str, speedup: float, fd: float, ratio: float = 0.0, steps: int = 50, ci=None) -> dict:
    stack = fr.Stack(ratio, "ddim", steps)
    point = {
        "label": name,
        "key": stack.key(),
        "stack": stack.as_dict(),
        "speedup": speedup,
        "latency_ms": 100 / speedup,
        "fd": fd,
        "ssim": 0.9,
    }
    return {**point, "fd_ci": ci} if ci else point


def test_the_grid_keeps_only_stacks_that_can_run():
    grid = fr.Grid([0.0, 0.3], ["ddim", "dpmsolver++"], [10, 2], [1, 2], ["fp32", "int8"])
    stacks = grid.stacks()
    assert fr.Stack(0.3, "ddim", 10, 2, "fp32") in stacks
    # feature reuse runs the fp32/fp16 passes only (not quantized) and needs a step to reuse on
    assert all(not (s.cache_interval > 1 and s.precision == "int8") for s in stacks)
    assert all(not (s.cache_interval >= s.steps) for s in stacks)
    assert len(stacks) == 2 * 2 * (3 + 2)  # ratios x solvers x (10 steps: c1 x 2 + c2 fp32; 2 steps: c1 x 2)
    assert len({s.key() for s in stacks}) == len(stacks)
    with pytest.raises(UserError, match="stochastic or unknown"):
        fr.Grid([0.0], ["ddpm"], [10]).check()
    with pytest.raises(UserError, match="no valid stack"):
        fr.Grid([0.0], ["ddim"], [2], [2, 3]).check()


def test_pareto_flags_exactly_the_undominated_points():
    points = [
        _point("slow good", 1.0, 10.0),
        _point("fast bad", 8.0, 40.0),
        _point("middle", 4.0, 20.0),
        _point("dominated", 3.0, 25.0),  # middle is faster and better
        _point("tie on speed, worse", 4.0, 22.0),
    ]
    assert fr.pareto(points) == [True, True, True, False, False]


def test_choose_takes_the_best_quality_that_meets_the_target_within_the_allowed_levers():
    points = [
        _point("dense 50", 1.0, 10.0),
        _point("dense 10", 5.0, 14.0, steps=10),
        _point("pruned 50", 3.2, 12.0, ratio=0.3),
        _point("pruned 10", 9.0, 30.0, ratio=0.3, steps=10),
    ]
    assert fr.choose(points, speedup=3)["label"] == "pruned 50"
    assert fr.choose(points, speedup=3, margin=0.1)["label"] == "dense 10"  # 3.2 < 3.3
    assert fr.choose(points, ms=32)["label"] == "pruned 50"  # 31.25 ms
    assert fr.choose(points, ms=30)["label"] == "dense 10"  # 20 ms; pruned 50 is 31.25 ms
    prune_only = fr.Grid([0.0, 0.3], ["ddim"], [50])
    assert fr.choose(points, speedup=3, grid=prune_only)["label"] == "pruned 50"
    assert fr.choose(points, speedup=4, grid=prune_only) is None


def test_choose_prefers_the_fastest_stack_within_noise_of_the_best():
    points = [
        _point("dense 50", 1.0, 10.0, ci=[8.0, 12.0]),
        _point("dense 20", 2.5, 11.0, steps=20, ci=[9.0, 13.0]),  # within noise of the best
        _point("pruned 50", 3.2, 9.5, ratio=0.3, ci=[7.5, 11.5]),  # the best that meets 2x
        _point("pruned 20", 6.0, 11.4, ratio=0.3, steps=20, ci=[11.4, 11.4]),  # overlaps [7.5, 11.5]
        _point("pruned 10", 9.0, 13.0, ratio=0.3, steps=10, ci=[11.6, 14.4]),  # clearly worse
    ]
    chosen = fr.choose(points, speedup=2)
    assert chosen["label"] == "pruned 20"
    choice = chosen["choice"]
    assert choice["best"]["label"] == "pruned 50" and choice["moved_from_best"]
    assert set(choice["within_noise_of_best"]) == {points[1]["key"], points[2]["key"], points[3]["key"]}
    assert choice["meeting_target"] == 4
    text = fr.choice_text(chosen, "2x", "fd_digits")
    assert "The lowest fd_digits meeting the target is pruned 50" in text and "this is the fastest" in text
    # bare figures (no intervals): the lowest Frechet distance, as before intervals
    bare = [{k: v for k, v in p.items() if k != "fd_ci"} for p in points]
    assert fr.choose(bare, speedup=2)["label"] == "pruned 50"
    assert not fr.choose(bare, speedup=2)["choice"]["moved_from_best"]
    fr.mark_noise(points)
    # [11.6, 14.4] overlaps [8, 12] and [9, 13], not [7.5, 11.5] nor the point 11.4
    assert points[4]["within_noise"] == [points[0]["key"], points[1]["key"]]


def test_fd_infinity_ranks_the_stacks_where_every_point_has_it():
    """The finite-N distance carries a 1/N bias that differs by model: where FD-infinity is recorded
    it decides the order, the front and the choice; a frontier without it still ranks by ``fd``."""
    a = {**_point("pruned 20", 3.0, 10.0, ratio=0.3, steps=20), "fd_inf": 6.0, "fd_inf_ci": [5.0, 7.0]}
    b = {**_point("pruned 10", 3.5, 11.0, ratio=0.3, steps=10), "fd_inf": 4.0, "fd_inf_ci": [3.0, 5.0]}
    assert fr.ranking_key([a, b]) == "fd_inf" and fr.pareto([a, b]) == [False, True]
    chosen = fr.choose([a, b], speedup=2)
    assert chosen["label"] == "pruned 10" and chosen["choice"]["best"]["figure"] == 4.0
    assert "FD-infinity 4.00 [3.00, 5.00]" in fr.choice_text(chosen, "2x", "fd_digits")
    bare = [{k: v for k, v in p.items() if not k.startswith("fd_inf")} for p in (a, b)]
    assert fr.ranking_key(bare) == "fd" and fr.pareto(bare) == [True, True]


def test_a_target_considers_only_stacks_whose_quality_gate_passes_when_any_does():
    """With the run's acceptance.max_fd_increase, a stack whose increase over dense may exceed it is
    not chosen while one that passes meets the target; when none passes, all are considered."""

    def point(name, speedup, inf, diff_ci, steps):
        p = _point(name, speedup, 10.0 + inf, ratio=0.3, steps=steps)
        return {**p, "fd_inf": inf, "fd_inf_ci": [inf - 10, inf + 10], "fd_inf_diff": inf - 3,
                "fd_inf_diff_ci": diff_ci}  # fmt: skip

    safe = point("pruned 10", 4.0, 3.0, [-2.0, 2.0], 10)
    risky = point("pruned 6", 5.0, 12.0, [0.7, 17.0], 6)  # within noise of safe, faster, may fail
    safe["within_noise"], risky["within_noise"] = [risky["key"]], [safe["key"]]
    assert fr.choose([safe, risky], speedup=3)["label"] == "pruned 6"  # the rule alone: the faster
    chosen = fr.choose([safe, risky], speedup=3, max_increase=5.3)
    assert chosen["label"] == "pruned 10"
    assert chosen["choice"]["quality_gate"] == {"max_fd_increase": 5.3, "meeting_target_and_passing": 1}
    assert "Considered: the 1 stacks" in fr.choice_text(chosen, "3x", "fd_digits")
    fallback = fr.choose([safe, risky], speedup=4.5, max_increase=5.3)  # only the risky one is fast enough
    assert fallback["label"] == "pruned 6"
    assert fallback["choice"]["quality_gate"]["meeting_target_and_passing"] == 0
    assert "No stack meeting the target passes" in fr.choice_text(fallback, "4.5x", "fd_digits")


def test_within_noise_is_the_paired_difference_when_replicates_are_kept():
    """Two stacks whose intervals overlap but whose paired difference is clear are not within noise;
    the choice then stays with the best stack."""
    import torch

    from compressor.intervals import Resampling

    boot = Resampling(method="jackknife")
    g = torch.Generator().manual_seed(0)
    common = 10 + 3 * torch.randn(200, generator=g, dtype=torch.float64)  # what every stack's seeds share
    jitter = 0.02 * torch.randn(200, generator=g, dtype=torch.float64)
    reps = {
        "r0-ddim-50-c1-fp32": common,
        "r0-ddim-20-c1-fp32": common + 1.0,
        "r0-ddim-10-c1-fp32": common + jitter,
    }
    points = [
        _point("dense 50", 1.0, 10.0, ci=[5.0, 15.0]),
        _point("dense 20", 2.5, 11.0, steps=20, ci=[6.0, 16.0]),  # overlaps, but 1.0 worse on every seed
        _point("dense 10", 4.0, 10.01, steps=10, ci=[5.0, 15.0]),  # the same on every seed, within noise
    ]
    fr.mark_noise(points, reps, boot)
    assert points[1]["within_noise"] == [] and points[2]["within_noise"] == [points[0]["key"]]
    chosen = fr.choose(points, speedup=2)
    assert chosen["label"] == "dense 10" and "paired interval" in chosen["choice"]["rule"]
    assert fr.choose(points[:2], speedup=1)["label"] == "dense 50"  # dense 20 is clearly worse


def test_levers_that_may_not_move_stay_at_the_runs_sampler(tiny_config):
    cfg = load_config(tiny_config, ["sample.scheduler=dpmsolver++", "sample.steps=7"])
    grid = fr.lever_grid(cfg, ["prune"])
    assert grid.schedulers == ["dpmsolver++"] and grid.steps == [7] and grid.cache_intervals == [1]
    assert grid.ratios == cfg.frontier.ratios and grid.precisions == ["fp32"]
    everything = fr.lever_grid(cfg, list(fr.LEVERS))
    assert (
        everything.steps == cfg.frontier.steps and everything.cache_intervals == cfg.frontier.cache_intervals
    )
    assert fr.lever_grid(cfg, ["steps"]).ratios == [0.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frontier")
    model = write_model_folder(root / "model")
    write_images(root / "images", 8)
    return write_config(root / "tiny.yaml", TINY_CONFIG.format(model=model, data=root / "images"))


GRID = ["--ratios", "0,0.25", "--steps", "3,2", "--cache-intervals", "1,2", "--batch", "2", "--samples", "4"]
GRID += ["--repeat", "1", "--threads", "1", "quality.feature=digits"]


@pytest.fixture(scope="module")
def in_process(tiny) -> tuple[Path, float]:
    out = tiny.parent / "in-process"
    began = time.perf_counter()
    assert main(["frontier", str(tiny), *GRID, "--target", "1.1x", "--out", str(out)]) == 0
    return out, time.perf_counter() - began


def test_the_frontier_measures_every_stack_and_marks_the_pareto_front(in_process, capsys):
    out, _ = in_process
    frontier = json.loads((out / "frontier.json").read_text())
    points = frontier["points"]
    assert len(points) == 2 * 2 * 3  # ratios x solvers x (3 steps: c1, c2; 2 steps: c1)
    for p in points:
        assert set(p["stack"]) == {"ratio", "scheduler", "steps", "cache_interval", "precision"}
        assert p["latency_ms"] > 0 and p["speedup"] > 0 and p["fd"] > 0 and 0 < p["ssim"] <= 1.0
        assert isinstance(p["pareto"], bool)
    assert [p["pareto"] for p in points] == fr.pareto(points)
    reference = [p for p in points if p["stack"] == {**frontier["reference"]["stack"], "cache_interval": 1,
                                                      "precision": "fp32"}]  # fmt: skip
    assert len(reference) == 1 and reference[0]["ssim"] == pytest.approx(1.0)  # the reference itself
    assert reference[0]["fd"] == pytest.approx(frontier["reference"]["fd"])
    assert {p["macs_kept"] for p in points if p["stack"]["ratio"] == 0} == {1.0}
    assert all(p["macs_kept"] < 0.7 for p in points if p["stack"]["ratio"] == 0.25)
    for p in points:  # every quality figure with its interval
        for key in ("fd", "fd_ratio", "ssim", "kid"):
            low, high = p[f"{key}_ci"]
            assert low <= p[key] <= high, (p["label"], key)
        assert set(p["within_noise"]) <= {q["key"] for q in points} - {p["key"]}
    assert (
        frontier["reference"]["fd_ci"][0] <= frontier["reference"]["fd"] <= frontier["reference"]["fd_ci"][1]
    )
    # ranked by FD-infinity (free of the 1/N bias), each point paired with the reference's seeds
    assert frontier["ranked_by"] == "fd_inf"
    for p in points:
        for key in ("fd_inf", "fd_inf_diff"):
            low, high = p[f"{key}_ci"]
            assert low <= p[key] <= high, (p["label"], key)
        assert p["fd_inf_diff"] == pytest.approx(p["fd_inf"] - frontier["reference"]["fd_inf"])
    assert reference[0]["fd_inf_diff"] == pytest.approx(0.0, abs=1e-9)  # the reference against itself
    chosen = frontier["chosen"]
    meeting = [p for p in points if p["speedup"] >= 1.1 * 1.03]
    best = min(meeting, key=lambda p: (p["fd_inf"], -p["speedup"]))
    assert chosen["choice"]["best"]["key"] == best["key"]
    tied = [p for p in meeting if p is best or best["key"] in p["within_noise"]]
    assert chosen["key"] == max(tied, key=lambda p: (p["speedup"], -p["fd_inf"]))["key"]
    assert (out / "frontier.png").stat().st_size > 10_000
    text = (out / "frontier.md").read_text()
    assert "| stack |" in text and "within noise of" in text and "95% intervals" in text
    assert "| FD-infinity | FD-infinity - dense |" in text and "which ranks the stacks" in text


def test_a_rerun_measures_nothing_again(in_process, tiny, capsys):
    out, _ = in_process
    points = sorted((out / "points").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in points}
    assert main(["frontier", str(tiny), *GRID, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in points} == stamps
    assert "cached: config and inputs unchanged" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratios", "0,1.5"], "every pruning ratio must be in [0, 1)"),
        (["--schedulers", "ddpm"], "choose from ddim, dpmsolver++, unipc"),
        (["--target", "0.5x"], "give a speed-up over 1"),
        (["--levers", "prune,colour"], "choose from prune, steps"),
        (["--samples", "1"], "--samples 1: must be at least 2"),
    ],
)
def test_bad_frontier_arguments_are_one_line(tiny, tmp_path, capsys, argv, message):
    assert main(["frontier", str(tiny), *argv, "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_ray_with_two_local_workers_gives_the_same_points(in_process, tiny, capsys):
    pytest.importorskip("ray", reason="Ray is the optional `ray` extra")
    import ray

    out, seconds = in_process
    on_ray = tiny.parent / "on-ray"
    began = time.perf_counter()
    try:
        assert main(["frontier", str(tiny), *GRID, "--target", "1.1x", "--out", str(on_ray),
                     "--ray", "--workers", "2"]) == 0  # fmt: skip
        assert ray.cluster_resources().get("CPU") == 2
    finally:
        ray.shutdown()
    ray_seconds = time.perf_counter() - began
    a = json.loads((out / "frontier.json").read_text())["points"]
    b = json.loads((on_ray / "frontier.json").read_text())["points"]
    same = ("stack", "key", "label", "macs_kept", "fd", "fd_ratio", "ssim")
    assert [{k: p[k] for k in same} for p in a] == [{k: p[k] for k in same} for p in b]
    print(f"in-process {seconds:.1f} s, Ray with 2 workers {ray_seconds:.1f} s")


@pytest.mark.slow
def test_a_latency_target_over_levers_chooses_a_stack_the_run_then_uses_and_checks(tiny, tmp_path):
    from rundir.records import chosen_stack, read_metrics

    run = tmp_path / "run"
    target = ["prune.target_latency.levers=[prune,steps,scheduler,cache]", "prune.target_latency.speedup=1.1",
              "prune.target_latency.what=sampler", "prune.target_latency.batch=2", "prune.ratio=null",
              "frontier.ratios=[0,0.25]", "frontier.steps=[3,2]", "frontier.cache_intervals=[1,2]",
              "frontier.samples=4", "frontier.repeat=1", "frontier.threads=1", "quality.feature=digits",
              "quality.compare_raw=false", "bench.backends=[onnxruntime]", "bench.batch_sizes=[2]",
              "bench.sampler_repeat=1", "bench.repeat=3"]  # fmt: skip
    stages = "prune,finetune,export,quality,bench,check,report"
    code = main([str(tiny), *target, "--stages", stages, "--run-dir", str(run)])
    frontier = json.loads((run / "frontier" / "frontier.json").read_text())
    chosen = frontier["chosen"]
    assert chosen is not None and chosen["speedup"] >= 1.1 * 1.03 and frontier["levers"][0] == "prune"
    assert chosen_stack(run).as_dict() == chosen["stack"]
    prune = read_metrics(run, "prune")
    assert prune.ratio == chosen["stack"]["ratio"] and prune.frontier["chosen"] == chosen
    assert prune.macs_kept == pytest.approx(chosen["macs_kept"])  # pruned exactly as the frontier's run
    quality = read_metrics(run, "quality")
    assert quality.compressed_stack == chosen["stack"]
    bench = read_metrics(run, "bench")
    assert bench.stack["stack"] == chosen["stack"] and bench.stack["speedup"] > 0
    check = json.loads((run / "check" / "record.json").read_text())
    (gate,) = [c for c in check["metrics"]["checks"] if c["name"] == "prune.target_latency.speedup"]
    assert gate["measured"] == pytest.approx(bench.stack["speedup"]) and "by bench" in gate["detail"]
    verdict = check["metrics"]["verdict"]  # timing and 4 samples on a tiny model: any may happen
    assert code == {"pass": 0, "fail": 3, "inconclusive": 4}[verdict]
    report = (run / "report" / "report.md").read_text()
    assert "## Speed-quality frontier" in report and f"Chosen for {frontier['target']}" in report
    # the target is a sweep around the run: the prune stage alone only prunes, at a ratio it is handed
    from compressor.errors import UserError
    from pipeline.runner import run_pipeline

    with pytest.raises(UserError, match="chosen on the frontier before the run"):
        run_pipeline(load_config(tiny, target), tmp_path / "direct", ["prune"])


def test_plan_with_a_target_is_the_frontier_search(tiny, tmp_path, capsys):
    assert main(["plan", str(tiny), "--target", "fast", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --target 'fast': give a speed-up over 1 such as 3x, or a latency such as 40ms"]


def test_nested_runs_build_engines_only_for_a_tensorrt_frontier():
    assert fr.ratio_stages(0.0) == ["prune", "export"]  # the dense model as it is: nothing to finetune
    assert fr.ratio_stages(0.25) == ["prune", "finetune", "export"]
    assert fr.ratio_stages(0.25, "tensorrt") == ["prune", "finetune", "export", "build"]


STUDENTS = ["distill_steps.start_steps=8", "distill_steps.steps_per_round=2", "distill_steps.batch_size=4",
            "distill_steps.checkpoint_every=2"]  # fmt: skip


@pytest.mark.slow
def test_students_are_a_lever_of_the_frontier_and_of_a_latency_target(tiny, tmp_path):
    """``--students 0,4,2``: per ratio one nested distill_steps run (rounds 8 -> 4 -> 2); its rounds are
    stacks sampled at their own steps; a latency target with the student lever can choose one, which the
    run then trains, exports and gates."""
    from rundir import layout
    from rundir.records import chosen_stack, read_metrics

    out = tmp_path / "f"
    grid = ["--ratios", "0,0.25", "--schedulers", "ddim", "--steps", "3", "--cache-intervals", "1",
            "--students", "0,4,2", "--batch", "2", "--samples", "4", "--repeat", "1", "--threads", "1",
            "quality.feature=digits", *STUDENTS]  # fmt: skip
    assert main(["frontier", str(tiny), *grid, "--out", str(out)]) == 0
    frontier = json.loads((out / "frontier.json").read_text())
    students = [p for p in frontier["points"] if p["stack"].get("student_steps")]
    assert sorted((p["stack"]["ratio"], p["stack"]["student_steps"]) for p in students) == [
        (0.0, 2), (0.0, 4), (0.25, 2), (0.25, 4)
    ]  # fmt: skip
    for p in students:
        assert p["stack"]["scheduler"] == "ddim" and p["stack"]["steps"] == p["stack"]["student_steps"]
        assert p["fd"] > 0 and p["speedup"] > 0 and "student" in p["label"]
        assert p["student_training"]["optimizer_steps"] == 2 * (1 if p["stack"]["student_steps"] == 4 else 2)
    assert all("student_steps" not in p["stack"] for p in frontier["points"] if p not in students)
    for ratio in (0.0, 0.25):  # one nested student run per ratio, its rounds the students
        rec = read_metrics(layout.frontier_student_dir(out, ratio), "distill_steps")
        assert [r["steps"] for r in rec.rounds] == [4, 2]
        assert rec.student == ("the dense model" if ratio == 0 else "finetune/model")
    # the ratio run's prune and finetune were reused, not redone
    copied = read_metrics(layout.frontier_student_dir(out, 0.25), "finetune")
    assert copied == read_metrics(layout.frontier_ratio_dir(out, 0.25), "finetune")
    # a latency target may choose a student: the run trains it and samples, exports and times it
    run = tmp_path / "run"
    target = ["prune.target_latency.levers=[prune,steps,student]", "prune.target_latency.speedup=1.5",
              "prune.target_latency.what=sampler", "prune.target_latency.batch=2", "prune.ratio=null",
              "frontier.ratios=[0,0.25]", "frontier.steps=[8]", "frontier.students=[0,2]",
              "frontier.samples=4", "frontier.repeat=1", "frontier.threads=1", "quality.feature=digits",
              "quality.compare_raw=false", "quality.compare_pruned=false", "bench.backends=[onnxruntime]",
              "bench.batch_sizes=[2]", "bench.sampler_repeat=1", "bench.repeat=3", *STUDENTS,
              "sample.steps=8", "prune.target_latency.margin=0"]  # fmt: skip
    stages = "prune,finetune,export,quality,bench,check"  # distill_steps joins: the student lever
    main([str(tiny), *target, "--stages", stages, "--run-dir", str(run)])
    chosen = json.loads((run / "frontier" / "frontier.json").read_text())["chosen"]
    assert (
        chosen["stack"]["student_steps"] == 2
    )  # 2 steps against the reference's 8: only students reach 1.5x
    assert chosen_stack(run).as_dict() == chosen["stack"]
    distill = read_metrics(run, "distill_steps")
    assert distill.target_steps == 2 and [r["steps"] for r in distill.rounds] == [4, 2]
    quality = read_metrics(run, "quality")
    assert quality.compressed_label() == "student" and quality.student_steps == 2
    assert read_metrics(run, "bench").stack["speedup"] > 0


def test_the_chart_stars_each_targets_choice_or_the_chosen_stack(monkeypatch, tmp_path):
    """frontier.targets without --target: every target's choice is starred (none where none was found);
    with --target, the chosen stack alone."""
    from pipeline.frontier import tables

    seen = []
    monkeypatch.setattr(tables, "plot_frontier", lambda f, placed, marks, ref, path: seen.append(marks))
    monkeypatch.setattr(tables, "figure", lambda p: p["y"])
    monkeypatch.setattr(tables, "point_interval", lambda p: (p["y"], p["y"]))
    a, b = {"label": "A", "speedup": 4.0, "y": 1.0}, {"label": "B", "speedup": 9.0, "y": 2.0}
    frontier = {"points": [a, b], "reference": {"y": 0.5}, "choices": {"3x": a, "10x": b, "20x": None}}
    tables.plot(frontier, tmp_path / "f.png")
    tables.plot({**frontier, "chosen": b}, tmp_path / "f.png")
    assert seen == [[("3x: A", 4.0, 1.0), ("10x: B", 9.0, 2.0)], [("chosen: B", 9.0, 2.0)]]
