"""What a run trains on, recorded when it starts, so that `--resume` notices a changed config or data file.

`RUN_DIR/fingerprint.json` holds every config value that shapes the model (dotted keys) and a
description of the data (a file's SHA-256, or a folder's listing). `--resume` compares the run's
config and data now with it and refuses to go on when they differ, saying what changed, unless
`--allow-changed` is given (the fingerprint is then rewritten: the next resume compares with what
the run trains on now).

Left out, because they change where or how safely a run trains, not what it learns:
`cluster.*` (address, verbosity; `--resume --address` replaces the address), `tune.*` (sweeps only),
`faults.*` (test fault injection), `train.max_failures`, `train.checkpoint_every`,
`train.checkpoints_to_keep`, `train.tensorboard` and `advisor.app_name`. Everything else counts,
`train.epochs` included: the cosine decay is laid over `train.epochs`, so raising it mid-run changes
the learning rate of every epoch after the resume point.

A sweep keeps one too (`SWEEP_DIR/fingerprint.json`, `fingerprint(config, sweep=True)`), with the
`tune.*` section counted: its space, scheduler and population decide which runs the sweep trains, and
`hybridtrain tune --resume` refuses a change in them the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cluster.experiment import ExperimentConfig
from workers.config import DataConfig

FINGERPRINT = "fingerprint.json"
IGNORED_SECTIONS = ("cluster", "tune", "faults")
IGNORED_KEYS = ("train.max_failures", "train.checkpoint_every", "train.checkpoints_to_keep", "train.tensorboard", "advisor.app_name")
HASHED_FILE_BYTES = 1 << 30  # data files up to 1 GiB are hashed (about 2 s); larger ones are described by size and mtime


def fingerprint(config: ExperimentConfig, *, sweep: bool = False) -> dict[str, Any]:
    """`{"config": {dotted key: value}, "data": {...}}` of what `config` trains on (see the module docstring);
    with `sweep`, of what a sweep of it trains on (`tune.*` counts too)."""
    ignored = tuple(section for section in IGNORED_SECTIONS if not (sweep and section == "tune"))
    values = {key: value for key, value in _flatten(config.to_dict()).items()
              if key.split(".")[0] not in ignored and key not in IGNORED_KEYS}
    # Through JSON and back, as it is read from the run directory (tuples become lists, keys strings).
    return json.loads(json.dumps({"config": values, "data": describe_data(config.data)}, default=str))


def describe_data(data: DataConfig) -> dict[str, Any]:
    """The data's identity: a file's SHA-256 (size and mtime above `HASHED_FILE_BYTES`), a folder's listing
    (each file's relative path, size and mtime, hashed), or the bundled dataset's name."""
    if data.path is None:
        return {"source": "sklearn:digits"}
    path = Path(data.path).expanduser().resolve()
    if path.is_file():
        size = path.stat().st_size
        if size > HASHED_FILE_BYTES:
            return {"path": str(path), "bytes": size, "mtime_ns": path.stat().st_mtime_ns}
        return {"path": str(path), "bytes": size, "sha256": _file_digest(path)}
    listing = hashlib.sha256()
    files = sorted(entry for entry in path.rglob("*") if entry.is_file())
    for entry in files:
        stat = entry.stat()
        listing.update(f"{entry.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"path": str(path), "files": len(files), "listing_sha256": listing.hexdigest()}


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a recorded fingerprint and the current one, one line per key: `key: old -> new`."""
    found = []
    for part in ("config", "data"):
        old, new = recorded.get(part, {}), current.get(part, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key, "(unset)") != new.get(key, "(unset)"):
                name = key if part == "config" else f"data {key}"
                found.append(f"{name}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return found


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:  # sections only: a dict value (tune.space) stays whole
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
