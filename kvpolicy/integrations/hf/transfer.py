"""Which model a policy was made for, and what attaching it to another one says.

A policy file records the model its weights were evolved or calibrated on (`ModelRecord`). Zero-
shot transfer to another model is a supported use, but a visible one: attaching elsewhere warns
once per pair of models unless the user chose it (``policy.transfer = True``), and the attachment's
report notes it either way, so a result never hides which model a policy came from.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

from kvpolicy.checkpoint import ModelRecord
from kvpolicy.errors import ModelTransferWarning

_warned: set[tuple[ModelRecord, ModelRecord]] = set()
_warned_lock = threading.Lock()


def model_record(model: Any) -> ModelRecord:
    """The record of a transformers model: its name (the last part of its path), layers, KV
    heads and head dimension."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or str(config.model_type)
    return ModelRecord(
        name, int(config.num_hidden_layers), int(getattr(config, "num_key_value_heads", None) or heads), int(head_dim)
    )


def transfer_note(policy: Any, model: Any) -> str | None:
    """A report note when ``policy`` was made for a model other than ``model`` (warning once per
    pair unless the transfer was chosen), else None."""
    made_for = getattr(policy, "made_for", None)
    if made_for is None:
        return None
    here = model_record(model)
    if here == made_for:
        return None
    chosen = bool(getattr(policy, "transfer", False))
    note = (
        f"zero-shot transfer{' (chosen)' if chosen else ''}: the policy was made for {made_for.describe()} "
        f"and is attached to {here.describe()}"
    )
    if not chosen:
        with _warned_lock:
            first = (made_for, here) not in _warned
            _warned.add((made_for, here))
        if first:
            warnings.warn(
                f"{note}; set policy.transfer = True (or Policy.load(..., transfer=True)) to choose it",
                ModelTransferWarning,
                stacklevel=3,
            )
    return note
