"""One learning round: new rankings -> reward model -> PPO -> candidate -> gate -> (promote).

A round reads top to bottom in :func:`run_round`. It runs in the Celery worker
(``learn.tasks.run_round``) or in the CLI (``loopchat learn round``); both call the same code.

**One at a time.** A round holds the Redis lock ``loopchat:loop:lock`` (``SET NX`` with an
expiry, renewed by a thread while the round runs, so a dead worker's lock lapses by itself).
A second round that finds it taken returns ``{"skipped": …}`` at once; the rankings it would
have used stay in the stream for the next round.

**Which rankings.** New rankings come from the feedback stream through the consumer group
(``serve.events.FeedbackLog``). While a round holds the lock no other round runs, so anything
still pending in the group was left by a round that died: the round first reclaims all of it
(``reclaim_idle_ms``, default 0), then reads new entries, and acks them only after it is
committed.

**Idempotent.** The task id is the round id. A round is committed in one Redis transaction
(round record, ``last_id``, the stream ids it consumed added to ``loopchat:loop:counted``) and
only then are its entries acked (and removed from ``counted`` again). So:

- a redelivered task whose round was committed finds ``loopchat:loop:round:<id>`` and returns
  the stored record without training again;
- an entry redelivered because its round died between commit and ack is found in ``counted``,
  acked, and not counted a second time;
- a round that dies before committing counted nothing; its entries are reclaimed by the next.

The reward model trains on the last ``rm_window`` rankings (default 256; 0 = all so far),
not only the new ones, warm-starting from the previous one: "counting" means the new rankings a
round reports and consumes from the group. A round that skips (lock taken, too few new
rankings, no ranking that orders two answers) returns ``{"round", "skipped": reason}``,
consumes nothing and writes nothing.

Redis keys (prefix ``loopchat:loop:``), read by ``GET /admin/loop`` and the ops page:

- ``rounds`` — list of JSON round records, oldest first (the last ``keep_rounds``). A finished
  round::

    {"round": "<id>", "status": "done",
     "started_at": float, "finished_at": float,                       # unix time
     "stream": {"first": "<entry id>", "last": "<entry id>", "count": int},   # consumed
     "rankings_new": int,          # new rankings this round consumed (each counted once)
     "rankings_total": int,        # rankings in the stream when the round read it
     "data_window": {"first": id, "last": id, "train": int, "heldout": int},  # RM's data
     "live": "vN", "reference": "vN",      # PPO's start and its KL reference (sft)
     "rm": {"version": "rm-N", ...learn.reward metrics: heldout_accuracy, reward_mean, ...},
     "ppo": {...learn.ppo metrics: reward_mean, kl, ..., "history": [per-step dicts]},
     "gate": {"passed": bool, "reasons": [...], "reason": str, ...numbers (learn.gate)},
     "candidate": "vN", "promoted": bool,
     "timings": {"read", "reward", "ppo", "register", "gate", "total"}}   # seconds

  A round that raised: ``{"round", "status": "failed", "started_at", "finished_at",
  "error"}`` (its rankings stay pending for the next round).
- ``last_id`` — the newest stream entry id any committed round consumed (rankings after it
  are "since the last round").
- ``round:<id>`` — the committed record of round ``<id>`` (expires after a week).
- ``counted`` — stream ids committed but possibly not yet acked (normally empty).
- ``lock`` — the round lock. ``since_round`` — the trigger's counter (``serve/loop_trigger.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import LockError

from learn.data import ptx_texts
from learn.gate import GateConfig, evaluate_gate
from learn.ppo import PPOConfig, train_ppo
from learn.reward import RewardConfig, train_reward_model
from serve.events import (
    COUNTED,
    LAST_ID,
    ROUND_LOCK,
    ROUNDS,
    FeedbackEvent,
    FeedbackLog,
    has_preference,
    round_key,
)
from serve.registry import Registry
from serve.settings import Settings
from serve.store import resolve_redis_url, sync_client

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
    rm_window: int = field(
        default=256,
        metadata={
            "help": "Reward model trains on the last N rankings (0 = all so far). It warm-starts "
            "from the last one, so a window bounds the round's time without forgetting."
        },
    )
    heldout_fraction: float = field(
        default=0.1,
        metadata={"help": "Most recent share of the window held out for RM accuracy and gate."},
    )
    max_heldout: int = field(
        default=64, metadata={"help": "Cap on held-out rankings (the gate scores each one)."}
    )
    max_prompts: int = field(
        default=1024,
        metadata={
            "help": "PPO prompts: the most recent distinct conversations of the whole stream, "
            "not only the reward model's window. Many distinct prompts are what makes PPO's "
            "gain carry over to new questions: offline, with the true correctness as reward, "
            "6 x 1,024 episodes on 1,024 prompts raised held-out prompts by 7 points, on 128 "
            "prompts by 2 (the training prompts' reward kept rising: memorised)."
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
            response_length=32,
            steps=32,
            batch_size=64,
            mini_batch_size=64,
            ppo_epochs=2,
            learning_rate=5e-5,
        ),
        metadata={
            "help": "PPO settings. Rollouts use transformers here: on the ~1M built-in model "
            "vLLM's start (~25 s) and per-step overhead cost more than the whole HF rollout; "
            'set {"engine": "vllm"} for larger models and GPU workers. Answers of the built-in '
            "tasks fit in 32 tokens. 32 steps of 64 episodes at lr 5e-5 (about 45 s on two "
            "cores): offline, 8 rounds of 128 rankings raised the built-in model's held-out "
            "rate by 9 points with 32 steps, 4 with 16; 48 steps or lr 8e-5 peaked higher, "
            "then fell (KL up); smaller batches drifted."
        },
    )
    gate: GateConfig = field(default_factory=GateConfig, metadata={"help": "Gate settings."})

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
        """Defaults, then ``settings.loop_config`` (JSON), then ``overrides``."""
        config = cls().with_overrides(json.loads(settings.loop_config or "{}"))
        return config.with_overrides(overrides or {})


class RoundLock:
    """The one-round-at-a-time lock: ``SET NX PX`` with a token, renewed by a daemon thread.

    If renewal ever fails (the lock expired, e.g. the process was frozen, and another round
    took it) :meth:`ensure_held` raises, and the round stops before committing anything.
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
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockError:
                self._lost.set()
                return

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
        except LockError:
            pass  # expired already: nothing of ours to release


