"""The built-in model: what a bare ``loopchat up`` serves when the user brings none.

No model can be downloaded here, so loopchat makes its own, once: stage 1 pre-trains the
``small`` preset on the built-in corpus's plain text, stage 2 fine-tunes it on the built-in
demonstrations (loss on answers only). The result is cached under
``<data_dir>/models/builtin-<recipe>-<fingerprint>``, so later starts return at once, and a
changed recipe trains a new one instead of reusing a stale model.

Safe to call from several processes (the API and its worker start together): a file lock lets
one train while the others wait for its result. Training happens in a ``.partial`` folder
renamed into place only when complete, so a crash never leaves a half model where a finished
one is expected; an interrupted bootstrap resumes from that folder's checkpoints.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the corpus, tokenizer or trainers change what the built-in model learns: installs
# then train the new model instead of reusing the cached one.
BUILTIN_VERSION = 3


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the built-in model (its fingerprint names the cache folder)."""

    preset: str
    pretrain_steps: int
    sft_steps: int
    pretrain_docs: int
    sft_conversations: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    seed: int = 0


RECIPES: dict[str, Recipe] = {
    # The real one: fits in 10 minutes on 2 CPU cores (see README for its measured quality).
    "small": Recipe(
        preset="small",
        pretrain_steps=40,
        sft_steps=1000,
        pretrain_docs=4000,
        sft_conversations=70000,
    ),
    # Seconds: lets tests exercise the bare `loopchat up` path (LOOPCHAT_BUILTIN_RECIPE=test).
    "test": Recipe(
        preset="nano",
        pretrain_steps=8,
        sft_steps=12,
        pretrain_docs=300,
        sft_conversations=300,
        batch_size=4,
        seq_len=128,
        warmup_steps=2,
    ),
}


def builtin_dir(data_dir: Path, recipe: str) -> Path:
    """Where the model of ``recipe`` lives (whether or not it is trained yet)."""
    spec = json.dumps({"version": BUILTIN_VERSION, **asdict(RECIPES[recipe])}, sort_keys=True)
    fingerprint = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return Path(data_dir) / "models" / f"builtin-{recipe}-{fingerprint}"


def ensure_builtin_model(data_dir: Path, progress: bool = True, recipe: str | None = None) -> Path:
    """The built-in model's HF directory, training it first if this data dir has none.

    ``recipe`` defaults to ``LOOPCHAT_BUILTIN_RECIPE`` (``small``; ``test`` for a seconds-long
    bootstrap in tests).
    """
    if recipe is None:
        from serve.settings import Settings

        recipe = Settings().builtin_recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown built-in recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    final = builtin_dir(data_dir, recipe)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / ".builtin.lock", progress):
        if not _complete(final):  # another process may have finished it while we waited
            _train_in_child(recipe, final, progress)
    return final


def _complete(path: Path) -> bool:
    return (path / "builtin.json").is_file()


@contextmanager
def _exclusive(lock_path: Path, progress: bool) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("another process is training the built-in model; waiting for it", progress)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"loopchat: {message}", file=sys.stderr, flush=True)


def _train_in_child(recipe: str, final: Path, progress: bool) -> None:
    """Train in a fresh interpreter with ``OMP_WAIT_POLICY=PASSIVE``.

    OpenMP's wait policy can only be chosen before torch loads, and its default (threads spin
    while waiting for each other) collapses when the cores are busy with anything else: on the
    shared 2-core machine, 2 threads trained at 316 tokens/s spinning, 2,985 passive. The
    API server and its worker run beside a bootstrap, so passive is the safe choice.
    """
    env = {**os.environ}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, "-m", "learn.bootstrap", str(final), recipe]
    done = subprocess.run(command + ([] if progress else ["--quiet"]), env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"training the built-in model failed (exit {done.returncode}); "
            "starting again resumes it"
        )


def _train(r: Recipe, final: Path, progress: bool) -> None:
    """Stage 1 then stage 2 into ``.partial-<name>``; rename into place when both are done."""
    from learn.pretrain import PretrainConfig, pretrain
    from learn.sft import SFTConfig, sft

    work = final.parent / f".partial-{final.name}"
    base, tuned = work / "pretrained", work / "sft"
    started = time.monotonic()
    _say(
        f"training the built-in model once ({r.preset} preset: pre-training "
        f"{r.pretrain_steps} steps, then SFT {r.sft_steps} steps) into {final}",
        progress,
    )
    common = dict(
        batch_size=r.batch_size,
        seq_len=r.seq_len,
        lr=r.lr,
        min_lr=r.min_lr,
        warmup_steps=r.warmup_steps,
        seed=r.seed,
        progress=progress,
        save_every=50,
    )
    if not (base / "training.json").is_file():
        pretrain(
            PretrainConfig(
                output_dir=str(base),
                preset=r.preset,
                max_steps=r.pretrain_steps,
                builtin_docs=r.pretrain_docs,
                **common,
            )
        )
    if not (tuned / "training.json").is_file():
        sft(
            SFTConfig(
                output_dir=str(tuned),
                model_dir=str(base),
                max_steps=r.sft_steps,
                builtin_conversations=r.sft_conversations,
                **common,
            )
        )
    info = {
        "recipe": asdict(r),
        "seconds": round(time.monotonic() - started, 1),
        "pretrain": json.loads((base / "training.json").read_text())["metrics"],
        "sft": json.loads((tuned / "training.json").read_text())["metrics"],
    }
    (tuned / "builtin.json").write_text(json.dumps(info, indent=1))
    if final.exists():  # an incomplete leftover under the final name (never renamed there)
        shutil.rmtree(final)
    os.replace(tuned, final)
    shutil.rmtree(work, ignore_errors=True)
    _say(f"built-in model ready in {info['seconds']:.0f} s", progress)


if __name__ == "__main__":  # the child process of _train_in_child
    _train(RECIPES[sys.argv[2]], Path(sys.argv[1]), progress="--quiet" not in sys.argv)
