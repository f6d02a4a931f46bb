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
* the command-line tools (``run``) pass stderr through a filter for the whole run.

``DEEPLAB_TF_VERBOSE=1`` turns both off.

Errors take one path too: every tool's ``main`` is wrapped by ``handles_errors``,
which turns any exception into one line of at most ``MAX_ERROR_CHARS`` on stderr
(exit code 2 for bad input, 1 for anything unexpected); ``--verbose`` adds the
traceback. This module must not import TensorFlow.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

VERBOSE_ENV = "DEEPLAB_TF_VERBOSE"
VERBOSE_HELP = f"Set {VERBOSE_ENV}=1 to see TensorFlow's own log lines."
MAX_ERROR_CHARS = 200

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


def run(main: Callable[[], int | None]) -> int:
    """Runs a command-line tool's ``main`` with TensorFlow's log lines filtered out."""
    filter_stderr()
    return main() or 0


def entry_point(main: Callable[[], int | None]) -> Callable[[], None]:
    """The installed script of a tool (``[project.scripts]``): runs ``main`` and exits
    with its code."""

    def cli() -> None:
        sys.exit(run(main))

    return cli


# === Errors ===

# TensorFlow's runtime errors by class name (this module does not import TensorFlow):
# what the user can do about each.
_TENSORFLOW_ERRORS = {
    "DataLossError": "corrupt or truncated data",
    "ResourceExhaustedError": "out of memory (try a smaller --batch-size or --crop-size)",
    "NotFoundError": "not found",
    "InvalidArgumentError": "invalid input",
}


# TensorFlow's node context after a runtime error's message ("[[{{node ...}}]]").
_OP_CONTEXT = re.compile(r"\s*\[\[.*")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' error form: a bad flag is one line on stderr (not the
    usage block) and exit code 2; ``--help`` names the TensorFlow log switch."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("epilog", VERBOSE_HELP)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's hook; never returns
        text = " ".join(message.split())
        self.exit(2, f"error: {text} (see {self.prog} --help)\n"[: MAX_ERROR_CHARS + 1])


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: the traceback of an error as well as its one line."""
    parser.add_argument(
        "--verbose", action="store_true", help="show the full traceback of an error"
    )


def error_line(error: BaseException) -> str:
    """``error`` as one line of at most ``MAX_ERROR_CHARS`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    name = type(error).__name__
    if name in _TENSORFLOW_ERRORS and type(error).__module__.startswith("tensorflow"):
        text = f"{_TENSORFLOW_ERRORS[name]}: {_OP_CONTEXT.sub('', text)}"
    limit = MAX_ERROR_CHARS - len("error: ")
    if len(text) > limit:  # long paths lose their middle directories first
        text = _PATH.sub(lambda m: _short_path(m.group(0)), text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# An absolute path in a message (up to a space, colon, quote or bracket).
_PATH = re.compile(r"/[^\s:'\"()\[\]]+")


def _short_path(path: str) -> str:
    """``/first/.../parent/name`` for a long path: where it is and what it is."""
    parts = path.split("/")
    if len(path) <= 40 or len(parts) <= 4:
        return path
    return "/".join([*parts[:2], "...", *parts[-2:]])


def _is_bad_input(error: BaseException) -> bool:
    tensorflow = type(error).__module__.startswith("tensorflow")
    return isinstance(error, (ValueError, OSError)) or (
        tensorflow and type(error).__name__ in _TENSORFLOW_ERRORS
    )


def handles_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a tool's ``main(argv)``: an exception becomes one line on stderr and exit
    code 2 (bad input: ValueError and its subclasses, OSError, TensorFlow's data and
    resource errors) or 1 (anything else, a bug to report); ``--verbose`` in argv also
    prints the traceback."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else [str(a) for a in argv]
        try:
            return main(argv) or 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if "--verbose" in args:
                traceback.print_exc()
            if _is_bad_input(error):
                print(f"error: {error_line(error)}", file=sys.stderr, flush=True)
                return 2
            hint = " (run with --verbose for the traceback)" if "--verbose" not in args else ""
            line = error_line(error)[: MAX_ERROR_CHARS - 60]
            print(f"internal error: {type(error).__name__}: {line}{hint}", file=sys.stderr)
            return 1

    return wrapper
