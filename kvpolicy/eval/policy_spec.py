"""Labels for policies named on the command line: ``streaming_llm@256``, ``h2o_recent_32@25%``.

The specs themselves (``NAME``, ``NAME:{json overrides}``, a .json config or a saved
.safetensors policy) are read by `kvpolicy.build` (`kvpolicy.spec`), as everywhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvpolicy.spec import is_policy_file


def policy_label(spec: str, budget: str | None = None) -> str:
    """A short, file-name-safe label: ``streaming_llm@256``, ``h2o_recent_32@25%``."""
    base = Path(spec).stem if is_policy_file(spec) else spec
    base = re.sub(r"[^A-Za-z0-9_.%-]+", "_", base).strip("_")
    return f"{base}@{budget}" if budget is not None else base
