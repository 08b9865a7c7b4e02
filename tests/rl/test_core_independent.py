"""The core never imports `kvpolicy.rl` (nor gymnasium): it is an optional layer on top."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import kvpolicy, kvpolicy.cli, kvpolicy.eval, kvpolicy.evolve, kvpolicy.testing
from kvpolicy.integrations.hf import adapter, attach
from kvpolicy.cli import _build_parser
_build_parser()
registry = kvpolicy.default_registry()
for name in registry.preset_names():
    kvpolicy.build(name)
leaked = sorted(m for m in sys.modules if m == "gymnasium" or m.startswith(("kvpolicy.rl", "mujoco")))
print(",".join(leaked))
"""


def test_core_imports_nothing_of_kvpolicy_rl():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
