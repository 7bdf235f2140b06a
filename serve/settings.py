"""All runtime settings, read from ``LOOPCHAT_*`` environment variables (CLI flags override).

This is the one place a setting is defined and documented; the README's configuration table
is generated from these descriptions (``loopchat config``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "loopchat"


class Settings(BaseSettings):
    """Process settings; every field maps to ``LOOPCHAT_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LOOPCHAT_", extra="ignore")

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the embedded Redis, the built-in model and caches live.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis to use (redis://, rediss://, unix://). Unset: an embedded redis-server "
        "persisted (AOF) in the data dir.",
    )
    checkpoints: str | None = Field(
        default=None,
        description="fsspec URL of the checkpoint store (a path or s3://bucket/prefix). Unset: "
        "<data_dir>/checkpoints. For s3:// (the `s3` extra) the endpoint and credentials come "
        "from the standard variables: AWS_ENDPOINT_URL (or FSSPEC_S3_ENDPOINT_URL), "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.",
    )
    checkpoint_retries: int = Field(
        default=5,
        ge=1,
        le=20,
        description="Attempts per checkpoint-store operation on transient errors (network, 5xx), "
        "with backoff from 0.5 s doubling to 8 s; an upload that still fails registers nothing.",
    )
    model: str | None = Field(
        default=None,
        description="Hugging Face model directory to serve when the registry has no live "
        "version yet. Unset: the built-in model (trained once, then cached).",
    )
    builtin_recipe: Literal["small", "test"] = Field(
        default="small",
        description="How the built-in model is trained: `small` (the real one, minutes) or "
        "`test` (a nano model in seconds, for tests of the bootstrap path).",
    )
    model_name: str = Field(default="loopchat", description="Served model name in /v1/models.")
    engine: Literal["vllm", "hf"] = Field(default="vllm", description="Inference engine.")
    host: str = Field(default="127.0.0.1", description="Bind address of `loopchat up`.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of `loopchat up`.")
    worker: bool = Field(
        default=True, description="Start a learning worker child process with `loopchat up`."
    )
    max_n: int = Field(default=4, ge=1, le=16, description="Largest `n` a request may ask for.")
    max_tokens_default: int = Field(
        default=64, ge=1, description="max_tokens when a request does not say."
    )
    max_model_len: int = Field(default=512, ge=16, description="Context length served.")
    completion_ttl: int = Field(
        default=7 * 24 * 3600, ge=60, description="Seconds a completion stays rankable."
    )
    kv_cache_bytes: int = Field(
        default=64 << 20, ge=1 << 20, description="vLLM KV-cache size on CPU, in bytes."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated client API keys (Bearer). Unset: no key needed.",
    )
    admin_token: str | None = Field(
        default=None, description="Bearer token for /admin/* and the /ops page."
    )
    admin_login_failures: int = Field(
        default=5,
        ge=1,
        description="Wrong admin tokens one address may present per minute (to /admin/* or the "
        "/ops login) before it is refused (429) for the rest of the minute.",
    )
    round_every: int = Field(
        default=64, ge=1, description="New rankings that start a learning round."
    )
    auto_promote: bool = Field(
        default=False,
        description="Promote without an operator: a candidate whose win rate against live "
        "clears 50% in mixed slates (`LOOPCHAT_AB_SHARE` > 0), else one that passes the gate.",
    )
    ab_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of ranked turns (requests with n >= 2) whose answers mix live and "
        "the candidate, blind, while a candidate that passed the gate exists (its answers come "
        "from a second, transformers engine). 0 turns online A/B off: then auto-promote "
        "promotes on the gate alone.",
    )
    ab_min_rankings: int = Field(
        default=100,
        ge=1,
        description="Mixed rankings before the win-rate test may promote or retire a candidate.",
    )
    ab_max_rankings: int = Field(
        default=2000,
        ge=1,
        description="Mixed rankings after which a candidate with no measured difference from "
        "live is retired (inconclusive).",
    )
    ab_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=0.5,
        description="Error level of the win-rate test's always-valid confidence sequence "
        "(false promotions of a candidate no better than live stay below it).",
    )
    loop_config: str | None = Field(
        default=None,
        description="JSON overrides of a learning round's LoopConfig (learn/loop.py), e.g. "
        '`{"max_prompts": 64, "ppo": {...}}`. Unset: defaults sized for a CPU.',
    )
    learner: Literal["ppo", "rloo", "dpo", "bon"] = Field(
        default="rloo",
        description="How a learning round turns rankings into a new policy (learn/learner.py): "
        "`rloo` group-baseline policy gradient (the default: it learned most in `loopchat "
        "bench loop`), `ppo` (InstructGPT's), `dpo` on the rankings' pairs, `bon` best-of-n "
        "distillation.",
    )
    ptx: str = Field(
        default="auto",
        description="Text of the PPO-ptx term: `auto` (the built-in corpus for the built-in "
        "model, off for a user's model), `builtin`, `off`, or a .txt/.jsonl file or folder of "
        "the served model's kind of text.",
    )
    lora_above: int = Field(
        default=50_000_000,
        ge=0,
        description="Models with more parameters than this learn as LoRA adapters on their "
        "frozen base (peft), and vLLM serves them with runtime LoRA: a new version goes live by "
        "loading its adapter. The built-in model (~1M) stays below: full-weight updates.",
    )
    lora_rank: int = Field(
        default=16, ge=1, le=256, description="LoRA rank r of the adapters (and vLLM's max)."
    )
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha (scale alpha / r).")
    keep_versions: int = Field(
        default=10, ge=2, description="Policy versions kept (live and previous never deleted)."
    )
    feedback_rate: int = Field(
        default=120,
        ge=1,
        description="Rankings one identity (an API key; the client address when keys are off) "
        "may post per minute (429 above). The `user` field is a label and does not count.",
    )
    chat_rate: int = Field(
        default=600,
        ge=1,
        description="Chat completion requests one identity (an API key; the client address "
        "when keys are off) may make per minute (429 above).",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body accepted (413 above)."
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request body may take to arrive in full (408 after).",
    )
    max_comment_chars: int = Field(default=2000, ge=0, description="Longest feedback comment.")
    feedback_retention: int = Field(
        default=1_000_000,
        ge=1,
        description="Rankings the feedback stream keeps: after each learning round the oldest "
        "beyond this many are trimmed, but never one the learner has not consumed yet (with no "
        "worker nothing is trimmed). `loopchat feedback stats` counts the trimmed ones; export "
        "and the per-version numbers cover those kept.",
    )
    max_waiting: int = Field(
        default=64,
        ge=0,
        description="Chat requests that may wait for an engine beyond those it generates at "
        "once (the HF engine 4; vLLM its max_num_seqs / LOOPCHAT_MAX_N). More are answered 503 "
        "with Retry-After rather than queued without end.",
    )
    redis_fsync: Literal["always", "everysec"] = Field(
        default="everysec",
        description="When the embedded Redis fsyncs its append-only file. `always`: before "
        "a ranking's 201, so a 201 survives power loss (costs ingest throughput, see the README). "
        "`everysec`: once a second, so a crash of the OS or power can lose the last second of "
        "201s (a killed redis-server or loopchat loses nothing). Deployed Redis: its own config.",
    )
    worker_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        description="How often a learning worker writes its heartbeat; `/health` calls the "
        "worker dead after three missed beats.",
    )
    task_visibility_s: int = Field(
        default=300,
        ge=5,
        description="Seconds before a round queued to a worker that died (kill -9, power) is "
        "delivered again. Keep it above the longest round when several workers share a queue "
        "(a live round redelivered early is skipped, never run twice).",
    )
    swap_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest a hot swap may load new weights; one that takes longer is "
        "abandoned and serving goes on with the old version (retried at the next announcement "
        "or poll).",
    )
    supervise: bool = Field(
        default=True,
        description="`loopchat up` restarts its worker child and embedded redis-server when "
        "either dies.",
    )
    access_log: bool = Field(
        default=True,
        description="Log one line per HTTP request. Costs ~5% of the API's CPU at high request "
        "rates; `/metrics` counts chat requests either way.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @cached_property
    def checkpoints_url(self) -> str:
        """Where checkpoints are stored, as an fsspec URL."""
        return self.checkpoints or str(self.data_dir / "checkpoints")
