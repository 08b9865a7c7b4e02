"""Model files tagged with a format (the Decision Transformer's, the digit-video model's) are read
through one check: a missing, corrupt or foreign file is a CheckpointError that says which."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kvpolicy.checkpoint import read_tagged_metadata
from kvpolicy.errors import CheckpointError


def test_missing_corrupt_and_foreign_files_are_named(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no widget at .*; make one"):
        read_tagged_metadata(tmp_path / "none.safetensors", "w/1", "widget", "; make one")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x05garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_tagged_metadata(corrupt, "w/1", "widget")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "other/2"})
    with pytest.raises(CheckpointError, match="not a kvpolicy widget \\(format 'other/2'\\)"):
        read_tagged_metadata(foreign, "w/1", "widget")
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "w/1", "config": "{}"})
    assert read_tagged_metadata(foreign, "w/1", "widget") == {"format": "w/1", "config": "{}"}
