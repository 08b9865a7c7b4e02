"""The repeat pass of `Requirements.reconstruction` (KVzip: Kim et al. 2025, arXiv 2505.23416).

KVzip scores a cached token by how much the model needs it to *reproduce the context*: after the
prompt, the model is fed a repeat prompt and the context again, teacher-forced, and every cached
token gets the most attention any of those queries (of any query head of its GQA group) gave it.
Here, just before the eviction pass of a policy that reads these scores (`reconstruct_if_due`,
called by the attachment between forward calls, and by `shared_prefill.prepare`):

1. the context's token ids are read back from the cache (`Requirements.token_ids`);
2. the policy's `RepeatPrompt` cuts them in chunks; each chunk (repeat prompt, chat suffix, the
   chunk's tokens) is fed through the attached model on a *copy* of the cache, so it attends to
   the whole original context and its own keys and values are dropped with the copy. Eviction is
   deferred meanwhile, so the forward hooks neither evict nor recurse;
3. the managed layers' attention is computed here (`attend_recording_max`: the output by sdpa
   under kvpolicy's mask, the maximum from one more pass over the scores in plain torch, since
   the fused kernels give no probabilities and kvpolicy's native kernels sum rather than take a
   max), and each original slot keeps the max over the chunk's queries; a slot's score comes
   from the chunk that repeats it (as in the authors' code);
4. the scores go to each due layer (`EvictingLayer.reconstruction`), and from there to
   `LayerView.reconstruction_attention`; the ordinary eviction pass follows.

Rows of a batch without padding are repeated together; a left-padded batch is repeated row by
row on each row's own tokens (rows of different lengths need different repeat inputs).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from kvpolicy.errors import ShapeError
from kvpolicy.integrations.hf.attention import attention_with_mask, visibility
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer
from kvpolicy.integrations.hf.generate import cache_keyword
from kvpolicy.integrations.hf.in_pass import query_chunk
from kvpolicy.types import RepeatPrompt

#: score values per query chunk of the repeat pass's attention (about 16 MiB of float32)
MAX_ELEMENTS = 1 << 22


def attend_recording_max(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    max_elements: int = MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query [batch, heads, queries, head_dim]``, the newest ``queries`` tokens of
    ``key`` / ``value [batch, kv_heads, tokens, head_dim]`` (older tokens visible where ``valid
    [batch, kv_heads, tokens]`` allows, new ones causally), and the most attention each older
    token received from any query of any head of its group: ``(output [batch, queries, heads,
    head_dim], received [batch, kv_heads, tokens - queries] float32)``.

    A probability is ``exp(score - logsumexp(row))`` and exp is monotonic, so the maximum is
    taken over ``score - logsumexp`` and exponentiated once. On the CPU the row normalisers come
    with the output from torch's fused flash kernel (the one sdpa runs), and one more matmul
    with a max gives the maximum; elsewhere (or with a soft cap) the output is sdpa's and the
    normalisers come from a plain pass over the scores."""
    batch, heads, queries, head_dim = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    before = tokens - queries
    seen = visibility(before, queries, valid, key.device)
    fused = _flash_with_normalisers(query, key, value, seen, scaling) if softcap is None else None
    if fused is None:
        output = attention_with_mask(query, key, value, seen, scaling, softcap)
        normalisers = _normalisers(query, key, seen, scaling, softcap, max_elements)
    else:
        output, normalisers = fused
    grouped = query.reshape(batch, kv_heads, groups, queries, head_dim)
    best = key.new_full((batch, kv_heads, before), float("-inf"), dtype=torch.float32)
    hidden = None if valid is None else ~valid[:, :, None, :before]
    step = query_chunk(groups, before, max_elements)
    for start in range(0, queries, step):
        stop = min(start + step, queries)
        part = grouped[:, :, :, start:stop]
        part = (part if softcap else part * scaling).reshape(batch, kv_heads, -1, head_dim)
        scores = torch.matmul(part, key[:, :, :before].mT).float()  # GQA: keys never repeated
        if softcap:
            scores = torch.tanh(scores * (scaling / softcap)) * softcap
        scores -= normalisers[:, :, :, start:stop].reshape(batch, kv_heads, -1, 1)
        if hidden is not None:
            scores.masked_fill_(hidden, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=2))
    return output, best.exp()


