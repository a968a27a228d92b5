"""The plugin manager: hookspecs, entry-point discovery and plugin-provided components.

Plugins are found through the entry-point groups ``gateway.channels`` and ``gateway.sinks``; the
built-in ones are registered through this project's own ``pyproject.toml`` the same way. One
manager per app (stored under an ``AppKey``), never a module global.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from gateway import hookspecs
from gateway.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from gateway.channel import Channel
    from gateway.command import Command
    from gateway.config import GatewayConfig
    from gateway.sink import Sink

GROUPS = {"channels": "gateway.channels", "sinks": "gateway.sinks"}


@dataclass(frozen=True)
class Discovered:
    """One entry point: which group, its name, the module, and the distribution that ships it."""

    group: str
    name: str
    value: str
    dist: str
    version: str


def discover() -> list[Discovered]:
    """Every entry point in the gateway's groups, sorted by group then name."""
    found = []
    for kind, group in GROUPS.items():
        for ep in metadata.entry_points(group=group):
            dist = ep.dist.metadata["Name"] if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            found.append(Discovered(kind, ep.name, ep.value, dist, version))
    return sorted(found, key=lambda d: (d.group, d.name))


def manager(load_entrypoints: bool = True, extra: list[Any] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with every installed plugin (and ``extra`` objects) registered.

    Raises:
        PluginError: a plugin failed to import, or implements a hook that does not exist.
    """
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        for kind, group in GROUPS.items():
            for ep in metadata.entry_points(group=group):
                _register(pm, ep, kind)
    for plugin in extra or []:
        name = getattr(plugin, "__name__", type(plugin).__name__)
        try:
            pm.register(plugin)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(str(exc), plugin=name) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc),
                          plugin=str(getattr(exc.plugin, "__name__", exc.plugin))) from None
    return pm


def _register(pm: pluggy.PluginManager, ep: metadata.EntryPoint, kind: str) -> None:
    try:
        module = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure is reported by name
        raise PluginError(f"cannot import {ep.value}: {exc!r}", plugin=f"{kind}.{ep.name}") from exc
    if pm.is_registered(module):
        return
    try:
        pm.register(module, name=f"{kind}.{ep.name}")
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(str(exc), plugin=f"{kind}.{ep.name}") from exc


def channels(pm: pluggy.PluginManager, config: GatewayConfig) -> dict[str, Channel]:
    """The enabled channels by name. Raises ConfigError for a table no plugin claims."""
    found = _collect(pm, pm.hook.register_channels, config, "channel")
    _check_claimed(config, "channels", found)
    return found


def sinks(pm: pluggy.PluginManager, config: GatewayConfig) -> dict[str, Sink]:
    """The enabled sinks by name. Raises ConfigError for a table no plugin claims."""
    found = _collect(pm, pm.hook.register_sinks, config, "sink")
    _check_claimed(config, "sinks", found)
    return found


def commands(pm: pluggy.PluginManager, reserved: tuple[str, ...]) -> dict[str, Command]:
    """The plugins' CLI subcommands by name.

    Raises:
        PluginError: two plugins provide one name, or a plugin reuses a name in ``reserved``.
    """
    found: dict[str, Command] = {}
    owners: dict[str, str] = {}
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):
        _collect_one(impl, None, found, owners, "command")
    for name in found:
        if name in reserved:
            raise PluginError(f"plugin {owners[name]!r} provides a command {name!r}, which is a "
                              "core command")
    return found


def check(pm: pluggy.PluginManager, config: GatewayConfig) -> list[ConfigError | PluginError]:
    """Every plugin table's problems (each plugin checked even when another one fails)."""
    return checked(pm, config)[0]


def checked(pm: pluggy.PluginManager, config: GatewayConfig
            ) -> tuple[list[ConfigError | PluginError], dict[str, Channel], dict[str, Sink]]:
    """:func:`check`, and the channels and sinks that could be built (for the checks that need
    them: the channels' secrets, the sinks' files)."""
    errors: list[ConfigError | PluginError] = []
    built: dict[str, dict[str, Any]] = {}
    for hook, kind in ((pm.hook.register_channels, "channels"), (pm.hook.register_sinks, "sinks")):
        found: dict[str, Any] = built.setdefault(kind, {})
        for impl in hook.get_hookimpls():
            try:
                found.update(_collect_one(impl, config, {}, {}, kind[:-1]))
            except ConfigError as exc:
                errors.extend(getattr(exc, "errors", [exc]))
                for error in getattr(exc, "errors", [exc]):
                    parts = error.key.split(".")
                    if len(parts) > 1 and parts[0] == kind:
                        found[parts[1]] = None  # claimed by a plugin, but its table is broken
            except PluginError as exc:
                errors.append(exc)
        try:
            _check_claimed(config, kind, found)
        except ConfigError as exc:
            errors.append(exc)
    usable = {kind: {k: v for k, v in found.items() if v is not None}
              for kind, found in built.items()}
    return errors, usable["channels"], usable["sinks"]


def _collect(pm: pluggy.PluginManager, hook: Any, config: GatewayConfig,
             what: str) -> dict[str, Any]:
    """Call each implementation on its own, so that a clash names both plugins."""
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in reversed(hook.get_hookimpls()):  # pluggy's call order: last registered first
        _collect_one(impl, config, found, owners, what)
    return found


def _collect_one(impl: Any, config: GatewayConfig | None, found: dict[str, Any],
                 owners: dict[str, str], what: str) -> dict[str, Any]:
    """Call one implementation; a plugin that raises (anything but a config problem) or returns
    something else than a list of its kind is reported by name, like an import failure."""
    kind, hook = _component_class(what), f"register_{what}s"
    try:
        items = impl.function(**{a: config for a in impl.argnames}) or []
    except (ConfigError, PluginError):
        raise
    except Exception as exc:  # noqa: BLE001 - any plugin failure is reported by name
        raise PluginError(f"{hook} failed: {exc!r}", plugin=impl.plugin_name) from exc
    if not isinstance(items, list | tuple):
        raise PluginError(f"{hook} returned {type(items).__name__!r}, not a list of "
                          f"{kind.__name__} objects", plugin=impl.plugin_name)
    for item in items:
        if not isinstance(item, kind):
            raise PluginError(f"{hook} returned a {type(item).__name__!r}, not a "
                              f"{kind.__name__}", plugin=impl.plugin_name)
        if item.name in found:
            raise PluginError(f"plugins {owners[item.name]!r} and {impl.plugin_name!r} both "
                              f"provide a {what} named {item.name!r}")
        found[item.name] = item
        owners[item.name] = impl.plugin_name
    return found


def _component_class(what: str) -> type:
    from gateway.channel import Channel
    from gateway.command import Command
    from gateway.sink import Sink

    return {"channel": Channel, "sink": Sink, "command": Command}[what]


def _check_claimed(config: GatewayConfig, kind: str, found: dict[str, Any]) -> None:
    for name in getattr(config, kind):
        if config.enabled(kind, name) and name not in found:
            raise ConfigError(
                f"no installed plugin provides {kind[:-1]} {name!r} (see `gateway plugins`)",
                f"{kind}.{name}",
            )
