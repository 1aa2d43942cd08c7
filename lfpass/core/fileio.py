"""Safe output: every path a command writes is checked against every path it reads
before any work, and each file is written atomically (a temporary file beside the
target, then a rename).

A reader never sees a half-written file, a failure or a SIGINT/SIGTERM leaves
nothing behind, and no output can land on an input, however it is spelled
(symlinks, hard links, ``./a/../``), or on another output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from lfpass.core.errors import OutputError


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: by inode when both exist, else by resolved path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable(label: str, path: Path) -> None:
    """``path`` can be created or replaced by a rename in its folder."""
    folder = _folder(path)
    if path.is_dir():
        raise OutputError(f"{label} {path}: is a folder")
    if not folder.is_dir():
        raise OutputError(f"{label} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{label} {path}: cannot write to folder {folder}")


def check_paths(reads: Mapping[str, Path | None], writes: Mapping[str, Path | None]) -> None:
    """Refuse, before any work, a write that would land on a read file or on another write.

    Keys are how the user named each path (``"--report"``, ``"the model"``); ``None``
    values are ignored. Raises :class:`OutputError` naming both paths."""
    reads = {k: Path(v) for k, v in reads.items() if v is not None}
    writes = {k: Path(v) for k, v in writes.items() if v is not None}
    for label, path in writes.items():
        check_writable(label, path)
        for what, source in reads.items():
            if same_file(path, source):
                raise OutputError(f"{label} {path}: would overwrite {what} {source}; choose another path")
    items = list(writes.items())
    for i, (label, path) in enumerate(items):
        for other, second in items[i + 1:]:
            if same_file(path, second):
                raise OutputError(f"{label} and {other} name the same file {path}; give each its own path")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``."""
    path = Path(path)
    check_writable("output", path)
    with temporary(path, suffix or path.suffix) as tmp:
        yield tmp
        ordinary_mode(tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def temporary(beside: Path, suffix: str) -> Iterator[Path]:
    """A fresh hidden file next to ``beside``, removed when the block ends unless renamed away."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=suffix, dir=_folder(beside))
    except OSError as exc:
        raise OutputError(f"{beside}: cannot write there ({exc.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ordinary_mode(path: str | Path) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode an ordinary write would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks remove temporary files (as on SIGINT)."""


@contextlib.contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM unwinds the stack like Ctrl-C does."""

    def raise_terminated(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
