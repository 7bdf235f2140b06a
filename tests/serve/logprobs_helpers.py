"""What every choice's ``logprobs`` must satisfy, whichever engine or endpoint produced it."""

from __future__ import annotations

import pytest


def check_logprobs(content: str, entries: list[dict], top: int) -> None:
    """``entries`` (a choice's ``logprobs.content``, as JSON) are OpenAI's shape with ``top``
    alternatives each, most likely first, every log-probability ≤ 0, and their tokens' bytes
    joined are the choice's text (half characters aside: the engines render those apart)."""
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert -9999 <= entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode(errors="replace") == entry["token"]
        alternatives = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert len(alternatives) == top
        assert alternatives == sorted(alternatives, reverse=True)
        assert all(-9999 <= lp <= 0 for lp in alternatives)
        for alt in entry["top_logprobs"]:
            if alt["bytes"] == entry["bytes"]:  # the chosen token among the most likely
                assert alt["logprob"] == pytest.approx(entry["logprob"])
        if top:
            assert entry["logprob"] <= alternatives[0]
    joined = bytes(b for entry in entries for b in entry["bytes"]).decode(errors="replace")
    assert joined.replace("\ufffd", "") == content.replace("\ufffd", "")
