"""Keep the documentation true (datasette's tests/test_docs.py is the model).

- every hook in ``gateway/hookspecs.py`` has a ``### name(args)`` section in docs/plugins.md with
  the spec's argument names, and a docstring; no section documents a hook that does not exist;
- the guide's example plugins are real: they load, normalise, store and pass their own test;
- ``gateway.__all__`` is sorted;
- every key docs/configuration.md documents for a table exists in that table's Struct.
"""

from __future__ import annotations

import inspect
import re
import sys
import tomllib
import types
from pathlib import Path

import msgspec
import pluggy
import pytest

import gateway
from gateway import ConfigError, hookspecs, plugins
from gateway.config import (
    GatewayConfig,
    LoggingConfig,
    QueueConfig,
    ServerConfig,
    SinkConfig,
)

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = ROOT / "docs" / "plugins.md"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
HOOK_HEADING = re.compile(r"^### (\w+)\(([^)]*)\)\s*$", re.MULTILINE)
CODE_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
EXAMPLE_BLOCK = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)```", re.DOTALL)


def section_text(markdown: str, heading: str) -> str:
    """The text under ``heading`` (a ``## ...`` line) up to the next ``## `` heading."""
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find("\n## ", start + len(heading) + 2)
    return markdown[start:end if end != -1 else None]


def documented_hooks() -> dict[str, list[str]]:
    """``### name(a, b)`` headings of the hook reference → argument names."""
    reference = section_text(PLUGINS_MD.read_text(), "## Hook reference")
    found: dict[str, list[str]] = {}
    for name, args in HOOK_HEADING.findall(reference):
        assert name not in found, f"docs/plugins.md documents {name} twice"
        found[name] = [a.strip() for a in args.split(",") if a.strip()]
    return found


def hook_sections() -> dict[str, str]:
    reference = section_text(PLUGINS_MD.read_text(), "## Hook reference")
    parts = HOOK_HEADING.split(reference)  # [intro, name, args, body, name, args, body, ...]
    return {parts[i]: parts[i + 2] for i in range(1, len(parts), 3)}


def spec_argnames(name: str) -> list[str]:
    """The argument names pluggy calls the hook with."""
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    caller = getattr(pm.hook, name)
    return list(caller.spec.argnames) + list(caller.spec.kwargnames)


# -- hooks -----------------------------------------------------------------------------------------

def test_hook_names_are_what_pluggy_discovers():
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    discovered = {name for name in vars(pm.hook) if not name.startswith("_")}
    assert discovered == set(hookspecs.HOOK_NAMES)
    assert hookspecs.HOOK_NAMES, "no hooks found in gateway/hookspecs.py"


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_has_a_section_with_its_arguments(name):
    documented = documented_hooks()
    args = spec_argnames(name)
    assert name in documented, (
        f"docs/plugins.md has no section for hook {name}: add '### {name}({', '.join(args)})'")
    assert documented[name] == args, (
        f"docs/plugins.md documents {name}({', '.join(documented[name])}) but the hookspec is "
        f"{name}({', '.join(args)})")
    # The Python signature and pluggy's view agree too (no *args, no defaults).
    assert list(inspect.signature(getattr(hookspecs, name)).parameters) == args


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_section_says_when_arguments_returns_and_shows_an_example(name):
    body = hook_sections()[name]
    for part in ("**What for:**", "**When:**", "**Arguments:**", "**Returns:**"):
        assert part in body, f"the section of {name} lacks {part}"
    examples = [code for lang, code in CODE_BLOCK.findall(body) if lang == "python"]
    assert any(f"def {name}(" in code for code in examples), f"no example implements {name}"
    for code in examples:
        compile(code, f"docs/plugins.md ({name})", "exec")


def test_no_section_documents_a_hook_that_does_not_exist():
    stale = set(documented_hooks()) - set(hookspecs.HOOK_NAMES)
    assert not stale, f"docs/plugins.md documents hooks gateway/hookspecs.py lacks: {sorted(stale)}"


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_has_a_docstring_naming_its_arguments(name):
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc and doc.strip(), f"hook {name} has no docstring"
    args = spec_argnames(name)
    if args:
        assert "Args:" in doc, f"the docstring of {name} has no Args: section"
        missing = [a for a in args if f"{a}:" not in doc]
        assert not missing, f"the docstring of {name} does not describe {missing}"


# -- the public surface ----------------------------------------------------------------------------

def test_gateway_all_is_sorted_and_importable():
    assert gateway.__all__ == sorted(gateway.__all__), "gateway.__all__ is not sorted"
    assert len(set(gateway.__all__)) == len(gateway.__all__)
    missing = [name for name in gateway.__all__ if not hasattr(gateway, name)]
    assert not missing, f"gateway.__all__ names what gateway does not define: {missing}"


# -- the guide's examples --------------------------------------------------------------------------

def examples() -> dict[str, str]:
    return dict(EXAMPLE_BLOCK.findall(PLUGINS_MD.read_text()))


def test_every_code_block_parses():
    for lang, code in CODE_BLOCK.findall(PLUGINS_MD.read_text()):
        if lang == "python":
            compile(code, "docs/plugins.md", "exec")
        elif lang == "toml":
            tomllib.loads(code)


def test_example_pyprojects_declare_gateway_entry_points():
    blocks = [tomllib.loads(code) for lang, code in CODE_BLOCK.findall(PLUGINS_MD.read_text())
              if lang == "toml" and "entry-points" in code]
    distributions = [b for b in blocks if "name" in b.get("project", {})]
    assert len(distributions) >= 2  # the sink and the channel example
    for block in distributions:
        groups = block["project"]["entry-points"]
        assert set(groups) <= set(plugins.GROUPS.values()), groups
        for entry in groups.values():
            for module in entry.values():
                assert module in block["tool"]["setuptools"]["packages"]


def test_documented_builtin_entry_points_are_the_real_ones():
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    real = {g: v for g, v in root.items() if g in plugins.GROUPS.values()}
    blocks = [tomllib.loads(code) for lang, code in CODE_BLOCK.findall(PLUGINS_MD.read_text())
              if lang == "toml" and "entry-points" in code]
    [builtin] = [b for b in blocks if "name" not in b["project"]]
    assert builtin["project"]["entry-points"] == real, (
        "docs/plugins.md 'How discovery works' lists other built-ins than pyproject.toml")


@pytest.fixture
def example_modules(monkeypatch):
    """The guide's sink and channel examples as the importable modules they claim to be."""
    found = examples()
    modules = {}
    for key, name in (("sink", "gateway_eventlog"), ("channel", "gateway_acme")):
        assert key in found, f"docs/plugins.md has no '<!-- example: {key} -->' block"
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(found[key], f"docs/plugins.md ({name})", "exec"), module.__dict__)  # noqa: S102
        modules[key] = module
    return modules


def test_example_plugins_implement_real_hooks(example_modules):
    pm = plugins.manager(load_entrypoints=False, extra=list(example_modules.values()))
    assert pm.get_plugins() >= set(example_modules.values())


async def test_example_plugins_work_end_to_end(example_modules, tmp_path):
    namespace: dict = {"__name__": "docs_example_test"}
    exec(compile(examples()["test"], "docs/plugins.md (test)", "exec"), namespace)  # noqa: S102
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    await tests[0](tmp_path)


def test_example_channel_tolerates_odd_content(example_modules):
    from gateway.config import section

    acme = example_modules["channel"]
    config = GatewayConfig(channels={"acme": {"app_secret": "x"}})
    channel = acme.AcmeChannel(section(config, "channels", "acme", acme.AcmeConfig, environ={}))
    odd = (b'{"object":"acme","entry":[{"id":"s","messages":[{"id":"1","from":"a","time":"x"},'
           b'{"id":"2","from":"b","text":"hi","time":"1736000000"},"junk",{"no":"id"}]},7]}')
    events = channel.normalise(odd)
    assert [(e.message_id, e.type) for e in events] == [("1", "unsupported"), ("2", "text")]
    assert len({e.id for e in events}) == 2 and channel.normalise(odd)[1].id == events[1].id
    for bad in (b"not json", b'{"object":"other","entry":[]}', b"[]"):
        with pytest.raises(gateway.BadPayload):
            channel.check_envelope(bad)


# -- docs/configuration.md -------------------------------------------------------------------------

TABLE_HEADING = re.compile(r"^#{2,3} `\[([\w.]+)\]`\s*$")
KEY_ROW = re.compile(r"^\| `(\w+)` \|")
CORE = {"server": ServerConfig, "queue": QueueConfig, "logging": LoggingConfig}
PROBE = {"__probe__": True}  # a value no documented key can hold, so conversion always fails


def configuration_keys() -> dict[str, list[str]]:
    """``[table]`` (or ``sinks.*`` for the table every sink shares) → documented keys."""
    tables: dict[str, list[str]] = {}
    current = None
    for line in CONFIGURATION_MD.read_text().splitlines():
        if line.startswith("#"):
            match = TABLE_HEADING.match(line)
            current = match.group(1) if match else ("sinks.*" if line == "## Sinks" else None)
            continue
        row = KEY_ROW.match(line)
        if current and row and row.group(1) != "key":
            tables.setdefault(current, []).append(row.group(1))
    return tables


def unknown_to_plugin(pm: pluggy.PluginManager, kind: str, name: str, key: str) -> str | None:
    """Why ``[kind.name] key`` is not accepted by any installed plugin, or None if it is."""
    config = GatewayConfig(**{kind: {name: {key: PROBE}}})
    try:
        plugins.components(pm, config)
    except ConfigError as exc:
        if exc.key == f"{kind}.{name}" or (exc.key == f"{kind}.{name}.{key}"
                                            and exc.message == "unknown key"):
            return str(exc)
    return None


@pytest.fixture
def configuration():
    if not CONFIGURATION_MD.exists():
        pytest.skip("docs/configuration.md does not exist yet")
    return configuration_keys()


def test_configuration_md_documents_plugin_tables(configuration):
    assert any(t.startswith(("sinks.", "channels.")) for t in configuration), (
        "docs/configuration.md documents no [sinks.X] / [channels.X] table in the expected format")


def test_every_documented_plugin_key_exists(configuration):
    pm = plugins.manager()
    wrong = []
    for table, keys in configuration.items():
        kind, _, name = table.partition(".")
        if kind not in ("sinks", "channels") or name == "*":
            continue
        for key in keys:
            problem = unknown_to_plugin(pm, kind, name, key)
            if problem:
                wrong.append(f"[{table}] {key}: {problem}")
    assert not wrong, "docs/configuration.md documents keys that do not exist:\n" + "\n".join(wrong)


def test_every_documented_core_and_shared_sink_key_exists(configuration):
    structs = {**CORE, "sinks.*": SinkConfig}
    wrong = []
    for table, struct in structs.items():
        names = {f.name for f in msgspec.structs.fields(struct)}
        wrong += [f"[{table}] {key}" for key in configuration.get(table, []) if key not in names]
    assert not wrong, "docs/configuration.md documents keys that do not exist:\n" + "\n".join(wrong)


def test_the_key_probe_tells_unknown_keys_from_known_ones():
    pm = plugins.manager()
    assert unknown_to_plugin(pm, "sinks", "jsonl", "pth") == "sinks.jsonl.pth: unknown key"
    assert unknown_to_plugin(pm, "sinks", "nosuch", "path")  # no plugin provides the table
    assert unknown_to_plugin(pm, "sinks", "jsonl", "path") is None
    assert unknown_to_plugin(pm, "channels", "whatsapp", "accounts") is None
