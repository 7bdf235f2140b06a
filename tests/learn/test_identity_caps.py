"""One identity's share of a learning round: the water level and who keeps what."""

from __future__ import annotations

import pytest

from learn.identity_caps import cap_per_identity, identity_cap, identity_of
from learn.loop import LoopConfig, select_rankings


def share_of_largest(counts: list[int], cap: int) -> float:
    kept = [min(c, cap) for c in counts]
    return max(kept) / sum(kept)


@pytest.mark.parametrize(
    ("counts", "share", "cap"),
    [
        ([1000], 0.25, 1000),  # alone: keeps everything
        ([5, 1000], 0.25, 5),  # too few identities for 25%: all count as the smallest
        ([10, 10, 10, 1000], 0.25, 10),  # 10 of 40 = 25%
        ([100, 100, 100, 100, 1000], 0.25, 133),  # 133 ≤ 0.25 · (400 + 133) < 134
        ([1, 1, 1, 1, 1000], 0.25, 1),
        ([3, 7], 1.0, 7),  # share 1: no cap
        ([], 0.25, 0),
    ],
)
def test_the_cap_is_the_highest_level_no_identity_exceeds_its_share_at(
    counts: list[int], share: float, cap: int
) -> None:
    assert identity_cap(counts, share) == cap
    if cap and share * len(counts) > 1:  # the definition: m ≤ share · Σ min(c, m), m largest
        assert cap <= share * sum(min(c, cap) for c in counts)
        assert cap == max(counts) or cap + 1 > share * sum(min(c, cap + 1) for c in counts)
        assert share_of_largest(counts, cap) <= share


def event(identity: str, user: str) -> dict:
    return {
        "id": f"fb-{identity}-{user}",
        "messages": [{"role": "user", "content": "hi"}],
        "candidates": ["a", "b"],
        "ranking": [[0], [1]],
        "all_bad": False,
        "user": user,
        "identity": identity,
    }


def test_an_identity_keeps_its_newest_rankings_up_to_the_cap_in_stream_order() -> None:
    entries = [(f"{i}-0", event("key:spam" if i % 2 else f"key:{i}", f"u{i}")) for i in range(20)]
    kept, dropped = cap_per_identity(entries, 0.25)
    spam = [entry_id for entry_id, e in kept if e["identity"] == "key:spam"]
    assert spam == ["15-0", "17-0", "19-0"]  # 10 honest + 3 = 13; 3 ≤ 0.25 · 13 < 4
    order = [int(entry_id.split("-")[0]) for entry_id, _ in kept]
    assert dropped == 7 and order == sorted(order)  # still in stream order
    assert identity_of({"user": "old"}) == "user:old"  # events from before identities


def test_one_identity_posting_under_invented_user_names_gets_one_identitys_share() -> None:
    """1,000 rankings from one key, each with a different `user` label, beside 40 honest users
    of 5 rankings each: the key holds at most a quarter of the round, train and held out."""
    honest = [event(f"key:h{i}", f"h{i}") for i in range(40) for _ in range(5)]
    attack = [event("key:attacker", f"sockpuppet-{j}") for j in range(1000)]
    everything = [(f"{n}-0", e) for n, e in enumerate(honest + attack)]
    config = LoopConfig(heldout_fraction=0.1, max_heldout=64, rm_replay=0)
    rankings = select_rankings(everything, everything, set(), config)
    used = rankings.train + rankings.heldout
    attacker = [e for _, e in used if e["identity"] == "key:attacker"]
    assert len(attacker) / len(used) <= 0.25
    assert len(attacker) == identity_cap([5] * 40 + [1000], 0.25) == 66
    assert rankings.capped == 1000 - 66 and rankings.window()["capped"] == 934
    uncapped = select_rankings(everything, everything, set(), LoopConfig(max_identity_share=1))
    assert uncapped.capped == 0 and len(uncapped.train + uncapped.heldout) == 1200
