"""Configuration: msgspec Structs loaded from TOML, overlaid with environment variables.

The core owns ``[server]``, ``[queue]`` and ``[logging]`` (a sink's retry policy lives in its
own ``[sinks.<name>]`` table). ``[channels.<name>]`` and
``[sinks.<name>]`` belong to the plugin of that name, which converts its table into its own Struct
with :func:`section` (unknown keys rejected, each error naming the dotted key).

Secrets may be written inline, as ``{ env = "NAME" }`` or as ``{ file = "/run/secrets/x" }``; the
documented environment variables (``WHATSAPP_APP_SECRET``, ``GATEWAY_API_TOKEN``, …) override the
file. :func:`redacted` masks every secret for display.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec

from gateway.errors import ConfigError

SECRET_KEYS = frozenset(
    {"app_secret", "verify_token", "access_token", "api_token", "api_key", "redis_url",
     "password", "token", "secret"}
)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def validate(self, prefix: str) -> None:
        """Cross-field checks; raise ConfigError naming the key."""


def require_positive(struct: Any, prefix: str, *keys: str) -> None:
    """Raise ConfigError naming the first of ``keys`` that is not greater than 0 (NaN too)."""
    for key in keys:
        if not getattr(struct, key) > 0:
            raise ConfigError("must be greater than 0", f"{prefix}.{key}")


def require_not_negative(struct: Any, prefix: str, *keys: str) -> None:
    """Raise ConfigError naming the first of ``keys`` that is negative, NaN or infinite."""
    for key in keys:
        value = getattr(struct, key)
        if not (0 <= value < float("inf")):
            raise ConfigError("must be a finite number, not negative", f"{prefix}.{key}")


def require_at_least(struct: Any, prefix: str, key: str, lower: str) -> None:
    """Raise ConfigError naming ``key`` when it is below ``lower`` (an initial <= max pair)."""
    if not getattr(struct, key) >= getattr(struct, lower):
        raise ConfigError(f"must be at least {lower}", f"{prefix}.{key}")


def require_not_blank(struct: Any, prefix: str, *keys: str) -> None:
    """Raise ConfigError naming the first of ``keys`` (secrets) that is only whitespace: such a
    value is refused like an empty one, never taken for a secret or a token."""
    for key in keys:
        value = getattr(struct, key)
        if isinstance(value, str) and value and not value.strip():
            raise ConfigError("must not be blank (only whitespace)", f"{prefix}.{key}")


class ServerConfig(_Section):
    """``[server]``: listening addresses, limits and the API token."""

    host: str = "0.0.0.0"
    port: int = 8080
    metrics_port: int = 9090
    data_dir: str = "./data"
    max_body_bytes: int = 3 * 1024 * 1024  # CONTRACT §3: Meta sends up to 3 MB
    # Request bytes the main port's lean path holds at once, across connections (a body counts at
    # its declared length from its head on); a request that would go over gets 503 + Retry-After.
    max_buffered_bytes: int = 64 * 1024 * 1024
    api_token: str | None = None
    erasure_audit_key: str | None = None  # HMAC key of erasures.jsonl; unset: data_dir file
    insecure_skip_signature: bool = False
    shutdown_timeout: float = 25.0
    # Webhook POSTs answered by the lean HTTP/1.1 path of gateway/listener.py (aiohttp serves
    # everything else on the port); false: aiohttp serves the whole port.
    fast_intake: bool = True

    def validate(self, prefix: str) -> None:
        for key in ("port", "metrics_port"):
            if not 1 <= getattr(self, key) <= 65535:
                raise ConfigError("must be a TCP port (1-65535)", f"{prefix}.{key}")
        if self.max_body_bytes < 1024:
            raise ConfigError("must be at least 1024", f"{prefix}.max_body_bytes")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ConfigError("must be at least max_body_bytes", f"{prefix}.max_buffered_bytes")
        require_not_negative(self, prefix, "shutdown_timeout")
        require_not_blank(self, prefix, "api_token")
        if self.erasure_audit_key is not None and len(self.erasure_audit_key.strip()) < 16:
            raise ConfigError("must be at least 16 characters (e.g. openssl rand -hex 32)",
                              f"{prefix}.erasure_audit_key")


class QueueConfig(_Section):
    """``[queue]``: the intake journal and event queue."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_pending: int = 100_000  # unprocessed requests before intake answers 503
    retry_after_seconds: int = 30
    dedupe_window_seconds: int = 7 * 24 * 3600
    synchronous: Literal["FULL", "NORMAL"] = "FULL"  # SQLite: FULL fsyncs every group commit

    def validate(self, prefix: str) -> None:
        for key in ("max_pending", "retry_after_seconds", "dedupe_window_seconds"):
            if getattr(self, key) < 1:
                raise ConfigError("must be at least 1", f"{prefix}.{key}")
        _require_redis_url(self.redis_url, f"{prefix}.redis_url")


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _require_redis_url(url: str, key: str) -> None:
    """What redis-py's ``from_url`` would refuse only when the gateway starts (the URL itself is
    never in the message: it may hold a password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError as exc:
        raise ConfigError(f"is not a valid URL ({exc})", key) from None
    if parts.scheme not in REDIS_SCHEMES:
        got = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise ConfigError(f"must be a redis://, rediss:// or unix:// URL, not {got}", key)


class LoggingConfig(_Section):
    """``[logging]``: structlog output."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    log_text: bool = False  # include message text in debug logs (off: personal data)


