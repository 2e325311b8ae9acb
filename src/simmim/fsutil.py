"""Writing files so that a crash or a kill never leaves a half-written one: a temp file next to the
target, fsynced, renamed over it, and the directory fsynced. Checkpoints, shards, indexes and caches
all go through `atomic_write`."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

PathLike = str | os.PathLike[str]


class ErrorRecordingWriter:
    """File wrapper that keeps the first OSError from `write`.

    torch's zip writer swallows exceptions raised by `write` and fails later with an unrelated
    "unexpected pos" RuntimeError, so the real cause (e.g. ENOSPC) would otherwise be lost.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        """Write to the wrapped file, remembering the first OSError."""
        try:
            return self._file.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def flush(self) -> None:
        """Flush the wrapped file (torch.save calls this when it finishes)."""
        self._file.flush()

    def tell(self) -> int:
        """The wrapped file's position (tarfile asks for it)."""
        return self._file.tell()


def fsync_directory(directory: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        # Some filesystems (e.g. certain network mounts) cannot fsync directories; the rename is done.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[ErrorRecordingWriter], None], what: str = "checkpoint") -> None:
    """Write via `write` to a temp file next to `path`, fsync it, then rename it onto `path`: readers see
    the old file or the whole new one. Failures are one line, "could not save <what> <path>: ..."."""
    target = Path(path)
    # Same directory, so os.replace is an atomic rename on one filesystem; a random name, so concurrent
    # writers never share a temp file; "x" mode so the file mode follows the umask like a plain open.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as file:
            writer = ErrorRecordingWriter(file)
            try:
                write(writer)
            except Exception as exc:
                raise (writer.error or exc) from None
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise OSError(exc.errno, f"could not save {what} {target}: {reason}") from exc
        if isinstance(exc, Exception):
            first_line = (str(exc).splitlines() or [""])[0]
            raise RuntimeError(
                f"could not save {what} {target}: {type(exc).__name__}: {first_line}"
            ) from exc
        raise  # KeyboardInterrupt and friends: cleaned up, passed on unchanged
    fsync_directory(target.parent)


def atomic_write_text(path: PathLike, text: str, what: str) -> None:
    """`text` written to `path` atomically (UTF-8)."""
    atomic_write(path, lambda file: file.write(text.encode()), what)


def read_json_cache(path: PathLike) -> dict:
    """The JSON object a cache file holds; {} where it is missing, unreadable or not an object (a
    cache only saves work, so a damaged one means doing the work again)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_json_cache(path: PathLike, entries: dict, what: str) -> None:
    """Adds `entries` to the cache file at `path` atomically, re-reading it first so that entries
    another process wrote meanwhile stay; an unwritable cache is skipped (the work is done again)."""
    with contextlib.suppress(OSError):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**read_json_cache(path), **entries}, indent=1), what)


def read_records(path: PathLike) -> dict[str, dict]:
    """The records of a JSON-lines results file by their "key", a later record of a key replacing an
    earlier one; {} where the file is missing."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def append_record(path: PathLike, record: dict) -> dict:
    """Appends `record` to a JSON-lines results file as one whole line, flushed and fsynced, so that a
    kill leaves the earlier ones readable; returns it."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record
