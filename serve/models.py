"""Bringing a user's own model into the registry: a GGUF file or a Hugging Face directory becomes
a policy version that both engines serve and every learner trains, unchanged.

Why a conversion step at all: vLLM and the learners read Hugging Face directories (config,
safetensors, the tokenizer with its chat template). A GGUF file is dequantized once by
transformers (with the ``gguf`` package) into such a directory, in bfloat16 — the Q4/Q8 blocks
hold far less precision than bf16 keeps, and it halves what every copy of the base weighs.

What is checked before anything is registered, so that a failure leaves the registry as it was:
the file is what it claims (GGUF magic, a config.json), the architecture is one that transformers
loads *and* vLLM serves, the tokenizer has a chat template (loopchat renders every prompt with the
model's own template and stops on its end-of-turn token), the weights are finite, and the model
generates. The version is registered as kind ``sft`` — it is the starting point and the KL
reference of every later round — with a model card (``README.md``) and its provenance in the
metadata, and the checks recorded as its gate, so an operator can promote it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from serve.adapters import is_adapter, load_merged
from serve.registry import Registry, weights_finite

GGUF_MAGIC = b"GGUF"


class ModelImportError(ValueError):
    """The file or directory cannot become a version (the message says why)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` a GGUF file declares (read from its header only)."""
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelImportError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, IndexError, ValueError, OSError) as exc:
        raise ModelImportError(f"{path}: broken GGUF file ({exc})") from None


def check_gguf_supported(architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelImportError(
            f"GGUF architecture {architecture!r} is not supported (transformers dequantizes: "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )


def check_servable(config: dict[str, Any], where: Path) -> str:
    """The config's architecture, if transformers trains it as a causal LM and vLLM serves it."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise ModelImportError(f"{where}: config.json names no architecture")
    arch = architectures[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ModelImportError(f"{where}: {arch} is not a causal language model transformers has")
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:  # an HF-engine-only install: transformers' check is all there is
        return arch
    if arch not in ModelRegistry.get_supported_archs():
        raise ModelImportError(f"{where}: vLLM does not serve {arch}")
    return arch


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Write ``source`` (GGUF file or HF directory) into ``out`` as an HF directory; returns its
    provenance (format, file hash, architecture, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.is_file():
        fmt, arch = "gguf", gguf_architecture(source)
        check_gguf_supported(arch)
        where: dict[str, Any] = {"pretrained_model_name_or_path": str(source.parent)}
        where["gguf_file"] = source.name
        digest = sha256(source)
    elif (source / "config.json").is_file():
        fmt, where, digest = "hf", {"pretrained_model_name_or_path": str(source)}, None
        arch = check_servable(json.loads((source / "config.json").read_text()), source)
    else:
        raise ModelImportError(f"{source}: neither a GGUF file nor a directory with config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelImportError(f"{source}: cannot be loaded ({exc})") from None
    if not tokenizer.chat_template:
        raise ModelImportError(
            f"{source}: the tokenizer has no chat template (loopchat renders prompts with it)"
        )
    if tokenizer.eos_token_id is None:
        raise ModelImportError(f"{source}: the tokenizer has no end-of-turn (eos) token")
    if tokenizer.pad_token_id is None:  # batches of learners and engines need one
        tokenizer.pad_token = tokenizer.eos_token
    if fmt == "gguf":  # dequantized: drop the quantization marker so the weights can be saved
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model = model.to(torch.bfloat16)
        model.config.architectures = [type(model).__name__]
    arch = check_servable(model.config.to_dict(), source)
    smoke_test(model, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {
        "source": str(source),
        "format": fmt,
        "sha256": digest,
        "architecture": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "imported_at": time.time(),
    }


def smoke_test(model: Any, tokenizer: Any) -> None:
    """The model answers a chat prompt rendered by its own template (a few greedy tokens)."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    if out.shape[1] <= ids["input_ids"].shape[1]:
        raise ModelImportError("the model generated nothing")


def model_card(name: str, provenance: dict[str, Any]) -> str:
    lines = [
        f"# {name}",
        "",
        "Imported into loopchat with `loopchat models import`.",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | `{v}` |" for k, v in provenance.items() if v is not None),
        "",
        "Served and trained with its own tokenizer and chat template.",
    ]
    return "\n".join(lines) + "\n"


def import_model(registry: Registry, source: Path, name: str | None = None) -> str:
    """Register ``source`` as a new ``sft`` version and record the import's checks as its gate.

    Nothing is written to the registry unless every check passed.
    """
    source = source.expanduser().resolve()
    if not source.exists():
        raise ModelImportError(f"{source}: no such file or directory")
    label = name or source.stem
    with tempfile.TemporaryDirectory(prefix="loopchat-import-") as tmp:
        out = Path(tmp) / "model"
        provenance = convert(source, out)
        if not weights_finite(out):
            raise ModelImportError(f"{source}: the weights are not all finite")
        (out / "README.md").write_text(model_card(label, provenance))
        version = registry.register(
            out, "sft", None, {}, {"source": provenance["source"], "import": provenance,
                                   "name": label},
        )  # fmt: skip
    registry.record_gate(
        version,
        {
            "passed": True,
            "reasons": ["imported: loads in transformers, finite weights, generates"],
            "imported": True,
        },
    )
    return version


EXPORT_SKIP = ("loopchat.json", "learner/")  # registry metadata and trainer state


def export_version(registry: Registry, version: str, out: Path) -> Path:
    """Write ``version`` to ``out`` as a plain Hugging Face directory that transformers and vLLM
    load unchanged (no registry metadata, no trainer state; an adapter version merged into its
    base). ``out`` must not hold files yet: an export never overwrites."""
    meta = registry.get(version)
    if meta is None:
        raise ModelImportError(f"unknown version {version!r}")
    if out.exists() and any(out.iterdir()):
        raise ModelImportError(f"{out} is not empty")
    src = registry.local_path(version)
    out.mkdir(parents=True, exist_ok=True)
    if is_adapter(src):
        from transformers import AutoTokenizer

        load_merged(src, registry.base_path(version)).save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
        return out
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = file.relative_to(src).as_posix()
        if not rel.startswith(EXPORT_SKIP):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, out / rel)
    return out
