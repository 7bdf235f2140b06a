"""One learning round: new rankings -> reward model -> learner -> candidate -> gate -> (promote).

A round reads top to bottom in :func:`run_round`. It runs in the Celery worker
(``learn.tasks.run_round``) or in the CLI (``loopchat learn round``); both call the same code.

**One at a time.** A round holds the Redis lock ``loopchat:loop:lock`` (``SET NX`` with an
expiry, renewed by a thread while the round runs, through Redis restarts, so a dead worker's
lock lapses by itself). A second round that finds it taken returns ``{"skipped": …}`` at once
and gives back the trigger counts it was queued with; the rankings it would have used stay in
the stream for the next round. A round whose lock lapsed (an outage longer than the expiry)
commits nothing: the commit checks the lock's token in its own transaction.

**Which rankings.** New rankings come from the feedback stream through the consumer group
(``serve.events.FeedbackLog``). While a round holds the lock no other round runs, so anything
still pending in the group was left by a round that died: the round first reclaims all of it
(``reclaim_idle_ms``, default 0), then reads new entries, and acks them only after it is
committed. Every usable ranking reaches training exactly once (:func:`select_rankings`): the
round trains on its new rankings and on those the previous round held out, and holds out the
newest share (``heldout_fraction``) of them from the reward model *and* the learner, for the
gate; those are trained on in the next round. Rankings that order nothing (all tied, all bad)
are consumed and counted by reason (``loopchat:loop:unusable``). No identity (API key or
address) holds more than ``max_identity_share`` of a round: the surplus of one that does is
consumed untrained (``learn.identity_caps``; counted in the record's ``data_window.capped``).
The reward model also replays the ``rm_replay`` rankings before them, warm-starting from the
previous one.

**What a round reads.** Never the whole stream: its new rankings (through the group), the ones
the previous round held out (by id), and the newest ``history_window`` rankings, where the
replay and the on-policy prompts come from (:func:`round_history`). After its commit and acks
it trims the stream to ``LOOPCHAT_FEEDBACK_RETENTION`` rankings, never one still pending, not
yet delivered to the group, or held out for the next round (``FeedbackLog.trim``; the
``loopchat:feedback:trimmed`` counter keeps the all-time total).

**Continuity.** The learner (``LOOPCHAT_LEARNER``: ppo, rloo, dpo or bon; ``learn.learner``)
starts from the previous round's candidate and trainer state whether or not it was promoted
(:func:`continuation`); its KL reference stays the SFT model; the gate decides only what goes
live.

**Idempotent.** The task id is the round id. A round is committed in one Redis transaction
(round record, ``last_id``, the stream ids it consumed added to ``loopchat:loop:counted``, the
held-out ids, the learner's position, the unusable counts); only then is its candidate promoted
(when it passed and ``LOOPCHAT_AUTO_PROMOTE`` is on) and its entries acked (and removed from
``counted`` again). So:

- a redelivered task whose round was committed finds ``loopchat:loop:round:<id>`` and returns
  the stored record without training again, promoting the candidate and acking its entries if
  the dead worker had not got that far (:func:`finish_promotion`, :func:`ack_committed`);
- a redelivered task whose round died before committing trains again from where the dead
  attempt started (not from the reward model that attempt registered), so no ranking reaches
  the reward model twice;
- an entry redelivered because its round died between commit and ack is found in ``counted``,
  acked, and not counted a second time;
- a round that dies before committing counted nothing; its entries are reclaimed by the next.

A round that skips (lock taken, too few new rankings, no ranking that orders two answers)
returns ``{"round", "skipped": reason}``, consumes nothing and writes nothing.

Redis keys (``serve.events``; prefix ``loopchat:loop:``), read by ``GET /admin/loop`` and the
ops page:

- ``rounds`` — list of JSON round records, oldest first (the last ``keep_rounds``). A finished
  round::

    {"round": "<id>", "status": "done",
     "started_at": float, "finished_at": float,                       # unix time
     "stream": {"first": "<entry id>", "last": "<entry id>", "count": int},   # consumed
     "rankings_new": int,          # new rankings this round consumed (each counted once)
     "rankings_total": int,        # rankings ever stored (kept + trimmed) when the round read
     "rankings_unusable": {"all_tied": int, "all_bad": int},   # of the new ones
     "data_window": {"first": id, "last": id, "train": int, "heldout": int, "replay": int,
                     "capped": int},
     "live": "vN", "start": "vN", "reference": "vN",   # live, the learner's start, SFT
     "learner": "rloo",
     "rm": {"version": "rm-N", ...learn.reward metrics: heldout_accuracy, reward_mean, ...},
     "policy": {...the learner's metrics (learn.ppo / rloo / dpo / bon)},
     "gate": {"passed": bool, "reasons": [...], "reason": str, ...numbers (learn.gate)},
     "candidate": "vN", "promoted": bool,   # promoted on the gate alone only with A/B off
     "promote_refused": str | None,    # why auto-promote did not (a rollback pins live)
     "ab_under_test": "vM" | null,   # the candidate kept in mixed slates (vN did not replace it)
     "timings": {"read", "reward", "learn", "register", "gate", "total"}}   # seconds

  A round that raised: ``{"round", "status": "failed", "started_at", "finished_at",
  "error"}`` (its rankings stay pending for the next round).
- ``last_id`` — the newest stream entry id any committed round consumed (rankings after it
  are "since the last round").
- ``round:<id>`` — the committed record of round ``<id>`` (expires after a week).
- ``counted`` — stream ids committed but possibly not yet acked (normally empty).
- ``heldout`` — the ids the last round held out; ``learner`` — where the learner continues
  from (the round record's ``continue_from``: learner, candidate, length of the registry
  history then); ``unusable`` — counts of rankings that order nothing.
- ``lock`` — the round lock. ``since_round`` — the trigger's counter (``serve/loop_trigger.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import LockError

from learn.bon import BoNConfig
from learn.data import ptx_texts
from learn.dpo import DPOConfig
from learn.gate import GateConfig, evaluate_gate
from learn.identity_caps import cap_per_identity
from learn.learner import RoundData, learner, load_state
from learn.modeling import LoraOptions
from learn.ppo import PPOConfig
from learn.reward import RewardConfig, train_reward_model
from learn.rloo import RLOOConfig
from serve.adapters import learns_with_lora
from serve.events import (
    COUNTED,
    HELDOUT,
    LAST_ID,
    LEARNER_STATE,
    ROUND_LOCK,
    ROUNDS,
    SINCE_ROUND,
    UNUSABLE,
    FeedbackEvent,
    FeedbackLog,
    round_key,
    stream_order,
    unusable_reason,
)
from serve.registry import Pinned, Registry
from serve.settings import Settings
from serve.store import resolve_redis_url, sync_client

log = logging.getLogger(__name__)

ROUND_TTL_S = 7 * 24 * 3600

Entry = tuple[str, FeedbackEvent]


@dataclass
class LoopConfig:
    """How big one round is. Defaults suit the built-in ~1M model on CPU (a round about a
    minute, inside the 2 minutes from a round's last ranking to its version live); raise them
    on a GPU worker."""

    max_new_rankings: int = field(
        default=4096, metadata={"help": "Most new rankings one round consumes from the stream."}
    )
    min_new_rankings: int = field(
        default=1,
        metadata={"help": "Skip the round (consume nothing) with fewer new rankings than this."},
    )
    learner: str = field(
        default="rloo",
        metadata={"help": "ppo, rloo, dpo or bon (learn/learner.py); LOOPCHAT_LEARNER sets it."},
    )
    rm_replay: int = field(
        default=256,
        metadata={
            "help": "Older rankings replayed with the new ones when the reward model refreshes "
            "(0 = none). Every new ranking is always trained on; the replay only steadies the "
            "warm-started model."
        },
    )
    heldout_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Newest share of the usable rankings held out of reward-model and policy "
            "training this round: the gate judges the candidate on them. They are trained on "
            "in the next round, so every ranking still reaches training once."
        },
    )
    max_heldout: int = field(
        default=64, metadata={"help": "Cap on held-out rankings (the gate scores each one)."}
    )
    max_identity_share: float = field(
        default=0.25,
        metadata={
            "help": "Most of a round's rankings (trained on, held out, replayed) one identity "
            "(API key or address, not the `user` label) may hold; the rest of its rankings "
            "are consumed untrained (learn/identity_caps.py). 1 = no cap."
        },
    )
    history_window: int = field(
        default=8192,
        metadata={
            "help": "Newest rankings of the stream a round reads besides its new ones and the "
            "last round's held-out ones: the reward model's replay and the on-policy prompts "
            "come from them. A round never reads the whole stream."
        },
    )
    max_prompts: int = field(
        default=1024,
        metadata={
            "help": "Prompts of the on-policy learners (ppo, rloo, bon): the most recent distinct "
            "conversations of the round's rankings (history_window) but the held-out ones. Many "
            "distinct prompts make the gain carry over to new questions: offline, with the true "
            "correctness as reward, PPO on 1,024 prompts raised held-out prompts by 7 points, on "
            "128 prompts by 2."
        },
    )
    ptx_texts: int = field(
        default=256,
        metadata={
            "help": "Pre-training texts drawn for the PPO-ptx term (0 = no ptx); where they "
            "come from is the LOOPCHAT_PTX setting."
        },
    )
    lock_ttl_s: float = field(
        default=60.0,
        metadata={"help": "Round lock expiry; renewed every third of it while the round runs."},
    )
    reclaim_idle_ms: int = field(
        default=0,
        metadata={
            "help": "Reclaim pending entries idle this long. Under the lock every pending entry "
            "belongs to a dead round, so 0 is safe."
        },
    )
    keep_rounds: int = field(
        default=1000, metadata={"help": "Round records kept in loopchat:loop:rounds."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the pre-training texts drawn for ptx."})
    reward: RewardConfig = field(
        default_factory=RewardConfig, metadata={"help": "Reward-model refresh settings."}
    )
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            engine="hf",
            response_length=48,
            steps=32,
            batch_size=64,
            mini_batch_size=64,
            ppo_epochs=2,
            learning_rate=5e-5,
            missing_eos_penalty=1.0,
        ),
        metadata={
            "help": "PPO settings. Rollouts use transformers here: on the ~1M built-in model "
            "vLLM's start (~25 s) and per-step overhead cost more than the whole HF rollout; "
            'set {"engine": "vllm"} for larger models and GPU workers. 32 steps of 64 episodes '
            "at lr 5e-5 (about 45 s on two cores); answers cut at 48 tokens lose 1 (in reward "
            "standard deviations): the served alternates have 64."
        },
    )
    rloo: RLOOConfig = field(
        default_factory=lambda: RLOOConfig(response_length=48),
        metadata={"help": "RLOO settings (answers cut at 48 tokens, as PPO's)."},
    )
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata={"help": "DPO settings."})
    bon: BoNConfig = field(
        default_factory=lambda: BoNConfig(response_length=48),
        metadata={"help": "Best-of-n distillation settings (answers cut at 48 tokens)."},
    )
    gate: GateConfig = field(default_factory=GateConfig, metadata={"help": "Gate settings."})
    lora: dict[str, Any] = field(
        default_factory=lambda: {
            "reward": {"bf16": True, "likelihood_feature": False},
            "rloo": {
                "steps": 8,
                "prompts_per_step": 4,
                "learning_rate": 2e-4,
                "bf16": True,
                "normalize_advantages": True,
            },
            "ppo": {"steps": 4, "batch_size": 16, "mini_batch_size": 16, "bf16": True},
            "dpo": {"bf16": True},
            "bon": {"bf16": True},
            "gate": {"prompts": 16, "samples_per_prompt": 2, "max_new_tokens": 48},
        },
        metadata={
            "help": "Overrides applied over all the above when the model learns as a LoRA "
            "adapter (more than LOOPCHAT_LORA_ABOVE parameters): a real model's round sized "
            "for a CPU. On SmolLM2-135M one forward of 8 answers takes ~1.9 s on 2 cores "
            "(4.2 s with its backward), so the built-in model's 16 RLOO steps of 64 answers "
            "would take over 20 minutes. With these, one round of 128 brevity rankings "
            "took 11 minutes and raised brevity +12.7 points (results/smollm2/); 6 steps at "
            "lr 5e-4 lowered the reward and the gate refused it. {} sizes every model alike."
        },
    )

    def with_overrides(self, overrides: dict[str, Any]) -> LoopConfig:
        """A copy with ``overrides`` applied; nested dicts override ``reward``/``ppo``/``gate``
        field by field (what ``LOOPCHAT_LOOP_CONFIG``, a task message or ``--config`` carry)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown loop config field(s): {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            current = getattr(self, name)
            if dataclasses.is_dataclass(current):
                value = dataclasses.replace(current, **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_settings(
        cls, settings: Settings, overrides: dict[str, Any] | None = None
    ) -> LoopConfig:
        """Defaults, then ``settings`` (the learner, ``loop_config`` JSON), then ``overrides``."""
        config = cls(learner=settings.learner)
        config = config.with_overrides(json.loads(settings.loop_config or "{}"))
        config = config.with_overrides(overrides or {})
        learner(config.learner)  # an unknown name fails here, not in the middle of a round
        config.for_lora()  # and so does a bad LoRA override
        return config

    def for_lora(self) -> LoopConfig:
        """The config of a round whose model learns as a LoRA adapter (``lora`` applied)."""
        return self.with_overrides(self.lora)

    def learner_config(self) -> Any:
        """The chosen learner's own config (``ppo``, ``rloo``, ``dpo`` or ``bon``)."""
        return getattr(self, self.learner)


class RoundLock:
    """The one-round-at-a-time lock: ``SET NX PX`` with a token, renewed by a daemon thread.

    The renewer outlives Redis outages: a ``ConnectionError`` or timeout (Redis restarting) is
    retried every second until Redis answers again. If the lock is gone by then (the outage
    outlasted its expiry and another round may have taken it), or renewal is refused, the lock
    is lost: :meth:`ensure_held` raises, and the commit, which checks the token in the same
    transaction (:meth:`token`), refuses, so the round stops before counting anything.
    """

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.lock = client.lock(ROUND_LOCK, timeout=ttl_s, blocking=False, thread_local=False)
        self.held = False
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="round-lock", daemon=True)

    def __enter__(self) -> RoundLock:
        self.held = bool(self.lock.acquire())
        if self.held:
            self._renewer.start()
        return self

    def _renew(self) -> None:
        renewed = time.monotonic()
        wait = self.ttl_s / 3
        while not self._stop.wait(wait):
            try:
                self.lock.reacquire()
            except LockError:  # expired, or someone else's now
                self._lost.set()
                return
            except redis.RedisError as exc:  # Redis down or restarting: try again soon
                if time.monotonic() - renewed >= self.ttl_s:
                    self._lost.set()  # expired meanwhile, whoever holds it now
                    return
                log.warning("round lock not renewed (%s); retrying", exc)
                wait = min(1.0, self.ttl_s / 10)
                continue
            renewed, wait = time.monotonic(), self.ttl_s / 3

    def token(self) -> str:
        """This holder's token: the lock key's value for as long as the lock is ours."""
        token = self.lock.local.token
        return token.decode() if isinstance(token, bytes) else str(token)

    def ensure_held(self) -> None:
        if self._lost.is_set() or not self.lock.owned():
            raise LockError("the round lock expired while the round ran; nothing was committed")

    def __exit__(self, *exc: object) -> None:
        if not self.held:
            return
        self._stop.set()
        self._renewer.join()
        try:
            self.lock.release()
        except (LockError, redis.RedisError):
            pass  # expired already, or Redis is down: it lapses by itself


def consumer_name() -> str:
    """This process's consumer name in the ``learner`` group (host and pid: unique per worker)."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class RoundRankings:
    """Which rankings a round uses, and how (see the module docstring)."""

    train: list[Entry]  # new and carried-over usable rankings: each reaches training here, once
    heldout: list[Entry]  # the newest usable share: judged by the gate, trained on next round
    replay: list[Entry]  # older rankings the reward model sees again (steadiness, not counting)
    unusable: dict[str, int]  # new rankings that order nothing, by reason
    capped: int = 0  # usable rankings left out: their identity was over its share of the round

    def window(self) -> dict[str, Any]:
        used = self.train + self.heldout
        return {
            "first": used[0][0] if used else None,
            "last": used[-1][0] if used else None,
            "train": len(self.train),
            "heldout": len(self.heldout),
            "replay": len(self.replay),
            "capped": self.capped,
        }


def round_history(
    feedback: FeedbackLog, new: list[Entry], carried: set[str], window: int
) -> list[Entry]:
    """The rankings a round knows, in stream order: ``new`` (from the group), the ``carried``
    ids the previous round held out, and the newest ``window`` of the stream (the replay and
    the prompts come from these). Bounded by the round's size, not the stream's."""
    known = dict(feedback.newest(window))
    known.update(new)
    known.update(feedback.get(carried - known.keys()))
    return sorted(known.items(), key=lambda e: stream_order(e[0]))


def select_rankings(
    known: list[Entry], new: list[Entry], carried: set[str], config: LoopConfig
) -> RoundRankings:
    """Train on what is new (and what the last round held out), hold out the newest share.

    ``carried`` are the ids the previous round held out; they were consumed then, so they are
    trained on now. Each identity keeps at most its share of them (``max_identity_share``,
    ``learn.identity_caps``). Of the rest, the newest ``heldout_fraction`` (at least one when
    there are two or more, at most ``max_heldout``) is held out of every training this round.
    """
    unusable: dict[str, int] = {}
    for _, event in new:
        if reason := unusable_reason(event):
            unusable[reason] = unusable.get(reason, 0) + 1
    fresh_ids = {entry_id for entry_id, _ in new} | carried
    pool = [(i, e) for i, e in known if i in fresh_ids and unusable_reason(e) is None]
    pool, capped = cap_per_identity(pool, config.max_identity_share)
    n_held = 0
    if len(pool) >= 2 and config.heldout_fraction > 0:
        n_held = min(
            config.max_heldout, len(pool) - 1, max(1, round(len(pool) * config.heldout_fraction))
        )
    train, heldout = pool[: len(pool) - n_held], pool[len(pool) - n_held :]
    older = [(i, e) for i, e in known if i not in fresh_ids and unusable_reason(e) is None]
    replay = older[-config.rm_replay :] if config.rm_replay else []
    replay, _ = cap_per_identity(replay, config.max_identity_share)
    return RoundRankings(train, heldout, replay, unusable, capped)


def distinct_prompts(
    events: list[FeedbackEvent], limit: int, leave_out: Sequence[FeedbackEvent] = ()
) -> list[list[dict]]:
    """Distinct prompt conversations, most recent first, none of ``leave_out``'s (InstructGPT
    drew PPO prompts from real API traffic; these are what users actually asked)."""
    seen = {json.dumps(e["messages"], sort_keys=True) for e in leave_out}
    prompts: list[list[dict]] = []
    for event in reversed(events):
        fingerprint = json.dumps(event["messages"], sort_keys=True)
        if fingerprint not in seen and len(prompts) < limit:
            seen.add(fingerprint)
            prompts.append(event["messages"])
    return prompts


def continuation(
    client: redis.Redis, registry: Registry, name: str, live: str, live_dir: Path
) -> tuple[str, Path, dict[str, Any] | None]:
    """Where this round's learner starts: (version, directory, trainer state).

    The previous round's candidate and state, promoted or not, when the same learner made it
    and no operator has overruled the loop since (a rollback, or promoting another version);
    otherwise live, with a fresh state.
    """
    raw = client.get(LEARNER_STATE)
    last = json.loads(raw) if raw else None
    if last and last["learner"] == name and registry.get(last["version"]) is not None:
        since = registry.history()[last["history"] :]
        overruled = any(
            event["by"] != "loop"
            and not (event["action"] == "promote" and event["version"] == last["version"])
            for event in since
        )
        if not overruled:
            path = registry.local_path(last["version"])
            return last["version"], path, load_state(path)
    return live, live_dir, None


def lora_options(reference_dir: Path, settings: Settings) -> LoraOptions | None:
    """LoRA for a base above ``LOOPCHAT_LORA_ABOVE`` parameters (the engines decide alike)."""
    if not learns_with_lora(reference_dir, settings.lora_above):
        return None
    return LoraOptions(rank=settings.lora_rank, alpha=settings.lora_alpha)


def reference_version(registry: Registry, live: str) -> str:
    """The SFT reference PPO keeps close to: the ``sft`` ancestor of the live policy, or, if the
    chain was pruned, the newest ``sft`` version (which pruning always keeps)."""
    version: str | None = live
    while version is not None:
        meta = registry.get(version)
        if meta is None:
            break
        if meta["kind"] == "sft":
            return version
        version = meta["parent"]
    sft = registry.versions("sft")
    if not sft:
        raise RuntimeError("no sft version registered: nothing to measure KL against")
    return sft[-1]["version"]


def live_policy(registry: Registry, settings: Settings) -> tuple[str, Path]:
    """The live version and its directory; registers the configured or built-in model if the
    worker is the first process to run (normally ``loopchat up`` has done it)."""

    def first_model() -> Path:
        if settings.model:
            return Path(settings.model)
        from learn.bootstrap import ensure_builtin_model

        return ensure_builtin_model(settings.data_dir)

    return registry.ensure_live(first_model)


def run_round(
    round_id: str | None = None,
    config: LoopConfig | None = None,
    settings: Settings | None = None,
    claimed: int = 0,
) -> dict[str, Any]:
    """Run one round now (or recognise it as already done); returns its record.

    ``claimed`` is how many counts of the trigger's counter (``SINCE_ROUND``) the ranking that
    queued this round took; a round skipped because another one runs gives them back, so the
    rankings that queued it still start the next round rather than waiting for as many more.
    """
    settings = settings or Settings()
    config = config or LoopConfig.from_settings(settings)
    round_id = round_id or f"manual-{uuid.uuid4().hex[:12]}"
    client = sync_client(resolve_redis_url(settings))
    done = client.get(round_key(round_id))
    if done:
        record = json.loads(done)
        finish_promotion(Registry.from_settings(settings, client), record)
        with RoundLock(client, config.lock_ttl_s) as lock:
            if lock.held:  # else the running round acks them (it finds them in COUNTED)
                ack_committed(client)
        return {**record, "replayed": True}
    with RoundLock(client, config.lock_ttl_s) as lock:
        if not lock.held:
            if claimed:
                client.incrby(SINCE_ROUND, claimed)
            return {"round": round_id, "skipped": "another round is running"}
        started = time.time()
        try:
            record, consumed, rankings = _round(round_id, started, config, settings, client, lock)
        except Exception as exc:
            failed = {
                "round": round_id,
                "status": "failed",
                "started_at": started,
                "finished_at": time.time(),
                "error": f"{type(exc).__name__}: {exc}",
            }
            client.rpush(ROUNDS, json.dumps(failed))
            client.ltrim(ROUNDS, -config.keep_rounds, -1)
            raise
        if consumed:
            feedback = FeedbackLog(client)
            _commit(client, lock, record, consumed, rankings, config.keep_rounds)
            finish_promotion(Registry.from_settings(settings, client), record)
            feedback.ack(consumed)
            client.srem(COUNTED, *consumed)
            trimmed = feedback.trim(
                settings.feedback_retention, [entry_id for entry_id, _ in rankings.heldout]
            )
            if trimmed:
                log.info("round %s: trimmed %d old rankings from the stream", round_id, trimmed)
        return record


def ack_committed(client: redis.Redis) -> None:
    """Ack the entries committed rounds left unacked (their worker died right after the
    commit): committed means counted, so acking them now changes no count. Under the round
    lock only: a running round decides what is new by looking in ``COUNTED``."""
    if entry_ids := sorted(client.smembers(COUNTED)):
        FeedbackLog(client).ack(entry_ids)
        client.srem(COUNTED, *entry_ids)


def finish_promotion(registry: Registry, record: dict[str, Any]) -> None:
    """Promote a committed round's candidate if the round decided to and it has not happened.

    A round commits first and promotes after, so a worker killed in between leaves a committed
    round whose promotion the redelivered task (which finds the record) carries out. Only if
    nothing changed the live version since the commit: a later promotion or an operator's
    rollback stands.
    """
    if not record.get("promoted"):
        return
    since = registry.history()[record["continue_from"]["history"] :]
    if any(e["action"] == "promote" and e["version"] == record["candidate"] for e in since):
        return
    if since:
        log.warning(
            "round %s: not promoting %s, live changed since the round committed",
            record["round"],
            record["candidate"],
        )
        return
    try:
        registry.promote(
            record["candidate"], by="loop", reason=f"round {record['round']}: gate passed",
            automatic=True,
        )  # fmt: skip
    except Pinned as exc:  # an operator rolled back between the commit and now
        log.warning("round %s: not promoting %s: %s", record["round"], record["candidate"], exc)


def _round(
    round_id: str,
    started: float,
    config: LoopConfig,
    settings: Settings,
    client: redis.Redis,
    lock: RoundLock,
) -> tuple[dict[str, Any], list[str], RoundRankings | None]:
    """Everything but the commit: the record, the stream ids to commit and how the round used
    the rankings (no ids and None if skipped)."""
    timings: dict[str, float] = {}

    # 0. The rankings this round consumes: what dead rounds left pending, then new ones.
    feedback = FeedbackLog(client)
    feedback.ensure_group()
    consumer = consumer_name()
    claimed = feedback.reclaim(consumer, config.reclaim_idle_ms)
    claimed += feedback.read_new(consumer, config.max_new_rankings)
    claimed = sorted(dict(claimed).items(), key=lambda e: stream_order(e[0]))
    if claimed:
        flags = client.smismember(COUNTED, [entry_id for entry_id, _ in claimed])
        recounted = [entry_id for (entry_id, _), f in zip(claimed, flags, strict=True) if f]
        if recounted:  # committed by a round that died before acking: done, not new
            feedback.ack(recounted)
            client.srem(COUNTED, *recounted)
        new = [e for (e, f) in zip(claimed, flags, strict=True) if not f]
    else:
        new = []
    if len(new) < config.min_new_rankings:
        skipped = f"{len(new)} new rankings, fewer than min_new_rankings={config.min_new_rankings}"
        return {"round": round_id, "skipped": skipped}, [], None

    carried = set(json.loads(client.get(HELDOUT) or "[]"))
    known = round_history(feedback, new, carried, config.history_window)
    rankings = select_rankings(known, new, carried, config)
    if not rankings.train:  # e.g. only all-bad rankings so far; they wait for the next round
        return {"round": round_id, "skipped": "no ranking orders two answers yet"}, [], None
    timings["read"] = time.time() - started
    train = [event for _, event in rankings.train]
    heldout = [event for _, event in rankings.heldout]

    registry = Registry.from_settings(settings, client)
    live, live_dir = live_policy(registry, settings)
    reference = reference_version(registry, live)
    reference_dir = registry.local_path(reference)
    lora = lora_options(reference_dir, settings)
    if lora is not None:  # a real model learns as an adapter, in a round sized for it
        config = config.for_lora()
    work_root = settings.data_dir / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"round-{round_id}-", dir=work_root) as tmp:
        work = Path(tmp)

        # 1. Refresh the reward model on every new ranking (and a replay), warm-started.
        t = time.time()
        # Not a reward model this very round registered before its worker died: those saw
        # these rankings already; the redelivered round starts where the dead one started.
        reward_models = [
            meta
            for meta in registry.versions("reward")
            if meta.get("info", {}).get("round") != round_id
        ]
        previous_rm = reward_models[-1]["version"] if reward_models else None
        rm_metrics = train_reward_model(
            [event for _, event in rankings.replay] + train,
            registry.local_path(previous_rm or reference),
            work / "rm",
            config.reward,
            heldout_events=heldout,
            lora=lora,
            base_dir=reference_dir,
        )
        rm = registry.register(
            work / "rm", "reward", parent=previous_rm or reference, metrics=rm_metrics,
            info={"round": round_id, "data_window": rankings.window(),
                  **({"base": reference} if lora else {})},
        )  # fmt: skip
        rm_dir = registry.local_path(rm)
        timings["reward"] = time.time() - t

        # 2. The learner, from where the last round left off, KL to the SFT reference.
        t = time.time()
        start, start_dir, state = continuation(client, registry, config.learner, live, live_dir)
        data = RoundData(
            policy_dir=start_dir,
            reference_dir=reference_dir,
            reward_dir=rm_dir,
            events=train,
            prompts=distinct_prompts(
                [event for _, event in known], config.max_prompts, leave_out=heldout
            ),
            ptx_texts=ptx_texts(settings.ptx, reference_dir, config.ptx_texts, config.seed),
            state=state,
            out_dir=work / "policy",
            seed=int(client.llen(ROUNDS)),
            lora=lora,
        )
        policy_metrics = learner(config.learner).train_round(data, config.learner_config())
        timings["learn"] = time.time() - t

        # 3. Register the candidate.
        t = time.time()
        candidate = registry.register(
            work / "policy",
            config.learner,
            parent=start,
            metrics=policy_metrics,
            info={
                "learner": config.learner,
                "reward_model": rm,
                "reference": reference,
                "data_window": rankings.window(),
                "round": round_id,
                "prompts": len(data.prompts),
                "continued": state is not None,
                **({"base": reference} if data.lora else {}),
            },
        )
        # A candidate in online A/B keeps its place until its win-rate test decides: a test
        # needs more rankings than a round brings, so replacing it every round would never let
        # one finish. This round's version is still gated, and the learner continues from it.
        under_test = registry.gated_candidate() if settings.ab_share > 0 else None
        timings["register"] = time.time() - t

    # 4. Gate: on the held-out rankings, which neither the reward model nor the policy saw.
    t = time.time()
    gate = evaluate_gate(
        registry.local_path(candidate), live_dir, reference_dir, rm_dir, heldout,
        distinct_prompts(heldout, config.gate.prompts), config.gate,
    )  # fmt: skip
    registry.record_gate(candidate, gate)
    if under_test is None:
        registry.set_candidate(candidate)  # only now: the candidate alias names gated versions
    timings["gate"] = time.time() - t

    # 5. Promote a passing candidate if the operator allowed it and no rollback pins live (after
    # the commit, in run_round: finish_promotion); otherwise it waits. With online A/B on, a
    # passing candidate goes to mixed slates instead and the users' win rate decides
    # (serve.ab.Referee).
    lock.ensure_held()
    promoted = bool(settings.auto_promote and gate["passed"] and settings.ab_share == 0)
    promote_refused = None
    if promoted and (pin := registry.pin()) is not None:
        promoted = False
        promote_refused = f"live is pinned by {pin['by']}'s rollback to {pin['version']}"

    new_ids = [entry_id for entry_id, _ in new]
    timings["total"] = time.time() - started
    record = {
        "round": round_id,
        "status": "done",
        "started_at": started,
        "finished_at": time.time(),
        "stream": {"first": new_ids[0], "last": new_ids[-1], "count": len(new_ids)},
        "rankings_new": len(new_ids),
        "rankings_total": feedback.total(),
        "rankings_unusable": rankings.unusable,
        "data_window": rankings.window(),
        "live": live,
        "start": start,
        "reference": reference,
        "learner": config.learner,
        "rm": {"version": rm, **rm_metrics},
        "policy": policy_metrics,
        "gate": gate,
        "candidate": candidate,
        "promoted": promoted,
        "promote_refused": promote_refused,
        "ab_under_test": under_test,
        "continue_from": {
            "learner": config.learner,
            "version": candidate,
            "history": len(registry.history()),
        },
        "timings": timings,
    }
    return record, new_ids, rankings


def _commit(
    client: redis.Redis,
    lock: RoundLock,
    record: dict,
    entry_ids: list[str],
    rankings: RoundRankings,
    keep: int,
) -> None:
    """Record the round, what it consumed, what it held out and where its learner stopped, in
    one transaction that only goes through while ``lock`` is still ours (see the module
    docstring); acking follows. Raises ``LockError`` if the lock was lost: nothing is written."""
    raw = json.dumps(record)
    token = lock.token()

    def write(pipe: redis.client.Pipeline) -> None:
        if pipe.get(ROUND_LOCK) != token:
            raise LockError("the round lock was lost before the commit; nothing was committed")
        last = pipe.get(LAST_ID)
        pipe.multi()
        pipe.sadd(COUNTED, *entry_ids)
        pipe.set(round_key(record["round"]), raw, ex=ROUND_TTL_S)
        pipe.rpush(ROUNDS, raw)
        pipe.ltrim(ROUNDS, -keep, -1)
        pipe.set(HELDOUT, json.dumps([entry_id for entry_id, _ in rankings.heldout]))
        for reason, count in rankings.unusable.items():
            pipe.hincrby(UNUSABLE, reason, count)
        pipe.set(LEARNER_STATE, json.dumps(record["continue_from"]))
        if last is None or stream_order(entry_ids[-1]) > stream_order(last):
            pipe.set(LAST_ID, entry_ids[-1])

    client.transaction(write, ROUND_LOCK, LAST_ID)
