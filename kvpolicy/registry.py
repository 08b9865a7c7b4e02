"""The plugin registry (tier 2): one pluggy `PluginManager`, a typed facade over its hooks.

Built-in components are not special: they live in the ``kvpolicy_plugins`` package and are found
through entry points in group ``kvpolicy``, exactly as a third party's. Entry points are loaded
one by one; a plugin that fails to import or register is reported with a warning naming it and
skipped, so one broken plugin never makes the library unusable. Set ``KVPOLICY_STRICT_PLUGINS=1``
(CI does) to turn those warnings into `PluginLoadError`.

Plugins are told apart by distribution and module, never by entry-point name alone: two
distributions that use the same entry-point name are both loaded, each as
``<distribution>:<name>``, with a `PluginClashWarning` naming both. Two plugins that register the
same component or preset name make that one name unusable (a `DuplicateComponentError` naming
both, when it is used) while everything else keeps working and ``kvpolicy plugins`` lists the
conflict; strict mode raises at load time instead.
"""

from __future__ import annotations

import functools
import importlib.metadata as importlib_metadata
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pluggy

from kvpolicy import hookspecs
from kvpolicy.errors import (
    DuplicateComponentError,
    InvalidConfigError,
    KVPolicyWarning,
    PluginClashWarning,
    PluginLoadError,
    UnknownComponentError,
    UnsupportedModelError,
)
from kvpolicy.types import COMPONENT_KINDS, PROTOCOLS, ComponentKind, ModelAdapter, PolicyConfig, config_from_dict

STRICT_ENV = "KVPOLICY_STRICT_PLUGINS"
_REGISTER_HOOKS: dict[ComponentKind, str] = {
    "extractor": "kvpolicy_register_extractors",
    "scorer": "kvpolicy_register_scorers",
    "pooler": "kvpolicy_register_poolers",
    "selector": "kvpolicy_register_selectors",
    "optimizer": "kvpolicy_register_optimizers",
}


class PluginLoadWarning(KVPolicyWarning):
    """A plugin was skipped because it could not be loaded or registered."""


@attrs.frozen
class ComponentSpec:
    """One registered component: where it came from and how to build it."""

    kind: ComponentKind
    name: str
    cls: type
    plugin: str
    description: str = ""

    @property
    def config_cls(self) -> type:
        return self.cls.Config


@attrs.frozen
class PresetSpec:
    """One registered policy preset."""

    name: str
    config: PolicyConfig
    plugin: str
    description: str = ""
    #: a saved policy file (`Policy.save`) whose learned parameters and frozen buffers the
    #: preset starts with, e.g. an evolved NAMM shipped as package data; None: a fresh policy
    weights: str | None = None


@attrs.frozen
class PluginInfo:
    """A loaded plugin, for ``kvpolicy plugins``. ``conflicts`` lists the names (``kind:name``)
    it registered that another plugin registered too: those are unusable until one is removed."""

    name: str
    distribution: str | None
    version: str | None
    components: tuple[str, ...]
    module: str | None = None
    conflicts: tuple[str, ...] = ()


@attrs.frozen
class Conflict:
    """A component (``kind`` scorer, …) or ``policy preset`` name registered by several plugins."""

    kind: str
    name: str
    providers: tuple[str, ...]


def _dist_of(ep: Any) -> tuple[str | None, str | None]:
    """``(distribution name, version)`` an entry point comes from, or ``(None, None)``."""
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"], dist.version) if dist is not None else (None, None)


def _strict_from_env() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _validate_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidConfigError(f"{kind} name {name!r} is not valid: use letters, digits, '-', '_' or '.'")
    return name


