"""The registry: entry-point loading, collisions, broken plugins, strict mode, suggestions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

import kvpolicy
from kvpolicy import DuplicateComponentError, PluginLoadError, Registry, UnknownComponentError
from kvpolicy.errors import InvalidConfigError, UnsupportedModelError
from kvpolicy.registry import PluginLoadWarning
from kvpolicy.types import EmptyConfig, Requirements


class _ConstScorer:
    name: ClassVar[str] = "const"
    Config = EmptyConfig

    def __init__(self, config=None):
        self.config = config or EmptyConfig()

    @property
    def requirements(self):
        return Requirements()

    def score(self, features, view):
        return features[..., 0] * 0


class _Plugin:
    @kvpolicy.hookimpl
    def kvpolicy_register_scorers(self, register):
        register("const", _ConstScorer)


def _write_distribution(root: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    """A real installed distribution (dist-info + module) that importlib.metadata discovers."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[kvpolicy]\n{ep_name} = {module}\n")


@pytest.fixture
def extra_site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("kvp_test_")]:
        del sys.modules[name]


def test_builtins_are_found_through_entry_points(registry):
    assert {"top_k", "threshold"} <= set(registry.names("selector"))
    assert {"full", "streaming_llm", "random"} <= set(registry.preset_names())
    infos = {p.name: p for p in registry.plugins()}
    assert infos["selectors"].distribution == "kvpolicy"
    assert infos["selectors"].version == kvpolicy.__version__
    assert "selector:top_k" in infos["selectors"].components


def test_installed_third_party_distribution_is_discovered(registry):
    infos = {p.name: p for p in registry.plugins()}
    assert infos["keydiversity"].distribution == "kvpolicy-keydiversity"
    assert "extractor:key_diversity" in infos["keydiversity"].components
    policy = kvpolicy.build("key-diversity", budget=64, registry=registry)
    assert policy.extractor.name == "key_diversity"
    assert policy.requirements.keys


def test_plugin_registered_in_code_is_usable():
    registry = Registry(entry_points=False)
    assert registry.register_plugin(_Plugin(), name="mine") == "mine"
    assert registry.names("scorer") == ["const"]
    assert isinstance(registry.create("scorer", "const"), _ConstScorer)


def test_duplicate_name_names_both_providers():
    registry = Registry()
    with pytest.raises(DuplicateComponentError) as info:
        registry.register_plugin(_Plugin(), name="first")
        registry.register_plugin(_Plugin(), name="second")
    assert "'first'" in str(info.value) and "'second'" in str(info.value)
    assert registry.names("scorer").count("const") == 1
    assert "second" not in [p.name for p in registry.plugins()]


def test_duplicate_of_builtin_names_its_distribution():
    class Clash:
        @kvpolicy.hookimpl
        def kvpolicy_register_selectors(self, register):
            register("top_k", type("TopK", (), {"name": "top_k", "Config": EmptyConfig}))

    with pytest.raises(DuplicateComponentError, match=r"distribution kvpolicy 0\.1\.0.*'clash'"):
        Registry().register_plugin(Clash(), name="clash")


def test_unknown_names_suggest_close_matches(registry):
    with pytest.raises(UnknownComponentError) as info:
        registry.spec("selector", "topk")
    assert info.value.suggestions == ["top_k"]
    assert "Did you mean 'top_k'" in str(info.value)
    with pytest.raises(UnknownComponentError, match="Known policy presets: .*streaming_llm"):
        kvpolicy.build("streaming", registry=registry)


def test_broken_entry_point_warns_names_it_and_is_skipped(extra_site):
    _write_distribution(extra_site, "kvp-broken", "kvp_test_broken", "raise RuntimeError('boom')\n", "broken")
    with pytest.warns(PluginLoadWarning, match=r"'broken' \(from distribution kvp-broken\) cannot be imported.*boom"):
        registry = Registry(strict=False)
    assert "broken" not in [p.name for p in registry.plugins()]
    assert "top_k" in registry.names("selector")  # everything else still works


