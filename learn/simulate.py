"""Simulated users: chat with a running loopchat and rank its answers, as real users would.

``loopchat simulate`` is how the loop is exercised and measured end to end without people. It
touches the service only through its public HTTP API, with the clients a real integration would
use: the official ``openai`` client asks for ``n=K`` candidates (so ``completion.id`` and
``system_fingerprint`` are read exactly as an application reads them) and ``httpx`` posts the
ranking to ``POST /v1/feedback``. It never reads Redis or imports the server: if the public
contract breaks, the simulation breaks.

Each user holds multi-turn chats made of the built-in corpus' *held-out* prompts
(``learn.builtin.corpus.prompts``), so the rankings judge answers to questions the model
never trained on. A follow-up prompt ("And plus 5?") is asked after its base question, with the
user's favourite answer to the base question kept in the history, so follow-ups really depend
on what the model said before. Every turn is ranked.

A *preference* maps ``(messages, candidates)`` to one score per candidate, higher is better;
equal scores are ties, and a turn whose candidates all score 0 is posted as "all bad". The
built-in ones (``correctness``, ``brevity``, ``politeness``) come from ``learn.builtin.corpus`` and
score in [0, 1]; any ``module:function`` with the same signature works too. The summary's
*preferred-answer rate* of a version is the mean score of the candidates it produced (for
``correctness``: the share of right answers), grouped by ``system_fingerprint``, so a run that
spans a hot swap shows each version separately.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

Messages = list[dict[str, str]]
Preference = Callable[[Messages, list[str]], Sequence[float]]

RATE_LIMIT_PATIENCE_S = 75.0  # the feedback limit is per minute: wait out one window, then fail


def _per_answer(score: Callable[[Messages, str], float]) -> Preference:
    """A preference from a score of one answer."""
    return lambda messages, candidates: [score(messages, c) for c in candidates]


def builtin_preferences() -> dict[str, Preference]:
    """The built-in simulated users' tastes, all scoring in [0, 1] (``learn.builtin.grader``)."""
    from learn.builtin import grader

    return {
        "correctness": _per_answer(grader.correctness),
        "brevity": _per_answer(lambda messages, answer: grader.brevity(answer)),
        "politeness": _per_answer(lambda messages, answer: grader.politeness(answer)),
        # The control users: rankings that carry no signal at all (a learner must gain ~0).
        "shuffled": _per_answer(lambda messages, answer: random.random() + 1e-9),
    }


BUILTIN_NAMES = ("correctness", "brevity", "politeness", "shuffled")


