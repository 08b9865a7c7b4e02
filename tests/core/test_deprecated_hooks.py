"""A third party's plugin written against the earlier hook name keeps working, and is told to rename."""

from __future__ import annotations

import pytest

import kvpolicy
from kvpolicy import Registry, hookimpl
from kvpolicy.types import Budget, ComponentRef, PolicyConfig, Schedule

CONFIG = PolicyConfig(
    extractor=ComponentRef("position"),
    scorer=ComponentRef("feature"),
    selector=ComponentRef("top_k"),
    schedule=Schedule("every_step"),
    budget=Budget(tokens=64),
)


class OldPlugin:
    @hookimpl
    def kvpolicy_register_policies(self, register) -> None:
        register("old-style", CONFIG, description="registered through the deprecated hook name")


class NewPlugin:
    @hookimpl
    def kvpolicy_register_presets(self, register) -> None:
        register("new-style", CONFIG)


def test_the_old_preset_hook_still_registers_and_warns():
    registry = Registry()
    with pytest.warns(DeprecationWarning, match="rename the hook to kvpolicy_register_presets"):
        registry.register_plugin(OldPlugin(), name="old-plugin")
    assert registry.preset("old-style").config == CONFIG
    assert kvpolicy.build("old-style", registry=registry).config == kvpolicy.Policy.from_config(CONFIG).config
    assert "policy:old-style" in {c for p in registry.plugins() if p.name == "old-plugin" for c in p.components}


def test_the_new_preset_hook_registers_without_a_warning(recwarn):
    registry = Registry()
    registry.register_plugin(NewPlugin(), name="new-plugin")
    assert registry.preset("new-style").config == CONFIG
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
