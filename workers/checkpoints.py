"""Checkpoint integrity: every rank lists what it wrote (size and SHA-256 of each file) in a manifest
beside its files, and a checkpoint is used only if every rank's manifest is there and every file
matches it. A truncated or corrupt checkpoint is named with its first problem, and the loop resumes
from the newest one that is intact (`choose_checkpoint`). A checkpoint that cannot be resumed from is
a `CheckpointError` (a `hybridtrain` error: the run cannot continue from it), raised by the loop that
needed it, with the problem named here.

A directory without any manifest is incomplete: a kill during Train's copy or rotation leaves one
(the manifests are written last), and taking it would fail on every restart until `max_failures` is
spent. Checkpoints written before manifests existed carry none either: to resume from one, set
`HYBRIDTRAIN_LEGACY_CHECKPOINTS=1` where the workers run (e.g. `ray.init(runtime_env={"env_vars": ...})`
or the cluster's environment); it is taken as it is then.

Every rank restores the same checkpoint: rank 0 chooses and broadcasts its choice
(`agree_on_checkpoint`), since on shared storage with stale listings each rank's own look could
find a different newest one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestration.errors import CheckpointError
from workers.files import atomic_write_text

__all__ = ["LEGACY_CHECKPOINTS", "MANIFEST", "CheckpointError", "agree_on_checkpoint", "checkpoint_problem", "choose_checkpoint",
           "write_manifest"]

MANIFEST = "manifest-rank{rank}.json"
LEGACY_CHECKPOINTS = "HYBRIDTRAIN_LEGACY_CHECKPOINTS"  # "1": a checkpoint without manifests is taken as it is


def legacy_checkpoints_allowed() -> bool:
    return os.environ.get(LEGACY_CHECKPOINTS, "").strip().lower() in ("1", "true", "yes", "on")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, *, rank: int, world_size: int) -> Path:
    """List every file under `directory` (this rank's part of a checkpoint) in its manifest."""
    directory = Path(directory)
    files = {str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.rglob("*")) if path.is_file() and not path.name.startswith("manifest-rank")}
    manifest = directory / MANIFEST.format(rank=rank)
    atomic_write_text(manifest, json.dumps({"rank": rank, "world_size": world_size, "files": files}))
    return manifest


def checkpoint_problem(directory: str | Path) -> str | None:
    """The first reason `directory` is not a complete, intact checkpoint, or None if it is."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: not a directory"
    manifests = sorted(directory.glob("manifest-rank*.json"))
    if not manifests:
        if legacy_checkpoints_allowed():
            return None  # written before manifests existed, and the user said to take it: nothing to check against
        return (f"{directory}: no manifest (an incomplete checkpoint: manifests are written last; "
                f"one written before manifests existed is taken with {LEGACY_CHECKPOINTS}=1)")
    world_size = None
    for manifest in manifests:
        try:
            listed = json.loads(manifest.read_text())
            world_size = int(listed["world_size"])
            files = dict(listed["files"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"{manifest}: unreadable manifest ({type(error).__name__}: {error})"
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                return f"{path}: missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{path}: {size} bytes, {expected['bytes']} written (truncated or overwritten)"
            if _sha256(path) != expected["sha256"]:
                return f"{path}: content differs from what was written (corrupt)"
    missing = sorted(set(range(world_size or 0)) - {int(p.stem.rsplit("rank", 1)[1]) for p in manifests})
    if missing:
        return f"{directory}: no manifest from rank(s) {missing} of {world_size} (an incomplete checkpoint)"
    return None


def choose_checkpoint(root: str | Path | None, registered: str | Path | None) -> tuple[Path | None, list[str]]:
    """Where a (re)started worker group resumes: the newest intact checkpoint under `root` (the run's
    Train storage), or `registered` (the one Ray Train hands over) when `root` is not a local folder.

    Train registers a checkpoint only after every worker has written it: a group that dies in between
    is handed the previous one, or none, though a complete newer one is on disk. Returns the choice
    (None: start from the beginning) and the problems of the newer checkpoints passed over."""
    candidates = sorted((path for path in Path(root).glob("checkpoint_*") if path.is_dir()), reverse=True) if root and Path(root).is_dir() else []
    if registered is not None and Path(registered) not in candidates:
        candidates.insert(0, Path(registered))
    problems = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, problems
        problems.append(problem)
    return None, problems


def agree_on_checkpoint(root: str | Path | None, registered: str | Path | None, *, rank: int,
                        share: Callable[[Any], Any]) -> tuple[Path | None, list[str]]:
    """`choose_checkpoint` on rank 0, and rank 0's choice on every rank.

    `share` sends rank 0's value to every rank and returns it (`workers.engine.broadcast_from_rank0`, a
    collective: every rank calls this). Other ranks do not look: their listing of shared storage may be
    stale, and ranks restoring different epochs would train on inconsistent ZeRO shards."""
    choice: tuple[str | None, list[str]] = (None, [])
    if rank == 0:
        chosen, problems = choose_checkpoint(root, registered)
        choice = (None if chosen is None else str(chosen), problems)
    chosen_path, problems = share(choice)
    return (None if chosen_path is None else Path(chosen_path)), list(problems)
