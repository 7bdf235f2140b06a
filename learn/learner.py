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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

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
