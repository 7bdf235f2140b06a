"""What a learning round hands a learner, and what a learner hands the next round.

Every learner (``learn.ppo``, ``learn.rloo``, ``learn.dpo``, ``learn.bon``) is one module with a
config dataclass and ``train_round(data: RoundData, config) -> metrics``; the round
(``learn.loop``) picks one by name (``LOOPCHAT_LEARNER``) from :data:`LEARNERS`, so switching
learners needs no code change. All of them consume the same rankings.

**Continuity.** A round starts from the previous round's policy *and* trainer state (optimizer
moments, value head, the KL controller's β), whether or not the gate promoted that candidate:
the gate decides what goes live, not what the learner remembers. The state is saved inside the
candidate's directory (``learner/state.pt``, plain tensors, loaded with ``weights_only=True``),
so it travels with the checkpoint through any registry store; vLLM and transformers ignore it.
The KL reference is always the SFT model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from learn import rlhf
from learn.modeling import LoraOptions
from serve.events import FeedbackEvent, Messages

# name -> module; each module has CONFIG (its dataclass) and train_round(data, config).
LEARNERS: dict[str, str] = {
    "ppo": "learn.ppo",
    "rloo": "learn.rloo",
    "dpo": "learn.dpo",
    "bon": "learn.bon",
}
STATE_FILE = Path("learner") / "state.pt"


@dataclass
class TrainerOptions:
    """What every learner's config has (TRL's ``TrainingArguments`` in small): each learner's
    dataclass extends it, and redeclares a field where its method wants another default."""

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast for forwards and backward (CPU/GPU)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of sampling and data order (plus the round's own)."}
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda."})
    micro_batch_size: int = field(
        default=8,
        metadata={
            "help": "Sequences per forward/backward pass; a step's gradient is the sum over its "
            "micro-batches, so the update does not depend on it. What bounds a step's memory: "
            "on SmolLM2-135M (49k-token vocabulary, 30 layers) one pass over 64 answers took "
            "the worker past 15 GB."
        },
    )

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0")
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")


@dataclass
class SamplingOptions(TrainerOptions):
    """What the learners that sample their own answers (ppo, rloo, bon) add."""

    response_length: int = field(
        default=64, metadata={"help": "Most tokens sampled per answer (end-of-turn included)."}
    )
    max_prompt_length: int = field(
        default=192, metadata={"help": "Longest prompt in tokens; longer ones lose their start."}
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (1.0: the policy as served); log-probs use it."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.response_length < 1 or self.max_prompt_length < 1:
            raise ValueError("response_length and max_prompt_length must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: the learner samples its own answers")


@dataclass
class KLOptions(SamplingOptions):
    """What the learners with a KL penalty to the SFT model in their reward (ppo, rloo) add:
    β, fixed or steered toward a target KL."""

    kl_coef: float = field(
        default=0.05, metadata={"help": "β of the KL penalty (the initial β if adaptive)."}
    )
    adaptive_kl: bool = field(
        default=True,
        metadata={"help": "Steer β toward kl_target (Ziegler et al. 2019); False: fixed β."},
    )
    kl_target: float = field(
        default=6.0, metadata={"help": "Target KL(π‖π_SFT) per answer, nats (adaptive β)."}
    )
    kl_horizon: int = field(
        default=10_000, metadata={"help": "Episodes over which adaptive β corrects its error."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon < 1):
            raise ValueError("an adaptive KL needs kl_target > 0 and kl_horizon >= 1")

    def kl_controller(self, beta: float) -> rlhf.FixedKLController | rlhf.AdaptiveKLController:
        """The controller of β, starting at ``beta`` (the config's, or where a previous
        round's adaptive controller left it)."""
        if self.adaptive_kl:
            return rlhf.AdaptiveKLController(beta, self.kl_target, self.kl_horizon)
        return rlhf.FixedKLController(beta)


@dataclass
class RoundData:
    """One round's inputs: where to start, what to stay close to, and the round's data."""

    policy_dir: Path  # start: the previous round's policy (continuity), or live
    reference_dir: Path  # the SFT reference of the KL penalty / DPO's reference
    reward_dir: Path  # the reward model refreshed this round
    events: list[FeedbackEvent]  # the round's new training rankings, each reaching training once
    prompts: list[Messages]  # distinct prompt conversations for on-policy sampling
    ptx_texts: list[str] | None  # pre-training text for a ptx term (None: off)
    state: dict[str, Any] | None  # the previous round's trainer state of this learner
    out_dir: Path  # write the policy here (and the state, with save_state)
    seed: int = 0  # differs per round, so rounds do not repeat their draws
    lora: LoraOptions | None = None  # train a LoRA adapter on the reference (a large model)


class Learner(Protocol):
    """The module interface (``learn.ppo`` and its siblings)."""

    CONFIG: type

    def train_round(self, data: RoundData, config: Any) -> dict[str, Any]: ...


def learner(name: str) -> Learner:
    """The learner module called ``name``; an unknown name is a ``ValueError`` naming the
    known ones."""
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r} (choose from {', '.join(LEARNERS)})")
    return importlib.import_module(LEARNERS[name])  # type: ignore[return-value]


def save_state(out_dir: Path, state: dict[str, Any]) -> None:
    """Keep a learner's state beside the policy it trained (see the module docstring)."""
    path = out_dir / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_state(policy_dir: Path) -> dict[str, Any] | None:
    """The state saved with ``policy_dir``, or None (a first round, or a version no learner
    wrote). Tensors only: never unpickles code."""
    path = policy_dir / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def continues(state: dict[str, Any] | None, name: str) -> bool:
    """Whether ``state`` is learner ``name``'s own (another learner's is never resumed)."""
    return state is not None and state.get("learner") == name


def restore_optimizer(
    optimizer: torch.optim.Optimizer, state: dict[str, Any] | None, name: str
) -> bool:
    """Load Adam's moments and step count from learner ``name``'s ``state`` (its
    ``"optimizer"`` entry); returns whether it did. The learning rate and weight decay stay
    this run's: loading a state dict would silently bring back the saved ones."""
    if not continues(state, name):
        return False
    keep = [{k: group[k] for k in ("lr", "weight_decay")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, settings in zip(optimizer.param_groups, keep, strict=True):
        group.update(settings)
    return True
