"""The ``gateway`` command: serve, demo, plugins, check-config, dead-letters, and the commands
plugins add through the ``register_commands`` hook (e.g. ``gateway firestore indexes``)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import re
import socket
import sqlite3
import sys
from collections.abc import Sequence

from gateway import config as gwconfig
from gateway.command import Command
from gateway.errors import ConfigError, PluginError

EXIT_CONFIG = 2
CORE_COMMANDS = ("serve", "demo", "plugins", "check-config", "dead-letters")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands, broken = _plugin_commands()
    if broken is not None and argv and not argv[0].startswith("-") and argv[0] not in CORE_COMMANDS:
        # a plugin command was asked for, but the plugins could not be loaded: say why
        print(f"gateway: {broken}", file=sys.stderr)
        return EXIT_CONFIG
    parser = _parser(commands)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return args.run(args) or 0
    except (ConfigError, PluginError) as exc:
        for error in getattr(exc, "errors", [exc]):
            print(f"gateway: {gwconfig.mask_url(str(error))}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gateway ... | head`: the reader is gone; nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        failure = _failure(exc, args)
        if failure is None:
            raise
        print(f"gateway: {gwconfig.mask_url(failure[0])}", file=sys.stderr)
        return failure[1]


# a port taken, a directory that cannot be created, a file that cannot be opened: fix the config
CONFIG_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM,
                           errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.EEXIST})


def _failure(exc: Exception, args: argparse.Namespace) -> tuple[str, int] | None:
    """One line and an exit status for a start-up or runtime failure that is not a bug in the
    gateway: the operator sees what to fix, not a traceback (and never a password)."""
    if _is_redis_error(exc):
        config = _config_or_none(args)
        where = f" at {config.queue.redis_url}" if config else ""
        return (f"cannot use Redis{where}: {exc} (queue.redis_url, env GATEWAY_REDIS_URL)",
                EXIT_CONFIG)
    if isinstance(exc, sqlite3.Error):  # a database that cannot be opened, or is not one
        key = _database_key(_config_or_none(args))
        return (f"cannot use a SQLite database: {exc}{key or ''}",
                EXIT_CONFIG if key else 1)
    if isinstance(exc, socket.gaierror):
        config = _config_or_none(args)
        host = f" {config.server.host!r}" if config else ""
        return f"cannot resolve the host{host}: {exc.strerror} (server.host)", EXIT_CONFIG
    if not isinstance(exc, OSError):
        return None
    status = EXIT_CONFIG if exc.errno in CONFIG_ERRNOS else 1
    address = re.search(r"address \('?([^',]*)'?, (\d+)", str(exc))
    if address:
        reason = (exc.strerror or str(exc)).rpartition(": ")[2]
        return (f"cannot listen on {address[1]}:{address[2]}: {reason} (server.host, "
                "server.port, server.metrics_port)", status)
    if exc.filename:
        key = _path_key(str(exc.filename), _config_or_none(args))
        return f"cannot create or open {exc.filename}: {exc.strerror}{key}", status
    return f"{type(exc).__name__}: {exc}", status


def _database_key(config: gwconfig.GatewayConfig | None) -> str | None:
    """`` (server.data_dir: PATH)``: the first configured database file that cannot be opened
    for writing (a directory in its place, a directory that is not writable), when one can be
    named."""
    if config is None:
        return None
    data_dir = config.server.data_dir
    files = {os.path.join(data_dir, name): "server.data_dir"
             for name in ("journal.db", "outbox.db", "storage.db", "analytics.db")}
    files |= {path: key for key, path in _sink_paths(config).items()}
    for path, key in files.items():
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)):
            return f" ({key}: {path} cannot be opened as a database file)"
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            return f" ({key}: {folder} is not writable)"
    return None


def _is_redis_error(exc: Exception) -> bool:
    redis = sys.modules.get("redis.exceptions")
    return redis is not None and isinstance(exc, redis.RedisError)


def _config_or_none(args: argparse.Namespace) -> gwconfig.GatewayConfig | None:
    try:
        return gwconfig.load(getattr(args, "config", None))
    except ConfigError:
        return None


def _path_key(path: str, config: gwconfig.GatewayConfig | None) -> str:
    """`` (server.data_dir)``: the config key that leads to ``path``, when one does."""
    if config is None:
        return ""
    keys = {"server.data_dir": config.server.data_dir, **_sink_paths(config)}
    path = os.path.abspath(path)
    for key, value in keys.items():
        value = os.path.abspath(value)
        if path == value or value.startswith(path + os.sep) or path.startswith(value + os.sep):
            return f" ({key})"
    return ""


def _sink_paths(config: gwconfig.GatewayConfig) -> dict[str, str]:
    """``{"sinks.NAME.path": path}`` of every sink table that sets one."""
    return {f"sinks.{name}.path": table["path"] for name, table in config.sinks.items()
            if isinstance(table.get("path"), str)}


def _plugin_commands() -> tuple[list[Command], PluginError | None]:
    """The installed plugins' commands; a broken plugin leaves the core commands usable."""
    from gateway import plugins

    try:
        return list(plugins.commands(plugins.manager(), CORE_COMMANDS).values()), None
    except PluginError as exc:
        return [], exc


