"""Plugins are told apart by distribution and module: a third party reusing a built-in's
entry-point name loads next to it; two plugins registering one component name make only that
name unusable, ``kvpolicy plugins`` still lists everything, and strict mode refuses the clash."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy import DuplicateComponentError, Registry
from kvpolicy.cli import main
from kvpolicy.errors import PluginClashWarning
from kvpolicy.registry import reset_default_registry

SCORER = """
    from typing import ClassVar

    import kvpolicy
    from kvpolicy.types import EmptyConfig, Requirements


    def _scorer(scorer_name):
        class Scorer:
            name: ClassVar[str] = scorer_name
            Config = EmptyConfig

            def __init__(self, config=None):
                self.config = config or EmptyConfig()

            @property
            def requirements(self):
                return Requirements()

            def score(self, features, view):
                return features[..., 0]

        return Scorer


    @kvpolicy.hookimpl
    def kvpolicy_register_scorers(register):
        for name in {names!r}:
            register(name, _scorer(name))
"""


def _write_distribution(root: Path, dist: str, module: str, ep_name: str, scorers: tuple[str, ...]) -> None:
    """A real installed distribution (dist-info + module) that importlib.metadata discovers."""
    (root / f"{module}.py").write_text(textwrap.dedent(SCORER.format(names=scorers)))
    info = root / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[kvpolicy]\n{ep_name} = {module}\n")


@pytest.fixture
def extra_site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    reset_default_registry()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("kvp_clash_")]:
        del sys.modules[name]
    reset_default_registry()


def test_third_party_reusing_a_builtin_entry_point_name_loads_beside_it(extra_site):
    _write_distribution(extra_site, "kvp-clash", "kvp_clash_h2o", "h2o", ("their_scorer",))
    with pytest.warns(PluginClashWarning, match=r"entry point name 'h2o' is used by 2 plugins: kvp-clash 9\.9"):
        registry = Registry(strict=True)  # nothing is lost, so strict mode has nothing to refuse
    assert kvpolicy.build("h2o", budget=64, registry=registry).scorer.name == "feature"
    assert registry.create("scorer", "their_scorer").name == "their_scorer"
    infos = {p.name: p for p in registry.plugins()}
    assert infos["kvpolicy:h2o"].module == "kvpolicy_plugins.h2o"
    assert "policy:h2o" in infos["kvpolicy:h2o"].components
    assert infos["kvp-clash:h2o"].distribution == "kvp-clash"
    assert infos["kvp-clash:h2o"].components == ("scorer:their_scorer",)


def test_same_component_from_two_plugins_breaks_only_that_name(extra_site):
    _write_distribution(extra_site, "kvp-one", "kvp_clash_one", "one", ("shared_scorer", "one_scorer"))
    _write_distribution(extra_site, "kvp-two", "kvp_clash_two", "two", ("shared_scorer", "two_scorer"))
    with pytest.warns(
        PluginClashWarning, match=r"scorer 'shared_scorer' is registered by plugin 'one'.*kvp-one.*'two'"
    ):
        registry = Registry()
    assert registry.create("scorer", "one_scorer").name == "one_scorer"
    assert registry.create("scorer", "two_scorer").name == "two_scorer"
    assert kvpolicy.build("h2o", budget=64, registry=registry).scorer.name == "feature"
    with pytest.raises(DuplicateComponentError, match=r"'shared_scorer' is registered twice: by plugin 'one'.*'two'"):
        kvpolicy.Policy("position", "shared_scorer", "top_k", budget=8, registry=registry)
    (conflict,) = registry.conflicts()
    assert (conflict.kind, conflict.name, conflict.providers) == ("scorer", "shared_scorer", ("one", "two"))


def test_strict_mode_refuses_the_component_clash(extra_site, monkeypatch):
    _write_distribution(extra_site, "kvp-one", "kvp_clash_one", "one", ("shared_scorer",))
    _write_distribution(extra_site, "kvp-two", "kvp_clash_two", "two", ("shared_scorer",))
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(DuplicateComponentError, match="'one'.*'two'"):
        Registry()


def test_plugins_command_lists_everything_and_shows_the_conflict(extra_site, capsys, monkeypatch):
    _write_distribution(extra_site, "kvp-one", "kvp_clash_one", "one", ("shared_scorer", "one_scorer"))
    _write_distribution(extra_site, "kvp-two", "kvp_clash_two", "two", ("shared_scorer",))
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")  # even strict: the listing is how one finds the clash
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "one  (kvp-one 9.9)  module kvp_clash_one" in out and "two  (kvp-two 9.9)" in out
    assert "scorer:one_scorer" in out and "scorer:shared_scorer  ! conflict" in out
    assert "selector:top_k" in out and "policy presets:" in out
    assert "conflict: scorer 'shared_scorer' is registered by one, two" in out


def test_other_commands_fail_only_on_the_clashing_name(extra_site, capsys):
    _write_distribution(extra_site, "kvp-one", "kvp_clash_one", "one", ("shared_scorer",))
    _write_distribution(extra_site, "kvp-two", "kvp_clash_two", "two", ("shared_scorer",))
    policy_file = extra_site / "clash.json"
    policy_file.write_text(
        '{"extractor": "position", "scorer": "shared_scorer", "selector": "top_k", "budget": 8, '
        '"schedule": {"kind": "every_step"}, "protect": {}}'
    )
    from kvpolicy.cli.run import prepare

    with pytest.warns(PluginClashWarning):
        assert prepare(_run_args("--policy", "h2o", "--budget", "64")).scorer.name == "feature"  # what `run` does first
    assert main(["run", "--policy", str(policy_file)]) == 2  # refused before any model is loaded
    assert "'shared_scorer' is registered twice: by plugin 'one'" in capsys.readouterr().err


def _run_args(*argv: str):
    import argparse

    from kvpolicy.cli.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))