def _flash_with_normalisers(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seen: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Output ``[batch, queries, heads, head_dim]`` and row log-normalisers ``[batch, kv_heads,
    groups, queries]`` float32 from torch's CPU flash kernel, or None where it does not run."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None or query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16):
        return None
    groups = query.shape[1] // key.shape[1]
    bias = torch.zeros(seen.shape, dtype=query.dtype, device=query.device).masked_fill_(~seen, float("-inf"))
    keys, values = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    try:
        bias = bias if bias.shape[1] == 1 else bias.repeat_interleave(groups, 1)  # padding: per KV head
        output, normalisers = flash(query, keys, values, attn_mask=bias, scale=scaling)
    except RuntimeError:  # a build or version of torch without this kernel's signature
        return None
    batch, heads, queries = normalisers.shape
    return output.transpose(1, 2).contiguous(), normalisers.float().view(batch, key.shape[1], groups, queries)


def _normalisers(
    query: torch.Tensor,
    key: torch.Tensor,
    seen: torch.Tensor,
    scaling: float,
    softcap: float | None,
    max_elements: int,
) -> torch.Tensor:
    """Row log-normalisers ``[batch, kv_heads, groups, queries]`` float32 (logsumexp of the
    visible scores), computed in query chunks."""
    batch, heads, queries, head_dim = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups, queries, head_dim)
    out = key.new_empty((batch, kv_heads, groups, queries), dtype=torch.float32)
    for start in range(0, queries, query_chunk(groups, tokens, max_elements)):
        stop = min(start + query_chunk(groups, tokens, max_elements), queries)
        part = grouped[:, :, :, start:stop]
        part = (part if softcap else part * scaling).reshape(batch, kv_heads, -1, head_dim)
        scores = torch.matmul(part, key.mT).float()
        if softcap:
            scores = torch.tanh(scores * (scaling / softcap)) * softcap
        scores = scores.view(batch, kv_heads, groups, stop - start, tokens)
        scores.masked_fill_(~seen[:, :, None, start:stop], float("-inf"))
        out[:, :, :, start:stop] = torch.logsumexp(scores, dim=-1)
    return out


class RepeatRecord:
    """What the attention function does on the managed layers during a repeat forward call
    (set as ``AttentionRoute.repeat``): attend with `attend_recording_max` and keep, per layer,
    what the ``context`` original slots received."""

    def __init__(self, context: int) -> None:
        self.context = context
        self.received: dict[int, torch.Tensor] = {}

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
        softcap: float | None,
    ) -> torch.Tensor:
        output, received = attend_recording_max(query.detach(), key.detach(), value.detach(), valid, scaling, softcap)
        self.received[layer] = received[..., : self.context]  # the original slots (all of them)
        return output


def due_for_reconstruction(policy: Any, cache: EvictingCache) -> tuple[int, ...]:
    """The managed layers of ``cache`` whose eviction pass is due now and still lack scores."""
    if not cache.requirements.reconstruction:
        return ()
    return tuple(
        i
        for i in cache.managed
        if isinstance(cache.layers[i], EvictingLayer)
        and cache.layers[i].reconstruction is None
        and cache.is_due(policy, i)
    )


#: repeat-pass scores of one recorded prompt, for the policies that repeat it the same way:
#: ``{(prompt, layers): (scores per layer, seconds the pass took)}`` (`reconstruct_if_due`)
SharedRepeats = dict[tuple[RepeatPrompt, tuple[int, ...]], tuple[dict[int, torch.Tensor], float]]