def _positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (``--duration``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def _positive_int(text: str) -> int:
    """A whole number above 0 (``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number above 0")
    return value


def _parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Meta messaging gateway")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cfg = argparse.ArgumentParser(add_help=False)
    cfg.add_argument("--config", metavar="PATH", help="TOML file (default: embedded defaults)")

    p = sub.add_parser("serve", parents=[cfg], help="run the gateway")
    p.set_defaults(run=_serve)
    p = sub.add_parser("demo", parents=[cfg],
                       help="run the pipeline locally with simulated customers")
    p.add_argument("--duration", type=_positive_seconds, default=30.0,
                   help="seconds of traffic (default 30)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("plugins", parents=[cfg], help="list discovered channels and sinks")
    p.set_defaults(run=_plugins)
    p = sub.add_parser("check-config", parents=[cfg], help="validate the configuration")
    p.set_defaults(run=_check_config)

    dl = sub.add_parser("dead-letters", help="inspect and replay dead letters")
    dsub = dl.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = dsub.add_parser("list", parents=[cfg], help="list dead letters")
    p.add_argument("--sink", help="only this sink")
    p.add_argument("--limit", type=_positive_int, default=100,
                   help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=_dead_list)
    p = dsub.add_parser("replay", parents=[cfg], help="queue dead letters for redelivery")
    p.add_argument("--sink", help="only this sink")
    p.add_argument("ids", nargs="*", type=int, help="dead-letter ids (default: all)")
    p.set_defaults(run=_dead_replay)

    for command in sorted(commands, key=lambda c: c.name):
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.arguments is not None:
            command.arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _load(args: argparse.Namespace) -> gwconfig.GatewayConfig:
    return gwconfig.load(args.config)


def _serve(args: argparse.Namespace) -> int:
    from gateway import logging as gwlog
    from gateway import server

    config = _load(args)
    gwlog.setup(config.logging)
    server.run(config)  # builds the app before binding ports: plugin or secret problems exit 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.config, args.duration)


def _plugins(args: argparse.Namespace) -> int:
    from gateway import plugins

    found = plugins.discover()
    try:
        pm = plugins.manager()
        # each plugin's register_* hooks run too: one that raises or returns junk is named here
        core, config = gwconfig.check_all(args.config)
        broken = [e for e in plugins.check(pm, config or gwconfig.GatewayConfig())
                  if isinstance(e, PluginError)]
        if args.config and config is None:  # the plugins were checked on defaults: say why
            broken = [*core, *broken]
        status = "; ".join(f"error: {e}" for e in broken) or "ok"
    except PluginError as exc:
        status = f"error: {exc}"
    print(f"{'KIND':<9} {'NAME':<14} {'MODULE':<28} PACKAGE")
    for item in found:
        print(f"{item.group[:-1]:<9} {item.name:<14} {item.value:<28} {item.dist} {item.version}")
    print(f"\n{len(found)} plugins; loading: {gwconfig.mask_url(status)}")
    return 0 if status == "ok" else EXIT_CONFIG


def _check_config(args: argparse.Namespace) -> int:
    import json

    from gateway import plugins
    from gateway.app import require_distinct_files, require_secrets

    core, config = gwconfig.check_all(args.config)
    errors: list[ConfigError | PluginError] = list(core)
    if config is not None:
        try:
            found, channels, sinks = plugins.checked(plugins.manager(), config)
        except (ConfigError, PluginError) as exc:  # the plugins could not even be loaded
            found, channels, sinks = list(getattr(exc, "errors", [exc])), {}, {}
        errors += found
        for check in (lambda: require_secrets(config, channels),  # what could be built
                      lambda: require_distinct_files(config, sinks)):
            try:
                check()
            except (ConfigError, PluginError) as exc:
                errors.extend(getattr(exc, "errors", [exc]))
    if errors:
        for exc in errors:
            print(f"gateway: config error: {gwconfig.mask_url(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(gwconfig.redacted(config), indent=2, default=str))
    print(f"config OK ({config.source})", file=sys.stderr)
    return 0


def _dead_list(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime

    from gateway.events import decode

    async def work() -> tuple[list, int]:
        journal, config = await _journal(args)
        try:
            counts = await journal.dead_letter_counts()
            _known_sink(args.sink, config, counts)
            total = counts.get(args.sink, 0) if args.sink else sum(counts.values())
            return await journal.dead_letters(args.sink, args.limit), total
        finally:
            await journal.close()

    letters, total = asyncio.run(work())
    for d in letters:
        when = datetime.fromtimestamp(d.failed_at, tz=UTC).isoformat(timespec="seconds")
        summary = _summary(d.data, decode)
        if args.json:
            print(json.dumps({"id": d.id, "sink": d.sink, "event_id": d.event_id, "state": d.state,
                              "attempts": d.attempts, "failed_at": when, "reason": d.reason,
                              **summary}))
        else:
            print(f"{d.id:>6} {d.sink:<12} {d.state:<6} {when} attempts={d.attempts} "
                  f"{summary.get('kind', '?')} {d.event_id} :: {d.reason}")
    if len(letters) < total:
        print(f"{len(letters)} of {total} dead letters (the oldest; --limit N shows more)",
              file=sys.stderr)
    else:
        print(f"{total} dead letters", file=sys.stderr)
    return 0


def _summary(data: bytes, decode) -> dict:
    try:
        ev = decode(data)
    except Exception:  # noqa: BLE001 - normalise failures hold a raw request, not an event
        return {"kind": "raw-request"}
    return {"kind": ev.kind, "channel": ev.channel, "conversation_id": ev.conversation_id}


def _dead_replay(args: argparse.Namespace) -> int:
    left: dict[str, int] = {}

    async def work() -> int:
        journal, config = await _journal(args)
        try:
            counts = await journal.dead_letter_counts()
            _known_sink(args.sink, config, counts)
            running = _running_sinks(config)
            if args.sink and args.sink not in running:
                what, table = (("channel", "channels." + args.sink.split(":", 1)[1])
                               if args.sink.startswith("normalise:") else
                               ("sink", "sinks." + args.sink))
                raise ConfigError(
                    f"{what} of {args.sink!r} is not enabled in this config: no gateway running "
                    f"it would redeliver its letters; enable [{table}], then replay", "--sink")
            targets = [args.sink] if args.sink else sorted(running & set(counts))
            left.update({sink: n for sink, n in counts.items() if sink not in running})
            total = 0
            for sink in targets:
                total += await journal.request_replay(sink, args.ids or None)
            return total
        finally:
            await journal.close()

    count = asyncio.run(work())
    print(f"{count} dead letters queued for replay; the running gateway redelivers them "
          "(or the next one to start)")
    if left and not args.sink:
        named = ", ".join(f"{sink} ({n})" for sink, n in sorted(left.items()))
        print(f"gateway: left the dead letters of sinks this config does not enable: {named}; "
              "enable a sink again to replay its letters", file=sys.stderr)
    if args.ids and count < len(set(args.ids)):
        print(f"gateway: {len(set(args.ids)) - count} of the ids given are not dead letters "
              "waiting for a replay (unknown, already queued, of a sink this config does not "
              "enable, or not of that --sink)", file=sys.stderr)
        return 2
    return 0


def _running_sinks(config: gwconfig.GatewayConfig) -> set[str]:
    """The sinks a gateway on ``config`` runs (whose marked letters it redelivers): every
    ``[sinks.NAME]`` not ``enabled = false``, the outbound service's ``outbox``, and
    ``normalise:NAME`` for every channel it runs (its processor journals those requests again)."""
    def enabled(tables: dict) -> set[str]:
        return {name for name, table in tables.items()
                if not (isinstance(table, dict) and table.get("enabled") is False)}

    return (enabled(config.sinks) | {"outbox"}
            | {f"normalise:{name}" for name in enabled(config.channels)})


async def _journal(args: argparse.Namespace):
    """The config and its journal, opened. A SQLite journal must exist: a wrong ``--config`` or
    ``data_dir`` would otherwise create an empty one and report no dead letters."""
    from gateway.journal import open_journal

    config = _load(args)
    if config.queue.backend == "sqlite":
        path = os.path.join(config.server.data_dir, "journal.db")
        if not os.path.exists(path):
            raise ConfigError(f"no journal at {path}: no gateway has run with this data_dir "
                              "(is --config the gateway's?)", "server.data_dir")
    journal = open_journal(config)
    await journal.open()
    return journal, config


def _known_sink(sink: str | None, config: gwconfig.GatewayConfig,
                counts: dict[str, int]) -> None:
    """``--sink`` names a configured sink or one with dead letters (a sink since removed)."""
    if not sink or sink in counts:
        return
    known = {*config.sinks, "outbox", *(f"normalise:{name}" for name in config.channels)}
    if sink not in known:
        raise ConfigError(f"no sink named {sink!r} is configured or has dead letters "
                          f"(configured: {', '.join(sorted(config.sinks)) or 'none'})", "--sink")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
