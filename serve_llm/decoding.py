"""Constrained decoding: the shape a language model may write, as a regular expression and as a
JSON schema, and the logits processor that enforces it during generation.

The generation format is a compact, fixed-key subset of the proposal schema: all four top-level
fields always present, at most `GENERATION_MAX_OPS` weight ops (no explicit `values`: a small model
cannot write useful raw numbers), groups drawn from the snapshot's names, numbers written with few
digits and inside their bounds, and a short reason without escapes. Every string matching the regex
is valid JSON that the validator accepts; it still runs on every answer, because the constraint is
one layer of defence, not the proof.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from orchestration.protocol import (
    ALPHA_BOUNDS,
    HYPERPARAMETER_BOUNDS,
    MAX_REASON_CHARS,
    WEIGHT_OP_AMOUNT_BOUNDS,
    WEIGHT_OPS,
)

logger = logging.getLogger(__name__)

GENERATION_MAX_OPS = 2  # each op costs ~20 tokens at ~18 tokens/s on 2 CPU cores
GENERATION_REASON_CHARS = 60  # ~15 tokens; the validator's own cap (MAX_REASON_CHARS) is larger
GENERATED_WEIGHT_OPS = tuple(op for op in WEIGHT_OPS if op != "values")
_SAFE_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.:/\-\[\]]{1,80}$")
_REGEX_META = re.compile(r"([\\.^$|?*+()\[\]{}\-])")

# Decimal numbers inside each bound, with few digits so that generation terminates quickly.
# Keyed by the bounds in schema.py; bounds without an entry get a loose pattern and the
# validator clamps (logged once per pattern build).
_DECIMAL_PATTERNS: dict[tuple[float, float], str] = {
    (0.1, 10.0): r"(0\.[1-9][0-9]?|[1-9](\.[0-9]{1,2})?|10(\.0)?)",
    (0.0, 0.1): r"(0(\.0[0-9]{0,3})?|0\.1)",
    (0.0, 0.8): r"(0(\.[0-7][0-9]?)?|0\.8)",
    (0.0, 0.999): r"(0(\.[0-9]{1,3})?)",
    (0.0, 0.5): r"(0(\.[0-4][0-9]?)?|0\.5)",
    (0.0, 1.0): r"(0(\.[0-9]{1,2})?|1(\.0)?)",
}
_LOOSE_DECIMAL = r"([0-9]{1,2}(\.[0-9]{1,3})?)"
# Prose characters only: no quote or backslash (never needs a JSON escape) and no braces or
# brackets, which a small model otherwise repeats to "close" the JSON from inside the string.
_REASON_START = r"[A-Za-z]"
_REASON_CHAR = r"[ A-Za-z0-9,.;:%+=/'()<>*-]"


def _decimal(bounds: tuple[float, float]) -> str:
    pattern = _DECIMAL_PATTERNS.get(bounds)
    if pattern is None:
        logger.warning("no tight number pattern for bounds %s; generating loosely, the validator clamps", bounds)
        return _LOOSE_DECIMAL
    return pattern


def generation_groups(group_names: Sequence[str]) -> list[str]:
    """The group names a model may write: those that need no JSON or regex escaping, in order."""
    safe = [name for name in dict.fromkeys(group_names) if _SAFE_GROUP_NAME.match(name)]
    skipped = [name for name in group_names if name not in safe]
    if skipped:
        logger.warning("parameter groups left out of the generation schema (unusual characters): %s", skipped[:5])
    return safe


def generation_regex(
    group_names: Sequence[str],
    *,
    max_ops: int = GENERATION_MAX_OPS,
    reason_chars: int = GENERATION_REASON_CHARS,
) -> str:
    """The regular expression a constrained model's whole answer must match (see module doc)."""
    groups = generation_groups(group_names)
    hyper = ", ".join(
        f'"{name}": (null|{_decimal(bounds)})' for name, bounds in HYPERPARAMETER_BOUNDS.items()
    )
    if groups and max_ops > 0:
        group_alternatives = "|".join(_REGEX_META.sub(r"\\\1", name) for name in groups)
        by_bounds: dict[tuple[float, float], list[str]] = {}
        for op in GENERATED_WEIGHT_OPS:
            by_bounds.setdefault(WEIGHT_OP_AMOUNT_BOUNDS[op], []).append(op)
        op_pattern = "|".join(
            rf'\{{"op": "({"|".join(ops)})", "group": "({group_alternatives})", "amount": {_decimal(bounds)}\}}'
            for bounds, ops in by_bounds.items()
        )
        op_pattern = f"({op_pattern})"
        weights = rf"\[({op_pattern}(, {op_pattern}){{0,{max_ops - 1}}})?\]"
    else:
        weights = r"\[\]"
    reason = f'"{_REASON_START}{_REASON_CHAR}{{0,{min(reason_chars, MAX_REASON_CHARS) - 1}}}"'
    # The reason comes first so that the model states the problem before it picks the numbers.
    return (
        rf'\{{"reason": {reason}, "hyperparameters": \{{{hyper}\}}, "weights": {weights}, '
        rf'"alpha": (null|{_decimal(ALPHA_BOUNDS)})\}}'
    )


