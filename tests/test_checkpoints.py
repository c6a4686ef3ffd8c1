"""Checkpoint manifests: a truncated, corrupt or incomplete checkpoint is named, and the newest intact one found."""

from __future__ import annotations

import json

from workers.checkpoints import checkpoint_problem, choose_checkpoint, write_manifest


def _checkpoint(root, name: str, *, ranks: int = 2):
    directory = root / name
    for rank in range(ranks):
        part = directory / f"part{rank}"  # each rank writes its own files into the shared directory
        part.mkdir(parents=True)
        (part / "weights.pt").write_bytes(bytes(range(256)) * (rank + 4))
        if rank == 0:
            (directory / "loop_state.json").write_text(json.dumps({"epoch": 1}))
    # Each rank's manifest lists the files it wrote (here: the whole directory, as rank 0 of a 1-rank run would).
    for rank in range(ranks):
        write_manifest(directory, rank=rank, world_size=ranks)
    return directory


def test_intact_checkpoint_passes_and_old_ones_without_manifest_are_taken(tmp_path) -> None:
    assert checkpoint_problem(_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01")) is None
    legacy = tmp_path / "checkpoint_2026-01-01_00-00-00"
    legacy.mkdir()
    (legacy / "loop_state.json").write_text("{}")
    assert checkpoint_problem(legacy) is None


def test_truncated_corrupt_missing_and_incomplete_are_named(tmp_path) -> None:
    directory = _checkpoint(tmp_path, "checkpoint_a")
    weights = directory / "part1" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    assert checkpoint_problem(directory) == f"{weights}: 100 bytes, {256 * 5} written (truncated or overwritten)"

    directory = _checkpoint(tmp_path, "checkpoint_b")
    weights = directory / "part0" / "weights.pt"
    flipped = bytearray(weights.read_bytes())
    flipped[7] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    assert checkpoint_problem(directory) == f"{weights}: content differs from what was written (corrupt)"

    directory = _checkpoint(tmp_path, "checkpoint_c")
    (directory / "loop_state.json").unlink()
    assert checkpoint_problem(directory) == f"{directory / 'loop_state.json'}: missing"

    directory = _checkpoint(tmp_path, "checkpoint_d")
    (directory / "manifest-rank1.json").unlink()
    assert "no manifest from rank(s) [1] of 2" in checkpoint_problem(directory)

    directory = _checkpoint(tmp_path, "checkpoint_e")
    (directory / "manifest-rank0.json").write_text("{not json")
    assert "unreadable manifest" in checkpoint_problem(directory)


def test_the_newest_intact_checkpoint_is_chosen_past_broken_ones(tmp_path) -> None:
    oldest = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01")
    middle = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02")
    newest = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-03")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Train's own file beside them
    # Train registered only the middle one (the newest was written as the workers died): the newest intact wins.
    assert choose_checkpoint(tmp_path, middle) == (newest, [])
    (newest / "loop_state.json").write_text("{}")
    assert choose_checkpoint(tmp_path, middle) == (middle, [f"{newest / 'loop_state.json'}: 2 bytes, 12 written (truncated or overwritten)"])
    (middle / "manifest-rank1.json").unlink()  # rank 1 never finished writing it
    chosen, problems = choose_checkpoint(tmp_path, None)
    assert chosen == oldest and len(problems) == 2 and "no manifest from rank(s) [1]" in problems[1]
    (oldest / "part0" / "weights.pt").unlink()
    assert choose_checkpoint(tmp_path, None)[0] is None  # nothing intact: start from the beginning
    assert choose_checkpoint(tmp_path / "nowhere", None) == (None, [])
    # Storage that is not a local folder: only the registered checkpoint is known.
    assert choose_checkpoint(None, oldest.parent / "elsewhere") == (None, [f"{oldest.parent / 'elsewhere'}: not a directory"])
