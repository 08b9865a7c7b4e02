"""Labels that name a policy in results, file names and tables: ``streaming_llm@256``,
``h2o_recent_32@25%`` for a spec given on the command line, ``stft/bam/top_k@0.25`` for a built
policy given no label.

The specs themselves (``NAME``, ``NAME:{json overrides}``, a .json config or a saved
.safetensors policy) are read by `kvpolicy.build` (`kvpolicy.spec`), as everywhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kvpolicy.spec import is_policy_file


def label_for_spec(spec: str, budget: str | None = None) -> str:
    """A short, file-name-safe label: ``streaming_llm@256``, ``h2o_recent_32@25%``."""
    base = Path(spec).stem if is_policy_file(spec) else spec
    base = re.sub(r"[^A-Za-z0-9_.%-]+", "_", base).strip("_")
    return f"{base}@{budget}" if budget is not None else base


def label_for_policy(policy: Any) -> str:
    """``extractor/scorer/selector@budget``: the label of a built policy when the caller gives none."""
    budget = policy.budget.tokens or policy.budget.ratio
    parts = f"{policy.extractor.name}/{policy.scorer.name}/{policy.selector.name}"
    return parts + (f"@{budget}" if budget is not None else "")
