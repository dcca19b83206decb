"""The one progress bar every long step uses: a tqdm bar on a terminal, plain lines in a log file.

tqdm redraws its bar with carriage returns, many times a second; written to a file (``compress-deploy
CONFIG > log 2>&1``) those frames pile up into one enormous line. :func:`progress_bar` therefore
gives a normal tqdm bar only when its stream is a terminal, and otherwise a :class:`LineProgress`:
one ``\\n``-terminated line at each tenth of the total (or every :data:`LINE_EVERY_S` seconds when
nothing else prints, and for bars without a total), and a last line when it closes.

Both kinds answer the same calls: ``update(n)``, ``set_postfix(**values)``, ``refresh()``,
``close()``, ``n`` and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LINE_EVERY_S = 30.0
"""Off a terminal, the longest silence between two lines of a bar that is moving."""


def log(stage: str, message: str) -> None:
    """One progress line on stderr, prefixed with the stage."""
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


class LineProgress:
    """Progress as plain lines for a log file: one at each tenth of ``total`` (or every ``every_s``
    seconds), and one at :meth:`close` unless the last line already showed the final count.

    Args:
        total: the count at which the work is done (None: unknown; lines every ``every_s`` seconds).
        desc: what is counted, e.g. ``[quality] dense``.
        unit: the name of one item (``image``, ``step``, ``timestep``).
        file: where the lines go.
        every_s: the longest silence between two lines while the count moves.
    """

    def __init__(
        self, total: int | None, desc: str, unit: str, file: TextIO, every_s: float = LINE_EVERY_S
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.file = file
        self.every_s = every_s
        self.n = 0
        self.postfix = ""
        self.started = self.last_line_t = time.monotonic()
        self.last_line_n = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items; print a line if one is due."""
        self.n += n
        self.refresh()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count on the next line (``loss=0.0123``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def refresh(self) -> None:
        """Print a line if the count crossed a tenth of the total or ``every_s`` seconds passed."""
        if self.closed or self.n == self.last_line_n:
            return
        now = time.monotonic()
        crossed = bool(self.total) and self._tenth(self.n) > self._tenth(self.last_line_n)
        if crossed or now - self.last_line_t >= self.every_s:
            self._line(now)

    def close(self) -> None:
        """The last line (the count reached, the time taken), unless the previous line showed it."""
        if self.closed:
            return
        if self.n != self.last_line_n:
            self._line(time.monotonic())
        self.closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tenth(self, n: int) -> int:
        return min(10, 10 * n // self.total) if self.total else 0

    def _line(self, now: float) -> None:
        elapsed = now - self.started
        if self.total:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)"
        else:
            text = f"{self.desc}: {self.n} {self.unit}"
        text += f", {elapsed:.1f} s"
        if self.total and 0 < self.n < self.total:
            text += f", about {elapsed * (self.total - self.n) / self.n:.0f} s left"
        if self.postfix:
            text += f" ({self.postfix})"
        print(text, file=self.file, flush=True)
        self.last_line_n, self.last_line_t = self.n, now


def is_terminal(file: TextIO) -> bool:
    """Whether ``file`` is an interactive terminal (where carriage-return redraws are read, not stored)."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    leave: bool = True,
    disable: bool = False,
    file: TextIO | None = None,
) -> tqdm | LineProgress:
    """A progress bar on ``file`` (default: stderr): tqdm on a terminal, :class:`LineProgress` elsewhere.

    Args:
        total: the count at which the work is done; the maximum where work may stop early (say
            so by closing the bar at the stop), None where unknown.
        desc: the label, by convention ``[stage] what``.
        unit: the name of one item.
        leave: on a terminal, keep the finished bar on screen (False: erase it).
        disable: show nothing (e.g. on every process but the main one).
        file: the stream; its being a terminal decides the kind.
    """
    file = sys.stderr if file is None else file
    if disable:
        return tqdm(total=total, disable=True)
    if is_terminal(file):
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=file)
    return LineProgress(total, desc, unit, file)
