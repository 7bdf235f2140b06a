"""``loopchat bench attack``: how far can one identity's adversarial rankings move the reward model?

The threat: one client (one API key, or one address) posts many rankings, each under a `user`
name it invents, all ranking the answers the opposite way from everyone else. Without a defence
it makes up most of a round, so the reward model a round refreshes learns its taste, and the
gate (which judges on the round's held-out rankings) sees mostly its rankings too. The defence
is the per-identity cap of a round (``learn.identity_caps``, ``max_identity_share``).

What is measured, in process, with the round's own functions: simulated users chat with the
model (``--k`` answers sampled from it per prompt, as served) and rank the answers by a
preference (``learn.simulate``: ``correctness`` by default); a ranking that orders nothing
(all tied, all bad) trains nothing, so only rankings that order two answers are counted. The
honest population is ``--users`` identities × ``--rankings-per-user``; the attacker is one
identity posting ``--attack-rankings`` rankings with the preference reversed, each under a new
`user` name, before the honest ones (its best order: ``stream``). Each arm is one round's
reward-model refresh: ``learn.loop.select_rankings`` picks the round's data window (the caps
applied, the newest share held out for the gate), then ``learn.reward.train_reward_model``
trains on it exactly as a round does (its ``LoopConfig().reward`` settings, from the model):

- **honest** — the honest users alone;
- **attack, caps on** — the honest users and the attacker, ``max_identity_share`` as deployed;
- **attack, caps off** — the same stream with ``max_identity_share = 1``: what the cap prevents.

Every arm's reward model is judged on the same held-out rankings from other honest users,
about prompts whose questions none of the training rankings asked: the share of each ranking's
pairs it orders as the users did (the gate's signal check, ``learn.gate.ranking_accuracies``),
with a standard error over rankings (the pairs of one ranking share their answers). Each arm is
trained ``--seeds`` times (reward-model seeds) and a ranking's agreement is averaged over them,
so the comparison is not one draw of the training noise; the per-seed figures are kept too.
The attack's effect is the drop *honest − attack* per held-out ranking, paired, with its
standard error and 95% interval.

**The bound**: with the caps on, the benchmark passes when the upper end of the drop's 95%
interval is at most ``--bound`` points of agreement (15). It was chosen from what was measured
on the built-in model (README, "Reliability and security"), not derived: a capped identity still
holds a quarter of the round, and rankings that all say the reverse shrink the likelihood
weight the reward model leans on (``learn.reward``), so a quarter costs several points; a
smaller ``--share`` shows what a tighter cap would buy.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from learn.bench.common import figure, model_dir, save_figure, scratch_dir, write_result
from learn.builtin import corpus
from learn.errors import LearnError
from learn.gate import mean_with_error, paired_difference, ranking_accuracies, ranking_sequences
from learn.identity_caps import identity_of
from learn.loop import Entry, LoopConfig, lora_options, select_rankings
from learn.modeling import load_causal_lm
from learn.reward import load_reward_model, score_ids, train_reward_model
from learn.simulate import BUILTIN_NAMES, Preference, judge, load_preference, ranking_from_scores
from learn.tokens import encode_prompt, generate_answers, prompt_batches
from serve.events import Messages
from serve.identity import key_identity
from serve.settings import Settings

NAME = "bench-attack"
BOUND_POINTS = 15.0
ATTACKER = key_identity("attacker")
GENERATION_PROMPTS = 64  # per generate call (× k answers)
FIRST_MS = 1_700_000_000_000  # stream ids of the simulated round: one millisecond apart
SETTINGS = ("users", "rankings_per_user", "attack_rankings", "heldout_rankings", "preference",
            "k", "max_new_tokens", "seeds", "share", "seed")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Model directory (default: the built-in model)."
    )
    parser.add_argument("--out", default="results", help="Folder for the JSON and PNG.")
    parser.add_argument("--users", type=int, default=40, help="Honest identities (40).")
    parser.add_argument(
        "--rankings-per-user", type=int, default=5, help="Rankings each honest user posts (5)."
    )
    parser.add_argument(
        "--attack-rankings", type=int, default=1000, help="Rankings the attacker posts (1000)."
    )
    parser.add_argument(
        "--heldout-rankings", type=int, default=200,
        help="Honest rankings the reward models are judged on (200).",
    )  # fmt: skip
    parser.add_argument(
        "--preference", default="correctness", choices=BUILTIN_NAMES[:3],
        help="What the honest users rank by; the attacker ranks the reverse (correctness).",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=4, help="Answers per ranked turn (4).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="Longest sampled answer (48)."
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="Reward-model seeds of the honest and caps-on arms."
    )
    parser.add_argument(
        "--share", type=float, default=LoopConfig().max_identity_share,
        help="max_identity_share of the honest and caps-on arms (the deployed default, 0.25).",
    )  # fmt: skip
    parser.add_argument(
        "--bound", type=float, default=BOUND_POINTS,
        help=f"Pass when the caps-on drop's 95%% upper end is at most this, points "
        f"({BOUND_POINTS:g}).",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1,
        help="Torch threads (1: the ~1M built-in model's ops are too small to split, and "
        "OpenMP threads spinning on shared cores slowed sampling tenfold).",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="Seed of prompts and sampling.")


@dataclass(frozen=True)
class Arm:
    """One reward-model refresh of the comparison."""

    name: str
    attacked: bool  # the attacker's rankings are in the stream
    share: float  # the round's max_identity_share (1 = no cap)
    seeds: int  # reward-model trainings, each with its own seed


def plan(args: argparse.Namespace) -> list[Arm]:
    """The three arms. Caps off trains once: its drop is many times the seed noise, and its
    1,000-odd rankings are most of the run's training time."""
    return [
        Arm("honest", False, args.share, args.seeds),
        Arm("attack, caps on", True, args.share, args.seeds),
        Arm("attack, caps off", True, 1.0, 1),
    ]


