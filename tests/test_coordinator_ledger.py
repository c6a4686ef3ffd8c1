"""Ledger: counts, CSV round-trip through pandas, JSON state."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from orchestration.ledger import COLUMNS, InterventionRecord, Ledger, to_json
from orchestration.protocol import HyperparameterChange, Proposal

PROPOSAL = Proposal(hyperparameters=HyperparameterChange(lr_scale=0.5), reason="plateau")


def filled_ledger() -> Ledger:
    ledger = Ledger()
    ledger.append(InterventionRecord(kind="query", epoch=3, step=30, reason="interval", query_id="r:q1"))
    ledger.append(
        InterventionRecord(
            kind="proposal",
            epoch=4,
            step=40,
            query_id="r:q1",
            proposal_summary=PROPOSAL.summary(),
            proposal_json=to_json(PROPOSAL.to_dict()),
            alphas_json=to_json({"fc.weight": 0.1}),
            latency_s=1.5,
            status="clamped",
            problems="lr_scale clamped to 0.5; reason truncated",
        )
    )
    ledger.append(InterventionRecord(kind="verdict", epoch=4, query_id="r:q1", reward=-math.inf, verdict="rejected"))
    ledger.append(InterventionRecord(kind="rollback", epoch=4, query_id="r:q1"))
    ledger.append(InterventionRecord(kind="cache_hit", epoch=8, query_id="r:q2"))
    ledger.append(InterventionRecord(kind="verdict", epoch=8, query_id="r:q2", reward=0.2, verdict="accepted"))
    ledger.append(InterventionRecord(kind="invalid", epoch=12, query_id="r:q3", status="rejected"))
    return ledger


def test_counts():
    assert filled_ledger().counts() == {
        "advisor_queries": 1,
        "cache_hits": 1,
        "kept_unasked": 0,
        "proposals_accepted": 1,
        "proposals_rejected": 1,
        "proposals_invalid": 1,
        "answers_stale": 0,
        "answers_timeout": 0,
        "errors": 0,
    }


def test_csv_round_trip_through_pandas(tmp_path):
    ledger = filled_ledger()
    path = ledger.write_csv(tmp_path / "nested" / "ledger.csv")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert tuple(frame.columns) == COLUMNS
    assert list(frame["kind"]) == [record.kind for record in ledger.records]
    assert frame["reward"].iloc[2] == -math.inf and frame["reward"].iloc[5] == pytest.approx(0.2)
    assert Proposal.from_dict(json.loads(frame["proposal_json"].iloc[1])) == PROPOSAL
    assert json.loads(frame["alphas_json"].iloc[1]) == {"fc.weight": 0.1}
    assert frame["problems"].iloc[1] == "lr_scale clamped to 0.5; reason truncated"


def test_empty_ledger_still_has_columns(tmp_path):
    frame = pd.read_csv(Ledger().write_csv(tmp_path / "empty.csv"))
    assert tuple(frame.columns) == COLUMNS and frame.empty


def test_state_is_strict_json_and_round_trips():
    ledger = filled_ledger()
    text = json.dumps(ledger.to_state(), allow_nan=False)
    restored = Ledger.from_state(json.loads(text))
    assert restored.records == ledger.records


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        InterventionRecord(kind="guess", epoch=0)  # type: ignore[arg-type]
