"""`hybridtrain advisor ...`: serve the advisor on Ray, or ask it about one snapshot file.

    hybridtrain advisor serve [--address ADDR] [--host ADDRESS] [--set key=value ...]
    hybridtrain advisor ask SNAPSHOT.json [--backend heuristic] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from cluster.experiment import build_config
from orchestration.protocol import TrainingSnapshot
from serve_llm.config import AdvisorConfig

logger = logging.getLogger(__name__)


def _config_from_args(args: argparse.Namespace) -> AdvisorConfig:
    """The `advisor` section after `--set` (`advisor.KEY=VALUE`, or `KEY=VALUE` for short) and `--backend`,
    through the same parser and checks as `hybridtrain run --set`."""
    overrides = [text if text.startswith("advisor.") else f"advisor.{text}" for text in args.set or []]
    if getattr(args, "backend", None):
        overrides.append(f"advisor.backend={args.backend}")
    if getattr(args, "host", None):
        overrides.append(f"advisor.http_host={args.host}")
    return build_config(overrides=overrides).advisor


def _connect(address: str | None) -> None:
    """Connect to Ray at `address` (or RAY_ADDRESS), else start an embedded local Ray."""
    from cluster.runtime import ClusterConfig, connect

    # An advisor replica plus the Serve controller and proxy need a few logical CPUs.
    connect(ClusterConfig(address=address), min_cpus=4)


def _usable_config(args: argparse.Namespace) -> AdvisorConfig | None:
    """The advisor config from the command line, or None after saying why it cannot be used."""
    try:
        config = _config_from_args(args)
    except ValueError as error:
        print(f"bad advisor setting: {error}", file=sys.stderr)
        return None
    if config.backend == "none":
        print("advisor backend is 'none': there is no advisor to serve or ask", file=sys.stderr)
        return None
    return config


def _serve(args: argparse.Namespace) -> int:
    from cluster.runtime import prepare_to_join

    prepare_to_join(args.address or os.environ.get("RAY_ADDRESS"))  # before Ray is imported (serve_llm.deployment does)
    from serve_llm.deployment import deploy_advisor, http_url

    config = _usable_config(args)
    if config is None:
        return 2
    _connect(args.address)
    deploy_advisor(config)
    print(f"[hybridtrain] advisor ({config.backend}, {config.model_label()}) serving at {http_url(config)}"
          " - POST a snapshot JSON, GET for health; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(config.app_name)
        print("[hybridtrain] advisor stopped", flush=True)
    return 0


def _load_snapshot(path: str) -> TrainingSnapshot:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return TrainingSnapshot.from_dict(json.loads(text))


def _ask(args: argparse.Namespace) -> int:
    from serve_llm.client import AdvisorClient, make_client

    config = _usable_config(args)
    if config is None:
        return 2
    try:
        snapshot = _load_snapshot(args.snapshot)
    except (OSError, ValueError, TypeError) as error:
        print(f"cannot read snapshot {args.snapshot}: {error}", file=sys.stderr)
        return 2
    client: Any
    if config.is_served:
        from cluster.runtime import prepare_to_join

        prepare_to_join(args.address or os.environ.get("RAY_ADDRESS"))  # before Ray is imported
        from serve_llm.deployment import deploy_advisor, get_advisor_handle, is_deployed

        _connect(args.address)
        if is_deployed(config):
            handle = get_advisor_handle(config)
        else:
            print(f"[hybridtrain] deploying the advisor ({config.backend}) ...", file=sys.stderr, flush=True)
            handle = deploy_advisor(config, http=False)  # asked through its handle
        client = AdvisorClient(config, handle)
    else:
        client = make_client(config)
    response = client.ask(snapshot, timeout_s=args.timeout)
    print(json.dumps(response.to_dict(), indent=2))
    return 0 if response.usable else 1


def register(subparsers: Any) -> None:
    """Add the `advisor` command (with `serve` and `ask`) to an argparse subparsers object."""
    advisor = subparsers.add_parser("advisor", help="serve or query the LLM training advisor")
    commands = advisor.add_subparsers(dest="advisor_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--address", default=None,
                            help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override an advisor setting, e.g. --set advisor.max_batch_size=4 (repeatable)")

    serve_parser = commands.add_parser("serve", help="deploy the advisor on Ray Serve and block until Ctrl-C")
    serve_parser.add_argument("--host", default=None, metavar="ADDRESS",
                              help="address the HTTP route listens on (default 127.0.0.1, this machine only; 0.0.0.0 opens "
                                   "it, unauthenticated, to every network the machine is on)")
    common(serve_parser)
    serve_parser.set_defaults(func=_serve)

    ask_parser = commands.add_parser("ask", help="print the advisor's validated answer for one snapshot JSON")
    ask_parser.add_argument("snapshot", help="snapshot JSON file (a partial snapshot is accepted; '-' = stdin)")
    ask_parser.add_argument("--backend", default=None,
                            help="advisor backend (smollm2, hf, openai, heuristic, scripted); "
                                 "heuristic and scripted run here without Ray")
    ask_parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for the answer")
    common(ask_parser)
    ask_parser.set_defaults(func=_ask)