def consumer_name() -> str:
    """This process's consumer name in the ``learner`` group (host and pid: unique per worker)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def stream_order(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id ``"<ms>-<seq>"``."""
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def split_recent(
    entries: list[Entry], fraction: float, cap: int
) -> tuple[list[Entry], list[Entry]]:
    """(train, held-out): the most recent ``fraction`` (at most ``cap``, at least one when there
    are two or more) is held out, so the model is judged on what users said last."""
    if len(entries) < 2 or fraction <= 0:
        return entries, []
    n_held = min(cap, len(entries) - 1, max(1, round(len(entries) * fraction)))
    return entries[:-n_held], entries[-n_held:]


def recent_prompts(events: list[FeedbackEvent], limit: int) -> list[list[dict]]:
    """Distinct prompt conversations, most recent first (InstructGPT drew PPO prompts from
    real API traffic; these are what users actually asked)."""
    seen: set[str] = set()
    prompts: list[list[dict]] = []
    for event in reversed(events):
        fingerprint = json.dumps(event["messages"], sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            prompts.append(event["messages"])
            if len(prompts) == limit:
                break
    return prompts


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
) -> dict[str, Any]:
    """Run one round now (or recognise it as already done); returns its record."""
    settings = settings or Settings()
    config = config or LoopConfig.from_settings(settings)
    round_id = round_id or f"manual-{uuid.uuid4().hex[:12]}"
    client = sync_client(resolve_redis_url(settings))
    done = client.get(round_key(round_id))
    if done:
        return {**json.loads(done), "replayed": True}
    with RoundLock(client, config.lock_ttl_s) as lock:
        if not lock.held:
            return {"round": round_id, "skipped": "another round is running"}
        started = time.time()
        try:
            record, consumed = _round(round_id, started, config, settings, client, lock)
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
            _commit(client, FeedbackLog(client), record, consumed, config.keep_rounds)
        return record