class OutboundConfig(_Section):
    """``[outbound]``: sending through Meta (the outbox, retries, the service window, consent)."""

    enforce_window: bool = True  # refuse free-form messages outside the 24-hour window up front
    window_hours: float = 24.0
    human_agent_days: float = 7.0  # Instagram's HUMAN_AGENT tag
    opt_out_keywords: list[str] = msgspec.field(default_factory=lambda: ["STOP", "UNSUBSCRIBE"])
    opt_in_keywords: list[str] = msgspec.field(default_factory=lambda: ["START"])
    max_attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    reconcile_seconds: float = 60.0  # wait for a status webhook before resending after a crash
    concurrency: int = 64  # sends in flight per account
    retention_days: float = 30.0  # Redis outbox: settled records kept this long, then expire
    # Throttling answers (4, 613, 80007, 130429, 131048, 131056, ...): per-scope exponential
    # backoff with jitter, reset on success; Meta's own hints (Retry-After, BUC
    # estimated_time_to_regain_access) are waited out in full.
    throttle_backoff_initial: float = 1.0  # 130429 (number), 131056 (pair: 1, 4, 16, 64 s)
    throttle_backoff_long: float = 60.0  # 4, 17, 32, 613, 80007, 131048: Meta asks >= 60 s
    throttle_backoff_max: float = 900.0  # one wait at most (unless Meta names a longer one)
    throttle_max_attempts: int = 20  # throttled answers per message, then it fails
    throttle_max_seconds: float = 3600.0  # or this long after its first throttled answer
    # An expired token (190) or a billing problem (131042) pauses the account: its messages are
    # held, one is tried as a probe every pause_probe_seconds, and a message held longer than
    # max_pause_seconds fails with the original error (the service window is 24 h anyway).
    max_pause_seconds: float = 86400.0
    pause_probe_seconds: float = 300.0  # 0: no probes (resume only on restart)

    def validate(self, prefix: str) -> None:
        if self.max_attempts < 1:
            raise ConfigError("must be at least 1", f"{prefix}.max_attempts")
        require_positive(self, prefix, "backoff_initial", "backoff_max", "reconcile_seconds",
                         "window_hours", "human_agent_days")
        require_at_least(self, prefix, "backoff_max", "backoff_initial")
        if self.concurrency < 1:
            raise ConfigError("must be at least 1", f"{prefix}.concurrency")
        if self.retention_days <= 0:
            raise ConfigError("must be greater than 0", f"{prefix}.retention_days")
        if self.throttle_max_attempts < 1:
            raise ConfigError("must be at least 1", f"{prefix}.throttle_max_attempts")
        require_positive(self, prefix, "throttle_backoff_initial", "throttle_backoff_long",
                         "throttle_backoff_max", "throttle_max_seconds", "max_pause_seconds")
        require_at_least(self, prefix, "throttle_backoff_max", "throttle_backoff_initial")
        require_not_negative(self, prefix, "pause_probe_seconds")


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration. ``channels`` and ``sinks`` stay raw until a plugin reads them."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    channels: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    sinks: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    source: str = "embedded defaults"

    def enabled(self, kind: str, name: str) -> bool:
        """Whether ``[kind.name]`` is present and not ``enabled = false``."""
        table = getattr(self, kind).get(name)
        return table is not None and table.get("enabled", True) is not False


class PluginSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for a plugin's config table.

    ``env`` maps a key to environment variables (the first one set wins).
    """

    enabled: bool = True
    env: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def validate(self, prefix: str) -> None:
        """Cross-field checks; raise ConfigError naming the key."""


class SinkConfig(PluginSection):
    """Fields every ``[sinks.<name>]`` table has: the sink's own retry policy and batch size."""

    max_attempts: int = 6
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    batch_size: int = 200

    def validate(self, prefix: str) -> None:
        if self.max_attempts < 1:
            raise ConfigError("must be at least 1", f"{prefix}.max_attempts")
        if self.batch_size < 1:
            raise ConfigError("must be at least 1", f"{prefix}.batch_size")
        require_positive(self, prefix, "backoff_initial", "backoff_max")
        require_at_least(self, prefix, "backoff_max", "backoff_initial")


class ChannelConfig(PluginSection):
    """Fields every Meta channel table has."""

    app_secret: str | None = None
    verify_token: str | None = None
    access_token: str | None = None
    graph_base_url: str = "https://graph.facebook.com"
    graph_version: str = "v24.0"

    def validate(self, prefix: str) -> None:
        require_not_blank(self, prefix, "app_secret", "verify_token", "access_token")
        url = urlsplit(self.graph_base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError("must be an http(s) URL with a host, e.g. "
                              "\"https://graph.facebook.com\"", f"{prefix}.graph_base_url")
        if not self.graph_version.strip() or "/" in self.graph_version:
            raise ConfigError("must be a Graph API version, e.g. \"v24.0\"",
                              f"{prefix}.graph_version")


EMBEDDED_DEFAULTS: dict[str, Any] = {
    "channels": {"whatsapp": {"enabled": True}, "instagram": {"enabled": True}},
    "sinks": {"storage": {}},
}

_CORE_ENV = {
    ("server", "api_token"): "GATEWAY_API_TOKEN",
    ("server", "erasure_audit_key"): "GATEWAY_ERASURE_AUDIT_KEY",
    ("server", "data_dir"): "GATEWAY_DATA_DIR",
    ("queue", "redis_url"): "GATEWAY_REDIS_URL",
}

S = TypeVar("S", bound=PluginSection)


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read ``path`` (or the embedded defaults), overlay the environment, validate everything.

    Raises:
        ConfigError: naming the bad key (:class:`ConfigErrors` holding each one when several).
    """
    errors, config = check_all(path, environ)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    assert config is not None
    return config


def check(path: str | None = None, environ: Mapping[str, str] | None = None) -> list[ConfigError]:
    """Every problem in the core sections, each naming its key (plugin sections: see plugins)."""
    return check_all(path, environ)[0]


def check_all(path: str | None = None, environ: Mapping[str, str] | None = None
              ) -> tuple[list[ConfigError], GatewayConfig | None]:
    """The core's problems, each key checked on its own, and the config built without the bad
    keys (None only when the file cannot be read), so that plugin tables are checked in the same
    run."""
    try:
        data = _read(path)
    except ConfigError as exc:
        return [exc], None
    unknown, not_tables = _unknown_keys(data), _plugin_non_tables(data)
    errors = [ConfigError("unknown key", key) for key in unknown]
    errors += [ConfigError(f"must be a table, not {kind}", key) for key, kind in not_tables]
    config = _build(_without(data, unknown + [key for key, _ in not_tables]),
                    os.environ if environ is None else environ, path, errors)
    return _first_per_key(errors), config


def _without(data: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key in keys:
        head, _, tail = key.partition(".")
        if not tail:
            data.pop(head, None)
        elif isinstance(data.get(head), dict):
            data[head].pop(tail, None)
    return data


def section(config: GatewayConfig, kind: str, name: str, struct: type[S],
            environ: Mapping[str, str] | None = None) -> S | None:
    """Convert ``[kind.name]`` into ``struct``; None when the table is absent or disabled (a
    disabled table's unknown keys are errors all the same, nothing else of it is checked).

    Environment variables named in ``struct.env`` override the table's values.

    Raises:
        ConfigError: naming ``kind.name.key`` for an unknown key or a wrong type.
    """
    prefix = f"{kind}.{name}"
    if not config.enabled(kind, name):
        # Nothing of a disabled table is used (its references stay unresolved, its required keys
        # may be missing), but a misspelt key is reported all the same.
        errors = _unknown_in(getattr(config, kind).get(name) or {}, struct, prefix)
        if errors:
            raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
        return None
    errors: list[ConfigError] = []
    env = environ if environ is not None else os.environ
    overrides = {}
    for key, names in struct.env.items():
        value = next((env[n] for n in names if env.get(n)), None)
        if value is not None:
            overrides[key] = value
    # An overridden key's own value is never read, so a reference there that cannot be
    # resolved (``{ env = "WHATSAPP_APP_SECRET" }`` with only META_APP_SECRET set) is no error.
    table = _resolved_each({k: v for k, v in getattr(config, kind)[name].items()
                            if k not in overrides}, prefix, errors)
    table.update(overrides)
    result = _checked(table, struct, prefix, errors)
    errors = _first_per_key(errors)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return result


def _unknown_in(table: dict[str, Any], struct: type[Any], prefix: str) -> list[ConfigError]:
    """The keys of ``table`` that ``struct`` (when it forbids unknown fields) does not have."""
    struct_config = getattr(struct, "__struct_config__", None)
    if struct_config is None or not struct_config.forbid_unknown_fields:
        return []
    names = {f.encode_name for f in msgspec.structs.fields(struct)}
    return [ConfigError("unknown key", f"{prefix}.{key}") for key in table if key not in names]


def file_sink_section(config: GatewayConfig, name: str, struct: type[S],
                      filename: str) -> S | None:
    """``[sinks.NAME]`` as :func:`section` gives it, for a sink that writes one file: its
    ``path`` defaults to ``<data_dir>/<filename>``."""
    table = section(config, "sinks", name, struct)
    if table is not None and not table.path:
        table.path = os.path.join(config.server.data_dir, filename)
    return table


def _first_per_key(errors: list[ConfigError]) -> list[ConfigError]:
    """One error per key: a reference that cannot be resolved drops its key, which must not be
    reported again as a required key that is missing."""
    seen: set[str] = set()
    kept = []
    for error in errors:
        if not error.key or error.key not in seen:
            kept.append(error)
            seen.add(error.key)
    return kept


class ConfigErrors(ConfigError):
    """Several configuration problems at once; ``errors`` holds each."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(str(e) for e in errors), errors[0].key)
        self.errors = errors


def resolve_secrets(table: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Replace ``{env = "X"}`` / ``{file = "path"}`` values with what they point at, at any
    depth (e.g. ``channels.whatsapp.accounts[0].access_token``, a plugin's ``headers``)."""
    for key, value in list(table.items()):
        table[key] = _resolved(value, f"{prefix}.{key}")
    return table


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and ("env" in value or "file" in value)


def _resolved(value: Any, key: str) -> Any:
    if _is_reference(value):
        return _secret_value(value, key)
    if isinstance(value, dict):
        return resolve_secrets(dict(value), key)  # a copy: the config keeps the references
    if isinstance(value, list):
        return [_resolved(item, f"{key}[{i}]") for i, item in enumerate(value)]
    return value


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#]+@")
_SECRET_PARAM = re.compile(r"(?i)([?&][^=&\s#]*(?:token|secret|key|password|sig)[^=&\s#]*=)"
                           r"[^&\s#]+")
_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#]*)\?[^\s#]+")


def mask_url(text: str, query: bool = False) -> str:
    """``text`` with every URL's credentials masked: ``scheme://user:pass@`` becomes
    ``scheme://***@`` and ``?token=...``-like parameters ``?token=***``; with ``query``, every
    URL's whole query string becomes ``?***``."""
    if "://" not in text:
        return text
    text = _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))
    return _QUERY.sub(r"\1?***", text) if query else text


def redacted(data: Any) -> Any:
    """A copy of a config mapping with every secret value masked, for logs and check-config
    (and every URL's credentials and query string, whatever its key)."""
    if isinstance(data, msgspec.Struct):
        data = msgspec.to_builtins(data)
    if isinstance(data, dict):
        return {k: ("***" if _is_secret(k, v) else redacted(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    if isinstance(data, str):
        return mask_url(data, query=True)
    return data


def _is_secret(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    key = key.lower().replace("-", "_")
    return (key in SECRET_KEYS or key.endswith(("_secret", "_token", "_key", "password"))
            or key in ("authorization", "proxy_authorization"))


def _secret_value(ref: dict[str, Any], key: str) -> str:
    kind, name = next(iter(ref.items()))
    if not isinstance(name, str):
        what = "environment variable name" if kind == "env" else "secret file path"
        raise ConfigError(f"{{ {kind} = ... }}: the {what} must be a string, not "
                          f"{type(name).__name__}", key)
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"environment variable {name!r} is not set", key)
        return value
    try:
        with open(name, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {name!r}: {exc.strerror}", key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {name!r} is not UTF-8", key) from None


def _read(path: str | None) -> dict[str, Any]:
    if path is None:
        return {k: dict(v) for k, v in EMBEDDED_DEFAULTS.items()}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 TOML (byte {exc.start}: {exc.reason})") from None
    return data


def _unknown_keys(data: dict[str, Any]) -> list[str]:
    known = {f.name for f in msgspec.structs.fields(GatewayConfig)} - {"source"}
    found = []
    for key, value in data.items():
        if key not in known:
            found.append(key)
            continue
        struct = {"server": ServerConfig, "queue": QueueConfig, "logging": LoggingConfig,
                  "outbound": OutboundConfig}.get(key)
        if struct and isinstance(value, dict):
            names = {f.name for f in msgspec.structs.fields(struct)}
            found += [f"{key}.{k}" for k in value if k not in names]
    return found


def _plugin_non_tables(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``[channels] whatsapp = 1``: (key, type name) of each plugin entry that is no table."""
    return [(f"{kind}.{name}", type(value).__name__)
            for kind in ("channels", "sinks") if isinstance(data.get(kind), dict)
            for name, value in data[kind].items() if not isinstance(value, dict)]


CORE_SECTIONS: dict[str, type[_Section]] = {
    "server": ServerConfig, "queue": QueueConfig, "logging": LoggingConfig,
    "outbound": OutboundConfig}


def _build(data: dict[str, Any], environ: Mapping[str, str], path: str | None,
           errors: list[ConfigError]) -> GatewayConfig:
    """The config from ``data``; each bad core key is added to ``errors`` and left at its
    default, so that the rest (the plugin tables above all) can still be checked."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    overridden = {(sect, key) for (sect, key), var in _CORE_ENV.items() if environ.get(var)}
    for name in ("server", "queue"):
        if isinstance(data.get(name), dict):  # an overridden key's reference is never resolved
            data[name] = _resolved_each({k: v for k, v in data[name].items()
                                         if (name, k) not in overridden}, name, errors)
    for (sect, key), var in _CORE_ENV.items():
        if environ.get(var) and isinstance(data.setdefault(sect, {}), dict):
            data[sect][key] = environ[var]
    for name, struct in CORE_SECTIONS.items():
        if name not in data:
            continue
        if not isinstance(data[name], dict):
            errors.append(ConfigError(f"must be a table, not {type(data[name]).__name__}", name))
        data[name] = _checked(data[name] if isinstance(data[name], dict) else {}, struct, name,
                              errors) or struct()
    for name in ("channels", "sinks"):
        if name in data and not isinstance(data[name], dict):
            errors.append(ConfigError(f"must be a table, not {type(data[name]).__name__}", name))
            data.pop(name)
    return GatewayConfig(**data, source=path or "embedded defaults")


def _resolved_each(table: dict[str, Any], prefix: str, errors: list[ConfigError]
                   ) -> dict[str, Any]:
    """:func:`resolve_secrets`, key by key: a key whose reference fails is named and dropped."""
    resolved = {}
    for key, value in table.items():
        try:
            resolved[key] = _resolved(value, f"{prefix}.{key}")
        except ConfigError as exc:
            errors.append(exc)
    return resolved


def _checked(table: dict[str, Any], struct: type[Any], prefix: str,
             errors: list[ConfigError]) -> Any:
    """``table`` converted into ``struct`` and validated; every bad key is added to ``errors``.
    msgspec and ``validate()`` stop at the first problem, so the key each one names is dropped
    (back to its default) and the rest checked again, until nothing new is found. Returns the
    Struct without the bad keys, or None when a required key is missing or bad."""
    table = dict(table)
    dropped: set[str] = set()
    while True:
        try:
            result = msgspec.convert(table, struct, strict=True)
            result.validate(prefix)
            return result
        except msgspec.ValidationError as exc:
            error = _named(exc, prefix)
        except ConfigError as exc:
            error = exc
        field = error.key.removeprefix(f"{prefix}.").split(".")[0].split("[")[0]
        if field not in dropped:  # else: a required key dropped above, already named
            errors.extend(getattr(error, "errors", [error]))
        if field in dropped or field not in table:
            return None
        dropped.add(field)
        del table[field]


def _named(exc: msgspec.ValidationError, prefix: str) -> ConfigError:
    """Turn msgspec's ``... - at `$.server.port``` into a ConfigError naming ``server.port``."""
    text = str(exc)
    message, _, where = text.rpartition(" - at `")
    if not message:
        message, where = text, ""
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    if message.startswith("Object contains unknown field `"):
        field = message.split("`")[1]
        path, message = ".".join(p for p in (path, field) if p), "unknown key"
    elif message.startswith("Object missing required field `"):
        field = message.split("`")[1]
        path, message = ".".join(p for p in (path, field) if p), "required key is missing"
    key = ".".join(p for p in (prefix, path) if p)
    return ConfigError(message[0].lower() + message[1:] if message else "invalid value", key)
