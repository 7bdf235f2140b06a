"""How much of a learning round one identity may own.

Rankings are counted per identity (``serve.identity``: an API key's hash, or a client address),
never per ``user`` label, which a client invents freely. Without a cap one key posting
rankings as fast as the rate limit allows would make up most of every round: most of what the
reward model is refreshed on, and most of the held-out rankings the gate judges the candidate
by, so it could steer the model and hide that it did.

The cap is a water level ``m``: every identity keeps at most ``m`` rankings of the round (its
newest), and ``m`` is the largest level at which no capped identity holds more than ``share``
of what is kept: ``m ≤ share · Σ_j min(c_j, m)`` for the identities' counts ``c_j``. With fewer
than ``1/share`` identities no level keeps anyone under ``share``; then every identity keeps
as many as the smallest one has (they count equally), and one identity alone keeps everything
(a single-user install trains on all its rankings).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

Entry = tuple[str, dict[str, Any]]


def identity_of(event: dict[str, Any]) -> str:
    """The event's identity; events stored before identities existed fall back to the label."""
    return event.get("identity") or f"user:{event.get('user')}"


def identity_cap(counts: Sequence[int], share: float) -> int:
    """The most rankings one identity keeps, for identities with ``counts`` rankings each:
    the largest ``m`` with ``m ≤ share · Σ_j min(c_j, m)``, else the smallest count."""
    if not counts:
        return 0
    exactly = Counter(counts)  # identities with exactly c rankings
    above, level_sum, best = len(counts), 0, 0  # above: identities with at least m
    for m in range(1, max(counts) + 1):
        level_sum += above  # Σ_j min(c_j, m), from the one at m - 1
        if m <= share * level_sum:
            best = m
        above -= exactly[m]  # identities with exactly m rankings stop growing after m
    return best or min(counts)


def cap_per_identity(entries: Sequence[Entry], share: float) -> tuple[list[Entry], int]:
    """``entries`` (stream order) with each identity's oldest ones beyond the cap left out;
    returns the kept entries, still in order, and how many were left out."""
    counts = Counter(identity_of(event) for _, event in entries)
    cap = identity_cap(list(counts.values()), share)
    kept_from: dict[str, int] = {}
    kept: list[Entry] = []
    for entry_id, event in reversed(entries):  # newest first: an identity keeps its newest
        who = identity_of(event)
        if kept_from.get(who, 0) < cap:
            kept_from[who] = kept_from.get(who, 0) + 1
            kept.append((entry_id, event))
    kept.reverse()
    return kept, len(entries) - len(kept)
