"""How far to trust the advisor, per parameter group: multiplicative increase/decrease of alpha.

Every group starts at `stability_alpha`. After a verdict on a proposal touching a group:
`alpha <- min(alpha * alpha_up, alpha_max)` if accepted,
`alpha <- max(alpha * alpha_down, alpha_min)` if rejected.
A group at alpha 0 (stability_alpha = 0, "blending off") stays at 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from orchestration.config import CoordinatorConfig


class AlphaController:
    """Per-group blend factors that grow with accepted proposals and shrink with rejected ones."""

    def __init__(
        self,
        *,
        stability_alpha: float,
        alpha_min: float,
        alpha_max: float,
        alpha_up: float,
        alpha_down: float,
    ) -> None:
        """Values as `CoordinatorConfig` checked them (build with `from_config`)."""
        self.stability_alpha = stability_alpha
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.alpha_up = alpha_up
        self.alpha_down = alpha_down
        self.alphas: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> AlphaController:
        return cls(stability_alpha=config.stability_alpha, alpha_min=config.alpha_min, alpha_max=config.alpha_max,
                   alpha_up=config.alpha_up, alpha_down=config.alpha_down)

    def current(self, group: str) -> float:
        """The group's alpha now (`stability_alpha` for a group never judged)."""
        return self.alphas.get(group, self.stability_alpha)

    def for_proposal(self, proposal: Any, expand: Callable[[str], list[str]] = lambda group: [group]) -> dict[str, float]:
        """The alpha of each group a proposal's weight ops touch (`alpha_for`), except groups it only
        re-draws dead units of: those take the proposal's own alpha (1 if unset). A dead unit
        contributes nothing, so re-drawing it moves no working weight, and blended at alpha 0.1 a
        unit whose bias is far below zero stays dead. A group at 0 (blending off) stays at 0.
        `expand` names the groups an op's group stands for (neuron-group coupling: a layer's neuron groups)."""
        ops_by_group: dict[str, list[Any]] = {}
        for op in proposal.weights:
            for group in expand(op.group):
                ops_by_group.setdefault(group, []).append(op)
        alphas = self.alpha_for(ops_by_group, proposal.alpha)
        for group, ops in ops_by_group.items():
            if alphas[group] > 0 and all(op.op == "reinit_dead" for op in ops):
                alphas[group] = 1.0 if proposal.alpha is None else float(proposal.alpha)
        return alphas

    def alpha_for(self, groups: Iterable[str], suggested: float | None = None) -> dict[str, float]:
        """The alpha to blend each group with.

        A proposal's `suggested` alpha may lower a group's alpha (down to `alpha_min`) but never
        raise it: `alpha = min(current, max(suggested, alpha_min))`; a group at 0 stays at 0.
        """
        result = {}
        for group in groups:
            current = self.current(group)
            if suggested is None or current == 0.0:
                result[group] = current
            else:
                result[group] = min(current, max(float(suggested), self.alpha_min))
        return result

    def update(self, groups: Iterable[str], accepted: bool) -> dict[str, float]:
        """Adapt the alphas of `groups` to a verdict; returns their new values."""
        for group in groups:
            current = self.current(group)
            if current == 0.0:
                continue
            if accepted:
                self.alphas[group] = min(current * self.alpha_up, self.alpha_max)
            else:
                self.alphas[group] = max(current * self.alpha_down, self.alpha_min)
        return {group: self.current(group) for group in groups}

    def to_state(self) -> dict[str, Any]:
        """JSON-able state: settings and per-group alphas."""
        return {
            "stability_alpha": self.stability_alpha,
            "alpha_min": self.alpha_min,
            "alpha_max": self.alpha_max,
            "alpha_up": self.alpha_up,
            "alpha_down": self.alpha_down,
            "alphas": dict(self.alphas),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AlphaController:
        """Rebuild from `to_state` output."""
        controller = cls(
            stability_alpha=state["stability_alpha"],
            alpha_min=state["alpha_min"],
            alpha_max=state["alpha_max"],
            alpha_up=state["alpha_up"],
            alpha_down=state["alpha_down"],
        )
        controller.alphas = {str(group): float(alpha) for group, alpha in state["alphas"].items()}
        return controller
