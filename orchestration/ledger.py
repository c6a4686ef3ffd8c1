"""The run's ledger: one `InterventionRecord` per thing the coordinator did, readable by pandas.

It answers "what did the advisor do to my run, and did it help?": every query, cache hit,
proposal (with the alphas it was blended with), verdict (with its reward) and rollback, and every
answer that was dropped (invalid, stale, timeout, error) with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

RecordKind = Literal["query", "cache_hit", "kept", "proposal", "verdict", "rollback", "invalid", "stale", "timeout", "error"]
RECORD_KINDS = ("query", "cache_hit", "kept", "proposal", "verdict", "rollback", "invalid", "stale", "timeout", "error")


@dataclass(kw_only=True, slots=True)
class InterventionRecord:
    """One entry of the ledger. JSON-valued fields hold JSON text so a CSV row stays flat."""

    kind: RecordKind
    epoch: int
    step: int = 0
    reason: str = ""
    query_id: str = ""
    time: float = field(default_factory=time.time)  # seconds since the epoch
    proposal_summary: str = ""  # Proposal.summary(), e.g. "lr_scale=0.5; shrink(fc1,0.1)"
    proposal_json: str = ""  # json.dumps(Proposal.to_dict())
    alphas_json: str = ""  # json.dumps({group: alpha})
    reward: float | None = None
    verdict: str = ""  # "accepted" | "rejected" on verdict records
    latency_s: float | None = None  # advisor answer time
    status: str = ""  # advisor status: valid | clamped | rejected | timeout | error
    problems: str = ""  # validator problems, "; "-joined

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"InterventionRecord.kind must be one of {RECORD_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COLUMNS = tuple(f.name for f in dataclasses.fields(InterventionRecord))


class Ledger:
    """An append-only list of records, exportable as a DataFrame or CSV."""

    def __init__(self, records: list[InterventionRecord] | None = None) -> None:
        self.records: list[InterventionRecord] = list(records or [])

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: InterventionRecord) -> InterventionRecord:
        self.records.append(record)
        return record

    def to_dataframe(self) -> pd.DataFrame:
        """One row per record, columns in `COLUMNS` order (present even when empty)."""
        return pd.DataFrame([record.to_dict() for record in self.records], columns=list(COLUMNS))

    def write_csv(self, path: str | Path) -> Path:
        """Write the ledger as CSV (read back with `pandas.read_csv`); creates parent folders."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False)
        return path

    def counts(self) -> dict[str, int]:
        """Totals for metrics: queries, cache hits, accepted/rejected/invalid proposals, dropped answers."""
        kinds = [record.kind for record in self.records]
        verdicts = [record.verdict for record in self.records if record.kind == "verdict"]
        return {
            "advisor_queries": kinds.count("query"),
            "cache_hits": kinds.count("cache_hit"),
            "kept_unasked": kinds.count("kept"),
            "proposals_accepted": verdicts.count("accepted"),
            "proposals_rejected": verdicts.count("rejected"),
            "proposals_invalid": kinds.count("invalid"),
            "answers_stale": kinds.count("stale"),
            "answers_timeout": kinds.count("timeout"),
            "errors": kinds.count("error"),
        }

    def to_state(self) -> list[dict[str, Any]]:
        """JSON-able state (non-finite rewards become strings so strict JSON accepts them)."""
        return [_jsonable(record.to_dict()) for record in self.records]

    @classmethod
    def from_state(cls, state: list[dict[str, Any]]) -> Ledger:
        """Rebuild from `to_state` output."""
        records = []
        for row in state:
            values = dict(row)
            if isinstance(values.get("reward"), str):
                values["reward"] = float(values["reward"])
            records.append(InterventionRecord(**values))
        return cls(records)


def to_json(value: Any) -> str:
    """Compact JSON for the ledger's JSON-valued columns."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    reward = row.get("reward")
    if isinstance(reward, float) and not math.isfinite(reward):
        row["reward"] = str(reward)
    return row
