"""`AdvisorConfig`: which advisor backend answers, and how the Serve deployment around it is sized.

Validated on construction so that a bad value fails before Ray starts, with the field named.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

BACKENDS = ("smollm2", "hf", "openai", "heuristic", "scripted", "none")
# Backends that load or call a language model: they run behind Ray Serve, never in-process.
SERVED_BACKENDS = ("smollm2", "hf", "openai")


def _positive_number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"AdvisorConfig.{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"AdvisorConfig.{name} must be {bound}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"AdvisorConfig.{name} must be an integer >= 1, got {value!r}")


@dataclass(kw_only=True, slots=True)
class AdvisorConfig:
    """How the LLM advisor is built and served.

    `backend` picks who answers: "smollm2" (the bundled 135M model, offline), "hf" (any
    transformers model id or local directory in `model`), "openai" (an OpenAI-compatible
    server at `endpoint`), "heuristic" (rules, no model), "scripted" (canned proposals from
    `script`, for tests) or "none" (no advisor at all; nothing is deployed).
    """

    backend: str = "smollm2"
    model: str | None = None  # "hf": model id or local dir; "openai": model name sent to the server
    endpoint: str | None = None  # "openai": base URL, e.g. http://127.0.0.1:8080
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key; unset means no key
    script: str | None = None  # "scripted": JSON file holding a list of proposal dicts
    max_new_tokens: int = 192  # the generation format needs ~70-170 tokens; ~18 tokens/s on 2 CPU cores
    temperature: float = 0.0  # 0.0 = greedy, reproducible
    request_timeout_s: float = 120.0  # per request, queueing in the batch included
    num_replicas: int | str = 1  # an int, or "auto" for Serve autoscaling between 1 and max_replicas
    max_replicas: int = 4  # upper bound when num_replicas == "auto"
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    max_batch_size: int = 8  # snapshots answered by one generate() call
    batch_wait_timeout_s: float = 0.05  # how long a replica waits to fill a batch
    http_host: str = "127.0.0.1"  # Serve's own default host may differ by version; keep it local
    http_port: int = 8000
    route_prefix: str = "/advisor"
    app_name: str = "hybridtrain-advisor"
    prompt_template: str = "advisor_v1"
    nice: int = 10  # CPU priority of the replica process (0-19): advice must not slow training on shared cores

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"AdvisorConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "hf" and not self.model:
            raise ValueError(f"AdvisorConfig.model must name a model id or directory for backend 'hf', got {self.model!r}")
        if self.backend == "openai" and not (
            isinstance(self.endpoint, str) and self.endpoint.startswith(("http://", "https://"))
        ):
            raise ValueError(f"AdvisorConfig.endpoint must be an http(s) URL for backend 'openai', got {self.endpoint!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError(f"AdvisorConfig.model must be a non-empty string or None, got {self.model!r}")
        if self.script is not None and (not isinstance(self.script, str) or not self.script.strip()):
            raise ValueError(f"AdvisorConfig.script must be a file path or None, got {self.script!r}")
        if not isinstance(self.nice, int) or isinstance(self.nice, bool) or not 0 <= self.nice <= 19:
            raise ValueError(f"AdvisorConfig.nice must be an integer in [0, 19], got {self.nice!r}")
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_number("temperature", self.temperature, allow_zero=True)
        _positive_number("request_timeout_s", self.request_timeout_s)
        if self.num_replicas != "auto":
            _positive_int("num_replicas", self.num_replicas)
        _positive_int("max_replicas", self.max_replicas)
        _positive_number("num_cpus_per_replica", self.num_cpus_per_replica, allow_zero=True)
        _positive_number("num_gpus_per_replica", self.num_gpus_per_replica, allow_zero=True)
        _positive_int("max_batch_size", self.max_batch_size)
        _positive_number("batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)
        if not isinstance(self.http_host, str) or not self.http_host:
            raise ValueError(f"AdvisorConfig.http_host must be a host name or IP, got {self.http_host!r}")
        if isinstance(self.http_port, bool) or not isinstance(self.http_port, int) or not 0 < self.http_port < 65536:
            raise ValueError(f"AdvisorConfig.http_port must be an integer in 1..65535, got {self.http_port!r}")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            raise ValueError(f"AdvisorConfig.route_prefix must start with '/', got {self.route_prefix!r}")
        if not isinstance(self.app_name, str) or not self.app_name:
            raise ValueError(f"AdvisorConfig.app_name must be a non-empty string, got {self.app_name!r}")
        if not isinstance(self.prompt_template, str) or not self.prompt_template.replace("_", "").isalnum():
            raise ValueError(
                f"AdvisorConfig.prompt_template must name a template in serve_llm/prompts, got {self.prompt_template!r}"
            )

    @property
    def is_served(self) -> bool:
        """True when this backend runs behind Ray Serve (it loads or calls a language model)."""
        return self.backend in SERVED_BACKENDS

    def model_label(self) -> str:
        """The model name recorded in responses."""
        if self.backend == "smollm2":
            return self.model or "SmolLM2-135M-Instruct.Q4_1.gguf"
        return self.model or self.backend

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdvisorConfig:
        """Build from a dict (a YAML/TOML section); unknown keys raise with the known ones listed."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdvisorConfig has no fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def with_overrides(self, overrides: dict[str, str]) -> AdvisorConfig:
        """A copy with `key=value` strings from the CLI applied, each parsed to its field's type."""
        values = self.to_dict()
        known = {f.name: f for f in dataclasses.fields(self)}
        for key, text in overrides.items():
            if key not in known:
                raise ValueError(f"AdvisorConfig has no field {key!r}; known fields are {sorted(known)}")
            values[key] = _parse_override(key, text, values[key], known[key].type)
        return AdvisorConfig(**values)


def _parse_override(key: str, text: str, current: Any, annotation: Any) -> Any:
    """Parse a CLI string for `key`, guided by its annotation (dataclass annotations are strings here)."""
    annotation = str(annotation)
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    if key == "num_replicas" and text == "auto":
        return "auto"
    try:
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError as error:
        raise ValueError(f"AdvisorConfig.{key} expects a {annotation.split(' ')[0]}, got {text!r}") from error
    return text
