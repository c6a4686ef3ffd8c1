"""Advisor latency through Ray Serve with batching: p50/p95 per request and proposals/s, for 1
and for 8 concurrent requests, on the default model (SmolLM2-135M on CPU unless told otherwise).

    python benchmarks/advisor_latency.py [--requests 3] [--rounds 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time
import urllib.request

from serve_llm.backends import HeuristicBackend
from serve_llm.client import AdvisorClient
from serve_llm.config import AdvisorConfig
from serve_llm.examples import example_snapshots
from serve_llm.validate import AdvisorResponse


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _lr_direction(response: AdvisorResponse) -> int:
    """-1 lower lr, 0 keep, +1 raise: the coarsest reading of what an answer asks for."""
    scale = response.proposal.hyperparameters.lr_scale if response.proposal is not None else None
    return 0 if scale is None or abs(scale - 1.0) < 1e-6 else (1 if scale > 1.0 else -1)


def _measure(client: AdvisorClient, concurrency: int, total: int) -> dict[str, float]:
    """Latency per request and throughput; `lr_agreement` is a crude quality figure: how often the
    model moves the learning rate the same way as the rule-based baseline."""
    snapshots = example_snapshots(total)
    baseline = HeuristicBackend().propose_batch(snapshots)
    latencies: list[float] = []
    responses: dict[int, AdvisorResponse] = {}

    def one(index: int) -> None:
        started = time.perf_counter()
        responses[index] = client.ask(snapshots[index])
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(total)))
    wall = time.perf_counter() - started
    parsed = sum(response.status in ("valid", "clamped") for response in responses.values())
    agree = sum(_lr_direction(responses[index]) == _lr_direction(baseline[index]) for index in range(total))
    return {
        "concurrency": concurrency,
        "requests": total,
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(_percentile(latencies, 0.95), 2),
        "proposals_per_s": round(total / wall, 3),
        "parse_rate": parsed / total,
        "lr_agreement": agree / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3, help="sequential requests at concurrency 1")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 8 concurrent requests")
    parser.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="AdvisorConfig override")
    args = parser.parse_args()

    from cluster.runtime import ClusterConfig, connect
    from serve_llm.deployment import deploy_advisor, http_url

    overrides = dict(pair.split("=", 1) for pair in args.set)
    overrides.setdefault("num_cpus_per_replica", "2")  # torch threads in the replica follow its CPUs
    overrides.setdefault("app_name", "advisor-benchmark")
    config = AdvisorConfig(max_batch_size=8, batch_wait_timeout_s=0.2, request_timeout_s=900.0).with_overrides(overrides)
    connect(ClusterConfig(address=args.address, num_cpus=4, dashboard=False), min_cpus=4)
    started = time.perf_counter()
    handle = deploy_advisor(config)
    print(f"deployed {config.backend} ({config.model_label()}) in {time.perf_counter() - started:.1f}s")
    with urllib.request.urlopen(http_url(config), timeout=30) as reply:
        print("health:", json.loads(reply.read()))
    client = AdvisorClient(config, handle)
    client.ask(example_snapshots(1)[0])  # warm-up: the first generate is several times slower
    results = [_measure(client, 1, args.requests), _measure(client, 8, 8 * args.rounds)]
    print(f"{'concurrency':>11} {'requests':>8} {'p50 s':>7} {'p95 s':>7} {'proposals/s':>11} {'parsed':>6} "
          f"{'lr agrees':>9}")
    for row in results:
        print(f"{row['concurrency']:>11} {row['requests']:>8} {row['p50_s']:>7} {row['p95_s']:>7} "
              f"{row['proposals_per_s']:>11} {row['parse_rate']:>6.0%} {row['lr_agreement']:>9.0%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