def reconstruct_if_due(attachment: Any, cache: EvictingCache, shared: SharedRepeats | None = None) -> float:
    """Before ``attachment``'s eviction pass on ``cache``: run the repeat pass when a layer due
    now reads reconstruction attention, and store its scores on those layers. ``attachment`` is
    an entered `Attachment` (duck-typed: its model, policy, route, cache and ``deferring``).

    ``shared`` (one dict per recorded prompt; `shared_prefill.prepare`) lets policies that
    repeat the same context with the same prompt on the same layers run the pass once: the
    scores depend on nothing else, so they are the ones each would compute. Each policy is still
    charged the pass's cost (`EvictingCache.policy_seconds`), as it would pay alone. Returns the
    seconds spent here."""
    if cache.sealed:  # no eviction pass will run: nothing to score
        return 0.0
    due = due_for_reconstruction(attachment.policy, cache)
    if not due:
        return 0.0
    start = time.perf_counter()
    prompt = attachment.policy.repeat_prompt()  # MissingTokenizerError before anything runs
    known = None if shared is None else shared.get((prompt, due))
    if known is None:
        known = repeat_scores(attachment, cache, prompt, due), time.perf_counter() - start
        if shared is not None:
            shared[(prompt, due)] = known
    scores, cost = known
    for index in due:
        cache.layers[index].reconstruction = scores[index]  # replaced, never changed in place, by eviction
    cache.policy_seconds += cost  # the policy's own cost, like its eviction passes
    return time.perf_counter() - start


def _context_ids(cache: EvictingCache, index: int) -> torch.Tensor:
    layer = cache.layers[index]
    if layer.token_ids is None:
        raise ShapeError(
            "the repeat pass needs the cached token ids, and this cache kept none: the prompt was fed as "
            "inputs_embeds, or the policy's Requirements lack token_ids=True"
        )
    return layer.token_ids[:, 0]


def repeat_scores(
    attachment: Any, cache: EvictingCache, prompt: RepeatPrompt, layers: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """``{layer: [batch, kv_heads, tokens] float32}`` for ``layers`` of ``cache``: the most
    attention each stored slot received while its context was repeated (0 at padded slots).
    ``cache`` itself is left exactly as it was."""
    first = cache.layers[layers[0]]
    scores = {i: torch.zeros(cache.layers[i].positions.shape, dtype=torch.float32, device=first.keys.device)
              for i in layers}  # fmt: skip
    ids = _context_ids(cache, layers[0])
    padded = cache.column_valid is not None or any(cache.layers[i].valid is not None for i in cache.managed)
    saved_cache, saved_deferring = attachment.cache, attachment.deferring
    attachment.deferring = True  # the forward hooks run neither an eviction pass nor this pass again
    try:
        with torch.no_grad():
            if not padded:
                _repeat_rows(attachment, cache, prompt, ids, torch.arange(ids.shape[1]), scores, slice(None))
            else:
                for row in range(ids.shape[0]):
                    slots = first.valid[row, 0].nonzero().flatten() if first.valid is not None else None
                    slots = torch.arange(ids.shape[1], device=ids.device) if slots is None else slots
                    one = cache.row_copy(row) if ids.shape[0] > 1 else cache
                    _repeat_rows(attachment, one, prompt, ids[row : row + 1, slots], slots, scores, slice(row, row + 1))
    finally:
        attachment.route.repeat = None
        attachment.cache, attachment.deferring = saved_cache, saved_deferring
    return scores


def _repeat_rows(
    attachment: Any,
    cache: EvictingCache,
    prompt: RepeatPrompt,
    context: torch.Tensor,
    slots: torch.Tensor,
    scores: dict[int, torch.Tensor],
    rows: slice,
) -> None:
    """Repeat ``context [rows, tokens]`` (the token ids of stored ``slots``) chunk by chunk, each
    chunk on its own copy of ``cache``, writing the scores of the chunk's slots into ``scores``."""
    model = attachment.model
    keyword = cache_keyword(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}
    for start, stop, input_ids in prompt.chunks(context):
        record = RepeatRecord(cache.layers[next(iter(scores))].tokens)
        attachment.route.repeat = record
        model(input_ids=input_ids.to(model.device), use_cache=True, **{keyword: cache.copy()}, **extra)
        attachment.route.repeat = None
        chunk = slots[start:stop].to(context.device)
        for index, tensor in scores.items():
            tensor[rows, :, chunk] = record.received[index][:, :, chunk].to(tensor.device)
