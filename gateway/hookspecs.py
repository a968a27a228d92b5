"""Every hook a plugin may implement. Each is documented in ``docs/plugins.md``.

Hooks are called with keyword arguments; an implementation accepts only the arguments it uses::

    from gateway import hookimpl

    @hookimpl
    def register_sinks(config):
        table = section(config, "sinks", "mysink", MySinkConfig)
        return [MySink(table)] if table else []

A spec may gain arguments later but never renames or drops one.
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
        (the ``{channel}`` of ``/webhooks/{channel}``).
    """


@hookspec
def register_sinks(config: GatewayConfig) -> list[Sink]:
    """Return the sinks this plugin provides, built from ``config``. Called once at start-up.

    A sink is on when its ``[sinks.NAME]`` table is present; ``gateway.config.section`` returns
    ``None`` otherwise, and then return ``[]``.

    Args:
        config: the whole validated configuration.

    Returns:
        Zero or more :class:`gateway.sink.Sink` instances, each with a unique ``name``.
    """


@hookspec
def register_routes(config: GatewayConfig) -> list[web.AbstractRouteDef]:
    """Return extra HTTP routes to serve on the main port (e.g. an admin page, a callback).

    Handlers receive the aiohttp request; ``request.app[gateway.app.CHANNELS]`` and the other
    ``AppKey`` constants give access to the running gateway. Paths under ``/webhooks/`` and
    ``/v1/`` are reserved for the core.

    Args:
        config: the whole validated configuration.

    Returns:
        A list of ``aiohttp.web.get(...)`` / ``web.post(...)`` route definitions.
    """


@hookspec
def register_commands() -> list[Command]:
    """Return extra ``gateway`` CLI subcommands (e.g. ``gateway firestore indexes``).

    Called whenever the ``gateway`` command starts, before its arguments are parsed, so keep it
    cheap: build the :class:`gateway.Command` objects and import heavy modules inside ``run``.
    A name that is already a core command or another plugin's stops the CLI, naming both.

    Returns:
        A list of :class:`gateway.Command` (``name``, ``help``, ``run``, optional ``arguments``).
    """


@hookspec
def gateway_started(app: web.Application, config: GatewayConfig) -> None:
    """Notification: start-up is complete (journal open, sinks started); the listeners open next.
    Return value ignored.

    Use it to start background work tied to the app's lifetime; stop it in a
    ``gateway_stopping`` implementation. Must not block: schedule tasks on the running loop.

    Args:
        app: the running aiohttp application.
        config: the whole validated configuration.
    """


@hookspec
def gateway_stopping(app: web.Application) -> None:
    """Notification: the gateway is shutting down (intake already stopped). Return value ignored.

    Args:
        app: the running aiohttp application.
    """


HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, value in list(globals().items())
    if callable(value) and hasattr(value, "gateway_spec")
)
