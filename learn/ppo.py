"""PPO with a per-token KL penalty to the SFT model and PPO-ptx: InstructGPT's RL stage.

One step, as :func:`train_ppo` runs it:

1. **generation** — the current policy samples one answer per prompt. By default the sampler is
   an in-process vLLM engine whose weights are overwritten in memory after every update (no
   checkpoint written, no engine restart); transformers ``generate`` is the fallback.
2. **forwards** — without gradients: the policy's log-probs and values (value head on the
   policy's own last hidden states), the frozen SFT reference's log-probs, and the reward
   model's score at the answer's last token, normalised with the statistics stored with it.
3. **advantages** — per-token reward −β·KL(π‖π_SFT) plus the score at the last token, GAE,
   whitened advantages (``learn.rlhf``).
4. **backward** — ``ppo_epochs`` passes over the batch in minibatches: clipped policy loss,
   clipped value loss, and the PPO-ptx term −γ·log-likelihood on a batch of pre-training text.
5. **sync** — the new weights go into the sampler; the KL controller updates β.

Layout of a batch: prompt + answer, right-padded; ``response_index[b, t]`` is the position whose
hidden state predicts answer token ``t`` (so logits, values and reference log-probs are gathered
there). Right padding keeps position ids plain and never leaves a query row fully masked.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from learn import rlhf
from learn.learner import KLOptions, RoundData, restore_optimizer, save_state
from learn.modeling import (
    LoraOptions,
    autocast,
    backbone,
    backward_in_micro_batches,
    load_causal_lm,
    load_policy,
    resolve_device,
    save_policy,
)
from learn.reward import check_model_dir, last_token_rewards, load_reward_model, normalize_rewards
from learn.tokens import (
    Rollout,
    encode_prompt,
    generate_answers,
    make_rollout,
    pack_texts,
    prompt_batches,
    sequence_logprobs,
)
from serve.events import Messages

logger = logging.getLogger(__name__)


@dataclass
class PPOConfig(KLOptions):
    """Settings of one PPO run. Defaults follow TRL's PPOTrainer where they overlap."""

    steps: int = field(
        default=8, metadata={"help": "PPO steps (each: one rollout batch, then its updates)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Episodes (prompts) per rollout batch."})
    mini_batch_size: int = field(
        default=8, metadata={"help": "Episodes per gradient step inside a PPO epoch."}
    )
    ppo_epochs: int = field(
        default=4, metadata={"help": "Passes over each rollout batch (PPO's sample reuse)."}
    )
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ."})
    lam: float = field(default=0.95, metadata={"help": "GAE λ."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip ε."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around old values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "β of the per-token KL penalty (initial β if adaptive)."}
    )
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator: k1 = log π − log π_SFT, k3 = (ρ−1) − log ρ."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of answers cut at response_length."},
    )
    ptx_coef: float = field(
        default=0.1,
        metadata={"help": "γ of PPO-ptx: weight of the pre-training log-likelihood (0 = off)."},
    )
    ptx_batch_size: int = field(
        default=4, metadata={"help": "Pre-training blocks per gradient step (PPO-ptx)."}
    )
    ptx_length: int = field(default=128, metadata={"help": "Tokens per pre-training block."})
    engine: str = field(
        default="vllm",
        metadata={"help": "Rollout sampler: vllm (in-process, weights synced in memory) or hf."},
    )
    vllm_kv_cache_bytes: int = field(
        default=64 << 20, metadata={"help": "KV cache of the vLLM sampler, bytes (CPU)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, not {self.kl_estimator!r}")
        if self.engine not in ("vllm", "hf"):
            raise ValueError(f"engine must be vllm or hf, not {self.engine!r}")
        if min(self.steps, self.batch_size, self.mini_batch_size, self.ppo_epochs) < 1:
            raise ValueError("steps, batch_size, mini_batch_size and ppo_epochs must be >= 1")


# --- the policy with a value head ----------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The causal LM plus a scalar value head reading the same last hidden states.

    Sharing the backbone halves the forwards of a separate value model; the head starts at zero
    (values 0, so the first advantages are the rewards themselves) and is not saved: the output
    is the policy alone, loadable as it is by transformers and vLLM.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, R, V) over answer tokens, scaled by 1/temperature; values (B, R))."""
        hidden = backbone(self.lm)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        index = batch.response_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        hidden = hidden.gather(1, index)
        logits = self.lm.get_output_embeddings()(hidden).float() / temperature
        return logits, self.value_head(hidden).squeeze(-1).float()


# --- samplers ------------------------------------------------------------------------------------


class HFSampler:
    """transformers ``generate`` on the training policy itself (always in sync, slower)."""

    def __init__(self, policy: PolicyWithValue, tokenizer: Any, config: PPOConfig) -> None:
        self.policy, self.tokenizer, self.config = policy, tokenizer, config

    def generate(self, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], None]:
        """One sampled answer per prompt, cut after its end-of-turn token."""
        answers = generate_answers(
            self.policy.lm, prompts, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
            self.config.response_length, self.config.temperature,
        )  # fmt: skip
        return answers, None

    def sync(self, policy: PolicyWithValue) -> None:
        """Nothing to do: generation uses the training weights."""

    def close(self) -> None:
        """Nothing to release."""


class VLLMSampler:
    """An in-process vLLM engine sampling from the policy, its weights updated in memory.

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process, which is what
    lets ``collective_rpc("reload_weights", weights_iterator=…)`` take the trainer's tensors
    directly; the prefix cache is reset after each reload (it holds the old weights' KV).
    vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the life of the
    process; :meth:`close` puts the real one back so later training in a long-lived worker
    can still set its threads.
    """

    def __init__(self, model_dir: Path, config: PPOConfig) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM, SamplingParams

        self._set_num_threads = torch.set_num_threads
        self.llm = LLM(
            model=str(model_dir), enforce_eager=True, dtype="float32", seed=config.seed,
            kv_cache_memory_bytes=config.vllm_kv_cache_bytes,
            max_model_len=config.max_prompt_length + config.response_length + 1,
        )  # fmt: skip
        self.params = SamplingParams(
            temperature=config.temperature, top_p=1.0, top_k=0,
            max_tokens=config.response_length, logprobs=0, detokenize=False,
        )  # fmt: skip

    def generate(
        self, prompts: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One answer per prompt (ending in end-of-turn when the model ended it), and the
        engine's log-prob of each sampled token (to check it agrees with the trainer's)."""
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], self.params, use_tqdm=False
        )
        responses, logprobs = [], []
        for out in outs:
            sample = out.outputs[0]
            responses.append(list(sample.token_ids))
            logprobs.append(
                [
                    step[tok].logprob
                    for step, tok in zip(sample.logprobs, sample.token_ids, strict=True)
                ]
            )
        return responses, logprobs

    def sync(self, policy: PolicyWithValue) -> None:
        """Load the policy's current weights into the engine, in place."""
        weights = ((name, t.detach()) for name, t in policy.lm.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        torch.set_num_threads = self._set_num_threads


# --- one PPO step --------------------------------------------------------------------------------


@dataclass
class Experience:
    """A scored rollout batch: everything the PPO epochs need, fixed during them."""

    rollout: Rollout
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def score_rollout(
    policy: PolicyWithValue,
    ref: PreTrainedModel,
    rm: PreTrainedModel,
    rollout: Rollout,
    kl_coef: float,
    config: PPOConfig,
) -> tuple[Experience, dict[str, float]]:
    """The no-gradient forwards, the per-token rewards and the advantages."""
    mask = rollout.response_mask
    with torch.no_grad(), autocast(rollout.input_ids.device, config.bf16):
        logits, values = policy(rollout, config.temperature)
        logprobs = rlhf.logprobs_from_logits(logits, rollout.responses)
        entropy = rlhf.masked_mean(rlhf.entropy_from_logits(logits), mask).item()
        del logits
        ref_all = sequence_logprobs(
            ref, rollout.input_ids, rollout.attention_mask, config.temperature
        )
        ref_logprobs = ref_all.gather(1, rollout.response_index)
        raw = last_token_rewards(
            rm, rollout.input_ids, rollout.attention_mask, rollout.answer_mask()
        )
        scores = normalize_rewards(rm, raw.float())
    penalised = scores.clone()
    if config.missing_eos_penalty is not None:
        penalised[~rollout.ended] -= config.missing_eos_penalty
    kl = rlhf.kl_per_token(logprobs, ref_logprobs, config.kl_estimator) * mask
    rewards = rlhf.token_rewards(penalised, kl, mask, kl_coef)
    advantages, returns = rlhf.gae(rewards, values, mask, config.gamma, config.lam)
    advantages = rlhf.whiten(advantages, mask)
    stats = {
        "reward": scores.mean().item(),
        "kl": kl.sum(1).mean().item(),
        "non_score_reward": (-kl_coef * kl).sum(1).mean().item(),
        "entropy": entropy,
        "response_length": mask.sum(1).mean().item(),
        "ended": rollout.ended.float().mean().item(),
    }
    return Experience(rollout, logprobs, values * mask, advantages, returns), stats


def ppo_update(
    policy: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    ptx: torch.Tensor | None,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """``ppo_epochs`` shuffled passes of minibatch gradient steps; returns mean statistics."""
    n = exp.rollout.input_ids.shape[0]
    totals: dict[str, float] = {}
    for _ in range(config.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.mini_batch_size):
            rows = order[start : start + config.mini_batch_size]
            step_stats = ppo_minibatch_step(policy, optimizer, exp, rows, ptx, config, generator)
            for name, value in step_stats.items():
                totals[name] = totals.get(name, 0.0) + value
    n_steps = config.ppo_epochs * -(-n // config.mini_batch_size)
    return {name: value / n_steps for name, value in totals.items()}


def ppo_minibatch_step(
    policy: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    rows: torch.Tensor,
    ptx: torch.Tensor | None,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """One gradient step on the rows ``rows`` of the experience (plus a ptx batch), their
    forwards ``micro_batch_size`` rows at a time (the minibatch's token means couple its rows:
    :func:`learn.modeling.backward_in_micro_batches` keeps the gradient the whole minibatch's)."""
    batch = exp.rollout.select(rows)
    mask = batch.response_mask
    old_logprobs, advantages = exp.logprobs[rows], exp.advantages[rows]
    old_values, returns = exp.values[rows], exp.returns[rows]

    def forward(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        piece = batch.select(part)
        logits, values = policy(piece, config.temperature)
        return rlhf.logprobs_from_logits(logits, piece.responses), values

    def objective(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs, values = outputs
        pg_loss = rlhf.policy_loss(logprobs, old_logprobs, advantages, mask, config.cliprange)
        vf_loss = rlhf.value_loss(values, old_values, returns, mask, config.cliprange_value)
        lp = logprobs.detach()
        return pg_loss + config.vf_coef * vf_loss, {
            "policy_loss": pg_loss.item(),
            "value_loss": vf_loss.item(),
            "clip_fraction": rlhf.clip_fraction(
                lp, old_logprobs, advantages, mask, config.cliprange
            ),
            "approx_kl": rlhf.approx_kl(lp, old_logprobs, mask),
        }

    optimizer.zero_grad(set_to_none=True)
    with autocast(batch.input_ids.device, config.bf16):
        stats = backward_in_micro_batches(len(rows), config.micro_batch_size, forward, objective)
        if ptx is not None:  # a term of its own rows: backpropagated on its own
            pick = torch.randint(len(ptx), (config.ptx_batch_size,), generator=generator)
            ptx_ids = ptx[pick]
            ptx_mask = torch.ones_like(ptx_ids)
            ptx_logprobs = sequence_logprobs(policy.lm, ptx_ids, ptx_mask)
            ptx_term = rlhf.ptx_loss(ptx_logprobs, ptx_mask[:, 1:], config.ptx_coef)
            ptx_term.backward()
            stats["ptx_loss"] = ptx_term.item()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
    optimizer.step()
    return stats


# --- the run -------------------------------------------------------------------------------------


def train_ppo(
    policy_dir: str | Path,
    ref_dir: str | Path,
    reward_dir: str | Path,
    prompts: Sequence[Messages],
    ptx_texts: Sequence[str] | None,
    out_dir: str | Path,
    config: PPOConfig,
    state: dict[str, Any] | None = None,
    lora: LoraOptions | None = None,
) -> dict[str, Any]:
    """Run ``config.steps`` PPO steps from ``policy_dir`` and save the policy to ``out_dir``
    (with ``lora``: a LoRA adapter over ``ref_dir``, sampled with transformers).

    ``ref_dir`` is the frozen SFT reference of the KL penalty, ``reward_dir`` a reward model
    from ``learn.reward``, ``prompts`` the conversations to answer (cycled), ``ptx_texts``
    pre-training text for PPO-ptx (None or ``ptx_coef=0``: no ptx). ``state`` is a previous
    run's trainer state (``learn.learner``: value head, optimizer, β), which this run continues
    and saves again beside the policy. Returns JSON-able metrics: ``reward_mean`` and ``kl``
    (means over the last quarter of the steps), ``reward_start``, ``kl_coef``, time per phase,
    ``episodes_per_s`` and the per-step ``history``.
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    for model_dir in (policy_dir, ref_dir, reward_dir):
        check_model_dir(model_dir)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    if lora is not None and config.engine == "vllm":
        config = replace(config, engine="hf")  # the vLLM sampler reloads full weights
    policy = PolicyWithValue(load_policy(policy_dir, ref_dir, lora)).to(device)
    ref, rm = (
        load_causal_lm(ref_dir, frozen=True).to(device),
        load_reward_model(reward_dir).to(device),
    )
    rm.requires_grad_(False)
    for name, other in (("reference", ref), ("reward model", rm)):
        if other.config.vocab_size != policy.lm.config.vocab_size:
            raise ValueError(f"the {name} does not share the policy's vocabulary")
    prompt_ids = [encode_prompt(tokenizer, m, config.max_prompt_length) for m in prompts]
    ptx = (
        pack_texts(tokenizer, ptx_texts, config.ptx_length).to(device)
        if ptx_texts and config.ptx_coef > 0
        else None
    )
    kl_ctl = config.kl_controller(config.kl_coef)
    # fused: one kernel for all parameters (what transformers' Trainer, so TRL, uses too)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=config.learning_rate, eps=1e-5, fused=True
    )
    if state is not None:
        resume(state, policy, optimizer, kl_ctl)
    generator = torch.Generator().manual_seed(config.seed)
    batches = prompt_batches(len(prompt_ids), config.batch_size, random.Random(config.seed))
    sampler = (
        VLLMSampler(Path(policy_dir), config)
        if config.engine == "vllm"
        else HFSampler(policy, tokenizer, config)
    )
    setup = time.perf_counter() - started
    history: list[dict[str, float]] = []
    try:
        for step in range(config.steps):
            history.append(
                ppo_step(
                    policy, ref, rm, sampler, optimizer, kl_ctl, tokenizer,
                    [prompt_ids[i] for i in next(batches)], ptx, config, generator,
                )
            )  # fmt: skip
            logger.info("ppo step %d: %s", step, _format(history[-1]))
    finally:
        sampler.close()
    save_policy(policy.lm, tokenizer, out_dir)
    save_state(Path(out_dir), trainer_state(policy, optimizer, kl_ctl))
    return summarize(history, config, kl_ctl.value, setup, time.perf_counter() - started)


def trainer_state(
    policy: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    kl_ctl: rlhf.FixedKLController | rlhf.AdaptiveKLController,
) -> dict[str, Any]:
    """What the next round continues from besides the weights: a value head that already
    predicts returns, Adam's moments, and β where the adaptive controller has steered it."""
    return {
        "learner": "ppo",
        "value_head": policy.value_head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "kl_coef": kl_ctl.value,
    }


def resume(
    state: dict[str, Any],
    policy: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    kl_ctl: rlhf.FixedKLController | rlhf.AdaptiveKLController,
) -> None:
    """Continue from a previous PPO run's :func:`trainer_state` (another learner's is ignored)."""
    if not restore_optimizer(optimizer, state, "ppo"):
        return
    policy.value_head.load_state_dict(state["value_head"])
    if isinstance(kl_ctl, rlhf.AdaptiveKLController):
        kl_ctl.value = float(state["kl_coef"])


CONFIG = PPOConfig


def train_round(data: RoundData, config: PPOConfig) -> dict[str, Any]:
    """One loop round of PPO (``learn.learner``): from the previous round's policy and state,
    on the round's prompts, with a seed of the round's own."""
    config = replace(config, seed=config.seed + data.seed)
    metrics = train_ppo(
        data.policy_dir, data.reference_dir, data.reward_dir, data.prompts, data.ptx_texts,
        data.out_dir, config, data.state, data.lora,
    )  # fmt: skip
    return {"learner": "ppo", **metrics}


def ppo_step(
    policy: PolicyWithValue,
    ref: PreTrainedModel,
    rm: PreTrainedModel,
    sampler: HFSampler | VLLMSampler,
    optimizer: torch.optim.Optimizer,
    kl_ctl: rlhf.FixedKLController | rlhf.AdaptiveKLController,
    tokenizer: Any,
    prompts: list[list[int]],
    ptx: torch.Tensor | None,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Generation, forwards, backward, sync: one PPO step and its statistics."""
    clock = time.perf_counter()
    responses, sampler_logprobs = sampler.generate(prompts)
    rollout = make_rollout(prompts, responses, tokenizer.pad_token_id, tokenizer.eos_token_id)
    rollout = rollout.to(policy.lm.device)
    t_generation = time.perf_counter() - clock

    clock = time.perf_counter()
    kl_coef = kl_ctl.value
    exp, stats = score_rollout(policy, ref, rm, rollout, kl_coef, config)
    if sampler_logprobs is not None:
        stats["sampler_logprob_gap"] = sampler_gap(sampler_logprobs, exp.logprobs)
    t_forwards = time.perf_counter() - clock

    clock = time.perf_counter()
    policy.train()
    stats |= ppo_update(policy, optimizer, exp, ptx, config, generator)
    t_backward = time.perf_counter() - clock

    clock = time.perf_counter()
    sampler.sync(policy)
    kl_ctl.update(stats["kl"], config.batch_size)
    t_sync = time.perf_counter() - clock
    return {
        **stats,
        "kl_coef": kl_coef,
        "time_generation": t_generation,
        "time_forwards": t_forwards,
        "time_backward": t_backward,
        "time_sync": t_sync,
    }


def sampler_gap(sampler_logprobs: list[list[float]], trainer_logprobs: torch.Tensor) -> float:
    """Mean |log π_sampler − log π_trainer| over sampled tokens: ~0 when the engine's weights
    are the trainer's (a stale engine after an update shows up here at once)."""
    total, count = 0.0, 0
    for row, values in enumerate(sampler_logprobs):
        theirs = torch.tensor(values, dtype=torch.float32)
        total += (theirs - trainer_logprobs[row, : len(values)].cpu()).abs().sum().item()
        count += len(values)
    return total / max(1, count)


def summarize(
    history: list[dict[str, float]],
    config: PPOConfig,
    kl_coef: float,
    setup: float,
    seconds: float,
) -> dict[str, Any]:
    """Run-level metrics; reward and KL are averaged over the last quarter of the steps."""
    tail = history[-max(1, len(history) // 4) :]

    def mean(name: str, rows: list[dict[str, float]] = tail) -> float:
        return sum(r[name] for r in rows) / len(rows)

    phases = ("generation", "forwards", "backward", "sync")
    time_by_phase = {p: sum(r[f"time_{p}"] for r in history) for p in phases}
    loop_time = sum(time_by_phase.values())
    episodes = len(history) * config.batch_size
    return {
        "steps": len(history),
        "episodes": episodes,
        "reward_mean": mean("reward"),
        "reward_start": history[0]["reward"],
        "kl": mean("kl"),
        "kl_coef": kl_coef,
        "entropy": mean("entropy"),
        "clip_fraction": mean("clip_fraction"),
        "approx_kl": mean("approx_kl"),
        "value_loss": mean("value_loss"),
        "episodes_per_s": episodes / loop_time,
        "time": {**time_by_phase, "setup": setup, "total": seconds},
        "engine": config.engine,
        "config": asdict(config),
        "history": history,
    }


def _format(stats: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items())
