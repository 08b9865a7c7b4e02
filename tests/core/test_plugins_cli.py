"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def _kvpolicy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpolicy", *args], capture_output=True, text=True, timeout=120)


def test_plugins_lists_distributions_versions_and_components():
    result = _kvpolicy("plugins")
    assert result.returncode == 0, result.stderr
    assert "keydiversity  (kvpolicy-keydiversity 0.1.0)" in result.stdout
    assert "selector:top_k" in result.stdout
    assert "policy presets:" in result.stdout and "streaming_llm" in result.stdout


def test_plugins_json_is_machine_readable():
    result = _kvpolicy("plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["selectors"]["distribution"] == "kvpolicy"
    assert "extractor:key_diversity" in plugins["keydiversity"]["components"]


def test_no_command_prints_help_and_fails():
    result = _kvpolicy()
    assert result.returncode == 2
    assert "plugins" in result.stdout
