"""Writing files that mark a state, so that a crash or a full disk leaves the old file or the new one, never half of one.

A reader that finds `summary.json`, `final_metrics.json` or `model.json` may act on it (a run is
finished, a model is there), so those files are written whole: to a temporary file in the same
directory, flushed to disk, then renamed over the target (a rename within one filesystem is atomic),
and the directory entry is flushed too. This module sits low (workers import it; `cluster.rundir`
re-exports it) and imports nothing of the project.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

LOCK_FILE = ".hybridtrain.lock"  # in a run or sweep directory: its driver's claim, stamped with the driver's pid and host (`cluster.rundir`)
WriteFault = Callable[[Path], bool]  # fault injection (`workers.faults`): whether the write of this path runs out of disk
_write_fault: WriteFault | None = None


def set_write_fault(fault: WriteFault | None) -> WriteFault | None:
    """Install `fault` (None removes it) for this process's atomic writes; returns the one it replaces.

    Testing only (`faults.disk_full`): a write the fault picks gets half its bytes into the temporary
    file, then `OSError(ENOSPC)`, as on a disk that fills up mid-write.
    """
    global _write_fault
    previous, _write_fault = _write_fault, fault
    return previous


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` atomically: a reader sees the old content or the new, whole.

    A failure (ENOSPC, a kill) leaves the old file as it was and no temporary file behind (a kill
    between write and rename can leave one `.NAME.*.tmp`, never a torn `NAME`).
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0o666 lets the umask decide the mode, as a plain open() would (mkstemp's 0o600 would not).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if _write_fault is not None and _write_fault(path):
                handle.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: faults.disk_full)", str(temporary))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: str | Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk; a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems (and platforms) refuse fsync on a directory; the rename itself stands
        pass
    finally:
        os.close(descriptor)
