"""Every argument of ``eval`` and ``compare`` is checked before any model loads or any run starts."""

from __future__ import annotations

import time

import pytest

from kvpolicy.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--policy", "h2o", "--budget", "64", "--paired-against", "nope"], "--paired-against 'nope'"),
        (["compare", "--policy", "h2o", "--budget", "64", "--chunk-size", "0"], "chunk_size must be a positive"),
        (["eval", "--policy", "h2o", "--budget", "64", "--chunk-size", "-3"], "chunk_size must be a positive"),
        (["eval", "--policy", "h2o", "--budget", "64", "--model", "gpt-17"], "unknown shipped model 'gpt-17'"),
        (["compare", "--policy", "h2o", "--model", "gpt-17"], "unknown shipped model 'gpt-17'"),
        (["eval", "--policy", "h2o", "--budget", "64", "--workers", "4"], "--workers sets up worker processes"),
        (["eval", "--policy", "h2o", "--budget", "64", "--threads", "0"], "--threads must be a positive"),
        (["compare", "--policy", "h2o", "--executor", "processes", "--address", "auto"], "--address joins a Ray"),
        (["eval", "--policy", "h2o", "--executor", "ray", "--batch-size", "4"], "cannot batch items"),
        (["compare", "--policy", "h2o", "--executor", "processes", "--workers", "0"], "--workers must be a positive"),
        (["compare", "--policy", "h2o", "--report", "../elsewhere"], "--report takes a plain file name"),
    ],
)
def test_a_bad_argument_fails_at_once(tmp_path, capsys, argv, message):
    start = time.monotonic()
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing ran"
    assert time.monotonic() - start < 20
