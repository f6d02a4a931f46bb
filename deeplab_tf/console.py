"""Keeps TensorFlow's own log lines off the user's terminal.

TensorFlow's C++ code logs through absl, which writes everything to stderr until
``absl::InitializeLog()`` is called, and TensorFlow never calls it: the oneDNN
notice, the CUDA stub's "could not find cuda drivers", ``E0000 ... cuInit`` and
the "Local rendezvous is aborting" lines of ended ``tf.data`` iterators appear even
with ``TF_CPP_MIN_LOG_LEVEL=3``. A user reads "E" and "aborting" as a crash, and
can act on none of them. So:

* ``import deeplab_tf`` imports TensorFlow with stderr sent to a temporary file and
  replays every line of it that is not a TensorFlow log line (an app's stderr is
  its own again once the import returns);
* the command-line tools (``cli.common.run``) pass stderr through a filter for the whole run.

``DEEPLAB_TF_VERBOSE=1`` turns both off.

The tools' own errors and flags are ``deeplab_tf.cli.common``'s. This module must not
import TensorFlow.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

VERBOSE_ENV = "DEEPLAB_TF_VERBOSE"
VERBOSE_HELP = f"Set {VERBOSE_ENV}=1 to see TensorFlow's own log lines."

# An absl/TF C++ log line ("I0000 00:00:1796241638.296290    2766 port.cc:153] ..."),
# the older "2024-01-01 10:00:00.000000: W tensorflow/..." form, absl's note that
# logging is not initialised, the second line of the CPU-feature notice, and Python
# absl's "WARNING:absl:" records (SavedModel tracing notes).
TENSORFLOW_LOG_LINE = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.\-]+:\d+\]"
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\]"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|To enable the following instructions: "
    rb"|(?:INFO|WARNING):absl:)"
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def is_tensorflow_log_line(line: bytes) -> bool:
    return TENSORFLOW_LOG_LINE.match(line) is not None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Within the block, file descriptor 2 goes to a temporary file; afterwards the
    lines that are not TensorFlow log lines are written to the real stderr."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured if not is_tensorflow_log_line(line)]
            _write_all(2, b"".join(kept))


class _StderrFilter:
    """File descriptor 2 becomes a pipe; a thread copies the pipe's lines that are
    not TensorFlow log lines to the original stderr."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _pump(self, read_end: int) -> None:
        with open(read_end, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if not is_tensorflow_log_line(line):
                    _write_all(self.original, line)

    def close(self) -> None:
        """Gives fd 2 back (the pipe ends, once child processes holding it exit)."""
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self.original, 2)
        self.thread.join(timeout=5)


_filter: _StderrFilter | None = None


def filter_stderr() -> None:
    """Drops TensorFlow's log lines from this process's stderr until it exits."""
    global _filter
    if _filter is None and not verbose():
        _filter = _StderrFilter()
