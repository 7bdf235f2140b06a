"""The checkpoint registry: versions, the aliases that say which one serves, and their history.

Shared by every process (API replicas, learning workers, the CLI) through Redis; the weights
live in a checkpoint store that is any fsspec URL (a local path by default, ``s3://…`` when
several machines share it; the matching fsspec backend, e.g. ``s3fs``, must be installed).

A version is a directory in Hugging Face format plus ``loopchat.json`` (its metadata), at
``<checkpoints_url>/<version>``. Policies are ``v1, v2, …`` (kind ``sft``, or the learner that made
it: ``ppo``, ``rloo``, ``dpo``, ``bon``); reward
models are ``rm-1, rm-2, …`` (kind ``reward``). A version becomes visible only once fully
written: every file, then ``loopchat.json`` last, is in the store before its metadata is written
to Redis, which is what every reader looks at. On a local disk the files go under a temporary
name that is renamed to the version name (atomic); an object store has no rename (s3fs's ``mv``
is a copy per object), so there they go straight to ``<version>/``. Either way a crash or an
outage mid-copy leaves at most an orphan directory that no reader ever sees, and whose name is
never handed out again.

Object stores fail transiently (a dropped connection, a throttled request, a restart): every
store operation is retried ``retries`` times with exponential backoff on errors that may pass
(:func:`is_transient`), on top of the backend's own retries; an upload that still fails raises
:class:`CheckpointStoreError` and registers nothing. For ``s3://`` the endpoint and credentials
come from the standard variables (``AWS_ENDPOINT_URL`` or ``FSSPEC_S3_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), read by botocore and
fsspec themselves.

A policy over a large base may be a LoRA adapter directory instead (``serve.adapters``): its
``info.base`` names the registered version it adapts, ``base_path`` fetches that, and
``prune`` never deletes a base that a kept version needs.

Aliases: ``live`` (what users are served), ``previous`` (what ``rollback`` returns to) and
``candidate`` (a trained version waiting for the gate or an operator). ``live`` and ``previous``
are the top two entries of a stack of live versions: ``promote`` pushes, ``rollback`` pops, so
rolling back twice walks further back rather than flipping back to the version just rejected.
Every change of ``live`` is appended to the history (when, which version, from which, by whom,
why) and announced on :data:`CHANNEL`, which serving processes follow to hot-swap weights.

A version whose weights are not all finite is never promoted, whatever its gate says and even
with ``force``: finiteness is checked here, when the version is registered, so no caller can
bypass it. The gate itself (``record_gate``) is written by the learning loop; its dict must hold
``passed: bool`` and should say why in ``reasons`` (a list of strings). Only a version whose gate
passed goes live: one with a failed gate *or none yet* needs ``force``, which needs a reason and
is marked ``forced`` in the history. These checks live in :meth:`Registry.promote`, so every
caller (HTTP, CLI, ops page, the loop, any automatic promoter) gets them. The candidate alias
only ever names a gated version (``set_candidate`` refuses one without a gate result).

**The pin.** A rollback pins live: automatic promotions (``automatic=True``: the learning loop's
auto-promote, any other promoter that is not an operator) are refused (``Pinned``) until an
operator lifts the pin, by ``unpin`` or by promoting a version themselves. So the loop cannot
undo an operator's rollback a round later.

Retention: ``prune(keep)`` deletes all but the newest ``keep`` policies and reward models, never
live, previous, the candidate or the newest ``sft`` version (PPO's KL reference). A registry made
by ``from_settings`` prunes after every registration (``LOOPCHAT_KEEP_VERSIONS``).

Redis keys (prefix ``loopchat:registry:``):

- ``seq:policy``, ``seq:reward`` — counters handing out version numbers.
- ``versions`` — sorted set of visible versions, scored by creation time.
- ``version:<v>`` — hash: ``meta`` (JSON written once at registration), ``gate`` (JSON, later).
- ``alias:candidate`` — the candidate version (absent when none, or once retired); always a
  gated version.
- ``pin`` — JSON ``{"version", "by", "reason", "time"}`` while a rollback pins live (absent
  otherwise).
- ``live_stack`` — list of live versions, newest first: index 0 is ``live``, index 1 ``previous``.
- ``history`` — list of JSON events, oldest first: ``{"time", "action", "version", "from",
  "by", "reason", "forced"}`` with action ``promote`` | ``rollback`` | ``bootstrap`` |
  ``unpin`` (``forced``: promoted by ``force`` past a failed or missing gate).
- ``lock:bootstrap`` — lock so that processes starting together register one first version.
- channel ``loopchat:registry:events`` — JSON ``{"alias", "version"}`` on every alias change,
  and ``{"alias": "candidate", …}`` again when the candidate's gate is recorded.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import fsspec
import redis
from fsspec.implementations.local import LocalFileSystem

from serve.adapters import is_adapter
from serve.store import key

Kind = Literal["sft", "ppo", "rloo", "dpo", "bon", "reward"]
POLICY_KINDS: frozenset[str] = frozenset({"sft", "ppo", "rloo", "dpo", "bon"})
KINDS: frozenset[str] = POLICY_KINDS | {"reward"}
ALIASES: tuple[str, ...] = ("live", "candidate", "previous")
METADATA_FILE = "loopchat.json"
CHANNEL = key("registry", "events")
RETRY_CAP_S = 8.0

T = TypeVar("T")

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """A registry operation that cannot be done as asked (the message says why; ``code`` is a
    stable machine-readable name for API error bodies)."""

    code = "registry_error"


class CheckpointStoreError(RegistryError):
    """The checkpoint store kept failing (after the retries): nothing was registered."""

    code = "checkpoint_store_unavailable"


class UnknownVersion(RegistryError):
    """The version does not exist (never registered, or pruned)."""

    code = "unknown_version"


class PromotionRefused(RegistryError):
    """The version may not go live (see the subclasses)."""

    code = "promotion_refused"


class NotAPolicy(PromotionRefused):
    """Only policies (``sft``, ``ppo``) can be candidate or live, not reward models."""

    code = "not_a_policy"


class NonFiniteWeights(PromotionRefused):
    """The weights hold NaN or inf; never promoted, even with ``force``."""

    code = "non_finite_weights"


class GateFailed(PromotionRefused):
    """The gate failed; ``force`` overrides."""

    code = "gate_failed"


class NotGated(PromotionRefused):
    """The version has no gate result yet; ``force`` overrides, for an operator."""

    code = "not_gated"


class Pinned(PromotionRefused):
    """An operator's rollback pinned live; automatic promotions wait until it is lifted."""

    code = "live_pinned"


