"""``loopchat bench ppo``: PPO episodes per second, loopchat's trainer beside TRL's PPOTrainer.

Both trainers run the same PPO step on the same models and prompts in the same command: a
~30M-parameter Llama (the ``bench`` preset, random weights: speed does not depend on what the
weights say, and an untrained model answers the full 64 tokens), batch 8, 64-token answers,
4 PPO epochs on one minibatch, fixed β, fp32 unless ``--bf16``, no PPO-ptx (TRL has none).
The first step of each run is a warm-up and is not counted; with ``--rounds N`` each trainer
runs N times, alternating (loopchat, TRL, TRL, loopchat, …), so a change in the machine's load
(other jobs on shared cores) hits both sides alike, and every run's rate and load are recorded.

Where the time goes is reported per step: generation, the no-gradient forwards (policy, value,
reference, reward model) and the PPO epochs ("backward": their forwards, backwards and
optimiser steps), plus, for loopchat, the in-memory weight sync into vLLM.

The two designs differ where it matters for speed: loopchat samples with an in-process vLLM
engine and puts the value head on the policy's own hidden states; TRL 1.12.0 samples with
transformers ``generate`` and trains a separate value model (a copy of the reward model).

TRL runs in its own virtual environment under the data dir, created with ``--trl`` on first use
(``pip install trl==1.12.0``; the venv reads this environment's torch and transformers through
a ``.pth`` file instead of downloading them, and anything TRL pins differently installs into
its own venv, ahead of them).
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import sysconfig
from functools import partial
from pathlib import Path
from typing import Any

from learn.bench.common import figure, machine, save_figure, scratch_dir, write_result
from learn.errors import LearnError

NAME = "bench-ppo"
TRL_VERSION = "1.12.0"
PHASES = ("generation", "forwards", "backward", "sync")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="results", help="Folder for the JSON results and PNG plots."
    )
    parser.add_argument("--steps", type=int, default=3, help="Measured PPO steps (3).")
    parser.add_argument("--batch-size", type=int, default=8, help="Episodes per step (8).")
    parser.add_argument("--response-length", type=int, default=64, help="Answer tokens (64).")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs per step (4).")
    parser.add_argument("--preset", default="bench", help="Model size preset (bench, ~30M).")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast for both trainers (default fp32)."
    )
    parser.add_argument(
        "--trl", action="store_true",
        help=f"Also run TRL {TRL_VERSION}'s PPOTrainer (creates its venv on first use).",
    )  # fmt: skip
    parser.add_argument(
        "--trl-venv", default=None,
        help=f"Virtual env for TRL (default: <data dir>/bench/trl-{TRL_VERSION}).",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="Runs of each trainer, alternating (ABBA…), so load changes hit both alike (1).",
    )  # fmt: skip


# --- the models and prompts both trainers use ----------------------------------------------------


def build_models(work: Path, preset: str) -> tuple[Path, Path, int]:
    """A random ``preset`` policy (also the reference) and a reward model on the same backbone
    (untrained head, normalisation 0/1): the models only have to cost what real ones cost."""
    from learn.builtin import corpus
    from learn.builtin.presets import new_model
    from learn.builtin.tokenizer import train_tokenizer
    from learn.modeling import save_model
    from learn.reward import init_reward_model

    tokenizer = train_tokenizer(corpus.tokenizer_texts(2000), vocab_size=1024)
    policy = new_model(preset, tokenizer, seed=0)
    policy_dir = save_model(policy, tokenizer, work / "policy")
    rm, _ = init_reward_model(policy_dir, seed=0)
    rm.config.reward_mean, rm.config.reward_std = 0.0, 1.0
    rm.save_pretrained(str(work / "reward"))
    tokenizer.save_pretrained(str(work / "reward"))
    return policy_dir, work / "reward", sum(p.numel() for p in policy.parameters())


def bench_prompts() -> list[list[dict[str, str]]]:
    from learn.builtin import corpus

    return [messages for _, messages in corpus.prompts(4, seed=0)]


# --- loopchat's side -----------------------------------------------------------------------------


def run_loopchat(
    policy: Path, reward: Path, prompts: list, config: Any, work: Path
) -> list[dict[str, float]]:
    """``train_ppo`` itself; its step log has the time of every phase. Returns measured steps."""
    from learn.ppo import train_ppo

    metrics = train_ppo(policy, policy, reward, prompts, None, work / "out-loopchat", config)
    steps = []
    for step in metrics["history"][1:]:
        phases = {p: step[f"time_{p}"] for p in PHASES}
        steps.append({**phases, "total": sum(phases.values())})
    return steps


# --- TRL's side ----------------------------------------------------------------------------------


def trl_python(venv: Path) -> Path:
    """The venv's python with TRL installed (created and installed on first use)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with trl=={TRL_VERSION} …", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    shared = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    Path(purelib, "loopchat-shared.pth").write_text("\n".join(dict.fromkeys(shared)) + "\n")
    install = [str(python), "-m", "pip", "install", "--quiet", f"trl=={TRL_VERSION}"]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip install trl=={TRL_VERSION} failed: {done.stderr.strip()[-800:]}")
    return python


