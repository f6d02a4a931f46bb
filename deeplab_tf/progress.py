"""Progress of long work (dataset builds, training, evaluation, prediction, CRF search,
int8 calibration), one way everywhere.

On a terminal it is Keras' ``Progbar``: a bar with the count, the time per item and
the time left, redrawn in place. When stdout is not a terminal (a log file, a pipe,
CI) it is a plain line at most every ``every_s`` seconds (and at the end) with the
count, rate, elapsed time and time left. ``enabled=False`` (the CLIs' ``--quiet``)
prints nothing.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress drawn on ``stream`` (stdout) would be seen on a terminal."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return stream is sys.stdout and bool(isatty and isatty())


class Progress:
    """Progress over ``total`` items of ``what`` (plural, e.g. ``"images"``).

    ``update(done, values)`` after each item (``done`` defaults to one more);
    ``values`` are (name, number) pairs shown with it (a training loss);
    ``initial`` items were done before (a resumed job): the rate counts the others.
    """

    def __init__(
        self,
        total: int,
        what: str = "images",
        *,
        enabled: bool = True,
        every_s: float = 10.0,
        stream: TextIO | None = None,
        title: str = "",
        initial: int = 0,
    ) -> None:
        self.total = max(int(total), 1)
        self.what = what
        self.enabled = enabled
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.title = f"{title}: " if title else ""
        self.done = self.initial = int(initial)  # done by an earlier, interrupted run
        self.start = time.perf_counter()
        self._last = -math.inf
        self._bar = None
        if enabled and on_terminal(self.stream):
            import keras  # only on a terminal: Progbar draws in place there

            if title:
                print(title, file=self.stream, flush=True)
            unit = what[:-1] if what.endswith("s") else what
            self._bar = keras.utils.Progbar(
                self.total, unit_name=unit, stateful_metrics=[name for name in ("loss", "lr")]
            )

    def update(self, done: int | None = None, values: Sequence[tuple[str, float]] = ()) -> None:
        self.done = self.done + 1 if done is None else int(done)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(min(self.done, self.total), values=list(values))
            return
        now = time.perf_counter()
        if now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        print(self.line(now - self.start, values), file=self.stream, flush=True)

    def line(self, elapsed: float, values: Sequence[tuple[str, float]] = ()) -> str:
        """The plain progress line after ``elapsed`` seconds."""
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        shown = "".join(f" {name} {value:.4g}" for name, value in values)
        return (
            f"{self.title}{self.done}/{self.total} {self.what}{shown}, "
            f"{rate:.2f} {self.what}/s, elapsed {clock(elapsed)}, left {clock(left)}"
        )


def track(items: Iterable[T], total: int, what: str = "images", **kwargs: Any) -> Iterator[T]:
    """``items``, updating a ``Progress`` after each one."""
    meter = Progress(total, what, **kwargs)
    for item in items:
        yield item
        meter.update()


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
