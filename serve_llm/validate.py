"""The gate every advisor answer passes through: untrusted text in, a bounded `Proposal` (or a
recorded refusal) out.

Nothing an advisor writes is trusted. Hard faults (unparseable text, wrong types, NaN/inf,
too many operations, absurd nesting) reject the whole answer; soft faults (an unknown group,
an out-of-bound number, an over-long reason, a training change the run's modes do not enable)
are repaired by dropping or clamping, and every repair is written to `problems` so the ledger
can show what was changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from typing import Any

from orchestration.fitting import fit
from orchestration.protocol import (
    ALPHA_BOUNDS,
    HYPERPARAMETER_BOUNDS,
    MAX_ABS_EXPLICIT_VALUE,
    MAX_EXPLICIT_VALUES,
    MAX_REASON_CHARS,
    MAX_WEIGHT_OPS,
    NEURON_GROUP_MARK,
    RESTART_POINTS,
    WEIGHT_OP_AMOUNT_BOUNDS,
    WEIGHT_OPS,
    AdvisorResponse,
    HyperparameterChange,
    ModesView,
    Proposal,
    TrainingChange,
    TrainingSnapshot,
    WeightOp,
    split_neuron_group,
)

MAX_RAW_CHARS = 32_000  # the largest legal proposal (8 `values` ops of 64 numbers) is ~12k characters
MAX_NESTING_DEPTH = 6  # proposal -> weights -> op -> values is depth 4
_TOP_LEVEL_FIELDS = ("hyperparameters", "weights", "alpha", "reason", "training", "restart")
_OP_FIELDS = ("op", "group", "amount", "values")
_TRAINING_FIELDS = tuple(change_field.name for change_field in dataclasses.fields(TrainingChange))
_SWITCH_WORDS = {"on": True, "off": False}
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# Unicode categories a reason may not hold: controls, format characters (bidi overrides, zero-width),
# line/paragraph separators, and lone surrogates (a JSON "\ud800" escape), which no UTF-8 file or
# terminal can take: one in a reason would crash the ledger's CSV write and every print of it.
_STRIPPED_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")


class _Rejected(Exception):
    """A hard fault: the whole answer is refused."""


def _reject_constant(name: str) -> float:
    raise _Rejected(f"non-finite number {name} in answer")


def _check_structure(value: Any, depth: int = 0) -> None:
    """Reject deep nesting and non-finite numbers anywhere, before any field is read."""
    if depth > MAX_NESTING_DEPTH:
        raise _Rejected(f"answer nested deeper than {MAX_NESTING_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected(f"non-finite number {value!r} in answer")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Rejected(f"non-string key {key!r}")
            _check_structure(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_structure(item, depth + 1)


def _parse(raw: str | dict, problems: list[str]) -> dict[str, Any]:
    if isinstance(raw, dict):
        data: Any = raw
    else:
        text = raw.strip()
        if len(text) > MAX_RAW_CHARS:
            raise _Rejected(f"answer is {len(text)} characters, more than {MAX_RAW_CHARS}")
        fenced = _FENCE.match(text)
        if fenced:
            problems.append("removed a markdown code fence around the JSON")
            text = fenced.group(1)
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except RecursionError as error:
            raise _Rejected("answer nested too deeply to parse") from error
        except ValueError as error:
            raise _Rejected(f"malformed JSON: {error}") from error
    if not isinstance(data, dict):
        raise _Rejected(f"answer must be a JSON object, got {type(data).__name__}")
    _check_structure(data)
    return data


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rejected(f"{where} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError as error:
        raise _Rejected(f"{where} is too large to be a float") from error
    if not math.isfinite(number):
        raise _Rejected(f"{where} is not finite: {value!r}")
    return number


def _clamp(value: float, bounds: tuple[float, float], where: str, problems: list[str]) -> float:
    low, high = bounds
    clamped = min(max(value, low), high)
    if clamped != value:
        problems.append(f"clamped {where} from {value:g} to {clamped:g} (bounds [{low:g}, {high:g}])")
    return clamped


def sanitize_reason(text: str, problems: list[str]) -> str:
    """Strip control and format characters (newlines, bidi overrides, zero-width, lone surrogates), squeeze
    whitespace, and cut to `MAX_REASON_CHARS`: the reason lands in prompts and ledgers."""
    cleaned = "".join(" " if unicodedata.category(ch) in _STRIPPED_CATEGORIES else ch for ch in text)
    cleaned = " ".join(cleaned.split())
    if cleaned != text.strip():
        problems.append("removed control characters or extra whitespace from reason")
    if len(cleaned) > MAX_REASON_CHARS:
        problems.append(f"truncated reason from {len(cleaned)} to {MAX_REASON_CHARS} characters")
        cleaned = cleaned[:MAX_REASON_CHARS]
    return cleaned


def _hyperparameters(value: Any, problems: list[str]) -> HyperparameterChange:
    if value is None:
        return HyperparameterChange()
    if not isinstance(value, dict):
        raise _Rejected(f"hyperparameters must be an object, got {type(value).__name__}")
    changes: dict[str, float] = {}
    for name, item in value.items():
        if name not in HYPERPARAMETER_BOUNDS:
            problems.append(f"ignored unknown hyperparameter {name[:40]!r}")
            continue
        if item is None:
            continue
        changes[name] = _clamp(_number(item, f"hyperparameters.{name}"), HYPERPARAMETER_BOUNDS[name], name, problems)
    return HyperparameterChange(**changes)


def _weight_op(index: int, value: Any, group_sizes: dict[str, int], problems: list[str]) -> WeightOp | None:
    """One checked op, or None when it is dropped (the reason is recorded)."""
    where = f"weights[{index}]"
    if not isinstance(value, dict):
        raise _Rejected(f"{where} must be an object, got {type(value).__name__}")
    extra = sorted(set(value) - set(_OP_FIELDS))
    if extra:
        problems.append(f"ignored unknown fields {[key[:40] for key in extra]} in {where}")
    op, group = value.get("op"), value.get("group")
    if not isinstance(op, str) or not isinstance(group, str):
        raise _Rejected(f"{where}.op and {where}.group must be strings")
    if op not in WEIGHT_OPS:
        problems.append(f"dropped {where}: unknown op {op[:40]!r}")
        return None
    if group not in group_sizes:
        problems.append(f"dropped {where}: unknown parameter group {group[:80]!r}")
        return None
    amount = _number(value.get("amount", 0.0), f"{where}.amount")
    amount = _clamp(amount, WEIGHT_OP_AMOUNT_BOUNDS[op], f"{where}.amount ({op})", problems)
    values = value.get("values")
    if op == "values" and split_neuron_group(group)[1] is not None:
        problems.append(f"dropped {where}: explicit values take a whole parameter group, not a neuron group")
        return None
    if op != "values":
        if values is not None:
            problems.append(f"ignored {where}.values: only the 'values' op takes explicit numbers")
        return WeightOp(op=op, group=group, amount=amount)
    if not isinstance(values, list):
        raise _Rejected(f"{where}.values must be a list of numbers, got {type(values).__name__}")
    numbers = [_number(item, f"{where}.values") for item in values]
    size = group_sizes[group]
    if size > MAX_EXPLICIT_VALUES:
        problems.append(f"dropped {where}: group {group!r} has {size} numbers, more than {MAX_EXPLICIT_VALUES}")
        return None
    if len(numbers) != size:
        problems.append(f"dropped {where}: {len(numbers)} values for group {group!r} of {size} numbers")
        return None
    bounds = (-MAX_ABS_EXPLICIT_VALUE, MAX_ABS_EXPLICIT_VALUE)
    clamped = [min(max(number, bounds[0]), bounds[1]) for number in numbers]
    if clamped != numbers:
        problems.append(f"clamped {where}.values to [{bounds[0]:g}, {bounds[1]:g}]")
    return WeightOp(op=op, group=group, amount=amount, values=clamped)


def _weights(value: Any, group_sizes: dict[str, int], problems: list[str]) -> list[WeightOp]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Rejected(f"weights must be a list, got {type(value).__name__}")
    if len(value) > MAX_WEIGHT_OPS:
        raise _Rejected(f"{len(value)} weight ops, more than {MAX_WEIGHT_OPS}")
    ops = [_weight_op(index, item, group_sizes, problems) for index, item in enumerate(value)]
    return [op for op in ops if op is not None]


def _training(value: Any, modes: ModesView, problems: list[str]) -> TrainingChange:
    """The checked training change: malformed types reject the answer; what the run's modes do not let through
    is dropped or clamped (`orchestration.fitting.fit`), and recorded."""
    if value is None:
        return TrainingChange()
    if not isinstance(value, dict):
        raise _Rejected(f"training must be an object, got {type(value).__name__}")
    extra = sorted(set(value) - set(_TRAINING_FIELDS))
    if extra:
        problems.append(f"ignored unknown fields {[key[:40] for key in extra]} in training")
    pace = value.get("curriculum_pace")
    if pace is not None:
        pace = _number(pace, "training.curriculum_pace")
    selection = value.get("batch_selection")
    if isinstance(selection, str) and selection in _SWITCH_WORDS:
        selection = _SWITCH_WORDS[selection]
    if selection is not None and not isinstance(selection, bool):
        raise _Rejected(f"training.batch_selection must be true or false (or \"on\"/\"off\"), got {type(selection).__name__}")
    layer, kind = value.get("activation_layer"), value.get("activation")
    if not all(item is None or isinstance(item, str) for item in (layer, kind)):
        raise _Rejected("training.activation_layer and training.activation must be strings")
    unfreeze = value.get("unfreeze")
    if unfreeze is not None:
        count = _number(unfreeze, "training.unfreeze")
        if not count.is_integer():
            raise _Rejected(f"training.unfreeze must be a whole number of blocks, got {count:g}")
        unfreeze = int(count)
    change = TrainingChange(curriculum_pace=pace, batch_selection=selection, activation_layer=layer, activation=kind, unfreeze=unfreeze)
    fitted, done = fit(change, modes)
    problems.extend(done)
    return fitted


def _build(data: dict[str, Any], snapshot: TrainingSnapshot, problems: list[str]) -> Proposal:
    extra = sorted(set(data) - set(_TOP_LEVEL_FIELDS))
    if extra:
        problems.append(f"ignored unknown fields {[key[:40] for key in extra]}")
    group_sizes = parameter_group_sizes(snapshot)
    hyperparameters = _hyperparameters(data.get("hyperparameters"), problems)
    weights = _weights(data.get("weights"), group_sizes, problems)
    training = _training(data.get("training"), snapshot.modes_view(), problems)
    alpha = data.get("alpha")
    if alpha is not None:
        alpha = _clamp(_number(alpha, "alpha"), ALPHA_BOUNDS, "alpha", problems)
    restart = data.get("restart") or ""
    if restart not in ("", *RESTART_POINTS):
        problems.append(f"ignored restart {str(restart)[:40]!r}: it must be one of {RESTART_POINTS}")
        restart = ""
    reason = data.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str):
        raise _Rejected(f"reason must be a string, got {type(reason).__name__}")
    return Proposal(
        hyperparameters=hyperparameters,
        weights=weights,
        alpha=alpha,
        reason=sanitize_reason(reason, problems),
        training=training,
        restart=restart,
    )


def validate_proposal(
    raw: str | dict,
    snapshot: TrainingSnapshot,
    *,
    backend: str = "",
    model: str = "",
    latency_s: float = 0.0,
) -> AdvisorResponse:
    """Check an advisor's raw answer against the bounds in `schema.py` and the snapshot's groups.

    Returns status "valid" (taken as is), "clamped" (taken after recorded repairs) or
    "rejected" (no proposal). Never raises on bad input: a hostile answer is a rejection.
    """
    raw_text = raw if isinstance(raw, str) else _dump(raw)
    problems: list[str] = []
    if len(raw_text) > MAX_RAW_CHARS:
        problems.append(f"raw text cut to its first {MAX_RAW_CHARS} of {len(raw_text)} characters")
        raw_text = raw_text[:MAX_RAW_CHARS]
    try:
        if not isinstance(raw, (str, dict)):
            raise _Rejected(f"answer must be text or a JSON object, got {type(raw).__name__}")
        proposal = _build(_parse(raw, problems), snapshot, problems)
    except _Rejected as error:
        problems.append(str(error))
        return AdvisorResponse(
            proposal=None,
            status="rejected",
            problems=problems,
            raw_text=raw_text,
            latency_s=latency_s,
            backend=backend,
            model=model,
        )
    return AdvisorResponse(
        proposal=proposal,
        status="clamped" if problems else "valid",
        problems=problems,
        raw_text=raw_text,
        latency_s=latency_s,
        backend=backend,
        model=model,
    )


def _dump(raw: Any) -> str:
    try:
        return json.dumps(raw)
    except (TypeError, ValueError, RecursionError):
        return repr(raw)[:MAX_RAW_CHARS]


def parameter_group_sizes(snapshot: TrainingSnapshot) -> dict[str, int]:
    """Numbers per parameter group a weight op may name: the snapshot's layers and, with neuron-group coupling,
    each grouped layer's neuron groups ("features.0.weight#2": the rows of that group)."""
    sizes = {layer.name: int(layer.num_params) for layer in snapshot.layers}
    for module, groups in snapshot.modes_view().neuron_groups.items():
        units = [group.size for group in groups]
        if sum(units) == 0:
            continue
        for name in (f"{module}.weight", f"{module}.bias"):
            if name in sizes and sizes[name] % sum(units) == 0:
                per_unit = sizes[name] // sum(units)
                sizes.update({f"{name}{NEURON_GROUP_MARK}{index}": size * per_unit for index, size in enumerate(units)})
    return sizes


