"""The one progress bar: a tqdm bar on a terminal, a few plain lines in a log file."""

from __future__ import annotations

import io

from tqdm import tqdm

from compressor import progress
from compressor.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_line_per_tenth_and_no_carriage_returns():
    log = io.StringIO()
    with progress_bar(300, "[finetune]", "step", file=log) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(300):
            bar.set_postfix(loss="0.1234")
            bar.update(1)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 10 <= len(lines) <= 12, lines
    assert lines[0].startswith("[finetune]: 30/300 step (10%)") and "loss=0.1234" in lines[0]
    assert lines[-1].startswith("[finetune]: 300/300 step (100%)")


def test_a_bar_stopped_early_ends_with_its_count_of_the_total():
    log = io.StringIO()
    bar = progress_bar(10, "[prune] Taylor pass", "timestep", leave=False, file=log)
    for _ in range(4):
        bar.update(1)
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("[prune] Taylor pass: 4/10 timestep (40%)"), lines
    assert len(lines) == 4


def test_without_a_total_or_a_tenth_crossed_a_line_comes_every_few_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = LineProgress(None, "[frontier] timing", "stack", log, every_s=30.0)
    for _ in range(5):
        now[0] += 10.0
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines == [
        "[frontier] timing: 3 stack, 30.0 s",
        "[frontier] timing: 5 stack, 50.0 s",
    ]


def test_a_terminal_gets_tqdm_and_a_disabled_bar_prints_nothing():
    term = _Terminal()
    with progress_bar(5, "[quality] dense", "image", file=term) as bar:
        assert isinstance(bar, tqdm)
        bar.update(5)
    assert "[quality] dense" in term.getvalue() and "5/5" in term.getvalue()
    quiet = io.StringIO()
    with progress_bar(5, "[finetune]", "step", disable=True, file=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