def load_preference(spec: str) -> Preference:
    """A built-in preference by name, or ``module:function`` taking (messages, candidates)."""
    if spec in BUILTIN_NAMES:
        return builtin_preferences()[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown preference {spec!r}: use one of {', '.join(BUILTIN_NAMES)} or module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"preference {spec!r}: cannot import {module_name!r}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"preference {spec!r}: {module_name} has no function {attr!r}")
    return function


class PreferenceError(ValueError):
    """The preference function failed or returned something other than one score each."""


def judge(preference: Preference, messages: Messages, candidates: list[str]) -> list[float]:
    """The preference's scores, checked: one finite number per candidate."""
    try:
        scores = [float(s) for s in preference(messages, candidates)]
    except Exception as exc:  # a user-supplied function: report it, whatever it raised
        raise PreferenceError(f"the preference failed: {type(exc).__name__}: {exc}") from exc
    if len(scores) != len(candidates) or not all(math.isfinite(s) for s in scores):
        raise PreferenceError(
            f"a preference must return one finite score per candidate; got {scores!r} "
            f"for {len(candidates)} candidates"
        )
    return scores


def ranking_from_scores(scores: Sequence[float]) -> list[list[int]]:
    """Best-to-worst tie groups: candidates with equal scores share a group."""
    groups: list[list[int]] = []
    last: float | None = None
    for index in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if last is not None and scores[index] == last:
            groups[-1].append(index)
        else:
            groups.append([index])
        last = scores[index]
    return groups


def feedback_body(completion_id: str, scores: Sequence[float], user: str) -> dict[str, Any]:
    """What a user posts for one turn: the ranking, or "all bad" when nothing scored above 0."""
    if max(scores) <= 0:
        return {"completion_id": completion_id, "ranking": [], "all_bad": True, "user": user}
    return {"completion_id": completion_id, "ranking": ranking_from_scores(scores), "user": user}


def chat_scripts(count: int, seed: int) -> list[list[str]]:
    """Held-out chats as the user turns to send, one after another.

    ``corpus.prompts`` gives held-out prompts, a follow-up one with its base exchange in
    context; here the base question becomes the chat's first turn, so the follow-up is asked
    after the model's own answer.
    """
    from learn.builtin import corpus

    per_task = max(1, math.ceil(count / len(corpus.BENCH_TASKS)))
    return [
        [m["content"] for m in messages if m["role"] == "user"]
        for _, messages in corpus.prompts(per_task, seed=seed, split="heldout")
    ]


@dataclass
class VersionStats:
    """What the simulated users thought of one version's answers."""

    completions: int = 0
    answers: int = 0
    score_sum: float = 0.0

    @property
    def rate(self) -> float:
        """The preferred-answer rate: mean score of its answers."""
        return self.score_sum / self.answers if self.answers else 0.0

    def add(self, scores: Sequence[float]) -> None:
        self.completions += 1
        self.answers += len(scores)
        self.score_sum += sum(scores)


@dataclass
class Summary:
    """The outcome of a simulation: what was posted, what failed, and how each version did."""

    preference: str = ""
    rankings: int = 0
    all_bad: int = 0
    pairs: int = 0
    completions: int = 0
    rate_limited: int = 0
    errors: Counter = field(default_factory=Counter)
    versions: dict[str, VersionStats] = field(default_factory=dict)
    feedback_ids: list[str] = field(default_factory=list)
    first_ranking_at: float | None = None
    last_ranking_at: float | None = None
    seconds: float = 0.0

    def record_answers(self, version: str, scores: Sequence[float]) -> None:
        self.completions += 1
        self.versions.setdefault(version, VersionStats()).add(scores)

    def record_ranking(self, feedback_id: str, pairs: int, all_bad: bool) -> None:
        now = time.time()
        self.rankings += 1
        self.pairs += pairs
        self.all_bad += all_bad
        self.feedback_ids.append(feedback_id)
        self.first_ranking_at = self.first_ranking_at or now
        self.last_ranking_at = now

    def to_dict(self) -> dict[str, Any]:
        return {
            "preference": self.preference,
            "rankings": self.rankings,
            "all_bad": self.all_bad,
            "pairs": self.pairs,
            "completions": self.completions,
            "rate_limited": self.rate_limited,
            "errors": dict(self.errors),
            "seconds": round(self.seconds, 3),
            "versions": {
                v: {"completions": s.completions, "answers": s.answers, "rate": s.rate}
                for v, s in sorted(self.versions.items(), key=lambda kv: _version_order(kv[0]))
            },
        }

    def report(self) -> str:
        """The summary as a few readable lines."""
        errors = ", ".join(f"{k}: {n}" for k, n in sorted(self.errors.items())) or "none"
        lines = [
            f"rankings posted: {self.rankings} ({self.pairs} pairs, {self.all_bad} all-bad) "
            f"from {self.completions} completions in {self.seconds:.1f} s",
            f"errors: {errors}; rate-limited retries: {self.rate_limited}",
            f"preferred-answer rate ({self.preference}) by version:",
        ]
        for version, stats in self.to_dict()["versions"].items():
            lines.append(
                f"  {version}: {stats['rate']:.1%} of {stats['answers']} answers "
                f"({stats['completions']} completions)"
            )
        return "\n".join(lines)


def _version_order(version: str) -> tuple[int, str]:
    digits = version.lstrip("v")
    return (int(digits), version) if digits.isdigit() else (1 << 30, version)


@dataclass
class SimulationConfig:
    """One simulation run."""

    url: str = "http://127.0.0.1:8000"
    users: int = 4
    rankings: int = 100
    preference: str = "correctness"
    k: int = 4
    seed: int = 0
    api_key: str | None = None
    turns: int = 3
    topics: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    timeout_s: float = 120.0
    max_errors: int = 20
    # User turns never to send: a benchmark's evaluation questions, so that what it measures
    # is the model answering questions no simulated user asked (not on the command line).
    avoid: frozenset[str] = frozenset()

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        if not self.url.startswith(("http://", "https://")):
            found.append(f"--url must be an http(s) URL, not {self.url!r}")
        if self.users < 1:
            found.append("--users must be at least 1")
        if self.rankings < 1:
            found.append("--rankings must be at least 1")
        if not 2 <= self.k <= 4:
            found.append(f"--k must be 2, 3 or 4 (candidates to rank), not {self.k}")
        if self.turns < 1:
            found.append("--turns must be at least 1")
        if self.topics < 1:
            found.append("--topics must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            found.append("--max-tokens must be at least 1")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            found.append("--temperature must be between 0 and 2")
        return found


class ServiceClient:
    """The service as an application sees it: the openai client and one plain HTTP POST."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        from openai import AsyncOpenAI

        self.url = url.rstrip("/")
        # No hidden retries: every failure is counted by the caller.
        self.openai = AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0, timeout=timeout_s
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s)
        self._model: str | None = None

    async def model(self) -> str:
        """The served model name, from ``GET /v1/models``."""
        if self._model is None:
            models = await self.openai.models.list()
            self._model = models.data[0].id
        return self._model

    async def complete(self, messages: Messages, n: int, user: str, **sampling: Any) -> Any:
        """One chat completion with ``n`` candidates (an ``openai`` ChatCompletion)."""
        options = {k: v for k, v in sampling.items() if v is not None}
        return await self.openai.chat.completions.create(
            model=await self.model(), messages=messages, n=n, user=user, **options
        )

    async def post_feedback(self, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/v1/feedback", json=body)

    async def aclose(self) -> None:
        await self.openai.close()
        await self.http.aclose()


async def wait_for_round(
    url: str, admin_headers: dict[str, str], known: set[str], timeout_s: float
) -> dict[str, Any] | None:
    """The first round record (``GET /admin/loop``) whose id is not in ``known``, or None."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, headers=admin_headers, timeout=30) as admin:
        while time.monotonic() < deadline:
            try:
                response = await admin.get("/admin/loop", params={"rounds": 1000})
            except httpx.TimeoutException:  # a server starved by the round's training: ask again
                continue
            response.raise_for_status()
            for record in response.json()["rounds"]:
                if record["round"] not in known:
                    return record
            await asyncio.sleep(0.5)
    return None


async def wait_for_version(client: ServiceClient, version: str, timeout_s: float) -> float | None:
    """Wall time (``time.time()``) of the first chat completion answered by ``version``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = await client.complete(
            [{"role": "user", "content": "Hi!"}], 1, "probe", max_tokens=1
        )
        if reply.system_fingerprint == version:
            return time.time()
        await asyncio.sleep(0.05)
    return None


def _error_name(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    return f"chat {status}" if status else f"chat {type(exc).__name__}"


class Simulation:
    """Users sharing one quota of rankings; a ranking counts once the service answered 201."""

    def __init__(self, config: SimulationConfig, preference: Preference, client: ServiceClient):
        self.config = config
        self.preference = preference
        self.client = client
        self.summary = Summary(preference=config.preference)
        # About one chat per ranking to post: real users rarely ask the same thing twice, and
        # a small pool repeated over many rankings teaches PPO those few questions only.
        drawn = chat_scripts(max(64, 4 * config.users, config.rankings), config.seed)
        self.scripts = [s for s in drawn if config.avoid.isdisjoint(s)]
        if not self.scripts:
            raise ValueError("every simulated chat asks a question in avoid")
        self._reserved = 0
        self._stop = asyncio.Event()

    def _take_slot(self) -> bool:
        """Reserve one of the rankings still to post (returned if the attempt fails)."""
        if self._stop.is_set() or self._reserved >= self.config.rankings:
            return False
        self._reserved += 1
        return True

    def _fail(self, name: str) -> None:
        self._reserved -= 1
        self.summary.errors[name] += 1
        if sum(self.summary.errors.values()) >= self.config.max_errors:
            self._stop.set()

    async def run(self) -> Summary:
        started = time.monotonic()
        await asyncio.gather(*(self._user(i) for i in range(self.config.users)))
        self.summary.seconds = time.monotonic() - started
        return self.summary

    async def _user(self, number: int) -> None:
        rng = random.Random(f"{self.config.seed}-{number}")
        name = f"sim-{self.config.seed}-{number}"
        while not self._stop.is_set() and self._reserved < self.config.rankings:
            await self._chat(rng, name)

    async def _chat(self, rng: random.Random, user: str) -> None:
        """One chat: ``topics`` held-out chats one after another (at most ``turns`` turns),
        every turn ranked; the user's favourite answer stays in the history.

        One topic by default: offline, PPO on rankings from three unrelated questions strung
        together did not improve fresh chats at all (-3 points in 3 rounds), on one-topic chats
        it did (+5 in 3 rounds), so strung chats are a choice, not what users are assumed to do.
        """
        history: Messages = []
        turns = [t for _ in range(self.config.topics) for t in rng.choice(self.scripts)]
        for text in turns[: self.config.turns]:
            if not self._take_slot():
                return
            history.append({"role": "user", "content": text})
            best = await self._turn(history, user)
            if best is None:
                return
            history.append({"role": "assistant", "content": best})

    async def _turn(self, messages: Messages, user: str) -> str | None:
        """Ask, score, rank, post; the favourite answer, or None if the turn failed."""
        try:
            completion = await self.client.complete(
                messages,
                self.config.k,
                user,
                max_tokens=self.config.max_tokens,
                temperature=self.config.temperature,
            )
        except Exception as exc:  # any failure of the service is counted, never fatal
            self._fail(_error_name(exc))
            return None
        candidates = [choice.message.content or "" for choice in completion.choices]
        scores = judge(self.preference, messages, candidates)
        self.summary.record_answers(completion.system_fingerprint or "unknown", scores)
        body = feedback_body(completion.id, scores, user)
        if not await self._post(body):
            return None
        return candidates[max(range(len(scores)), key=scores.__getitem__)]

    async def _post(self, body: dict[str, Any]) -> bool:
        """POST one ranking; waits out the per-minute rate limit instead of dropping it."""
        deadline = time.monotonic() + RATE_LIMIT_PATIENCE_S
        wait = 1.0
        while True:
            try:
                response = await self.client.post_feedback(body)
            except httpx.HTTPError as exc:
                self._fail(f"feedback {type(exc).__name__}")
                return False
            if response.status_code == 201:
                reply = response.json()
                self.summary.record_ranking(reply["id"], reply["pairs"], body.get("all_bad", False))
                return True
            if response.status_code == 429 and time.monotonic() + wait < deadline:
                self.summary.rate_limited += 1
                await asyncio.sleep(wait)
                wait = min(2 * wait, 10.0)
                continue
            self._fail(f"feedback {response.status_code}")
            return False


async def run_simulation(config: SimulationConfig, preference: Preference | None = None) -> Summary:
    """Run the simulated users until ``config.rankings`` rankings are stored (or too many
    errors); ``preference`` defaults to loading ``config.preference``."""
    preference = preference or load_preference(config.preference)
    client = ServiceClient(config.url, config.api_key, config.timeout_s)
    try:
        return await Simulation(config, preference, client).run()
    finally:
        await client.aclose()


async def sample_candidates(
    client: ServiceClient,
    prompts: list[Messages],
    k: int,
    concurrency: int = 8,
    **sampling: Any,
) -> list[tuple[str, list[str]]]:
    """(version, ``k`` answers) for each prompt, in prompt order, posting no feedback: what a
    benchmark uses to follow the live model without feeding the loop."""
    gate = asyncio.Semaphore(concurrency)

    async def one(messages: Messages) -> tuple[str, list[str]]:
        async with gate:
            completion = await client.complete(messages, k, "sim-eval", **sampling)
        candidates = [choice.message.content or "" for choice in completion.choices]
        return completion.system_fingerprint or "unknown", candidates

    return list(await asyncio.gather(*(one(p) for p in prompts)))
