"""TRL's PPOTrainer on the benchmark's models: the baseline side of ``loopchat bench ppo``.

Runs in its own virtual environment (TRL 1.12.0, the last release with PPO, may pin other
versions than loopchat), so it imports nothing from loopchat:

    <trl venv>/bin/python learn/bench_ppo_trl.py SPEC.json RESULT.json

SPEC names the policy, reference and reward model directories, the prompts (token ids) and the
settings; RESULT gets the time of every PPO step and of its generation and no-gradient forwards.
Those two phases are timed by wrapping the trainer module's own ``batch_generation``,
``forward`` and ``get_reward`` functions (calls made with gradients off are the rollout
forwards); the rest of a step is the PPO epochs. TRL's value model is a copy of the reward
model, as in TRL's examples.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo


class PhaseClock:
    """Seconds spent in wrapped functions since the last reset, by phase."""

    def __init__(self) -> None:
        self.seconds = {"generation": 0.0, "forwards": 0.0}

    def wrap(self, fn: Callable, phase: str | None) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if phase is None and torch.is_grad_enabled():
                return fn(*args, **kwargs)  # a training forward: part of the PPO epochs
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase or "forwards"] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out


class StepTimes(TrainerCallback):
    """Wall time of each PPO step and its phases."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock
        self.steps: list[dict[str, float]] = []
        self.last = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = time.perf_counter()
        self.clock.take()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        phases = self.clock.take()
        total = now - self.last
        rest = total - phases["generation"] - phases["forwards"]
        self.steps.append({"total": total, **phases, "backward": rest})
        self.last = now


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["ref"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(
        spec["reward"], num_labels=1, dtype=torch.float32
    )
    value = AutoModelForSequenceClassification.from_pretrained(
        spec["reward"], num_labels=1, dtype=torch.float32
    )
    steps = spec["steps"]
    dataset = Dataset.from_dict({"input_ids": spec["prompts"]})
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1, num_mini_batches=1,
            num_ppo_epochs=spec["ppo_epochs"], response_length=spec["response_length"],
            total_episodes=spec["batch_size"] * steps, learning_rate=spec["learning_rate"],
            temperature=spec["temperature"], kl_coef=spec["kl_coef"], stop_token="eos",
            bf16=spec["bf16"], fp16=False, gradient_checkpointing=False, use_cpu=True,
            num_sample_generations=0, save_strategy="no", report_to="none", logging_steps=1,
            disable_tqdm=True, seed=spec["seed"], local_rollout_forward_batch_size=64,
        )  # fmt: skip
        clock = PhaseClock()
        trl_ppo.batch_generation = clock.wrap(trl_ppo.batch_generation, "generation")
        trl_ppo.forward = clock.wrap(trl_ppo.forward, None)
        trl_ppo.get_reward = clock.wrap(trl_ppo.get_reward, None)
        times = StepTimes(clock)
        trainer = PPOTrainer(
            args=config, processing_class=tokenizer, model=policy, ref_model=ref,
            reward_model=reward, value_model=value, train_dataset=dataset, callbacks=[times],
        )  # fmt: skip
        trainer.train()
    import trl

    result = {"trl_version": trl.__version__, "steps": times.steps}
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