def _round(
    round_id: str,
    started: float,
    config: LoopConfig,
    settings: Settings,
    client: redis.Redis,
    lock: RoundLock,
) -> tuple[dict[str, Any], list[str]]:
    """Everything but the commit: the record, and the stream ids to commit (none if skipped)."""
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
        return {"round": round_id, "skipped": skipped}, []

    everything = list(feedback.iter_events())
    window = everything[-config.rm_window :] if config.rm_window else everything
    ranked = [(entry_id, ev) for entry_id, ev in window if has_preference(ev)]
    if not ranked:  # e.g. only all-bad rankings so far; they wait for the next round
        return {"round": round_id, "skipped": "no ranking orders two answers yet"}, []
    train, heldout = split_recent(ranked, config.heldout_fraction, config.max_heldout)
    data_window = {
        "first": ranked[0][0],
        "last": ranked[-1][0],
        "train": len(train),
        "heldout": len(heldout),
    }
    timings["read"] = time.time() - started

    registry = Registry.from_settings(settings, client)
    live, live_dir = live_policy(registry, settings)
    reference = reference_version(registry, live)
    work_root = settings.data_dir / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"round-{round_id}-", dir=work_root) as tmp:
        work = Path(tmp)

        # 1. Refresh the reward model: warm start from the last one (or the SFT weights).
        t = time.time()
        reward_models = registry.versions("reward")
        previous_rm = reward_models[-1]["version"] if reward_models else None
        rm_init = registry.local_path(previous_rm or reference)
        rm_metrics = train_reward_model(
            [ev for _, ev in train],
            rm_init,
            work / "rm",
            config.reward,
            heldout_events=[ev for _, ev in heldout],
        )
        rm = registry.register(
            work / "rm",
            "reward",
            parent=previous_rm or reference,
            metrics=rm_metrics,
            info={"round": round_id, "data_window": data_window},
        )
        rm_dir = registry.local_path(rm)
        timings["reward"] = time.time() - t

        # 2. PPO from the live policy on recent real prompts, KL to the SFT reference, ptx.
        t = time.time()
        events = [ev for _, ev in window]
        prompts = recent_prompts([ev for _, ev in everything], config.max_prompts)
        ppo_metrics = train_ppo(
            live_dir,
            registry.local_path(reference),
            rm_dir,
            prompts,
            ptx_texts(settings.ptx, registry.local_path(reference), config.ptx_texts, config.seed),
            work / "policy",
            config.ppo,
        )
        timings["ppo"] = time.time() - t

        # 3. Register the candidate.
        t = time.time()
        candidate = registry.register(
            work / "policy",
            "ppo",
            parent=live,
            metrics=ppo_metrics,
            info={
                "reward_model": rm,
                "reference": reference,
                "data_window": data_window,
                "round": round_id,
                "prompts": len(prompts),
            },
        )
        registry.set_candidate(candidate)
        timings["register"] = time.time() - t

    # 4. Gate: on held-out recent rankings and prompts the reward model did not train on.
    t = time.time()
    gate_prompts = recent_prompts([ev for _, ev in heldout] + events, config.gate.prompts)
    gate = evaluate_gate(
        registry.local_path(candidate),
        live_dir,
        rm_dir,
        [ev for _, ev in heldout],
        gate_prompts,
        config.gate,
    )
    registry.record_gate(candidate, gate)
    timings["gate"] = time.time() - t

    # 5. Promote a passing candidate if the operator allowed it; otherwise it waits.
    lock.ensure_held()
    promoted = bool(settings.auto_promote and gate["passed"])
    if promoted:
        registry.promote(candidate, by="loop", reason=f"round {round_id}: gate passed")

    new_ids = [entry_id for entry_id, _ in new]
    timings["total"] = time.time() - started
    record = {
        "round": round_id,
        "status": "done",
        "started_at": started,
        "finished_at": time.time(),
        "stream": {"first": new_ids[0], "last": new_ids[-1], "count": len(new_ids)},
        "rankings_new": len(new_ids),
        "rankings_total": len(everything),
        "data_window": data_window,
        "live": live,
        "reference": reference,
        "rm": {"version": rm, **rm_metrics},
        "ppo": ppo_metrics,
        "gate": gate,
        "candidate": candidate,
        "promoted": promoted,
        "timings": timings,
    }
    return record, new_ids


def _commit(
    client: redis.Redis, feedback: FeedbackLog, record: dict, entry_ids: list[str], keep: int
) -> None:
    """Record the round and what it consumed atomically, then ack (see the module docstring)."""
    raw = json.dumps(record)
    last = client.get(LAST_ID)
    pipe = client.pipeline(transaction=True)
    pipe.sadd(COUNTED, *entry_ids)
    pipe.set(round_key(record["round"]), raw, ex=ROUND_TTL_S)
    pipe.rpush(ROUNDS, raw)
    pipe.ltrim(ROUNDS, -keep, -1)
    if last is None or stream_order(entry_ids[-1]) > stream_order(last):
        pipe.set(LAST_ID, entry_ids[-1])
    pipe.execute()
    feedback.ack(entry_ids)
    client.srem(COUNTED, *entry_ids)
