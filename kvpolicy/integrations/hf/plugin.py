"""The Hugging Face integration, registered as the ``hf`` plugin through entry points like any other."""

from __future__ import annotations

from typing import Any

from kvpolicy import hookimpl


@hookimpl(trylast=True)
def kvpolicy_model_adapter(model: Any) -> Any | None:
    """An adapter for transformers models (unsupported families raise a clear error on attach);
    ``trylast`` lets another plugin claim a model first."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a dependency, but a broken install must not break the registry
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    from kvpolicy.integrations.hf.adapter import HFAdapter

    return HFAdapter(model)