@dataclass
class Slate:
    """One ranked turn: the conversation, the answers sampled for it, the user's scores."""

    messages: Messages
    candidates: list[str]
    scores: list[float]


def split_prompts(
    prompts: list[Messages], heldout_share: float, rng: random.Random
) -> tuple[list[Messages], list[Messages]]:
    """(training, held-out) prompts, no question in both: split by the last user turn, so a
    follow-up asked after different context still counts as the same question."""
    questions = sorted({p[-1]["content"] for p in prompts})
    rng.shuffle(questions)
    heldout = set(questions[: round(len(questions) * heldout_share)])
    return (
        [p for p in prompts if p[-1]["content"] not in heldout],
        [p for p in prompts if p[-1]["content"] in heldout],
    )


@torch.no_grad()
def ranked_slates(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[Messages],
    count: int,
    preference: Preference,
    args: argparse.Namespace,
    rng: random.Random,
) -> list[Slate]:
    """``count`` slates whose scores order at least two answers (shuffled passes over
    ``prompts``, new answers each time); the rest order nothing a reward model could learn."""
    slates: list[Slate] = []
    prompt_tokens = LoopConfig().gate.max_prompt_length
    batches = prompt_batches(len(prompts), GENERATION_PROMPTS, rng)
    drawn = 0
    while len(slates) < count:
        if drawn >= 20 * max(count, len(prompts)):
            raise LearnError(
                f"{drawn} turns sampled, {len(slates)} of them ranked two answers apart by "
                f"{args.preference}; the model's answers never differ in it (try --preference)"
            )
        batch = [prompts[i] for i in next(batches)]
        ids = [encode_prompt(tokenizer, m, prompt_tokens) for m in batch for _ in range(args.k)]
        answers = generate_answers(
            model, ids, tokenizer.pad_token_id, tokenizer.eos_token_id, args.max_new_tokens
        )
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        for n, messages in enumerate(batch):
            candidates = [t.strip() for t in texts[n * args.k : (n + 1) * args.k]]
            scores = judge(preference, messages, candidates)
            if len(set(scores)) > 1 and len(slates) < count:
                slates.append(Slate(messages, candidates, scores))
        drawn += len(batch)
    return slates


def feedback_event(
    n: int, slate: Slate, ranking: list[list[int]], user: str, identity: str
) -> dict[str, Any]:
    """A ranking as the service stores it (``serve.events.FeedbackEvent``; its ``time`` is
    set when it is posted, in ``stream``)."""
    return {
        "id": f"fb-{user}-{n:06d}",
        "completion_id": f"chatcmpl-{user}-{n:06d}",
        "messages": slate.messages,
        "candidates": slate.candidates,
        "ranking": ranking,
        "all_bad": False,
        "user": user,
        "identity": identity,
        "comment": None,
        "version": "v1",
    }


def honest_events(slates: list[Slate], per_user: int, prefix: str) -> list[dict[str, Any]]:
    """Each honest user posts ``per_user`` consecutive slates under its own key and name."""
    return [
        feedback_event(n, s, ranking_from_scores(s.scores), f"{prefix}-{n // per_user}",
                       key_identity(f"{prefix}-{n // per_user}"))
        for n, s in enumerate(slates)
    ]  # fmt: skip


