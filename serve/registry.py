"""The checkpoint registry: versions, the aliases that say which one serves, and their history.

Shared by every process (API replicas, learning workers, the CLI) through Redis; the weights
live in a checkpoint store that is any fsspec URL (a local path by default, ``s3://…`` when
several machines share it; the matching fsspec backend, e.g. ``s3fs``, must be installed).

A version is a directory in Hugging Face format plus ``loopchat.json`` (its metadata), at
``<checkpoints_url>/<version>``. Policies are ``v1, v2, …`` (kind ``sft``, or the learner that made
it: ``ppo``, ``rloo``, ``dpo``, ``bon``); reward
models are ``rm-1, rm-2, …`` (kind ``reward``). A version becomes visible only once fully
written: files are copied under a temporary name, renamed to the version name, and only then is
its metadata written to Redis, which is what every reader looks at. A crash mid-copy leaves an
orphan directory that no reader ever sees.

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

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """A registry operation that cannot be done as asked (the message says why; ``code`` is a
    stable machine-readable name for API error bodies)."""

    code = "registry_error"


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
    ) -> None:
        """``client`` must decode responses (``serve.store.sync_client``). ``cache_dir`` holds
        local copies of versions from a remote store (default ``<data_dir>/cache/checkpoints``).
        With ``keep``, every registration ends with ``prune(keep)``, so the store stays bounded
        whoever registers.
        """
        self.client = client
        self.keep = keep
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
        return cls(client, settings.checkpoints_url, cache_dir, keep=settings.keep_versions)

    # ------------------------------------------------------------------ versions

    @property
    def is_local(self) -> bool:
        """Whether the store is a local filesystem (then versions are used in place)."""
        return isinstance(self.fs, LocalFileSystem)

    def _store_path(self, version: str) -> str:
        return f"{self.root}/{version}"

    def _next_version(self, kind: str) -> str:
        """Reserve the next free version name; skips names whose directory already exists
        (left by a crash or by a Redis that lost its data) so nothing stored is overwritten."""
        seq, prefix = ("policy", "v") if kind in POLICY_KINDS else ("reward", "rm-")
        while True:
            version = f"{prefix}{self.client.incr(_rkey('seq', seq))}"
            if not self.fs.exists(self._store_path(version)):
                return version

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
        tmp = f"{self.root}/.tmp-{version}-{uuid.uuid4().hex[:8]}"
        try:
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                rel = file.relative_to(local).as_posix()
                if rel == METADATA_FILE:
                    continue
                target = f"{tmp}/{rel}"
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(file), target)
            self.fs.pipe_file(f"{tmp}/{METADATA_FILE}", json.dumps(meta, indent=2).encode())
            self.fs.mv(tmp, self._store_path(version), recursive=True)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
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
            for remote in self.fs.find(src):
                rel = remote[len(src) :].lstrip("/")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(tmp / rel))
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
                if self.fs.exists(self._store_path(version)):
                    self.fs.rm(self._store_path(version), recursive=True)
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