def generation_json_schema(
    group_names: Sequence[str],
    *,
    max_ops: int = GENERATION_MAX_OPS,
    reason_chars: int = GENERATION_REASON_CHARS,
) -> dict[str, Any]:
    """The same format as a JSON schema, for servers that take `response_format` (OpenAI's strict
    mode wants every property required and no additional properties)."""
    groups = generation_groups(group_names)

    def bounded(bounds: tuple[float, float]) -> dict[str, Any]:
        return {"type": ["number", "null"], "minimum": bounds[0], "maximum": bounds[1]}

    op_schema = {
        "type": "object",
        "properties": {
            "op": {"type": "string", "enum": list(GENERATED_WEIGHT_OPS)},
            "group": {"type": "string", "enum": groups},
            "amount": {"type": "number", "minimum": 0.0, "maximum": 1.0},
        },
        "required": ["op", "group", "amount"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": min(reason_chars, MAX_REASON_CHARS)},
            "hyperparameters": {
                "type": "object",
                "properties": {name: bounded(bounds) for name, bounds in HYPERPARAMETER_BOUNDS.items()},
                "required": list(HYPERPARAMETER_BOUNDS),
                "additionalProperties": False,
            },
            "weights": {"type": "array", "items": op_schema, "maxItems": max_ops if groups else 0},
            "alpha": bounded(ALPHA_BOUNDS),
        },
        "required": ["reason", "hyperparameters", "weights", "alpha"],
        "additionalProperties": False,
    }


class RegexLogitsConstraint:
    """Builds per-call logits processors that confine a Hugging Face tokenizer's output to a regex.

    Uses outlines' outlines-core backend: the token-level index for a regex is compiled once
    (seconds for a 49k vocabulary) and cached, since one run's group names, hence its regex,
    stay the same from query to query. Processors are stateful, so each `generate` call gets a
    fresh one.
    """

    def __init__(self, tokenizer: Any, *, cache_size: int = 8) -> None:
        from outlines.backends.outlines_core import OutlinesCoreBackend
        from outlines.models.transformers import TransformerTokenizer

        adapter = TransformerTokenizer(tokenizer)
        self._vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
            adapter.get_vocab(), adapter.eos_token_id, adapter.eos_token, adapter.convert_token_to_string
        )
        self._indexes: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _index(self, regex: str) -> Any:
        from outlines_core import Index

        with self._lock:
            if regex in self._indexes:
                self._indexes.move_to_end(regex)
                return self._indexes[regex]
        index = Index(regex, self._vocabulary)
        with self._lock:
            self._indexes[regex] = index
            while len(self._indexes) > self._cache_size:
                self._indexes.popitem(last=False)
        return index

    def logits_processor(self, regex: str) -> Any:
        """A fresh `transformers`-compatible logits processor for one (batched) generate call."""
        from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor

        return OutlinesCoreLogitsProcessor(self._index(regex), "torch")
