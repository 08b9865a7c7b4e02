"""When the question reaches the cache: the two evaluation protocols.

- ``question-aware``: one prompt (context, question, answer prompt); eviction passes may see the
  question (a pass after the whole prompt reads the question's attention). What SnapKV and
  kvpress measure, and where a span-pooled vote of the newest queries finds the answer.
- ``context-first``: the context is prefilled and compressed first, then the question and the
  answer prompt are appended to the sealed cache, so no eviction pass sees a question token
  before the answer is produced (`kvpolicy.integrations.hf.context_first`). What a cached
  document, a multi-turn chat or NAMM's every-512-tokens schedule meets in real use.

Every result records its protocol, and a run never mixes the two.
"""

from __future__ import annotations

from typing import Literal

from kvpolicy.errors import InvalidConfigError

EvalProtocol = Literal["question-aware", "context-first"]
PROTOCOLS: tuple[str, ...] = ("question-aware", "context-first")
DEFAULT_PROTOCOL: EvalProtocol = "question-aware"


def check_protocol(protocol: str) -> EvalProtocol:
    if protocol not in PROTOCOLS:
        raise InvalidConfigError(f"unknown protocol {protocol!r}; protocols are {', '.join(PROTOCOLS)}")
    return protocol  # type: ignore[return-value]
