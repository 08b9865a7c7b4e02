"""What follows a prefill: teacher forcing and greedy decoding of prepared batch rows.

Every evaluation path ends here (`kvpolicy.eval.harness.evaluate`): rows were prefilled by one of
the preparations in `kvpolicy.eval.rows` (a left-padded batch of items, a population repeating
one item, or forks of a shared prefill), and the logits of each row's last prompt token predict
its first answer token. From there:

- **teacher forcing** feeds the gold answer but its last token and returns
  ``mean log p(answer)``; rows that share one answer are fed as one batch on the cache itself,
  other rows each on a copy of their own row (`Handle.fork_row`), so the batch's cache is left as
  it was for greedy decoding;
- **greedy decoding** runs all rows in lockstep, one token per forward call, as ``generate``
  does; a row ends at an end-of-sequence token (`end_of_sequence_ids`) or at its
  ``max_new_tokens``, its cache report is taken at that moment, and it leaves the batch (its last
  token is never fed, as in ``generate``).

A population loaded on the policy (one parameter row per batch row) follows the rows that stay:
every forward call runs under `Policy.population_rows`, so a row's eviction passes always use its
own member's parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.eval.metrics import answer_logprobs
from kvpolicy.types import CacheReport


def end_of_sequence_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end an answer: those of the model's generation config, as ``model.generate``
    stops on them, or the tokenizer's end-of-sequence token where the config names none.

    One rule for every path, so an item scores the same whichever way its rows were prepared, and
    the full cache scores exactly what ``model.generate`` returns.
    """
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def teacher_force(
    handle: Any, last: torch.Tensor, answers: dict[int, torch.Tensor], *, keep_cache: bool
) -> dict[int, tuple[float, CacheReport]]:
    """Mean log-probability per token of each answer ``{row: answer_ids [1, tokens]}`` and the
    row's report after it was fed; ``last [rows, vocab]`` are the prompts' last logits.

    Rows that share one answer and are the whole batch go in one batched feed on the cache, unless
    ``keep_cache`` (greedy decoding follows on it); any other row goes alone on a copy of its
    row, leaving the batch's cache unchanged."""
    batch = last.shape[0]
    shared = (
        not keep_cache and len(answers) == batch and all(torch.equal(answer, answers[0]) for answer in answers.values())
    )
    if shared:
        answer = answers[0].to(last.device).expand(batch, -1)
        logits = _continue(handle, last, answer)
        logprobs = answer_logprobs(logits, answer).mean(-1).tolist()
        return {row: (float(logprobs[row]), handle.report(row=row)) for row in range(batch)}
    out: dict[int, tuple[float, CacheReport]] = {}
    for row, answer in answers.items():
        answer = answer.to(last.device)
        with handle.fork_row(row), handle.policy.population_rows([row]):
            logits = _continue(handle, last[row : row + 1], answer)
            out[row] = (answer_logprobs(logits, answer).mean().item(), handle.report())
    return out


def _continue(handle: Any, last: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Logits predicting every token of ``answer [rows, tokens]``: the prompt's last logits, then
    those of the answer fed but its last token."""
    logits = last[:, None]
    if answer.shape[-1] > 1:
        logits = torch.cat([logits, handle.feed(answer[:, :-1])], dim=1)
    return logits


def greedy(
    handle: Any, last: torch.Tensor, limits: dict[int, int], eos: frozenset[int]
) -> dict[int, tuple[list[int], CacheReport]]:
    """Greedy tokens of the rows in ``limits`` (row → max new tokens), all rows decoding together
    from the prompts' last logits ``last [rows, vocab]``; each row's tokens (the end-of-sequence
    token left out) and its report at the moment it stopped."""
    out: dict[int, tuple[list[int], CacheReport]] = {}
    if not limits:
        return out
    tokens: dict[int, list[int]] = {row: [] for row in limits}
    active = sorted(limits)  # batch rows still decoding, in cache order
    if len(active) < last.shape[0]:  # rows that only teacher-force leave the batch
        handle.cache.batch_select_indices(torch.tensor(active))
        last = last[active]
    while True:
        chosen = last.argmax(-1)
        for place, row in enumerate(active):
            token = int(chosen[place])
            ended = token in eos
            if not ended:
                tokens[row].append(token)
            if ended or len(tokens[row]) >= limits[row]:
                out[row] = (tokens[row], handle.report(row=place))
        if len(out) == len(tokens):
            return out
        places = [place for place, row in enumerate(active) if row not in out]
        if len(places) < len(active):  # finished rows leave: later steps cost only the others
            handle.cache.batch_select_indices(torch.tensor(places))
            active, chosen = [active[place] for place in places], chosen[places]
        with handle.policy.population_rows(active):
            last = handle.feed(chosen[:, None])[:, -1]
