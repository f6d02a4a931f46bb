"""Progress of long work: Keras' Progbar on a terminal, plain lines elsewhere, nothing
with --quiet."""

import io
import re
import sys

import pytest

from deeplab_tf import progress
from deeplab_tf.progress import Progress, clock, track


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    """A line with count, rate, elapsed and time left at most every every_s seconds,
    and always the last one."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    meter = Progress(10, "images", every_s=10.0, title="building split val")
    for step in range(1, 11):
        now[0] = 2.0 * step  # 0.5 images/s
        meter.update()
    lines = capsys.readouterr().out.splitlines()
    # Printed at 2 s (the first), 12 s (10 s later) and 20 s (the last).
    assert lines == [
        "building split val: 1/10 images, 0.50 images/s, elapsed 0:00:02, left 0:00:18",
        "building split val: 6/10 images, 0.50 images/s, elapsed 0:00:12, left 0:00:08",
        "building split val: 10/10 images, 0.50 images/s, elapsed 0:00:20, left 0:00:00",
    ]


def test_a_bar_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert progress.on_terminal()
    meter = Progress(3, "steps")
    for step in range(1, 4):
        meter.update(step, values=[("loss", 0.5 / step)])
    out = terminal.getvalue()
    assert "\r" in out and "━" in out and re.search(r"3/3\S* \S*━", out), out  # redrawn in place
    assert "loss: 0.1667" in out  # the latest value, not an average


@pytest.mark.parametrize("stream_is_terminal", [False, True])
def test_quiet_prints_nothing(monkeypatch, capsys, stream_is_terminal):
    if stream_is_terminal:
        monkeypatch.setattr(sys, "stdout", _Terminal())
    items = list(track(range(5), 5, "images", enabled=False, title="x"))
    assert items == [0, 1, 2, 3, 4]
    written = sys.stdout.getvalue() if stream_is_terminal else capsys.readouterr().out
    assert written == ""


def test_clock():
    assert clock(3725.4) == "1:02:05"
