"""A run's or sweep's directory belongs to one driver at a time, and its files are never left torn.

    with claim_directory(run_dir, "run"):      # before Ray starts; a second driver is refused
        ...
    atomic_write_text(run_dir / "summary.json", text)   # the old file or the new one, whole
    rows = read_jsonl(sweep_dir / "explores.jsonl")     # a torn last line is skipped (and said)

The claim is an exclusive `fcntl.flock` on `DIR/.hybridtrain.lock`, held for the life of the
context: the kernel drops it when the holder exits, however it exits (a kill, a crash), so a dead
driver never leaves a stale claim to clean up. The lock file records the holder's pid and host for the
refusal's message. On shared storage the lock is as good as the filesystem's locking (NFSv4 and
Lustre lock across nodes; a filesystem without locks makes `flock` fail, and the claim says so).
Only the driver claims: trials and workers run inside the claim of the `hybridtrain` process that
started them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from orchestration.errors import DataError, ReportError, UsageError
from workers.files import LOCK_FILE, atomic_write_bytes, atomic_write_text, fsync_directory

__all__ = ["LOCK_FILE", "DirectoryInUseError", "UnreadableFileError", "append_jsonl", "atomic_write_bytes", "atomic_write_text", "claim_directory",
           "fsync_directory", "read_json", "read_jsonl"]

logger = logging.getLogger(__name__)



class DirectoryInUseError(UsageError):
    """Another live process holds the run or sweep directory; the message names the directory and the holder."""


@contextlib.contextmanager
def claim_directory(path: str | Path, kind: Literal["run", "sweep"]) -> Iterator[Path]:
    """Hold `path` (created if missing) for this process until the context ends; yields its absolute path.

    Raises `DirectoryInUseError` naming the directory and the holder's pid and host when another live
    process holds it. A directory this claim created and left holding nothing but the lock is removed
    at the end, so a run refused before it wrote anything leaves no empty directory behind.
    """
    directory = Path(path).resolve()
    created = [parent for parent in (directory, *directory.parents) if not parent.exists()]  # the leaf first
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{kind} directory {str(directory)!r}: cannot create it ({error.strerror or error})") from error
    handle = _acquire(directory, kind)
    try:
        yield directory
    finally:
        if created and [entry.name for entry in directory.iterdir()] == [LOCK_FILE]:
            (directory / LOCK_FILE).unlink()  # safe while we hold it: a waiter re-checks the inode it locked
            with contextlib.suppress(OSError):  # stops at the first folder something else has written to
                for folder in created:
                    folder.rmdir()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _acquire(directory: Path, kind: str) -> IO[str]:
    """The open, locked lock file of `directory`, stamped with this process; or `DirectoryInUseError`."""
    lock_path = directory / LOCK_FILE
    while True:
        handle = open(lock_path, "a+", encoding="utf-8")  # a+: create it, never truncate the holder's stamp before we hold it
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock_path)
            handle.close()
            raise DirectoryInUseError(f"{kind} directory {str(directory)!r} is in use by {holder}; two drivers writing one {kind} "
                                      f"would overwrite each other's checkpoints. Wait for it to end, stop it, or choose another "
                                      f"directory") from None
        except OSError as error:
            handle.close()
            raise UsageError(f"{kind} directory {str(directory)!r}: cannot lock {LOCK_FILE} ({error.strerror or error}); "
                             f"the filesystem must support file locks") from error
        # The holder we waited on may have removed the file (see claim_directory): then our lock is on a
        # name nobody else opens any more, and we try again on the current file.
        if _same_file(handle, lock_path):
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "kind": kind, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    os.fsync(handle.fileno())
    return handle


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _holder(lock_path: Path) -> str:
    """`pid 1234 on host h (since ...)` from the lock file, or what can be said without it."""
    try:
        stamp: dict[str, Any] = json.loads(lock_path.read_text(encoding="utf-8"))
        return f"pid {stamp['pid']} on host {stamp['host']} (since {stamp['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has locked it and not stamped it yet
        return f"another process (its {LOCK_FILE} does not say which yet)"


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append `row` as one JSON line, in one write to a file opened for appending (whole lines from several
    writers do not interleave). If the last append was torn, this row starts on a new line, so it is not
    glued onto the fragment and lost with it (`read_jsonl` then names the fragment's line)."""
    line = (json.dumps(row) + "\n").encode()
    with open(path, "a+b") as log:  # a+: every write goes to the end, whatever was read
        log.seek(0, os.SEEK_END)
        if log.tell() > 0:
            log.seek(-1, os.SEEK_END)
            if log.read(1) != b"\n":
                line = b"\n" + line
        log.write(line)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an append-only JSON-lines log ([] when it is not there yet).

    A torn last line (a writer killed or out of disk mid-append) is skipped with a warning that says so;
    a bad line anywhere else is corruption, not an interrupted append, and raises `DataError` naming the
    file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: skipped its torn last line %d (an interrupted append: %s): %.80r", path, number, error.msg, line)
                continue
            raise DataError(f"{path}: line {number} of {len(lines)} is not JSON ({error.msg}); only a torn last line is skipped. "
                            f"Remove or repair that line to read the file") from error
    return rows


class UnreadableFileError(ReportError):
    """A state file that is there but cannot be read whole: 0 bytes, cut off, or not JSON."""


def read_json(path: str | Path) -> Any | None:
    """The JSON value in `path`, or None when there is no such file; `UnreadableFileError` (naming the file
    and what is wrong with it) when it is there but torn: empty, cut off or garbled."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        what = "it is empty (0 bytes)" if not text.strip() else f"it is not whole JSON ({error.msg} at character {error.pos} of {len(text)})"
        raise UnreadableFileError(f"{path} cannot be read: {what}; it was cut off while it was written (a full disk or a kill)") from None
