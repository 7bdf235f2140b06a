"""Prometheus metrics of the API process, served at ``GET /metrics``.

They live in a registry of their own so that what ``/metrics`` shows is exactly loopchat's
metrics, whatever else the libraries in this process register globally.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "loopchat_chat_requests",
    "Chat completion requests by outcome (ok, error, busy: refused with 503, aborted).",
    ["outcome"],
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "loopchat_prompt_tokens", "Prompt tokens of completed requests.", registry=REGISTRY
)
COMPLETION_TOKENS = Counter(
    "loopchat_completion_tokens",
    "Generated tokens of completed requests (all candidates).",
    registry=REGISTRY,
)
LATENCY = Histogram(
    "loopchat_request_latency_seconds",
    "Time from request to the last candidate's last token.",
    ["stream"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "loopchat_time_to_first_token_seconds",
    "Time from request to the first generated text.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SWAP_SECONDS = Histogram(
    "loopchat_swap_seconds",
    "Time the engine took to switch versions: kind=adapter over the same base (no drain), "
    "kind=weights for a drain and reload.",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
LIVE_VERSION = Gauge(
    "loopchat_live_version_info",
    "The checkpoint version the engine serves (value 1 on its label).",
    ["version"],
    registry=REGISTRY,
)


def set_live_version(version: str) -> None:
    """Show ``version`` as the one live version (read from the engine at scrape time)."""
    LIVE_VERSION.clear()
    LIVE_VERSION.labels(version=version).set(1)