class Registry:
    """Owns one `pluggy.PluginManager` and every component, preset and model adapter it provides.

    Parameters
    ----------
    entry_points:
        Load plugins from entry points in group ``kvpolicy`` (the built-ins included).
    strict:
        Raise instead of warning when a plugin is broken. Defaults to ``$KVPOLICY_STRICT_PLUGINS``.
    """

    def __init__(self, *, entry_points: bool = True, strict: bool | None = None) -> None:
        self.strict = _strict_from_env() if strict is None else strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self._modules: dict[str, str] = {}
        self._components: dict[ComponentKind, dict[str, ComponentSpec]] = {k: {} for k in COMPONENT_KINDS}
        self._presets: dict[str, PresetSpec] = {}
        self._conflicts: dict[tuple[str, str], list[str]] = {}
        if entry_points:
            self.load_entry_points()

    # ----------------------------------------------------------------- loading

    def load_entry_points(self) -> None:
        """Load every entry point of group ``kvpolicy`` one by one (broken ones warn and skip).

        Entry points are grouped by name; a name used by several (distribution, module) pairs
        loads each of them as ``<distribution>:<name>`` and warns, naming all of them."""
        groups: dict[str, list[Any]] = {}
        for ep in importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            groups.setdefault(ep.name, []).append(ep)
        loaded = {(self._dists.get(n, (None, None))[0], module) for n, module in self._modules.items()}
        for ep_name in sorted(groups):
            group = sorted(groups[ep_name], key=lambda e: (_dist_of(e)[0] or "", e.value))
            clash = len(group) > 1
            if clash:
                self._warn_name_clash(ep_name, group)
            for ep in group:
                dist_info = _dist_of(ep)
                if (dist_info[0], ep.value) in loaded:  # loaded already (load_entry_points called again)
                    continue
                name = f"{dist_info[0] or ep.value}:{ep_name}" if clash else ep_name
                if self.pm.is_blocked(ep_name) or self.pm.is_blocked(name):
                    continue
                if self.pm.has_plugin(name):  # taken by a plugin registered in code: keep both
                    name = f"{dist_info[0] or ep.value}:{ep_name}"
                try:
                    plugin = ep.load()
                except Exception as exc:  # noqa: BLE001 - any import error of a third party's code
                    self._broken(name, dist_info[0], f"cannot be imported: {type(exc).__name__}: {exc}", exc)
                    continue
                if self.register_plugin(plugin, name=name, _dist=dist_info, _conflicts="record"):
                    self._modules[name] = ep.value

    def _warn_name_clash(self, ep_name: str, group: list[Any]) -> None:
        def where(ep: Any) -> str:
            dist, version = _dist_of(ep)
            return f"{dist} {version} ({ep.value})" if dist else ep.value

        names = [f"{_dist_of(ep)[0] or ep.value}:{ep_name}" for ep in group]
        warnings.warn(
            f"kvpolicy entry point name {ep_name!r} is used by {len(group)} plugins: "
            f"{' and '.join(where(ep) for ep in group)}; all are loaded, as plugins {', '.join(map(repr, names))}",
            PluginClashWarning,
            stacklevel=3,
        )

    def register_plugin(
        self, plugin: object, name: str | None = None, *, _dist: tuple | None = None, _conflicts: str = "raise"
    ) -> str | None:
        """Register a plugin object (a module or an instance with hookimpls) from code.

        Returns the plugin's name, or None if it was skipped as broken (non-strict mode). A name
        another plugin registered already raises `DuplicateComponentError` (nothing of this
        plugin is kept); entry points (``_conflicts="record"``) instead record the conflict.
        """
        try:
            name = self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            self._broken(name or repr(plugin), (_dist or (None, None))[0], f"cannot be registered: {exc}", exc)
            return None
        assert name is not None
        try:
            self.pm.check_pending()  # a misspelt hook (kvpolicy_register_scorer) fails here
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            self._broken(name, (_dist or (None, None))[0], f"has an unknown hook: {exc}", exc)
            return None
        self._dists[name] = _dist or (None, None)
        record = _conflicts == "record" and not self.strict
        try:
            clashes = self._collect_from(name, plugin, self._components, self._presets, record=record)
        except DuplicateComponentError as exc:
            self.pm.unregister(plugin)
            dist = self._dists.pop(name, (None, None))[0]
            if record:  # recording, only a plugin that registers one name twice itself gets here
                self._broken(name, dist, f"cannot be registered: {exc}", exc)
                return None
            raise
        except Exception as exc:  # noqa: BLE001 - a third party's registration code failed
            self.pm.unregister(plugin)
            dist = self._dists.pop(name, (None, None))[0]
            self._broken(name, dist, f"failed while registering: {type(exc).__name__}: {exc}", exc)
            return None
        for kind, component in clashes:
            providers = " and ".join(self._provider(p) for p in self._conflicts[(kind, component)])
            warnings.warn(
                f"{kind} {component!r} is registered by {providers}; that name cannot be used until one of them "
                f"is uninstalled (everything else they provide works). Set {STRICT_ENV}=1 to make this an error.",
                PluginClashWarning,
                stacklevel=4,
            )
        return name

    def unregister_plugin(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._dists.pop(name, None)
        self._modules.pop(name, None)
        self._components = {k: {} for k in COMPONENT_KINDS}
        self._presets = {}
        self._conflicts = {}
        for other, obj in self.pm.list_name_plugin():
            self._collect_from(other, obj, self._components, self._presets, record=True)

    def _broken(self, name: str, dist: str | None, why: str, exc: BaseException) -> None:
        where = f" (from distribution {dist})" if dist else ""
        message = f"kvpolicy plugin {name!r}{where} {why}"
        if self.strict:
            raise PluginLoadError(message) from exc
        warnings.warn(
            message + f"; skipped it. Set {STRICT_ENV}=1 to make this an error.", PluginLoadWarning, stacklevel=3
        )

    # ----------------------------------------------------------------- collection

    def _collect_from(
        self,
        plugin_name: str,
        plugin: object,
        components: dict[ComponentKind, dict[str, ComponentSpec]],
        presets: dict[str, PresetSpec],
        *,
        record: bool = False,
    ) -> list[tuple[str, str]]:
        """Call one plugin's registration hooks and commit what it provides.

        A name another plugin registered raises `DuplicateComponentError` before anything is
        committed; with ``record`` the plugin's other names are committed and the clashing ones
        become conflicts (returned as ``(kind, name)``), unusable until one provider is removed.
        """
        staged: list[ComponentSpec] = []
        staged_presets: list[PresetSpec] = []
        for kind, hook_name in _REGISTER_HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=self._component_register(kind, plugin_name, staged))
        for impl in self.pm.hook.kvpolicy_register_presets.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(register=self._preset_register(plugin_name, staged_presets))
        clashes: list[tuple[str, str, str]] = [
            (spec.kind, spec.name, components[spec.kind][spec.name].plugin)
            for spec in staged
            if spec.name in components[spec.kind]
        ]
        clashes += [("policy preset", p.name, presets[p.name].plugin) for p in staged_presets if p.name in presets]
        if clashes and not record:
            kind, name, first = clashes[0]
            raise DuplicateComponentError(kind, name, self._provider(first), self._provider(plugin_name))
        clashing = {(kind, name) for kind, name, _ in clashes}
        for spec in staged:
            if (spec.kind, spec.name) not in clashing:
                components[spec.kind][spec.name] = spec
        for preset in staged_presets:
            if ("policy preset", preset.name) not in clashing:
                presets[preset.name] = preset
        for kind, name, first in clashes:
            self._conflicts.setdefault((kind, name), [first]).append(plugin_name)
        return [(kind, name) for kind, name, _ in clashes]

    def _component_register(
        self, kind: ComponentKind, plugin_name: str, staged: list[ComponentSpec]
    ) -> Callable[..., None]:
        def register(name: str, cls: type, *, description: str = "") -> None:
            _validate_name(kind, name)
            config_cls = getattr(cls, "Config", None)
            if config_cls is None or not attrs.has(config_cls):
                raise InvalidConfigError(f"{kind} {name!r} ({cls!r}) needs a `Config` attribute that is an attrs class")
            if getattr(cls, "name", None) != name:
                raise InvalidConfigError(
                    f"{kind} {name!r} is registered with class {cls.__name__} whose `name` is "
                    f"{getattr(cls, 'name', None)!r}; they must agree so saved policies rebuild by name"
                )
            for spec in staged:
                if spec.kind == kind and spec.name == name:
                    raise DuplicateComponentError(kind, name, self._provider(plugin_name), self._provider(plugin_name))
            staged.append(
                ComponentSpec(kind, name, cls, plugin_name, description or (cls.__doc__ or "").strip().split("\n")[0])
            )

        return register

    def _preset_register(self, plugin_name: str, staged: list[PresetSpec]) -> Callable[..., None]:
        def register(
            name: str, config: PolicyConfig, *, description: str = "", weights: str | os.PathLike[str] | None = None
        ) -> None:
            _validate_name("policy preset", name)
            if not isinstance(config, PolicyConfig):
                raise InvalidConfigError(f"policy preset {name!r} must be a PolicyConfig, got {type(config).__name__}")
            staged.append(PresetSpec(name, config, plugin_name, description, None if weights is None else str(weights)))

        return register

    def _provider(self, plugin_name: str) -> str:
        dist, version = self._dists.get(plugin_name, (None, None))
        return f"plugin {plugin_name!r}" + (f" (distribution {dist} {version})" if dist else "")

    # ----------------------------------------------------------------- queries

    def names(self, kind: ComponentKind) -> list[str]:
        return sorted(self._components[kind])

    def conflicts(self) -> list[Conflict]:
        """Names several plugins registered (each unusable until one of its providers is removed)."""
        return [Conflict(kind, name, tuple(providers)) for (kind, name), providers in sorted(self._conflicts.items())]

    def _refuse_conflict(self, kind: str, name: str) -> None:
        providers = self._conflicts.get((kind, name))
        if providers:
            first, *rest = (self._provider(p) for p in providers)
            raise DuplicateComponentError(kind, name, first, " and ".join(rest))

    def spec(self, kind: ComponentKind, name: str) -> ComponentSpec:
        if not isinstance(kind, str) or kind not in self._components:
            raise UnknownComponentError("component kind", str(kind), COMPONENT_KINDS)
        if not isinstance(name, str):
            raise InvalidConfigError(f"a {kind} is named by a string, got {name!r}")
        self._refuse_conflict(kind, name)
        try:
            return self._components[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self._components[kind]) from None

    def create(
        self, kind: ComponentKind, name: str, config: Mapping[str, Any] | Any | None = None, **kwargs: Any
    ) -> Any:
        """Build a component by name; ``config`` is a dict of fields or an instance of its Config."""
        spec = self.spec(kind, name)
        if config is None or isinstance(config, Mapping):
            config = config_from_dict(spec.config_cls, config)
        elif not isinstance(config, spec.config_cls):
            raise InvalidConfigError(f"{kind} {name!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}")
        component = spec.cls(config, **kwargs)
        protocol = PROTOCOLS[kind]
        if not isinstance(component, protocol):
            raise InvalidConfigError(
                f"{kind} {name!r} from {self._provider(spec.plugin)} does not implement {protocol.__name__}"
            )
        return component

    def preset_names(self) -> list[str]:
        return sorted(self._presets)

    def preset(self, name: str) -> PresetSpec:
        if not isinstance(name, str):
            raise InvalidConfigError(f"a policy preset is named by a string, got {name!r}")
        self._refuse_conflict("policy preset", name)
        try:
            return self._presets[name]
        except KeyError:
            raise UnknownComponentError("policy preset", name, self._presets) from None

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with its distribution, version and what it provides."""
        provided: dict[str, list[str]] = {}
        for kind, table in self._components.items():
            for spec in table.values():
                provided.setdefault(spec.plugin, []).append(f"{kind}:{spec.name}")
        for preset in self._presets.values():
            provided.setdefault(preset.plugin, []).append(f"policy:{preset.name}")
        for name in self.pm.hook.kvpolicy_model_adapter.get_hookimpls():
            plugin_name = self.pm.get_name(name.plugin)
            if plugin_name:
                provided.setdefault(plugin_name, []).append("model-adapter")
        clashing: dict[str, list[str]] = {}
        for (kind, component), providers in self._conflicts.items():
            label = f"{'policy' if kind == 'policy preset' else kind}:{component}"
            for plugin_name in providers:
                clashing.setdefault(plugin_name, []).append(label)
        infos = []
        for name, _ in self.pm.list_name_plugin():
            dist, version = self._dists.get(name, (None, None))
            infos.append(
                PluginInfo(
                    name,
                    dist,
                    version,
                    tuple(sorted(provided.get(name, []))),
                    self._modules.get(name),
                    tuple(sorted(clashing.get(name, []))),
                )
            )
        return sorted(infos, key=lambda p: p.name)

    def model_adapter(self, model: Any) -> ModelAdapter:
        """The adapter of the first plugin that supports ``model``."""
        adapter = self.pm.hook.kvpolicy_model_adapter(model=model)
        if adapter is None:
            adapters = [self.pm.get_name(i.plugin) for i in self.pm.hook.kvpolicy_model_adapter.get_hookimpls()]
            raise UnsupportedModelError(
                f"no loaded plugin can attach a policy to {type(model).__name__}; "
                f"model adapters loaded: {', '.join(filter(None, adapters)) or 'none'}"
            )
        return adapter


@functools.cache
def default_registry() -> Registry:
    """The registry `kvpolicy.build` and `Policy` use when none is given (built on first use)."""
    return Registry()


def reset_default_registry() -> None:
    """Forget the default registry, e.g. after installing a plugin in the same process."""
    default_registry.cache_clear()
