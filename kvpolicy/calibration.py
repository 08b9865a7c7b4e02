"""Calibration: an extractor's frozen normalisation moments, collected while a policy runs.

NAMM's spectrogram features are z-scored per bin with moments (mean, variance) collected once, by running the
zero policy (all parameters 0, so nothing is evicted), and then frozen (Cetin et al. 2024). Any
extractor that declares `kvpolicy.types.Calibrated` can be calibrated the same way; the moments
are its buffers, saved with the policy. Both `kvpolicy.calibrate` users — a user with a model and
prompts, and an evolution run's calibration job — go through `calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.types import Calibrated

if TYPE_CHECKING:
    from kvpolicy.policy import Policy


def calibrates(policy: Policy) -> bool:
    """Whether the policy's extractor has normalisation moments to calibrate (`Calibrated`)."""
    return isinstance(policy.extractor, Calibrated)


def calibrate(
    policy: Policy,
    model: Any,
    inputs: Iterable[Any],
    *,
    params: torch.Tensor | None = None,
    run: Callable[[Policy, Any, Any], Any] | None = None,
    **generate_kwargs: Any,
) -> int:
    """Collect the extractor's normalisation moments by running ``policy`` over ``inputs``, then
    freeze them. Returns the number of inputs run.

    The policy runs with ``params`` (default: zeros, the zero policy that keeps every token); its
    own parameters are restored afterwards. Each input is run by ``run(policy, model, input)``,
    by default ``policy.generate(model, input, **generate_kwargs)`` on tokenised batches
    (``max_new_tokens`` defaults to 1: the prompt's attention is what is measured).
    """
    extractor = policy.extractor
    if not isinstance(extractor, Calibrated):
        raise InvalidConfigError(
            f"extractor {extractor.name!r} has no normalisation moments to calibrate; calibrate works with 'stft'"
        )
    if run is None:
        generate_kwargs.setdefault("max_new_tokens", 1)

        def run(policy: Policy, model: Any, batch: Any) -> Any:
            return policy.generate(model, batch, **generate_kwargs)

    saved = [(component, component.get_flat().clone()) for component in policy.parametric().values()]
    if params is None:
        for component, _ in saved:
            component.set_flat(torch.zeros(component.num_params))
    else:
        policy.set_flat(params)
    runs = 0
    try:
        extractor.start_calibration()
        for item in inputs:
            run(policy, model, item)
            runs += 1
    finally:
        extractor.freeze()
        for component, values in saved:
            component.set_flat(values)
    return runs
