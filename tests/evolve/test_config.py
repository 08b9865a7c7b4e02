"""Bad evolution configs and unavailable executors give clear kvpolicy errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from evolve_support import quadratic_data

from kvpolicy.cli import main
from kvpolicy.errors import InvalidConfigError, UnknownComponentError
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.executors import make_executor
from kvpolicy.evolve.runner import Evolution


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": []}, "at least one stage"),
        ({"stages": [{"tasks": [], "generations": 2}]}, "non-empty list of task names"),
        ({"stages": [{"tasks": ["a"], "generations": 0}]}, "generations must be > 0"),
        ({"fitness": {"metric": "accuracy"}}, "metric"),
        ({"executor": {"kind": "slurm"}}, "kind"),
        ({"stages": [{"tasks": ["a"], "generations": 1, "itemz": 2}]}, "no field.*itemz"),
        ({"populaton": 3}, "no field.*populaton"),
        ({"executor": {"kind": "ray", "address": ""}}, "executor.address must be a Ray address"),
        ({"executor": {"kind": "ray", "address": 6379}}, "executor.address must be a Ray address"),
    ],
)
def test_bad_config_is_a_clear_error(change, message):
    with pytest.raises(InvalidConfigError, match=message):
        EvolveConfig.from_dict(quadratic_data(**change))


def test_unknown_optimizer_and_impossible_item_count(tmp_path):
    with pytest.raises(UnknownComponentError, match="cma_es"):
        Evolution(EvolveConfig.from_dict(quadratic_data(optimizer={"name": "cmaes"})), tmp_path)
    too_many = quadratic_data(stages=[{"tasks": ["a"], "generations": 1, "items": 9}], train_pool=4)
    with pytest.raises(InvalidConfigError, match="train_pool"):
        Evolution(EvolveConfig.from_dict(too_many), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here")
def test_ray_executor_without_ray_says_how_to_install_it():
    config = EvolveConfig.from_dict(quadratic_data(executor={"kind": "ray"}))
    with pytest.raises(InvalidConfigError, match=r"pip install kvpolicy\[ray\]"):
        make_executor(config)


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"stages": "needle"}))
    assert main(["evolve", str(path)]) == 2
    assert "stages" in capsys.readouterr().err
    assert main(["evolve", str(tmp_path / "missing.json")]) == 2


def test_cli_address_goes_with_the_ray_executor_only(tmp_path, capsys):
    path = tmp_path / "quadratic.json"
    path.write_text(json.dumps(quadratic_data()))
    assert main(["evolve", str(path), "--executor", "process", "--address", "auto", "--out", str(tmp_path / "o")]) == 2
    assert "--address joins a Ray cluster" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_simple_es_drops_in_and_improves_the_quadratic(tmp_path):
    data = quadratic_data(optimizer={"name": "simple_es", "config": {"popsize": 8, "sigma": 0.1, "learning_rate": 0.1}})
    result = Evolution(EvolveConfig.from_dict(data), tmp_path).run()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("type") == "generation")
    assert result.best_fitness > first["heldout_fitness"]
