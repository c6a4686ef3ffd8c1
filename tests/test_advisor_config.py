"""AdvisorConfig: defaults, validation messages that name the field, CLI-style overrides."""

from __future__ import annotations

import pytest

from cluster.experiment import build_config
from serve_llm.config import SERVED_BACKENDS, AdvisorConfig


def test_defaults_are_valid_and_local() -> None:
    config = AdvisorConfig()
    assert config.backend == "smollm2"
    assert config.temperature == 0.0
    assert config.http_host == "127.0.0.1"
    assert config.route_prefix == "/advisor"
    assert config.is_served


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"backend": "gpt"}, "backend"),
        ({"backend": "hf"}, "model"),
        ({"backend": "openai"}, "endpoint"),
        ({"backend": "openai", "endpoint": "localhost:80"}, "endpoint"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"request_timeout_s": float("nan")}, "request_timeout_s"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"num_replicas": "many"}, "num_replicas"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"num_gpus_per_replica": -0.5}, "num_gpus_per_replica"),
        ({"http_port": 70000}, "http_port"),
        ({"route_prefix": "advisor"}, "route_prefix"),
        ({"prompt_template": "../etc/passwd"}, "prompt_template"),
    ],
)
def test_bad_values_name_the_field_and_quote_the_value(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=rf"advisor\.{named}") as caught:
        AdvisorConfig(**fields)
    bad = next(iter(fields.values())) if named in fields else fields.get(named)
    assert repr(bad) in str(caught.value)


def test_overrides_parse_types_and_reject_unknown_fields() -> None:
    """The advisor's `--set` goes through the one override parser every section uses."""
    sets = ["advisor.backend=heuristic", "advisor.max_batch_size=4", "advisor.temperature=0.5", "advisor.model=null",
            "advisor.num_replicas=auto"]
    config = build_config(overrides=sets).advisor
    assert (config.backend, config.max_batch_size, config.temperature, config.model) == ("heuristic", 4, 0.5, None)
    assert config.num_replicas == "auto"
    with pytest.raises(ValueError, match=r"advisor\.colour"):
        build_config(overrides=["advisor.colour=red"])
    with pytest.raises(ValueError, match="max_batch_size"):
        build_config(overrides=["advisor.max_batch_size=lots"])


def test_round_trip_and_served_backends() -> None:
    config = AdvisorConfig(backend="openai", endpoint="http://127.0.0.1:9/v1", model="m")
    assert AdvisorConfig.from_dict(config.to_dict()) == config
    assert set(SERVED_BACKENDS) == {"smollm2", "hf", "openai"}
    assert not AdvisorConfig(backend="heuristic").is_served
    with pytest.raises(ValueError, match="valid keys"):
        AdvisorConfig.from_dict({"backend": "heuristic", "extra": 1})
