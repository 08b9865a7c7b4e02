"""Policy files cannot change silently: a sha256 in the metadata covers the config and every tensor,
a file without one loads only when asked explicitly, and no file can carry or run code."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kvpolicy
from kvpolicy import CheckpointError, Policy, checkpoint
from kvpolicy.checkpoint import CHECKSUM_KEY


def _saved(tmp_path: Path) -> tuple[Path, Policy]:
    policy = kvpolicy.build("namm-bam")
    policy.set_flat(torch.linspace(-1, 1, policy.num_params))
    path = tmp_path / "policy.safetensors"
    policy.save(path)
    return path, policy


def _contents(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}


def test_saved_file_carries_a_checksum_and_round_trips(tmp_path):
    path, policy = _saved(tmp_path)
    metadata, _ = _contents(path)
    assert len(metadata[CHECKSUM_KEY]) == 64
    assert torch.equal(Policy.load(path).get_flat(), policy.get_flat())


def test_a_flipped_byte_in_the_tensor_data_is_a_checkpoint_error(tmp_path):
    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed after it was saved: its config or tensors do not match"):
        Policy.load(path)
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        kvpolicy.build("namm-bam").load_weights(path)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"recent": 0', '"recent": 92'),
        ('"kind": "every_n"', '"kind": "never"'),
        ('"threshold": 0.0', '"threshold": 9.0'),
    ],
)
def test_an_edited_config_is_a_checkpoint_error(tmp_path, old, new):
    path, _ = _saved(tmp_path)
    metadata, tensors = _contents(path)
    assert old in metadata["policy"]
    metadata["policy"] = metadata["policy"].replace(old, new)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="changed after it was saved"):
        Policy.load(path)


def test_an_edited_model_record_is_a_checkpoint_error(tmp_path):
    policy = kvpolicy.build("namm-bam")
    path = tmp_path / "policy.safetensors"
    policy.save(path, made_for=checkpoint.ModelRecord("m", 2, 1, 8))
    metadata, tensors = _contents(path)
    metadata[checkpoint.MODEL_KEY] = metadata[checkpoint.MODEL_KEY].replace('"layers": 2', '"layers": 3')
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="changed after it was saved"):
        Policy.load(path)


def test_a_file_without_a_checksum_loads_only_when_asked(tmp_path):
    path, policy = _saved(tmp_path)
    metadata, tensors = _contents(path)
    del metadata[CHECKSUM_KEY]
    tensors["params"] = tensors["params"] + 1  # changed weights: nothing could tell
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="carries no checksum.*allow_unsigned=True"):
        Policy.load(path)
    with pytest.raises(CheckpointError, match="carries no checksum"):
        kvpolicy.build("namm-bam").load_weights(path)
    assert torch.equal(Policy.load(path, allow_unsigned=True).get_flat(), policy.get_flat() + 1)


def test_a_file_of_the_first_format_is_refused_by_name(tmp_path):
    path, _ = _saved(tmp_path)
    metadata, tensors = _contents(path)
    metadata["format"] = "kvpolicy.policy/1"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="not a kvpolicy policy file of this version.*save the policy again"):
        Policy.load(path)


def _write(path: Path, policy_text: str) -> None:
    """A signed file holding ``policy_text`` as its config (the checksum proves integrity, not trust)."""
    checkpoint.write_policy_file(path, policy_text, torch.zeros(0), {})


class _Trap:
    """Unpickling this would create ``marker`` (proof that code ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_the_metadata_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Trap(marker))
    for policy_text in (payload.decode("latin-1"), base64.b64encode(payload).decode()):
        path = tmp_path / "trap.safetensors"
        _write(path, policy_text)
        with pytest.raises(CheckpointError, match="cannot be rebuilt here: policy config is not valid JSON"):
            Policy.load(path)
    assert not marker.exists()


def test_a_torch_pickle_named_like_a_policy_file_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "trap.safetensors"
    torch.save({"trap": _Trap(marker)}, str(path))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Policy.load(path)
    assert not marker.exists()


def test_a_policy_naming_an_unknown_component_is_refused(tmp_path):
    config = json.loads(kvpolicy.build("h2o", budget=64).to_json())
    config["scorer"] = {"name": "os.system", "config": {"command": "touch pwned"}}
    path = tmp_path / "unknown.safetensors"
    _write(path, json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown scorer 'os.system'"):
        Policy.load(path)
    assert not (Path.cwd() / "pwned").exists() and not os.path.exists(tmp_path / "pwned")


def test_deeply_nested_policy_json_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    deep = "[" * 100_000 + "]" * 100_000
    _write(path, deep)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Policy.load(path)


def test_checkpoint_module_uses_no_pickle():
    source = Path(checkpoint.__file__).read_text()
    assert "import pickle" not in source and "torch.load" not in source and "pickle.load" not in source