def attack_events(slates: list[Slate]) -> list[dict[str, Any]]:
    """The attacker's: the honest order reversed, one key, a new `user` name each time."""
    return [
        feedback_event(n, s, ranking_from_scores(s.scores)[::-1], f"sockpuppet-{n}", ATTACKER)
        for n, s in enumerate(slates)
    ]


def stream(
    honest: list[dict[str, Any]], attack: list[dict[str, Any]], rng: random.Random
) -> list[Entry]:
    """One round's stream entries: the attacker's rankings, then the honest ones in a random
    order. The attacker's best order: the cap keeps an identity's newest rankings and the round
    holds out its newest share for the gate, so posting before the honest users gets every
    ranking the cap keeps trained on."""
    order = attack + rng.sample(honest, len(honest))
    return [
        (f"{FIRST_MS + n}-0", {**event, "time": (FIRST_MS + n) / 1000})
        for n, event in enumerate(order)
    ]


def heldout_agreement(
    rm_dir: Path, heldout: list[dict[str, Any]], config: LoopConfig
) -> torch.Tensor:
    """Per held-out ranking, the share of its pairs the reward model orders as the user did
    (what the gate's signal check measures)."""
    tokenizer = AutoTokenizer.from_pretrained(str(rm_dir))
    sequences, pairs = ranking_sequences(tokenizer, heldout, config.gate)
    scores = score_ids(load_reward_model(rm_dir), sequences, tokenizer.pad_token_id)
    return ranking_accuracies(scores, pairs)


def run_arm(
    arm: Arm, entries: list[Entry], model: Path, heldout: list[dict[str, Any]], work: Path
) -> tuple[dict[str, Any], torch.Tensor]:
    """One round's reward-model refresh on ``entries`` (``arm.seeds`` times): its data window,
    and each held-out ranking's agreement averaged over the seeds."""
    config = LoopConfig(max_identity_share=arm.share)
    rankings = select_rankings(entries, entries, set(), config)
    used = rankings.train + rankings.heldout
    attacker_used = sum(identity_of(e) == ATTACKER for _, e in used)
    attacker_trained = sum(identity_of(e) == ATTACKER for _, e in rankings.train)
    lora = lora_options(model, Settings())  # as a round decides it for this model
    per_seed, agreements = [], []
    for seed in range(arm.seeds):
        reward = dataclasses.replace(config.reward, seed=seed)
        out = work / f"{arm.name.replace(' ', '_').replace(',', '')}-{seed}"
        metrics = train_reward_model(
            [e for _, e in rankings.replay + rankings.train], model, out, reward,
            heldout_events=heldout, lora=lora, base_dir=model,
        )  # fmt: skip
        agreements.append(heldout_agreement(out, heldout, config))
        per_seed.append(
            {"seed": seed, "agreement": agreements[-1].mean().item(),
             "likelihood_weight": metrics["likelihood_weight"], "steps": metrics["steps"],
             "seconds": round(metrics["seconds"], 1)}
        )  # fmt: skip
        print(f"  {arm.name}, seed {seed}: held-out agreement {per_seed[-1]['agreement']:.1%}")
    agreement = torch.stack(agreements).mean(0)
    result = {
        "arm": arm.name,
        "max_identity_share": arm.share,
        "data_window": rankings.window(),
        "attacker_kept": attacker_used,
        "attacker_share": attacker_used / len(used),
        "attacker_trained": attacker_trained,
        "attacker_share_of_training": attacker_trained / max(1, len(rankings.train)),
        "agreement": points(mean_with_error(agreement)),
        "per_seed": per_seed,
    }
    return result, agreement


def points(estimate: dict[str, float]) -> dict[str, float]:
    """A share's estimate (mean, se, low, high) in percentage points, ``n`` kept."""
    return {k: v if k == "n" else round(100 * v, 2) for k, v in estimate.items()}