def run_trl(
    python: Path, policy: Path, reward: Path, prompts: list, config: Any, work: Path
) -> list[dict[str, float]]:
    """TRL's PPOTrainer in its venv (``learn/bench_ppo_trl.py``), same models and settings."""
    from transformers import AutoTokenizer

    from learn.ppo import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(policy)
    ids = [encode_prompt(tokenizer, m, config.max_prompt_length) for m in prompts]
    spec = {
        "policy": str(policy), "ref": str(policy), "reward": str(reward), "prompts": ids,
        "seed": config.seed, "steps": config.steps, "batch_size": config.batch_size,
        "ppo_epochs": config.ppo_epochs, "response_length": config.response_length,
        "learning_rate": config.learning_rate, "temperature": config.temperature,
        "kl_coef": config.kl_coef, "bf16": config.bf16,
    }  # fmt: skip
    spec_path, result_path = work / "trl-spec.json", work / "trl-result.json"
    spec_path.write_text(json.dumps(spec))
    script = Path(__file__).with_name("ppo_trl.py")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(
        [str(python), str(script), str(spec_path), str(result_path)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"TRL's PPOTrainer failed: {done.stderr.strip()[-1500:]}")
    return json.loads(result_path.read_text())["steps"][1:]


def side_result(runs: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Episodes/s and mean seconds per phase over every measured step of every run."""
    steps = [step for run in runs for step in run["steps"]]
    step_s = _mean([s["total"] for s in steps])
    phases = {p: _mean([s[p] for s in steps]) for p in PHASES if p in steps[0]}
    return {
        "episodes_per_s": batch_size / step_s,
        "step_s": step_s,
        "phases_s": phases,
        "runs": [
            {"episodes_per_s": batch_size / _mean([s["total"] for s in r["steps"]]),
             "load_average_1m_at_start": r["load"]}
            for r in runs
        ],
    }  # fmt: skip


# --- the command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    # Before torch loads, for both trainers (TRL's child inherits it): OpenMP threads that
    # sleep instead of spinning while they wait, or shared cores make either side crawl.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from learn.ppo import PPOConfig
    from serve.settings import Settings

    if min(args.steps, args.batch_size, args.response_length, args.ppo_epochs, args.rounds) < 1:
        raise LearnError(
            "--steps, --batch-size, --response-length, --ppo-epochs and --rounds must be >= 1"
        )
    config = PPOConfig(
        steps=args.steps + 1, batch_size=args.batch_size, mini_batch_size=args.batch_size,
        ppo_epochs=args.ppo_epochs, response_length=args.response_length, temperature=1.0,
        kl_coef=0.05, adaptive_kl=False, ptx_coef=0.0, learning_rate=1e-5, bf16=args.bf16,
        engine="vllm",
    )  # fmt: skip
    venv = Path(args.trl_venv or Settings().data_dir / "bench" / f"trl-{TRL_VERSION}")
    with scratch_dir("bench-ppo") as work:
        policy, reward, n_params = build_models(work, args.preset)
        prompts = bench_prompts()
        settings = {
            "preset": args.preset, "parameters": n_params, "batch_size": args.batch_size,
            "response_length": args.response_length, "ppo_epochs": args.ppo_epochs,
            "mini_batches": 1, "measured_steps": args.steps, "warmup_steps": 1,
            "rounds": args.rounds, "precision": "bf16 autocast" if args.bf16 else "fp32",
            "kl": "fixed β 0.05", "ptx": "off (TRL has no PPO-ptx)", "prompts": len(prompts),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        }  # fmt: skip
        result: dict[str, Any] = {"settings": settings, "machine": machine()}
        sides = {"loopchat": partial(run_loopchat, policy, reward, prompts, config, work)}
        result["trl"] = {"error": "not run (pass --trl)"}
        if args.trl:
            try:
                python = trl_python(venv)
                sides["trl"] = partial(run_trl, python, policy, reward, prompts, config, work)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                result["trl"] = {"error": str(exc)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for round_ in range(args.rounds):  # ABBA…: a load change hits both sides alike
            for name in list(sides) if round_ % 2 == 0 else reversed(list(sides)):
                print(f"round {round_ + 1}: {name}, {config.steps} PPO steps …", file=sys.stderr)
                load = round(os.getloadavg()[0], 2)
                try:
                    runs[name].append({"steps": sides[name](), "load": load})
                except RuntimeError as exc:
                    if name == "loopchat":
                        raise
                    result[name] = {"error": str(exc)}  # say why, keep loopchat's numbers
                    del sides[name]
        for name in sides:
            result[name] = side_result(runs[name], args.batch_size)
        if "trl" in sides:
            result["trl"]["version"] = TRL_VERSION
    ours, trl = result["loopchat"], result["trl"]
    if "episodes_per_s" in trl:
        result["speedup"] = ours["episodes_per_s"] / trl["episodes_per_s"]
    path = write_result(args.out, NAME, result)
    png = _plot(result, args.out)
    print(_summary(result))
    print(f"results: {path} {png}")
    return 0


def _summary(result: dict[str, Any]) -> str:
    lines = []
    for name in ("loopchat", "trl"):
        side = result[name]
        if "error" in side:
            lines.append(f"{name:>9}: {side['error']}")
            continue
        phases = " ".join(f"{p} {s:.2f}s" for p, s in side["phases_s"].items())
        lines.append(f"{name:>9}: {side['episodes_per_s']:.2f} episodes/s  (per step: {phases})")
    if "speedup" in result:
        lines.append(f"  speedup: {result['speedup']:.2f}x")
    return "\n".join(lines)


def _plot(result: dict[str, Any], out: str) -> Path:
    fig, axes = figure(1, 2)
    sides = [n for n in ("loopchat", "trl") if "episodes_per_s" in result[n]]
    rate, phases = axes[0][0], axes[0][1]
    rate.bar(sides, [result[n]["episodes_per_s"] for n in sides], color=["C0", "C1"][: len(sides)])
    rate.set_ylabel("PPO episodes / s")
    s = result["settings"]
    rate.set_title(
        f"{s['parameters'] / 1e6:.0f}M Llama, batch {s['batch_size']}, "
        f"{s['response_length']} tokens, {s['ppo_epochs']} epochs"
    )
    bottom = [0.0] * len(sides)
    for i, phase in enumerate(PHASES):
        heights = [result[n]["phases_s"].get(phase, 0.0) for n in sides]
        phases.bar(sides, heights, bottom=bottom, label=phase, color=f"C{i + 2}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    phases.set_ylabel("seconds per PPO step")
    phases.set_title("where a step's time goes")
    phases.legend()
    return save_figure(fig, out, NAME)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
