"""The LLM advisor: reads a `TrainingSnapshot`, answers with a bounded, validated `Proposal`.

Importing this package is cheap (no torch, Ray or transformers); backends, the Serve deployment
and the clients import their heavy dependencies when used.
"""

from serve_llm.config import AdvisorConfig
from orchestration.protocol import (
    AdvisorResponse,
    HyperparameterChange,
    LayerStats,
    Proposal,
    ProposalOutcome,
    TrainingSnapshot,
    WeightOp,
)
from serve_llm.validate import validate_proposal

__all__ = [
    "AdvisorConfig",
    "AdvisorResponse",
    "HyperparameterChange",
    "LayerStats",
    "Proposal",
    "ProposalOutcome",
    "TrainingSnapshot",
    "WeightOp",
    "validate_proposal",
]