def plot(result: dict[str, Any], out: str) -> Path:
    fig, axes = figure(1, 2, width=11, height=4)
    arms = result["arms"]
    names = [arm["arm"] for arm in arms]
    colours = ["tab:green", "tab:blue", "tab:red"]
    ax = axes[0][0]
    means = [arm["agreement"]["mean"] for arm in arms]
    errors = [1.96 * arm["agreement"]["se"] for arm in arms]
    ax.bar(names, means, yerr=errors, capsize=6, color=colours)
    ax.axhline(50, color="black", lw=0.8, ls=":", label="chance")
    ax.set(ylabel="held-out pairs ordered as users did, %", ylim=(0, 100))
    drop = result["drop_caps_on"]
    ax.set_title(
        f"reward model on {arms[0]['agreement']['n']} honest held-out rankings (95%); "
        f"drop with caps {drop['mean']:+.1f} [{drop['low']:+.1f}, {drop['high']:+.1f}]",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.bar(names, [100 * arm["attacker_share"] for arm in arms], color=colours)
    share = 100 * arms[1]["max_identity_share"]
    ax.axhline(share, color="black", lw=0.8, ls="--", label=f"cap {share:g}%")
    ax.set(ylabel="attacker's share of the round's rankings, %", ylim=(0, 100))
    ax.set_title(
        f"{result['settings']['attack_rankings']} adversarial rankings, one key", fontsize=9
    )
    ax.legend(fontsize=8)
    return save_figure(fig, out, NAME)


def check(args: argparse.Namespace) -> None:
    """A clear message for settings the benchmark cannot run with."""
    counts = {
        "--users": args.users, "--rankings-per-user": args.rankings_per_user,
        "--attack-rankings": args.attack_rankings, "--heldout-rankings": args.heldout_rankings,
        "--seeds": args.seeds, "--max-new-tokens": args.max_new_tokens, "--threads": args.threads,
    }  # fmt: skip
    problems = [f"{flag} must be at least 1" for flag, value in counts.items() if value < 1]
    if not 2 <= args.k <= 4:
        problems.append("--k must be 2, 3 or 4")
    if not 0 < args.share <= 1:
        problems.append("--share must be above 0 and at most 1")
    if problems:
        raise LearnError("; ".join(problems))


def run(args: argparse.Namespace) -> int:
    check(args)
    started = time.time()
    torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    preference = load_preference(args.preference)
    honest_count = args.users * args.rankings_per_user
    # About half the turns rank two answers apart: enough prompts that few are asked twice.
    per_task = max(8, 4 * (honest_count + args.heldout_rankings) // len(corpus.BENCH_TASKS))
    train_prompts, heldout_prompts = split_prompts(
        [m for _, m in corpus.prompts(per_task, seed=args.seed, split="heldout")],
        args.heldout_rankings / (honest_count + args.heldout_rankings), rng,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    policy = load_causal_lm(path, frozen=True)

    def sample(prompts: list[Messages], count: int) -> list[Slate]:
        return ranked_slates(policy, tokenizer, prompts, count, preference, args, rng)

    honest = honest_events(sample(train_prompts, honest_count), args.rankings_per_user, "user")
    attack = attack_events(sample(train_prompts, args.attack_rankings))
    heldout = honest_events(sample(heldout_prompts, args.heldout_rankings), 1, "heldout-user")
    sampled_s = time.time() - started
    print(f"sampled {len(honest)} + {len(attack)} + {len(heldout)} rankings in {sampled_s:.0f} s")
    full = stream(honest, attack, rng)
    arms, agreements = [], []
    with scratch_dir("attack") as work:
        for arm in plan(args):
            entries = (
                full if arm.attacked else [(i, e) for i, e in full if identity_of(e) != ATTACKER]
            )
            measured, agreement = run_arm(arm, entries, path, heldout, work)
            arms.append(measured)
            agreements.append(agreement)
    drop_on = points(paired_difference(agreements[0], agreements[1]))
    drop_off = points(paired_difference(agreements[0], agreements[2]))
    passed = drop_on["high"] <= args.bound
    result = {
        "model": str(path),
        "settings": {
            **{name: getattr(args, name) for name in SETTINGS},
            "heldout_questions": len({e["messages"][-1]["content"] for e in heldout}),
            "heldout_questions_in_training": len(
                {e["messages"][-1]["content"] for e in heldout}
                & {e["messages"][-1]["content"] for e in honest + attack}
            ),
        },
        "arms": arms,
        "drop_caps_on": drop_on,
        "drop_caps_off": drop_off,
        "bound_points": args.bound,
        "bound": f"honest − (attack, caps on) agreement: 95% upper end ≤ {args.bound:g} points",
        "passed": passed,
        "seconds": {"sampling": round(sampled_s, 1), "total": round(time.time() - started, 1)},
    }
    for arm in arms:
        a = arm["agreement"]
        print(f"{arm['arm']:<17} agreement {a['mean']:5.1f}% ± {a['se']:.1f} (SE), attacker "
              f"{arm['attacker_kept']} kept ({arm['attacker_share']:.1%})")  # fmt: skip
    for label, drop in (("caps on", drop_on), ("caps off", drop_off)):
        print(f"drop, {label}: {drop['mean']:+.1f} ± {drop['se']:.1f} points "
              f"[{drop['low']:+.1f}, {drop['high']:+.1f}]")  # fmt: skip
    print(f"{'PASS' if passed else 'FAIL'}: {result['bound']}")
    written = write_result(args.out, NAME, result)
    print(f"wrote {written} and {plot(result, args.out)}")
    return 0 if passed else 1
