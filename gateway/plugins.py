"""The plugin manager: hookspecs, entry-point discovery and plugin-provided components.

Plugins are found through the entry-point groups ``gateway.channels`` and ``gateway.sinks``; the
built-in ones are registered through this project's own ``pyproject.toml`` the same way. One
manager per app (stored under an ``AppKey``), never a module global.

Every hook is called here one implementation at a time, so that whatever a plugin does wrong
(raises, returns junk, returns a component the core cannot use, is an ``async def``) becomes a
:class:`PluginError` naming that plugin, never a traceback from deep inside the core.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pluggy

from gateway import hookspecs
from gateway.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiohttp import web

    from gateway.channel import Channel
    from gateway.command import Command
    from gateway.config import GatewayConfig
    from gateway.sink import Sink

GROUPS = {"channels": "gateway.channels", "sinks": "gateway.sinks"}
# Sink names the core gives its own sinks: the outbound queue, and the dead letters of a channel
# whose normalise failed (``normalise:<channel>``). A plugin's sink of such a name would be
# replaced by the core's, or mixed with its dead letters.
RESERVED_SINKS = ("outbox",)
RESERVED_SINK_PREFIXES = ("normalise:",)
# Paths the core serves on the main port: a plugin route there could shadow or impersonate them
# (``/v1/*`` is behind the api_token, a plugin route would not be).
RESERVED_PATHS = ("/webhooks", "/v1", "/healthz", "/readyz", "/metrics")


@dataclass(frozen=True)
class Discovered:
    """One entry point: which group, its name, the module, and the distribution that ships it."""

    group: str
    name: str
    value: str
    dist: str
    version: str


@dataclass(frozen=True)
class Components:
    """What the plugins provide for one config: channels and sinks by name, and who provides
    each (``owners[("sink", NAME)]`` is the plugin's name, for error messages)."""

    channels: dict[str, Channel]
    sinks: dict[str, Sink]
    owners: dict[tuple[str, str], str]


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
        PluginError: a plugin failed to import, implements a hook that does not exist, or
            implements one as an ``async def`` or a hook wrapper.
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
    _check_plain_functions(pm)
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


def _check_plain_functions(pm: pluggy.PluginManager) -> None:
    """The gateway calls every implementation itself, synchronously: an ``async def`` would
    return a coroutine nobody awaits, a hook wrapper would never wrap anything."""
    for hook in hookspecs.HOOK_NAMES:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"{hook} is a hook wrapper, which the gateway does not "
                                  "support: implement it as a plain function",
                                  plugin=impl.plugin_name)
            if inspect.iscoroutinefunction(impl.function) or \
                    inspect.isasyncgenfunction(impl.function):
                raise PluginError(_NOT_ASYNC.format(hook=hook), plugin=impl.plugin_name)


_NOT_ASYNC = ("{hook} must be a plain function (def, not async def): the gateway calls it "
              "without awaiting; start async work with asyncio.get_running_loop().create_task()")


def _call(impl: Any, hook: str, kwargs: dict[str, Any]) -> Any:
    """Call one implementation with the arguments it declares. A config problem it reports
    passes through; anything else it raises, or a coroutine it returns, is a PluginError
    naming it."""
    try:
        result = impl.function(**{name: kwargs[name] for name in impl.argnames})
    except (ConfigError, PluginError):
        raise
    except Exception as exc:  # noqa: BLE001 - any plugin failure is reported by name
        raise PluginError(f"{hook} failed: {exc!r}", plugin=impl.plugin_name) from exc
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited, on purpose: no "never awaited" warning either
        raise PluginError(_NOT_ASYNC.format(hook=hook), plugin=impl.plugin_name)
    return result


def _impls(pm: pluggy.PluginManager, hook: str) -> list[Any]:
    """The hook's implementations in pluggy's call order (last registered first)."""
    return list(reversed(getattr(pm.hook, hook).get_hookimpls()))


# -- channels and sinks (register_channels, register_sinks) ------------------------------------

def components(pm: pluggy.PluginManager, config: GatewayConfig) -> Components:
    """The enabled channels and sinks, and the plugin providing each.

    Raises:
        ConfigError: a plugin table is invalid, or no plugin claims one.
        PluginError: a plugin's hook raised or returned something the core cannot use, two
            plugins provide one name, or a sink takes a name the core reserves.
    """
    owners: dict[tuple[str, str], str] = {}
    channels_ = _collect(pm, config, "channel", owners)
    _check_claimed(config, "channels", channels_)
    sinks_ = _collect(pm, config, "sink", owners)
    _check_claimed(config, "sinks", sinks_)
    return Components(channels_, sinks_, owners)


def check(pm: pluggy.PluginManager, config: GatewayConfig) -> list[ConfigError | PluginError]:
    """Every plugin problem: the tables and components (:func:`checked`), and the CLI commands
    (each plugin checked even when another one fails)."""
    errors = checked(pm, config)[0]
    try:
        commands(pm)
    except PluginError as exc:
        errors.append(exc)
    return errors