def proposal_violations(proposal: Proposal, snapshot: TrainingSnapshot) -> list[str]:
    """Every way `proposal` breaks a bound or names a group the snapshot lacks (empty if none).

    An independent re-check of the validator's output against the protocol's bounds, for tests and for the
    coordinator to assert on proposals it got from a cache or a file. A training change is checked by
    `orchestration.fitting.fit`, the one rule for what the run's modes take: whatever it would repair is a violation.
    """
    violations: list[str] = []
    group_sizes = parameter_group_sizes(snapshot)

    def check(value: Any, bounds: tuple[float, float], where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            violations.append(f"{where} is not a finite number: {value!r}")
        elif not bounds[0] <= value <= bounds[1]:
            violations.append(f"{where}={value!r} outside {bounds}")

    for name, bounds in HYPERPARAMETER_BOUNDS.items():
        value = getattr(proposal.hyperparameters, name)
        if value is not None:
            check(value, bounds, name)
    if proposal.alpha is not None:
        check(proposal.alpha, ALPHA_BOUNDS, "alpha")
    if len(proposal.weights) > MAX_WEIGHT_OPS:
        violations.append(f"{len(proposal.weights)} weight ops, more than {MAX_WEIGHT_OPS}")
    for index, op in enumerate(proposal.weights):
        if op.op not in WEIGHT_OPS:
            violations.append(f"weights[{index}].op {op.op!r} unknown")
            continue
        if op.group not in group_sizes:
            violations.append(f"weights[{index}].group {op.group!r} unknown")
            continue
        check(op.amount, WEIGHT_OP_AMOUNT_BOUNDS[op.op], f"weights[{index}].amount")
        if op.op == "values":
            size = group_sizes[op.group]
            if op.values is None or len(op.values) != size or size > MAX_EXPLICIT_VALUES:
                violations.append(f"weights[{index}].values does not fit group {op.group!r}")
            else:
                for value in op.values:
                    check(value, (-MAX_ABS_EXPLICIT_VALUE, MAX_ABS_EXPLICIT_VALUE), f"weights[{index}].values")
        elif op.values is not None:
            violations.append(f"weights[{index}].values set on op {op.op!r}")
    if proposal.restart not in ("", *RESTART_POINTS):
        violations.append(f"restart {proposal.restart!r} is not one of {RESTART_POINTS}")
    violations += fit(proposal.training, snapshot.modes_view())[1]
    if not isinstance(proposal.reason, str) or len(proposal.reason) > MAX_REASON_CHARS:
        violations.append("reason is not a string of at most MAX_REASON_CHARS characters")
    elif any(unicodedata.category(ch) in _STRIPPED_CATEGORIES for ch in proposal.reason):
        violations.append("reason holds control characters")
    return violations


_CHOICE_TEXT = re.compile(r'^\s*(?:\{\s*"choice"\s*:\s*"([A-Za-z])"\s*\}|([A-Za-z])[.):]?)\s*$')


def validate_choice(
    raw: str,
    snapshot: TrainingSnapshot,
    *,
    backend: str = "",
    model: str = "",
    latency_s: float = 0.0,
    scores: dict[str, float] | None = None,
) -> AdvisorResponse:
    """Check an advisor's pick from `snapshot.menu` ("B", "B.", or `{"choice": "B"}`) and return the
    chosen option's proposal, itself checked by `validate_proposal` like any other answer.

    An answer that names no option on the menu is rejected; never raises.
    """
    raw_text = raw if isinstance(raw, str) else _dump(raw)
    match = _CHOICE_TEXT.match(raw_text[:200]) if isinstance(raw, str) else None
    key = (match.group(1) or match.group(2)).upper() if match else ""
    option = next((option for option in snapshot.menu if option.key == key), None)
    if option is None:
        keys = ", ".join(option.key for option in snapshot.menu) or "none"
        problem = f"answer {raw_text[:40]!r} names no option on the menu ({keys})"
        return AdvisorResponse.failure("rejected", problem, raw_text=raw_text[:MAX_RAW_CHARS], latency_s=latency_s, backend=backend, model=model)
    chosen = dict(option.proposal)
    probability = (scores or {}).get(key)
    pick = f"advisor chose {key}" + (f" (p={probability:.2f})" if probability is not None else "")
    chosen["reason"] = f"{pick}: {option.label}"
    response = validate_proposal(chosen, snapshot, backend=backend, model=model, latency_s=latency_s)
    response.raw_text = raw_text
    response.choice = key
    response.scores = dict(scores or {})
    return response
