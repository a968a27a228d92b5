"""Every hook a plugin may implement. Each is documented in ``docs/plugins.md``.

Hooks are called with keyword arguments; an implementation accepts only the arguments it uses::

    from gateway import hookimpl

    @hookimpl
    def register_sinks(config):
        table = section(config, "sinks", "mysink", MySinkConfig)
        return [MySink(table)] if table else []

A spec may gain arguments later but never renames or drops one.

Every implementation is a plain function (``def``, never ``async def`` or a hook wrapper): the
gateway calls each one itself, without awaiting, so that a failure names the plugin; an
``async def`` implementation stops the start (``PluginError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.channel import Channel
    from gateway.command import Command
    from gateway.config import GatewayConfig
    from gateway.sink import Sink

hookspec = pluggy.HookspecMarker("gateway")


@hookspec
def register_channels(config: GatewayConfig) -> list[Channel]:
    """Return the channels this plugin provides, built from ``config``. Called once at start-up.

    Read your table with ``gateway.config.section(config, "channels", NAME, YourConfig)``: it is
    ``None`` when the operator has not enabled the channel, and then return ``[]``. A channel whose
    ``app_secret`` is empty stops the gateway from starting unless the operator set
    ``server.insecure_skip_signature``.

    Args:
        config: the whole validated configuration.

    Returns:
        Zero or more :class:`gateway.channel.Channel` instances, each with a unique ``name``
        (the ``{channel}`` of ``/webhooks/{channel}``), whose ``__init__`` called
        ``super().__init__(app_secret=..., verify_token=...)``. Anything else, a name another
        plugin provides, or an exception stops the start (``PluginError`` naming the plugin).
    """


@hookspec
def register_sinks(config: GatewayConfig) -> list[Sink]:
    """Return the sinks this plugin provides, built from ``config``. Called once at start-up.

    A sink is on when its ``[sinks.NAME]`` table is present; ``gateway.config.section`` returns
    ``None`` otherwise, and then return ``[]``.

    Args:
        config: the whole validated configuration.

    Returns:
        Zero or more :class:`gateway.sink.Sink` instances, each with a unique ``name`` (not
        ``outbox``, nor starting ``normalise:``: the core's) and the ``SinkConfig`` it was built
        from as ``config`` (``super().__init__(config)``). Anything else, a name another plugin
        provides, or an exception stops the start (``PluginError`` naming the plugin).
    """


@hookspec
def register_routes(config: GatewayConfig) -> list[web.AbstractRouteDef]:
    """Return extra HTTP routes to serve on the main port (e.g. an admin page, a callback).

    Handlers receive the aiohttp request; ``request.app[gateway.app.CHANNELS]`` and the other
    ``AppKey`` constants give access to the running gateway. Paths under ``/webhooks/`` and
    ``/v1/``, and ``/healthz``, ``/readyz`` and ``/metrics``, are reserved for the core: a route
    that could answer one of them (``/v1/x``, but also ``/{any:.*}``) stops the start.

    Args:
        config: the whole validated configuration.

    Returns:
        A list of ``aiohttp.web.get(...)`` / ``web.post(...)`` route definitions (or a
        ``web.RouteTableDef``). Anything else, a reserved path, or an exception stops the start
        (``PluginError`` naming the plugin).
    """


@hookspec
def register_commands() -> list[Command]:
    """Return extra ``gateway`` CLI subcommands (e.g. ``gateway firestore indexes``).

    Called whenever the ``gateway`` command starts, before its arguments are parsed, so keep it
    cheap: build the :class:`gateway.Command` objects and import heavy modules inside ``run``.
    A name that is already a core command or another plugin's makes the plugins' commands
    unavailable, naming both (``gateway plugins`` reports it, as it reports this hook raising).
    A ``run`` that raises prints one line naming the plugin and exits 1 (2 for a
    ``ConfigError`` or ``PluginError``).

    Returns:
        A list of :class:`gateway.Command` (``name``, ``help``, ``run``, optional ``arguments``).
    """


@hookspec
def gateway_started(app: web.Application, config: GatewayConfig) -> None:
    """Notification: start-up is complete (journal open, sinks started); the listeners open next.
    Return value ignored.

    Use it to start background work tied to the app's lifetime; stop it in a
    ``gateway_stopping`` implementation. Must be a plain function (``def``, not ``async def``:
    it is not awaited, and an ``async def`` is refused) and must not block: schedule tasks on
    the running loop. Raising stops the start (``PluginError`` naming the plugin), and what had
    started is closed again.

    Args:
        app: the running aiohttp application.
        config: the whole validated configuration.
    """


@hookspec
def gateway_stopping(app: web.Application) -> None:
    """Notification: the gateway is shutting down (intake already stopped). Return value ignored.

    Must be a plain function (``def``, not ``async def``: it is not awaited, and an ``async def``
    is refused at start-up). Afterwards the gateway drains the journal and closes the sinks,
    channels and journal; an implementation that raises is logged, naming the plugin, and the
    shutdown carries on.

    Args:
        app: the running aiohttp application.
    """


HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, value in list(globals().items())
    if callable(value) and hasattr(value, "gateway_spec")
)
