"""The plugin registry (tier 2): one pluggy `PluginManager` and the names its plugins provide.

Built-in components are not special: they live in the ``kvpolicy_plugins`` package and are found
through entry points in group ``kvpolicy``, exactly as a third party's. The registry's promise is
that a broken or clashing plugin never takes down what does not depend on it:

- entry points are loaded one by one; one that fails to import or register is skipped with a
  `PluginLoadWarning` naming it (a `PluginLoadError` with ``KVPOLICY_STRICT_PLUGINS=1``, as in CI);
- two distributions using one entry-point name are both loaded, as ``<distribution>:<name>``;
- a name two plugins register is unusable (a `DuplicateComponentError` naming both, when used)
  while everything else works; in strict mode, or for a plugin registered in code, it raises at once.
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
#: the registration hook of each component kind
REGISTER_HOOKS: dict[ComponentKind, str] = {kind: f"kvpolicy_register_{kind}s" for kind in COMPONENT_KINDS}
PRESET = "policy preset"  # the kind under which presets are registered (and named in errors)


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
    """One registered policy preset; ``weights``: a saved policy file (`Policy.save`) whose learned
    parameters and frozen buffers it starts with (e.g. an evolved NAMM shipped as package data)."""

    name: str
    config: PolicyConfig
    plugin: str
    description: str = ""
    weights: str | None = None
    kind: str = PRESET


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


@attrs.frozen
class _Origin:
    """Where a plugin comes from: its distribution and version, and the module of its entry point."""

    distribution: str | None = None
    version: str | None = None
    module: str | None = None


Spec = ComponentSpec | PresetSpec


def _key(spec: Spec) -> tuple[str, str]:
    return spec.kind, spec.name


def _label(spec: Spec) -> str:
    """``scorer:tova``, ``policy:h2o``: how ``kvpolicy plugins`` lists a name."""
    return f"{'policy' if spec.kind == PRESET else spec.kind}:{spec.name}"


def _origin_of(ep: Any, module: str | None = None) -> _Origin:
    dist = getattr(ep, "dist", None)
    return _Origin(dist.metadata["Name"], dist.version, module) if dist is not None else _Origin(module=module)


def _where(ep: Any) -> str:
    origin = _origin_of(ep)
    return f"{origin.distribution} {origin.version} ({ep.value})" if origin.distribution else ep.value


def _valid_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidConfigError(f"{kind} name {name!r} is not valid: use letters, digits, '-', '_' or '.'")


def _component_spec(kind: ComponentKind, name: str, cls: type, plugin: str, description: str) -> ComponentSpec:
    """A checked registration: the class has an attrs ``Config`` and is named ``name`` (saved policies rebuild by name)."""
    _valid_name(kind, name)
    if not attrs.has(getattr(cls, "Config", None) or object):
        raise InvalidConfigError(f"{kind} {name!r} ({cls!r}) needs a `Config` attribute that is an attrs class")
    if getattr(cls, "name", None) != name:
        raise InvalidConfigError(
            f"{kind} {name!r} is registered with class {cls.__name__} whose `name` is "
            f"{getattr(cls, 'name', None)!r}; they must agree so saved policies rebuild by name"
        )
    return ComponentSpec(kind, name, cls, plugin, description or (cls.__doc__ or "").strip().split("\n")[0])


def _preset_spec(name: str, config: Any, plugin: str, description: str, weights: Any) -> PresetSpec:
    _valid_name(PRESET, name)
    if not isinstance(config, PolicyConfig):
        raise InvalidConfigError(f"policy preset {name!r} must be a PolicyConfig, got {type(config).__name__}")
    return PresetSpec(name, config, plugin, description, None if weights is None else os.fspath(weights))


class Registry:
    """Owns one `pluggy.PluginManager` and every component, preset and model adapter it provides.

    Parameters
    ----------
    entry_points:
        Load plugins from entry points in group ``kvpolicy`` (the built-ins included).
    strict:
        Raise instead of warning when a plugin is broken or clashes. Defaults to ``$KVPOLICY_STRICT_PLUGINS``.
    """

    def __init__(self, *, entry_points: bool = True, strict: bool | None = None) -> None:
        if strict is None:
            strict = os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[str, _Origin] = {}  # plugin name → where it comes from
        self._provided: dict[str, list[Spec]] = {}  # plugin name → what it registered, in order
        self._providers: dict[tuple[str, str], list[Spec]] = {}  # (kind, name) → its specs, first first
        if entry_points:
            self.load_entry_points()

    # ----------------------------------------------------------------- loading

    def load_entry_points(self) -> None:
        """Load every entry point of group ``kvpolicy`` one by one (broken ones warn and skip).

        An entry-point name used by several distributions loads each as ``<distribution>:<name>``
        and warns, naming all of them."""
        by_name: dict[str, list[Any]] = {}
        for ep in importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            by_name.setdefault(ep.name, []).append(ep)
        for ep_name, group in sorted(by_name.items()):
            group.sort(key=lambda ep: (_origin_of(ep).distribution or "", ep.value))
            if len(group) > 1:
                names = ", ".join(repr(self._qualified(ep)) for ep in group)
                warnings.warn(
                    f"kvpolicy entry point name {ep_name!r} is used by {len(group)} plugins: "
                    f"{' and '.join(map(_where, group))}; all are loaded, as plugins {names}",
                    PluginClashWarning,
                    stacklevel=2,
                )
            for ep in group:
                self._load(ep, self._qualified(ep) if len(group) > 1 else ep.name)

    @staticmethod
    def _qualified(ep: Any) -> str:
        return f"{_origin_of(ep).distribution or ep.value}:{ep.name}"

    def _load(self, ep: Any, name: str) -> None:
        origin = _origin_of(ep, ep.value)
        if origin in self._origins.values() or self.pm.is_blocked(ep.name) or self.pm.is_blocked(name):
            return  # loaded already (load_entry_points called again), or blocked
        if self.pm.has_plugin(name):  # taken by a plugin registered in code: keep both
            name = self._qualified(ep)
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import error of a third party's code
            self._broken(name, origin, f"cannot be imported: {type(exc).__name__}: {exc}", exc)
            return
        self._add(plugin, name, origin, from_entry_point=True)

    def register_plugin(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin object (a module or an instance with hookimpls) from code.

        Returns the plugin's name, or None if it was skipped as broken (non-strict mode). A name
        another plugin registered already raises `DuplicateComponentError` naming both, and
        nothing of this plugin is kept."""
        return self._add(plugin, name, _Origin(), from_entry_point=False)

    def _add(self, plugin: object, name: str | None, origin: _Origin, *, from_entry_point: bool) -> str | None:
        try:
            name = self.pm.register(plugin, name=name)
            assert name is not None
        except (ValueError, pluggy.PluginValidationError) as exc:
            return self._broken(name or repr(plugin), origin, f"cannot be registered: {exc}", exc)
        try:
            self.pm.check_pending()  # a misspelt hook (kvpolicy_register_scorer) fails here
            specs = self._collect(name, plugin)
        except Exception as exc:  # noqa: BLE001 - a third party's registration code failed
            self.pm.unregister(plugin)
            why = "has an unknown hook" if isinstance(exc, pluggy.PluginValidationError) else "failed while registering"
            return self._broken(name, origin, f"{why}: {type(exc).__name__}: {exc}", exc)
        self._origins[name] = origin
        clashes = [spec for spec in specs if _key(spec) in self._providers]
        if clashes and (self.strict or not from_entry_point):
            self.pm.unregister(plugin)
            del self._origins[name]
            first = self._providers[_key(clashes[0])][0].plugin
            raise DuplicateComponentError(clashes[0].kind, clashes[0].name, self._provider(first), self._provider(name))
        self._provided[name] = specs
        self._reindex()
        for spec in clashes:
            providers = " and ".join(self._provider(s.plugin) for s in self._providers[_key(spec)])
            warnings.warn(
                f"{spec.kind} {spec.name!r} is registered by {providers}; that name cannot be used until one of them "
                f"is uninstalled (everything else they provide works). Set {STRICT_ENV}=1 to make this an error.",
                PluginClashWarning,
                stacklevel=3,
            )
        return name

    def _collect(self, plugin_name: str, plugin: object) -> list[Spec]:
        """Call one plugin's registration hooks; what it registers, checked (a name it registers
        twice itself is a `DuplicateComponentError`)."""
        specs: list[Spec] = []

        def add(spec: Spec) -> None:
            if any(_key(s) == _key(spec) for s in specs):
                provider = self._provider(plugin_name)
                raise DuplicateComponentError(spec.kind, spec.name, provider, provider)
            specs.append(spec)

        def component(kind: ComponentKind) -> Callable[..., None]:
            def register(name: str, cls: type, *, description: str = "") -> None:
                add(_component_spec(kind, name, cls, plugin_name, description))

            return register

        def preset(name: str, config: PolicyConfig, *, description: str = "", weights: Any = None) -> None:
            add(_preset_spec(name, config, plugin_name, description, weights))

        calls = [(hook, component(kind)) for kind, hook in REGISTER_HOOKS.items()]
        for hook, register in [*calls, ("kvpolicy_register_presets", preset)]:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=register)
        return specs

    def unregister_plugin(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._origins.pop(name, None)
        self._provided.pop(name, None)
        self._reindex()

    def _reindex(self) -> None:
        """Every registered name with the specs of the plugins that provide it, in registration order."""
        self._providers = {}
        for specs in self._provided.values():
            for spec in specs:
                self._providers.setdefault(_key(spec), []).append(spec)

    def _broken(self, name: str, origin: _Origin, why: str, exc: BaseException) -> None:
        where = f" (from distribution {origin.distribution})" if origin.distribution else ""
        message = f"kvpolicy plugin {name!r}{where} {why}"
        if self.strict:
            raise PluginLoadError(message) from exc
        warnings.warn(
            message + f"; skipped it. Set {STRICT_ENV}=1 to make this an error.", PluginLoadWarning, stacklevel=4
        )

    def _provider(self, plugin_name: str) -> str:
        origin = self._origins.get(plugin_name, _Origin())
        where = f" (distribution {origin.distribution} {origin.version})" if origin.distribution else ""
        return f"plugin {plugin_name!r}{where}"

    # ----------------------------------------------------------------- queries

    def _lookup(self, kind: str, name: str, known: Any) -> Any:
        """The one spec of ``(kind, name)``: an `UnknownComponentError` if none, a
        `DuplicateComponentError` naming every provider if several plugins registered it."""
        providers = self._providers.get((kind, name))
        if not providers:
            raise UnknownComponentError(kind, name, known)
        if len(providers) > 1:
            first, *rest = (self._provider(spec.plugin) for spec in providers)
            raise DuplicateComponentError(kind, name, first, " and ".join(rest))
        return providers[0]

    def names(self, kind: ComponentKind | str) -> list[str]:
        return sorted(name for k, name in self._providers if k == kind)

    def conflicts(self) -> list[Conflict]:
        """Names several plugins registered (each unusable until one of its providers is removed)."""
        return [
            Conflict(kind, name, tuple(spec.plugin for spec in specs))
            for (kind, name), specs in sorted(self._providers.items())
            if len(specs) > 1
        ]

    def spec(self, kind: ComponentKind, name: str) -> ComponentSpec:
        if not isinstance(kind, str) or kind not in COMPONENT_KINDS:
            raise UnknownComponentError("component kind", str(kind), COMPONENT_KINDS)
        if not isinstance(name, str):
            raise InvalidConfigError(f"a {kind} is named by a string, got {name!r}")
        return self._lookup(kind, name, self.names(kind))

    def create(self, kind: ComponentKind, name: str, config: Any = None, **kwargs: Any) -> Any:
        """Build a component by name; ``config`` is None, a mapping of fields or an instance of its Config."""
        spec = self.spec(kind, name)
        if config is None or isinstance(config, Mapping):
            config = config_from_dict(spec.config_cls, config)
        elif not isinstance(config, spec.config_cls):
            raise InvalidConfigError(f"{kind} {name!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}")
        component = spec.cls(config, **kwargs)
        if not isinstance(component, PROTOCOLS[kind]):
            raise InvalidConfigError(
                f"{kind} {name!r} from {self._provider(spec.plugin)} does not implement {PROTOCOLS[kind].__name__}"
            )
        return component

    def preset_names(self) -> list[str]:
        return self.names(PRESET)

    def preset(self, name: str) -> PresetSpec:
        if not isinstance(name, str):
            raise InvalidConfigError(f"a policy preset is named by a string, got {name!r}")
        return self._lookup(PRESET, name, self.preset_names())

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with its distribution, version, what it provides and its conflicts
        (a conflicting name is listed among the components of the plugin that registered it first)."""
        adapters = {self.pm.get_name(impl.plugin) for impl in self.pm.hook.kvpolicy_model_adapter.get_hookimpls()}
        infos = []
        for name, _ in self.pm.list_name_plugin():
            specs = self._provided.get(name, [])
            first = [_label(s) for s in specs if self._providers[_key(s)][0] is s]
            conflicts = tuple(sorted(_label(s) for s in specs if len(self._providers[_key(s)]) > 1))
            origin = self._origins.get(name, _Origin())
            components = tuple(sorted(first + (["model-adapter"] if name in adapters else [])))
            infos.append(PluginInfo(name, origin.distribution, origin.version, components, origin.module, conflicts))
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