def checked(pm: pluggy.PluginManager, config: GatewayConfig
            ) -> tuple[list[ConfigError | PluginError], dict[str, Channel], dict[str, Sink]]:
    """Every problem ``gateway serve`` would meet building the application from ``config``
    (tables, components, duplicate names, routes), and the channels and sinks that could be
    built (for the checks that need them: the channels' secrets, the sinks' files)."""
    errors: list[ConfigError | PluginError] = []
    built: dict[str, dict[str, Any]] = {}
    owners: dict[tuple[str, str], str] = {}
    for what in ("channel", "sink"):
        kind = f"{what}s"
        before = len(errors)
        built[kind] = _collect(pm, config, what, owners,
                               lambda exc: errors.extend(getattr(exc, "errors", [exc])))
        # a table whose plugin reported a problem with it is claimed, if broken
        claimed = {key[1] for e in errors[before:]
                   if len(key := getattr(e, "key", "").split(".")) > 1 and key[0] == kind}
        try:
            _check_claimed(config, kind, {**built[kind], **dict.fromkeys(claimed)})
        except ConfigError as exc:
            errors.append(exc)
    from aiohttp import web

    add_routes(web.UrlDispatcher(), pm, config, errors.append)
    return errors, built["channels"], built["sinks"]


def _collect(pm: pluggy.PluginManager, config: GatewayConfig, what: str,
             owners: dict[tuple[str, str], str],
             failed: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Call each implementation on its own, so that a clash names both plugins. Without
    ``failed``, the first problem raises; with it, each is passed to it and the others go on."""
    found: dict[str, Any] = {}
    for impl in _impls(pm, f"register_{what}s"):
        try:
            _collect_one(impl, {"config": config}, found, owners, what)
        except (ConfigError, PluginError) as exc:
            if failed is None:
                raise
            failed(exc)
    # by name, whatever the plugins' install order: sinks start in this order, and serve and
    # check-config report a clash between two sinks' files alike
    return dict(sorted(found.items()))


def _collect_one(impl: Any, kwargs: dict[str, Any], found: dict[str, Any],
                 owners: dict[tuple[str, str], str], what: str) -> None:
    """Call one implementation; a plugin that raises (anything but a config problem), returns
    something else than a list of its kind, or a component the core cannot use is reported by
    name, like an import failure."""
    kind, hook = _component_class(what), f"register_{what}s"
    items = _call(impl, hook, kwargs) or []
    if not isinstance(items, list | tuple):
        raise PluginError(f"{hook} returned {type(items).__name__!r}, not a list of "
                          f"{kind.__name__} objects", plugin=impl.plugin_name)
    for item in items:
        if not isinstance(item, kind):
            raise PluginError(f"{hook} returned a {type(item).__name__!r}, not a "
                              f"{kind.__name__}", plugin=impl.plugin_name)
        problem = _component_problem(what, item)
        if problem:
            raise PluginError(f"{hook} returned {problem}", plugin=impl.plugin_name)
        if item.name in found:
            raise PluginError(f"plugins {owners[what, item.name]!r} and {impl.plugin_name!r} "
                              f"both provide a {what} named {item.name!r}")
        found[item.name] = item
        owners[what, item.name] = impl.plugin_name


def _component_problem(what: str, item: Any) -> str | None:
    """Why the core cannot use ``item`` (a Channel, Sink or Command), or None."""
    from gateway.config import SinkConfig

    label = type(item).__name__
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name:
        return f"a {label!r} without a name: set its `name` (a non-empty str)"
    if what == "channel" and "/" in name:
        return f"a channel named {name!r}: it must fit in /webhooks/{{channel}} (no '/')"
    if what == "channel" and not (hasattr(item, "app_secret") and hasattr(item, "verify_token")):
        return (f"channel {name!r} without app_secret: its __init__ must call "
                "super().__init__(app_secret=..., verify_token=...)")
    if what == "sink" and not isinstance(getattr(item, "config", None), SinkConfig):
        return (f"sink {name!r} without a SinkConfig `config`: its __init__ must call "
                "super().__init__(config) with its gateway.config.SinkConfig table")
    if what == "sink" and (name in RESERVED_SINKS or name.startswith(RESERVED_SINK_PREFIXES)):
        return (f"a sink named {name!r}: 'outbox' and names starting 'normalise:' are the "
                "core's (its outbound queue, the dead letters of a channel's normalise)")
    if what == "command" and not callable(getattr(item, "run", None)):
        return f"command {name!r} whose `run` is not callable"
    return None


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


# -- routes (register_routes) ------------------------------------------------------------------

def add_routes(router: web.UrlDispatcher, pm: pluggy.PluginManager, config: GatewayConfig,
               failed: Callable[[PluginError], None] | None = None) -> None:
    """Add every plugin's routes to ``router``, one plugin at a time.

    Raises:
        PluginError: naming the plugin whose ``register_routes`` raised, returned something else
            than route definitions, a path the core reserves, or a route aiohttp refuses (the
            first one; with ``failed``, each is passed to it instead).
    """
    from aiohttp import web

    for impl in _impls(pm, "register_routes"):
        try:
            routes = _call(impl, "register_routes", {"config": config}) or []
            if not isinstance(routes, list | tuple | web.RouteTableDef):
                raise PluginError(f"register_routes returned {type(routes).__name__!r}, not a "
                                  "list of aiohttp route definitions", plugin=impl.plugin_name)
            for route in routes:
                _check_route(route, impl.plugin_name)
            try:
                router.add_routes(routes)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise PluginError(f"register_routes returned a route aiohttp refuses: {exc}",
                                  plugin=impl.plugin_name) from exc
        except PluginError as exc:
            if failed is None:
                raise
            failed(exc)


def _check_route(route: Any, plugin: str) -> None:
    from aiohttp import web

    if not isinstance(route, web.AbstractRouteDef):
        raise PluginError(f"register_routes returned a {type(route).__name__!r}, not an aiohttp "
                          "route definition (web.get(...), web.post(...))", plugin=plugin)
    path = getattr(route, "path", None) or getattr(route, "prefix", None)
    if not isinstance(path, str):
        raise PluginError(f"register_routes returned a {type(route).__name__!r} without a path",
                          plugin=plugin)
    if reserved_path(path):
        raise PluginError(f"register_routes returned a route for {path!r}: paths under "
                          "/webhooks/ and /v1/, and /healthz, /readyz and /metrics, are the "
                          "core's", plugin=plugin)


def reserved_path(path: str) -> bool:
    """Whether a route for ``path`` (an aiohttp path, maybe with ``{variable}`` parts) could
    answer a request the core serves: ``/v1/x``, but also ``/{anything:.*}``."""
    path = unquote(path)
    literal = path.split("{", 1)[0]  # what a request must start with to reach the route
    for core in RESERVED_PATHS:
        if path == core or path.startswith(f"{core}/"):
            return True
        if "{" in path and core.startswith(literal):
            return True
    return False


# -- notifications (gateway_started, gateway_stopping) -----------------------------------------

def notify(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call every implementation of a notification hook, in pluggy's order.

    Raises:
        PluginError: naming the first plugin whose implementation raised or returned a coroutine;
            the ones after it are not called.
    """
    for impl in _impls(pm, hook):
        _call(impl, hook, kwargs)


def notify_each(pm: pluggy.PluginManager, hook: str, **kwargs: Any
                ) -> list[tuple[str, ConfigError | PluginError]]:
    """Call every implementation of a notification hook, also after one fails (for shutdown,
    which must go on whatever a plugin does); the failures, as (plugin name, error)."""
    failures: list[tuple[str, ConfigError | PluginError]] = []
    for impl in _impls(pm, hook):
        try:
            _call(impl, hook, kwargs)
        except (ConfigError, PluginError) as exc:
            failures.append((impl.plugin_name, exc))
    return failures


# -- CLI commands (register_commands) ----------------------------------------------------------

def commands(pm: pluggy.PluginManager, reserved: tuple[str, ...] | None = None
             ) -> dict[str, Command]:
    """The plugins' CLI subcommands by name (``reserved``: the core's command names, by default
    ``gateway.cli.CORE_COMMANDS``). Each ``run`` reports a failure in one line naming its
    plugin: exit status 1 (a ``ConfigError`` or ``PluginError`` is the CLI's: status 2).

    Raises:
        PluginError: a plugin's hook raised or returned junk, two plugins provide one name, or a
            plugin reuses a name in ``reserved``.
    """
    if reserved is None:
        from gateway import cli  # loaded already: the CLI is what asks

        reserved = cli.CORE_COMMANDS
    found: dict[str, Command] = {}
    owners: dict[tuple[str, str], str] = {}
    for impl in _impls(pm, "register_commands"):
        _collect_one(impl, {}, found, owners, "command")
    for name in found:
        if name in reserved:
            raise PluginError(f"plugin {owners['command', name]!r} provides a command {name!r}, "
                              "which is a core command")
    return {name: dataclasses.replace(command, run=_guarded(command, owners["command", name]))
            for name, command in found.items()}


def _guarded(command: Command, plugin: str) -> Callable[[Any], int | None]:
    run = command.run

    def guarded(args: Any) -> int | None:
        try:
            return run(args)
        except PluginError as exc:
            if exc.plugin:
                raise
            raise PluginError(str(exc), plugin=plugin) from exc
        except (ConfigError, BrokenPipeError):
            raise  # the CLI's own one-line reports
        except Exception as exc:  # noqa: BLE001 - one line naming the plugin, never a traceback
            from gateway.config import mask_url

            print(f"gateway: plugin {plugin!r}: command {command.name!r} failed: "
                  f"{mask_url(repr(exc))}", file=sys.stderr)
            return 1

    return guarded
