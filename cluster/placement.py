"""Placement-group clean-up for sweeps: free the CPUs of Train runs whose trial Tune killed."""

from __future__ import annotations

from pathlib import Path

from workers.loop import PLACEMENT_GROUP


def free_placement_groups(root: Path) -> int:
    """Remove the placement groups of the Train runs under `root` whose workers are gone.

    A paused or stopped Tune trial is killed with its Train controller; Ray Train's cleaner frees the
    workers' placement group only through the State API (the dashboard), so without it the CPUs stay
    reserved and the next trials wait forever for them. Every run records its group's id
    (`workers.loop.PLACEMENT_GROUP`); a run's own trial, or the sweep at its end, frees it here.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = ray.util.placement_group_table()
    freed = 0
    for path in root.rglob(PLACEMENT_GROUP):
        group_id = path.read_text().strip()
        if table.get(group_id, {}).get("state") not in (None, "REMOVED"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            freed += 1
        path.unlink()
    return freed