class ReasonRequired(RegistryError):
    """A forced promotion without a reason: ``force`` is audited, so it must say why."""

    code = "reason_required"


class NoPrevious(RegistryError):
    """Rollback asked for with no previous live version."""

    code = "no_previous_version"


def _rkey(*parts: str) -> str:
    return key("registry", *parts)


def weights_finite(model_dir: Path) -> bool:
    """True when every tensor in the directory's safetensors files is finite (no NaN/inf).

    A model with a single NaN answers garbage or crashes the engine, so such weights must never
    reach users, whichever path tries to promote them.
    """
    import torch  # the API process has it already (engines); imported lazily for the CLI
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise RegistryError(f"{model_dir} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return False
    return True


# Errors that say the request itself is wrong, never worth repeating.
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    """botocore's connection and HTTP-client errors (when s3fs is installed), which s3fs lets
    through untranslated once its own retries are spent."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return ()
    return (BotoConnectionError, HTTPClientError)


def is_transient(exc: BaseException) -> bool:
    """Whether a store operation that raised ``exc`` may succeed if repeated: network and
    server-side errors (fsspec backends turn an unrecognised 5xx into a plain ``OSError``), not
    a missing file or a refused permission."""
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (OSError, TimeoutError, *_network_errors()))


def backoff_delays(attempts: int, first_s: float, cap_s: float) -> list[float]:
    """Seconds to wait before each retry of an operation tried ``attempts`` times in all:
    ``first_s`` doubling, each at most ``cap_s``."""
    return [min(cap_s, first_s * 2**i) for i in range(max(0, attempts - 1))]


def gate_reason(gate: dict) -> str:
    """The gate's ``reasons`` as one line."""
    return "; ".join(str(r) for r in gate.get("reasons") or []) or "no reason recorded"


class Registry:
    """Versions, aliases and history in Redis; weights in an fsspec checkpoint store."""

    def __init__(
        self,
        client: redis.Redis,
        checkpoints_url: str,
        cache_dir: Path | None = None,
        keep: int | None = None,
        retries: int = 5,
        retry_delay_s: float = 0.5,
    ) -> None:
        """``client`` must decode responses (``serve.store.sync_client``). ``cache_dir`` holds
        local copies of versions from a remote store (default ``<data_dir>/cache/checkpoints``).
        With ``keep``, every registration ends with ``prune(keep)``, so the store stays bounded
        whoever registers. ``retries``: attempts per store operation (transient errors only),
        waiting ``retry_delay_s`` doubling between them.
        """
        if retries < 1:
            raise RegistryError("retries must be at least 1")
        self.client = client
        self.keep = keep
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.checkpoints_url = str(checkpoints_url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.checkpoints_url)
        self.root = self.root.rstrip("/")
        if cache_dir is None:
            from serve.settings import Settings

            cache_dir = Settings().data_dir / "cache" / "checkpoints"
        self.cache_dir = Path(cache_dir)

    @classmethod
    def from_settings(cls, settings: Any, client: redis.Redis) -> Registry:
        """The registry for these settings (store ``checkpoints_url``, ``keep_versions``)."""
        cache_dir = Path(settings.data_dir) / "cache" / "checkpoints"
        return cls(
            client,
            settings.checkpoints_url,
            cache_dir,
            keep=settings.keep_versions,
            retries=settings.checkpoint_retries,
        )

    # ------------------------------------------------------------------ versions

    @property
    def is_local(self) -> bool:
        """Whether the store is a local filesystem (then versions are used in place)."""
        return isinstance(self.fs, LocalFileSystem)

    def _store_path(self, version: str) -> str:
        return f"{self.root}/{version}"

    def _retrying(self, what: str, operation: Callable[..., T], *args: Any) -> T:
        """``operation(*args)``, repeated on transient errors; ``CheckpointStoreError`` once
        ``retries`` attempts have failed. Listings cached by the backend are dropped before
        each attempt: another host may have written since (a cache would hide it)."""
        delays = backoff_delays(self.retries, self.retry_delay_s, RETRY_CAP_S)
        for attempt in range(self.retries):
            self.fs.invalidate_cache()
            try:
                return operation(*args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == len(delays):
                    raise CheckpointStoreError(
                        f"checkpoint store {self.checkpoints_url}: {what} failed "
                        f"{self.retries} times, last: {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning(
                    "checkpoint store: %s failed (%s: %s); retry %d/%d in %.1f s",
                    what,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    len(delays),
                    delays[attempt],
                )
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def _next_version(self, kind: str) -> str:
        """Reserve the next free version name; skips names whose directory already exists
        (left by a crash, an outage or a Redis that lost its data) so nothing stored is
        overwritten."""
        seq, prefix = ("policy", "v") if kind in POLICY_KINDS else ("reward", "rm-")
        while True:
            version = f"{prefix}{self.client.incr(_rkey('seq', seq))}"
            path = self._store_path(version)
            if not self._retrying(f"check {version}", self.fs.exists, path):
                return version

    def _write(self, local: Path, target: str, meta: dict) -> None:
        """Copy the directory's files to ``target``, ``loopchat.json`` (``meta``) last."""
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = file.relative_to(local).as_posix()
            if rel == METADATA_FILE:
                continue
            dest = f"{target}/{rel}"
            if self.is_local:  # object stores have no directories to make
                self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self._retrying(f"upload {rel}", self.fs.put_file, str(file), dest)
        metadata = json.dumps(meta, indent=2).encode()
        self._retrying(
            f"write {METADATA_FILE}", self.fs.pipe_file, f"{target}/{METADATA_FILE}", metadata
        )

    def _discard(self, target: str) -> None:
        """Delete a partial copy if the store lets us; if it does not (it is down), the orphan
        stays, unseen: readers only know versions from Redis."""
        try:
            self.fs.invalidate_cache()
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        except Exception as exc:
            log.warning("left a partial copy at %s (%s: %s)", target, type(exc).__name__, exc)

    def register(
        self,
        local_dir: str | Path,
        kind: Kind,
        parent: str | None,
        metrics: dict,
        info: dict | None = None,
    ) -> str:
        """Copy ``local_dir`` into the store as a new version and return its name.

        ``info`` holds provenance such as ``reward_model`` (the rm-N used) and ``data_window``
        (which rankings were used). The version is visible to readers only after every file,
        ``loopchat.json`` included, is in place.
        """
        if kind not in KINDS:
            raise RegistryError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
        local = Path(local_dir)
        adapter = is_adapter(local)
        if not adapter and not (local / "config.json").is_file():
            raise RegistryError(f"{local} is not a Hugging Face model directory (no config.json)")
        if parent is not None and self.get(parent) is None:
            raise UnknownVersion(f"parent {parent!r} is not a registered version")
        base = (info or {}).get("base")
        if adapter and (base is None or self.get(base) is None):
            raise RegistryError(f"{local} is a LoRA adapter: info['base'] must name its base")
        finite = weights_finite(local)
        version = self._next_version(kind)
        meta = {
            "version": version,
            "kind": kind,
            "parent": parent,
            "created_at": time.time(),
            "metrics": metrics,
            "info": info or {},
            "finite": finite,
            "uri": f"{self.checkpoints_url}/{version}",
        }
        dest = self._store_path(version)
        target = f"{self.root}/.tmp-{version}-{uuid.uuid4().hex[:8]}" if self.is_local else dest
        try:
            self._write(local, target, meta)
            if target != dest:
                self.fs.mv(target, dest, recursive=True)
        except BaseException:
            self._discard(target)
            raise
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(_rkey("version", version), "meta", json.dumps(meta))
        pipe.zadd(_rkey("versions"), {version: meta["created_at"]})
        pipe.execute()
        if self.keep is not None:
            try:
                self.prune(self.keep)
            except Exception:  # the version is registered; retention can catch up next time
                log.exception("pruning old checkpoints failed")
        return version

    def get(self, version: str) -> dict | None:
        """The version's metadata (with ``gate``, None until recorded), or None if unknown."""
        raw = self.client.hgetall(_rkey("version", version))
        if not raw.get("meta"):
            return None
        meta = json.loads(raw["meta"])
        meta["gate"] = json.loads(raw["gate"]) if raw.get("gate") else None
        return meta

    def _require(self, version: str) -> dict:
        meta = self.get(version)
        if meta is None:
            raise UnknownVersion(f"unknown version {version!r}")
        return meta

    def versions(self, kind: str | None = None) -> list[dict]:
        """Visible versions, oldest first, optionally only one kind (``"policy"``: every policy)."""
        names = self.client.zrange(_rkey("versions"), 0, -1)
        metas = [m for m in (self.get(v) for v in names) if m is not None]
        if kind == "policy":
            return [m for m in metas if m["kind"] in POLICY_KINDS]
        return [m for m in metas if kind is None or m["kind"] == kind]

    def record_gate(self, version: str, gate: dict) -> None:
        """Store the gate's verdict (``{"passed": bool, "reasons": [str, …], …checks}``)."""
        self._require(version)
        if not isinstance(gate.get("passed"), bool):
            raise RegistryError("a gate result needs a boolean 'passed'")
        self.client.hset(_rkey("version", version), "gate", json.dumps(gate))
        if self.alias("candidate") == version:  # a passed gate lets it into mixed slates
            self._publish("candidate", version)

    def base_path(self, version: str) -> Path | None:
        """For an adapter version, a local directory of the base it adapts (else None)."""
        base = (self._require(version).get("info") or {}).get("base")
        return self.local_path(base) if base else None

    def local_path(self, version: str) -> Path:
        """A local directory holding the version's files (fetched once from a remote store)."""
        self._require(version)
        if self.is_local:
            return Path(self._store_path(version))
        target = self.cache_dir / version
        if (target / METADATA_FILE).is_file():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        src = self._store_path(version)
        try:
            for remote in self._retrying(f"list {version}", self.fs.find, src):
                rel = remote[len(src) :].lstrip("/")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self._retrying(
                    f"download {version}/{rel}", self.fs.get_file, remote, str(tmp / rel)
                )
            tmp.rename(target)  # atomic; if another process won the race, keep its copy
        except OSError:
            if not (target / METADATA_FILE).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ aliases

    def alias(self, name: str) -> str | None:
        """The version an alias points at (``live``, ``candidate``, ``previous``), or None."""
        if name == "live":
            return self.client.lindex(_rkey("live_stack"), 0)
        if name == "previous":
            return self.client.lindex(_rkey("live_stack"), 1)
        if name == "candidate":
            return self.client.get(_rkey("alias", "candidate"))
        raise RegistryError(f"alias must be one of {ALIASES}, not {name!r}")

    def aliases(self) -> dict[str, str | None]:
        """All three aliases at once."""
        return {name: self.alias(name) for name in ALIASES}

    def _publish(self, alias: str, version: str | None) -> None:
        self.client.publish(CHANNEL, json.dumps({"alias": alias, "version": version}))

    def set_candidate(self, version: str) -> None:
        """Mark a gated policy version as the candidate waiting for an operator (or the loop's
        auto-promote). A version without a gate result is refused (``NotGated``): whatever an
        operator sees as "the candidate" has been judged."""
        meta = self._require(version)
        if meta["kind"] not in POLICY_KINDS:
            raise NotAPolicy(f"{version} is a {meta['kind']} model, not a policy")
        if meta.get("gate") is None:
            raise NotGated(f"{version} has no gate result yet; record the gate first")
        vkey = _rkey("version", version)

        def mark(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(vkey):  # pruned since we looked
                raise UnknownVersion(f"unknown version {version!r}")
            pipe.multi()
            pipe.set(_rkey("alias", "candidate"), version)

        self.client.transaction(mark, vkey)
        self._publish("candidate", version)

    def gated_candidate(self) -> str | None:
        """The candidate if its gate passed and it is not live (what online A/B may show)."""
        candidate = self.alias("candidate")
        if candidate is None or candidate == self.alias("live"):
            return None
        gate = (self.get(candidate) or {}).get("gate") or {}
        return candidate if gate.get("passed") is True else None

    def clear_candidate(self, version: str) -> bool:
        """Drop the ``candidate`` alias if it still names ``version`` (a retired candidate);
        returns whether it did. Checked and done in one transaction, so a newer candidate set
        meanwhile stays."""
        cand = _rkey("alias", "candidate")

        def drop(pipe: redis.client.Pipeline) -> bool:
            if pipe.get(cand) != version:
                return False
            pipe.multi()
            pipe.delete(cand)
            return True

        cleared = self.client.transaction(drop, cand, value_from_callable=True)
        if cleared:
            self._publish("candidate", None)
        return cleared

    def promote(
        self,
        version: str,
        *,
        by: str,
        reason: str,
        force: bool = False,
        automatic: bool = False,
        action: str = "promote",
    ) -> None:
        """Make ``version`` live (the old live becomes previous); no-op if already live.

        Refused (``PromotionRefused``) for reward models, for non-finite weights (always), for a
        failed or missing gate unless ``force`` (which needs a ``reason``: ``ReasonRequired``),
        and, when ``automatic``, while a rollback pins live (``Pinned``). A promotion that is
        not automatic is an operator's decision and lifts the pin. ``action="bootstrap"`` is the
        first version of an empty registry (nothing to gate it against). Serving processes
        follow via :data:`CHANNEL`.
        """
        meta = self._require(version)
        if meta["kind"] not in POLICY_KINDS:
            raise NotAPolicy(f"{version} is a {meta['kind']} model, not a policy")
        if not meta.get("finite", False):
            raise NonFiniteWeights(f"{version} has non-finite weights (NaN or inf)")
        if force and automatic:
            raise RegistryError("force is an operator's decision; an automatic promotion cannot")
        if force and not reason.strip():
            raise ReasonRequired("a forced promotion needs a reason (it is kept in the history)")
        gate = meta.get("gate")
        forced = action != "bootstrap" and (gate is None or not gate["passed"])
        if forced and not force:
            if gate is None:
                raise NotGated(
                    f"{version} has no gate result; use force (with a reason) to promote"
                )
            raise GateFailed(
                f"{version} failed its gate ({gate_reason(gate)}); use force to promote anyway"
            )
        stack, cand, pin = _rkey("live_stack"), _rkey("alias", "candidate"), _rkey("pin")
        changed: dict[str, Any] = {}

        def push(pipe: redis.client.Pipeline) -> None:
            live = pipe.lindex(stack, 0)
            changed.clear()
            if not pipe.exists(_rkey("version", version)):  # pruned since we looked
                raise UnknownVersion(f"unknown version {version!r}")
            pinned = pipe.get(pin)
            if automatic and pinned:
                held = json.loads(pinned)
                raise Pinned(
                    f"live is pinned to {held['version']} by {held['by']}'s rollback; "
                    "an operator must unpin it (or promote) first"
                )
            if live == version:
                return
            clears_candidate = pipe.get(cand) == version
            event = {
                "time": time.time(),
                "action": action,
                "version": version,
                "from": live,
                "by": by,
                "reason": reason,
                "forced": forced,
            }
            pipe.multi()
            pipe.lpush(stack, version)
            pipe.rpush(_rkey("history"), json.dumps(event))
            if clears_candidate:
                pipe.delete(cand)
            if not automatic:
                pipe.delete(pin)
            changed.update(live=version, previous=live, candidate=clears_candidate)

        self.client.transaction(push, stack, cand, pin, _rkey("version", version))
        if changed:
            self._publish("live", version)
            self._publish("previous", changed["previous"])
            if changed["candidate"]:
                self._publish("candidate", None)
        elif not automatic:  # promoting what is live already still lifts a pin
            self.client.delete(pin)

    def rollback(self, by: str, reason: str) -> str:
        """Make the previous live version live again and pin it (automatic promotions wait until
        an operator lifts the pin); return it. ``NoPrevious`` if none."""
        stack = _rkey("live_stack")
        result: dict[str, str | None] = {}

        def pop(pipe: redis.client.Pipeline) -> None:
            live, previous, before = (pipe.lindex(stack, i) for i in range(3))
            if previous is None:
                raise NoPrevious("there is no previous version to roll back to")
            event = {
                "time": time.time(),
                "action": "rollback",
                "version": previous,
                "from": live,
                "by": by,
                "reason": reason,
                "forced": False,
            }
            pin = {"version": previous, "by": by, "reason": reason, "time": event["time"]}
            pipe.multi()
            pipe.lpop(stack)
            pipe.rpush(_rkey("history"), json.dumps(event))
            pipe.set(_rkey("pin"), json.dumps(pin))
            result.update(live=previous, previous=before)

        self.client.transaction(pop, stack)
        self._publish("live", result["live"])
        self._publish("previous", result["previous"])
        return str(result["live"])

    def pin(self) -> dict | None:
        """The rollback pinning live (``{"version", "by", "reason", "time"}``), or None."""
        raw = self.client.get(_rkey("pin"))
        return json.loads(raw) if raw else None

    def unpin(self, by: str, reason: str) -> dict | None:
        """Lift the pin (recorded in the history as ``unpin``); returns the lifted pin, or None
        when live was not pinned (then nothing is recorded)."""
        lifted: dict[str, Any] = {}

        def lift(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(_rkey("pin"))
            lifted.clear()
            if not raw:
                return
            lifted.update(json.loads(raw))
            event = {
                "time": time.time(),
                "action": "unpin",
                "version": lifted["version"],
                "from": None,
                "by": by,
                "reason": reason,
                "forced": False,
            }
            pipe.multi()
            pipe.delete(_rkey("pin"))
            pipe.rpush(_rkey("history"), json.dumps(event))

        self.client.transaction(lift, _rkey("pin"))
        return lifted or None

    def history(self) -> list[dict]:
        """Every change of the live version, oldest first."""
        return [json.loads(e) for e in self.client.lrange(_rkey("history"), 0, -1)]

    def ensure_live(self, first_model: Path | Callable[[], Path]) -> tuple[str, Path]:
        """The live version and its local directory; the first process to find nothing live
        registers ``first_model`` as an ``sft`` version and makes it live.

        ``first_model`` may be a callable, called only then: a process joining a running
        deployment never looks for (or builds) a model of its own.
        """
        live = self.alias("live")
        if live is None:
            with self.client.lock(_rkey("lock", "bootstrap"), timeout=600, blocking_timeout=600):
                live = self.alias("live")
                if live is None:
                    model_dir = first_model() if callable(first_model) else first_model
                    live = self.register(model_dir, "sft", None, {}, {"source": str(model_dir)})
                    self.promote(
                        live, by="bootstrap", reason=f"first model: {model_dir}", action="bootstrap"
                    )
        return live, self.local_path(live)

    # ------------------------------------------------------------------ retention

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` policy versions and ``keep`` reward models.

        Never deleted: live, previous, the candidate, the newest ``sft`` version (the
        reference PPO measures KL against), and the base of any adapter version that stays.
        Returns the deleted versions.
        """
        if keep < 1:
            raise RegistryError("keep must be at least 1")
        protected = {v for v in self.aliases().values() if v}
        sft = self.versions("sft")
        if sft:
            protected.add(sft[-1]["version"])
        protected |= {b for m in self.versions() if (b := (m.get("info") or {}).get("base"))}
        deleted: list[str] = []
        for kind in ("policy", "reward"):
            metas = self.versions(kind)
            for meta in metas[: max(0, len(metas) - keep)]:
                version = meta["version"]
                if version in protected:
                    continue
                if not self._forget_unless_aliased(version):
                    continue
                path = self._store_path(version)
                if self._retrying(f"check {version}", self.fs.exists, path):
                    self._retrying(f"delete {version}", self.fs.rm, path, True)
                shutil.rmtree(self.cache_dir / version, ignore_errors=True)
                deleted.append(version)
        return deleted

    def _forget_unless_aliased(self, version: str) -> bool:
        """Remove ``version`` from Redis unless an alias took it meanwhile (a promotion racing
        the prune): checked and done in one transaction watching the aliases."""
        stack, cand = _rkey("live_stack"), _rkey("alias", "candidate")

        def forget(pipe: redis.client.Pipeline) -> bool:
            if version in (pipe.lindex(stack, 0), pipe.lindex(stack, 1), pipe.get(cand)):
                return False
            pipe.multi()
            pipe.zrem(_rkey("versions"), version)
            pipe.delete(_rkey("version", version))
            pipe.lrem(stack, 0, version)
            return True

        return self.client.transaction(forget, stack, cand, value_from_callable=True)