def test_strict_mode_from_environment_raises(extra_site, monkeypatch):
    _write_distribution(extra_site, "kvp-broken2", "kvp_test_broken2", "import no_such_module_xyz\n", "broken2")
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="broken2.*no_such_module_xyz"):
        Registry()


def test_misspelt_hook_is_rejected(extra_site):
    source = """
        import kvpolicy

        @kvpolicy.hookimpl
        def kvpolicy_register_scorer(register):  # missing the final s
            pass
    """
    _write_distribution(extra_site, "kvp-typo", "kvp_test_typo", source, "typo")
    with pytest.raises(PluginLoadError, match="typo.*unknown hook.*kvpolicy_register_scorer"):
        Registry(strict=True)
    with pytest.warns(PluginLoadWarning, match="typo"):
        registry = Registry(strict=False)
    assert "typo" not in [p.name for p in registry.plugins()]


def test_failing_registration_is_skipped_without_leaving_half_its_components():
    class Half:
        @kvpolicy.hookimpl
        def kvpolicy_register_scorers(self, register):
            register("half_ok", type("H", (), {"name": "half_ok", "Config": EmptyConfig}))
            raise ValueError("second component failed")

    registry = Registry(entry_points=False, strict=False)
    with pytest.warns(PluginLoadWarning, match="'half' failed while registering.*second component"):
        assert registry.register_plugin(Half(), name="half") is None
    assert registry.names("scorer") == []


@pytest.mark.parametrize(
    ("name", "cls", "message"),
    [
        ("bad name!", _ConstScorer, "not valid"),
        ("other", _ConstScorer, "whose `name` is 'const'"),
        ("const", type("NoConfig", (), {"name": "const"}), "needs a `Config`"),
    ],
)
def test_invalid_registrations_are_explained(name, cls, message):
    class Bad:
        @kvpolicy.hookimpl
        def kvpolicy_register_scorers(self, register):
            register(name, cls)

    with pytest.raises(PluginLoadError, match=message):
        Registry(entry_points=False, strict=True).register_plugin(Bad(), name="bad")


def test_component_that_breaks_its_protocol_is_refused():
    @attrs.frozen
    class Cfg:
        pass

    class NotAScorer:
        name: ClassVar[str] = "nope"
        Config = Cfg

        def __init__(self, config):
            self.config = config

    class P:
        @kvpolicy.hookimpl
        def kvpolicy_register_scorers(self, register):
            register("nope", NotAScorer)

    registry = Registry(entry_points=False)
    registry.register_plugin(P(), name="p")
    with pytest.raises(InvalidConfigError, match="does not implement Scorer"):
        registry.create("scorer", "nope")


def test_unregister_removes_components():
    registry = Registry(entry_points=False)
    registry.register_plugin(_Plugin(), name="mine")
    registry.unregister_plugin("mine")
    with pytest.raises(UnknownComponentError):
        registry.spec("scorer", "const")


def test_model_without_adapter_gets_clear_error():
    registry = Registry(entry_points=False)
    with pytest.raises(UnsupportedModelError, match="no loaded plugin can attach a policy to object"):
        registry.model_adapter(object())


def test_a_plugin_registering_one_name_twice_is_broken_not_a_clash():
    class Twice:
        @kvpolicy.hookimpl
        def kvpolicy_register_scorers(self, register):
            register("const", _ConstScorer)
            register("const", _ConstScorer)

    registry = Registry(entry_points=False, strict=False)
    with pytest.warns(PluginLoadWarning, match=r"'twice' failed while registering.*'const' is registered twice"):
        assert registry.register_plugin(Twice(), name="twice") is None
    assert registry.names("scorer") == [] and registry.conflicts() == []
    with pytest.raises(PluginLoadError, match="twice"):
        Registry(entry_points=False, strict=True).register_plugin(Twice(), name="twice")


def test_loading_the_entry_points_again_adds_nothing(registry):
    before = registry.plugins()
    registry.load_entry_points()
    assert registry.plugins() == before and registry.conflicts() == []
