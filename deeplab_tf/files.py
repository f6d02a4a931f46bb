"""Atomic writes of files and directories, with the modes a plain ``open`` and
``mkdir`` would give.

Everything the project writes goes through a temporary name in the target's own
directory (so the rename cannot cross file systems), is flushed to disk and then
renamed: a killed job leaves the old file or none, never half of one. Files are
created with mode 0666 and directories with 0777, both reduced by the user's umask
(0644 / 0755 under umask 022), so a TF Serving process running as another user can
read an export; ``tempfile.mkstemp``/``mkdtemp`` would give 0600 / 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temporary_name(path: str | os.PathLike, kind: str = "tmp", suffix: str = "") -> Path:
    """A hidden, unused name beside ``path``: ``.NAME.KIND-PID-RANDOM`` + ``suffix``.

    The temporaries of ``path`` that a killed process left behind go first
    (``remove_stale_temporaries``): rerunning a killed job leaves nothing over."""
    path = Path(path)
    remove_stale_temporaries(path, kind)
    token = f"{os.getpid()}-{secrets.token_hex(3)}"
    return path.with_name(f".{path.name}.{kind}-{token}{suffix}")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, kind: str = "tmp") -> list[Path]:
    """Removes the temporaries of ``path`` (``temporary_name``) whose process is no
    longer running on this machine; returns them. A live process's are kept, so two
    jobs writing beside each other are safe (on one machine: PIDs are local)."""
    path = Path(path)
    prefix = f".{path.name}.{kind}-"
    try:
        entries = [e for e in path.parent.iterdir() if e.name.startswith(prefix)]
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        pid = entry.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _fsync(path: Path) -> None:
    """Flushes a file, or a directory's entries after a rename, to disk (POSIX; a no-op
    where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside ``path`` (ending with ``suffix``, for writers that want
    one) for any writer that takes a path; flushed and renamed onto ``path`` when the
    block ends without an exception, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix=suffix)
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Renames the finished file ``tmp`` onto ``path`` (same directory), durably."""
    _fsync(Path(tmp))
    os.replace(tmp, path)
    _fsync(Path(path).parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` (``mode`` "w" or "wb"), renamed onto
    ``path`` when the block ends without an exception, removed otherwise."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with open(fd, mode) as f:
            yield f


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """Writes ``data`` as JSON (``default=str`` for paths and the like)."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def save_model_atomic(model: Any, path: str | os.PathLike) -> None:
    """``model.save(path)`` (a Keras ``.keras`` file) through a temporary name."""
    with atomic_path(path, suffix=".keras") as tmp:  # Keras requires the suffix
        model.save(tmp)


def temporary_dir(output_dir: str | os.PathLike) -> Path:
    """A new empty directory beside ``output_dir`` (mode 0777 less the umask), to be
    moved onto it with ``replace_dir`` when complete."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(output_dir)
    os.mkdir(tmp, 0o777)
    return tmp


def replace_dir(tmp: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Moves the finished ``tmp`` to ``output_dir``, replacing an old one only then."""
    tmp, output_dir = Path(tmp), Path(output_dir)
    if output_dir.exists():
        old = temporary_name(output_dir, "old")
        os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output_dir)
    _fsync(output_dir.parent)


class PartialDir:
    """The unfinished output of a job, kept as ``.NAME.partial`` beside ``output`` so
    that rerunning the same command (after a kill, a crash, a full disk) continues it.

    ``settings`` (JSON-ready) say what the job computes: a partial directory left by a
    job with other settings could never be finished and is started afresh. The job's
    bookkeeping (``job.json``: its settings and PID; the progress it saves) lives in
    ``state`` (``.job`` inside it) and is removed by ``finish``, which moves the rest
    onto ``output``. Used as a context manager, an error before any progress was saved
    removes it. A partial directory whose PID is another live process's is
    refused: two jobs must not write one output.

    Attributes:
        path: the directory the job writes its outputs into.
        state: the directory for its bookkeeping.
        resumed: the partial directory holds earlier work of the same settings.
        discarded: it held work of other settings, now removed.
    """

    def __init__(self, output: str | os.PathLike, settings: dict[str, Any]):
        self.output = Path(output)
        self.path = self.output.with_name(f".{self.output.name}.partial")
        self.state = self.path / ".job"
        wanted = json.loads(json.dumps(settings, default=str))  # tuples -> lists, paths -> str
        try:
            record = json.loads((self.state / "job.json").read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            pid = record.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and _running(pid):
                raise FileExistsError(
                    f"{self.output}: another job (PID {pid}) is writing it; "
                    "wait for it to end or stop it"
                )
        self.resumed = isinstance(record, dict) and record.get("settings") == wanted
        self.discarded = self.path.exists() and not self.resumed
        if not self.resumed:
            shutil.rmtree(self.path, ignore_errors=True)
            self.output.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.path, 0o777)
            os.mkdir(self.state, 0o777)
        write_json_atomic(self.state / "job.json", {"settings": wanted, "pid": os.getpid()})

    def __enter__(self) -> PartialDir:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """An error (not an interrupt) before any work was saved leaves nothing behind."""
        if isinstance(error, Exception) and self.path.exists() and not self._holds_work():
            self.discard()

    def _holds_work(self) -> bool:
        """Whether the job saved any progress to continue from (in ``state``)."""
        return any(p.name != "job.json" for p in self.state.iterdir())

    def finish(self) -> None:
        """Moves the finished outputs onto ``output`` (replacing an old one)."""
        shutil.rmtree(self.state)
        replace_dir(self.path, self.output)

    def discard(self) -> None:
        """Removes the partial directory (its outputs went elsewhere)."""
        shutil.rmtree(self.path, ignore_errors=True)
