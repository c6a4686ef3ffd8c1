"""`AdvisorConfig`: which advisor backend answers, and how the Serve deployment around it is sized.

Validated on construction so that a bad value fails before Ray starts, with the field named.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from orchestration.settings import build_section, is_int, is_number, require

BACKENDS = ("smollm2", "hf", "openai", "heuristic", "scripted", "none")
# Backends that load or call a language model: they run behind Ray Serve, never in-process.
SERVED_BACKENDS = ("smollm2", "hf", "openai")


def _positive_number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    require(is_number(value), f"advisor.{name}", value, "must be a finite number")
    require(value > 0 or (allow_zero and value == 0), f"advisor.{name}", value, "must be >= 0" if allow_zero else "must be > 0")


def _positive_int(name: str, value: Any) -> None:
    require(is_int(value) and value >= 1, f"advisor.{name}", value, "must be an integer >= 1")


@dataclass(kw_only=True, slots=True)
class AdvisorConfig:
    """How the LLM advisor is built and served.

    `backend` picks who answers: "smollm2" (the bundled 135M model, offline), "hf" (any
    transformers model id or local directory in `model`), "openai" (an OpenAI-compatible
    server at `endpoint`), "heuristic" (rules, no model), "scripted" (canned proposals from
    `script`, for tests) or "none" (no advisor at all; nothing is deployed). Language models
    always run behind Ray Serve; "heuristic" and "scripted" answer inside the coordinator unless
    `serve` puts them behind Serve too (one deployment every node reaches, as a model would be).
    """

    backend: str = "smollm2"
    model: str | None = None  # "hf": model id or local dir; "openai": model name sent to the server
    endpoint: str | None = None  # "openai": base URL, e.g. http://127.0.0.1:8080
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key; unset means no key
    script: str | None = None  # "scripted": JSON file holding a list of proposal dicts
    serve: bool = False  # "heuristic"/"scripted": deploy them on Ray Serve like a model (models are always served)
    max_new_tokens: int = 192  # the generation format needs ~70-170 tokens; ~18 tokens/s on 2 CPU cores
    temperature: float = 0.0  # 0.0 = greedy, reproducible
    request_timeout_s: float = 120.0  # per request, queueing in the batch included
    # A run deploys its advisor while its workers start: questions asked before the replicas have loaded the model
    # wait for them this long (not counted in request_timeout_s), then are recorded as timeouts.
    deploy_timeout_s: float = 600.0
    # "openai": the whole HTTP exchange (connect to last byte), not each socket read; None = request_timeout_s
    reply_deadline_s: float | None = None
    max_reply_bytes: int = 1_048_576  # "openai": a reply past this is refused unread (one proposal's reply is ~1-3 KB)
    num_replicas: int | str = 1  # an int, or "auto" for Serve autoscaling between 1 and max_replicas
    max_replicas: int = 4  # upper bound when num_replicas == "auto"
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    max_batch_size: int = 8  # snapshots answered by one generate() call
    batch_wait_timeout_s: float = 0.05  # how long a replica waits to fill a batch
    # Serve's own default host may differ by version; keep it local. Another address (0.0.0.0: every interface) opens
    # the route, which has no authentication, to whoever reaches it: set it only on purpose (a warning says so).
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    route_prefix: str = "/advisor"
    max_request_bytes: int = 262_144  # HTTP route: a larger POST body is refused with 413 (a snapshot is ~3 KB, ~20 KB for 60 layers)
    max_history: int = 256  # HTTP route: entries allowed in each history of a posted snapshot (losses, accuracies, proposals)
    app_name: str = "hybridtrain-advisor"
    prompt_template: str = "advisor_v1"  # for answers written from scratch (coordinator.advice_mode: invent)
    choose_template: str = "advisor_choose_v1"  # for picks from the coordinator's menu (advice_mode: choose)
    menu_orders: int = 2  # orders a menu is scored in (as listed, reversed, then rotations): cancels the model's bias for a position
    nice: int = 10  # CPU priority of the replica process (0-19): advice must not slow training on shared cores
    # The replica's compute threads under Linux SCHED_IDLE: they get a core only when nothing else wants it, so on
    # cores shared with training an answer waits for idle time instead of slowing the training. None = on for
    # CPU replicas, off for GPU replicas (their threads only feed the GPU and must not queue behind data loading).
    idle_cpu: bool | None = None

    def __post_init__(self) -> None:
        require(self.backend in BACKENDS, "advisor.backend", self.backend, f"must be one of {BACKENDS}")
        require(isinstance(self.serve, bool), "advisor.serve", self.serve, "must be true or false")
        require(not (self.serve and self.backend == "none"), "advisor.serve", self.serve, "needs an advisor; advisor.backend is 'none'")
        require(self.backend != "hf" or bool(self.model), "advisor.model", self.model, "must name a model id or directory for backend 'hf'")
        require(self.backend != "openai" or (isinstance(self.endpoint, str) and self.endpoint.startswith(("http://", "https://"))),
                "advisor.endpoint", self.endpoint, "must be an http(s) URL for backend 'openai'")
        require(self.model is None or (isinstance(self.model, str) and bool(self.model.strip())), "advisor.model", self.model,
                "must be a non-empty string or None")
        require(self.script is None or (isinstance(self.script, str) and bool(self.script.strip())), "advisor.script", self.script,
                "must be a file path or None")
        require(is_int(self.nice) and 0 <= self.nice <= 19, "advisor.nice", self.nice, "must be an integer in [0, 19]")
        require(self.idle_cpu is None or isinstance(self.idle_cpu, bool), "advisor.idle_cpu", self.idle_cpu, "must be true, false or null (auto)")
        # The value is not echoed: a key pasted here by mistake must not reach the terminal or a log.
        require(isinstance(self.api_key_env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", self.api_key_env) is not None,
                "advisor.api_key_env", "(not shown)", "must be the NAME of an environment variable holding the key, never the key itself")
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_number("temperature", self.temperature, allow_zero=True)
        _positive_number("request_timeout_s", self.request_timeout_s)
        _positive_number("deploy_timeout_s", self.deploy_timeout_s)
        if self.reply_deadline_s is not None:
            _positive_number("reply_deadline_s", self.reply_deadline_s)
        _positive_int("max_reply_bytes", self.max_reply_bytes)
        if self.num_replicas != "auto":
            _positive_int("num_replicas", self.num_replicas)
        _positive_int("max_replicas", self.max_replicas)
        _positive_number("num_cpus_per_replica", self.num_cpus_per_replica, allow_zero=True)
        _positive_number("num_gpus_per_replica", self.num_gpus_per_replica, allow_zero=True)
        _positive_int("max_batch_size", self.max_batch_size)
        _positive_number("batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)
        require(isinstance(self.http_host, str) and bool(self.http_host), "advisor.http_host", self.http_host, "must be a host name or IP")
        require(is_int(self.http_port) and 0 < self.http_port < 65536, "advisor.http_port", self.http_port, "must be an integer in 1..65535")
        require(isinstance(self.route_prefix, str) and self.route_prefix.startswith("/"), "advisor.route_prefix", self.route_prefix,
                "must start with '/'")
        require(isinstance(self.app_name, str) and bool(self.app_name), "advisor.app_name", self.app_name, "must be a non-empty string")
        _positive_int("menu_orders", self.menu_orders)
        _positive_int("max_request_bytes", self.max_request_bytes)
        _positive_int("max_history", self.max_history)
        for name in ("prompt_template", "choose_template"):
            value = getattr(self, name)
            require(isinstance(value, str) and value.replace("_", "").isalnum(), f"advisor.{name}", value, "must name a template in serve_llm/prompts")

    def template_for(self, snapshot: Any) -> str:
        """The prompt template for a snapshot: the choosing one when it carries a menu."""
        return self.choose_template if getattr(snapshot, "menu", None) else self.prompt_template

    @property
    def reply_deadline(self) -> float:
        """Seconds the OpenAI-compatible backend gives one whole exchange: `reply_deadline_s`, else `request_timeout_s`."""
        return self.request_timeout_s if self.reply_deadline_s is None else float(self.reply_deadline_s)

    @property
    def wants_idle_cpu(self) -> bool:
        """Whether the replica's compute threads should run under SCHED_IDLE (`idle_cpu`, or auto: CPU replicas)."""
        return self.num_gpus_per_replica == 0 if self.idle_cpu is None else self.idle_cpu

    @property
    def is_served(self) -> bool:
        """True when this backend runs behind Ray Serve (it loads or calls a language model, or `serve` asks for it)."""
        return self.backend in SERVED_BACKENDS or (self.serve and self.backend != "none")

    def model_label(self) -> str:
        """The model name recorded in responses."""
        if self.backend == "smollm2":
            return self.model or "SmolLM2-135M-Instruct.Q4_1.gguf"
        return self.model or self.backend

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def served_cpus(self) -> float:
        """Logical CPUs the Serve deployment may hold at once (0 when nothing is served)."""
        return self.num_cpus_per_replica * self.replicas_upper_bound if self.is_served else 0.0

    @property
    def replicas_upper_bound(self) -> int:
        """The most replicas this config can run at once ("auto" scales up to `max_replicas`)."""
        return self.max_replicas if self.num_replicas == "auto" else int(self.num_replicas)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdvisorConfig:
        """Build from a mapping (a YAML section); unknown keys raise with the valid ones listed."""
        return build_section(cls, data, "advisor")
