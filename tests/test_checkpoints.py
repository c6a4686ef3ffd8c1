"""Checkpoint manifests: a truncated, corrupt or incomplete checkpoint is named, and the newest intact one found."""

from __future__ import annotations

import json
from pathlib import Path

from workers.checkpoints import LEGACY_CHECKPOINTS, agree_on_checkpoint, checkpoint_problem, choose_checkpoint, write_manifest


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


def test_intact_checkpoint_passes_and_one_without_manifest_only_when_legacy_is_asked_for(tmp_path, monkeypatch) -> None:
    assert checkpoint_problem(_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01")) is None
    legacy = tmp_path / "checkpoint_2026-01-01_00-00-00"
    legacy.mkdir()
    (legacy / "loop_state.json").write_text("{}")
    monkeypatch.delenv(LEGACY_CHECKPOINTS, raising=False)
    assert checkpoint_problem(legacy) == (f"{legacy}: no manifest (an incomplete checkpoint: manifests are written last; "
                                          f"one written before manifests existed is taken with {LEGACY_CHECKPOINTS}=1)")
    monkeypatch.setenv(LEGACY_CHECKPOINTS, "1")
    assert checkpoint_problem(legacy) is None


def test_a_newest_directory_without_manifest_is_passed_over(tmp_path, monkeypatch) -> None:
    """A kill during Train's copy or rotation leaves a directory with some files and no manifest (they come
    last): it was taken as intact, failed to load, and did so again on every restart."""
    monkeypatch.delenv(LEGACY_CHECKPOINTS, raising=False)
    intact = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01")
    partial = tmp_path / "checkpoint_2026-01-01_00-00-02"
    (partial / "part0").mkdir(parents=True)
    (partial / "part0" / "weights.pt").write_bytes(bytes(100))
    chosen, problems = choose_checkpoint(tmp_path, None)
    assert chosen == intact and problems == [checkpoint_problem(partial)] and "no manifest" in problems[0]


def _share_from(rank0_value):
    """A broadcast stand-in: every rank gets what rank 0 sent (here: the value rank 0's call made)."""
    sent = []

    def share(value):
        if not sent:
            sent.append(rank0_value if rank0_value is not None else value)
        return sent[0]
    return share


def test_every_rank_takes_rank_0s_choice(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(LEGACY_CHECKPOINTS, raising=False)
    older = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01")
    newer = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02")
    share = _share_from(None)
    assert agree_on_checkpoint(tmp_path, None, rank=0, share=share) == (newer, [])
    # Rank 1 sees a stale listing (only the older checkpoint) but takes rank 0's choice without looking.
    stale = tmp_path / "stale-listing"
    stale.mkdir()
    assert agree_on_checkpoint(stale, None, rank=1, share=share) == (newer, [])
    assert agree_on_checkpoint(tmp_path, None, rank=1, share=lambda value: value) == (None, [])  # rank 1 alone chooses nothing
    assert older.is_dir()


def _two_ranks(rank: int, root: str, stale: str, port: int, results: str) -> None:
    import torch.distributed as dist

    from workers.engine import broadcast_from_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        chosen, problems = agree_on_checkpoint(root if rank == 0 else stale, None, rank=rank, share=broadcast_from_rank0)
        (Path(results) / f"rank{rank}.json").write_text(json.dumps({"chosen": str(chosen), "problems": problems}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_of_a_gloo_group_restore_the_same_checkpoint(tmp_path, monkeypatch) -> None:
    import socket

    import torch.multiprocessing as mp

    monkeypatch.delenv(LEGACY_CHECKPOINTS, raising=False)
    root, stale, results = tmp_path / "storage", tmp_path / "stale", tmp_path / "results"
    for folder in (root, stale, results):
        folder.mkdir()
    _checkpoint(stale, "checkpoint_2026-01-01_00-00-01")  # what rank 1's stale listing shows
    _checkpoint(root, "checkpoint_2026-01-01_00-00-01")
    newest = _checkpoint(root, "checkpoint_2026-01-01_00-00-03")
    (root / "checkpoint_2026-01-01_00-00-04").mkdir()  # a partial copy: no manifest
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_two_ranks, args=(str(root), str(stale), port, str(results)), nprocs=2, join=True)
    seen = [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1] and seen[0]["chosen"] == str(newest) and "no manifest" in seen[0]["problems"][0]


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
