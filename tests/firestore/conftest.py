"""Google's Cloud Firestore emulator for the tests: started once per session with ``java`` on
127.0.0.1 (a free port), stopped by pid at the end. Without java or the JAR (Debian package
``google-cloud-cli-firestore-emulator``) every test that needs it is skipped with that reason.

Each test gets a project of its own (the emulator keeps projects apart), so data never leaks
between tests. ``tests/test_erasure.py`` imports these fixtures; one emulator serves both.
"""

from __future__ import annotations

import uuid

import pytest

from sinks.firestore import emulator as fsemu
from tests.conftest import SINKS_TOML

_running: dict[str, fsemu.Emulator] = {}


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory):
    """``host:port`` of the session's running emulator."""
    reason = fsemu.missing()
    if reason:
        pytest.skip(reason)
    if "emulator" not in _running:
        log = tmp_path_factory.mktemp("firestore") / "emulator.log"
        try:
            _running["emulator"] = fsemu.Emulator(log_path=str(log)).start()
        except RuntimeError as exc:
            pytest.fail(str(exc))
    yield _running["emulator"].host
    emulator = _running.pop("emulator", None)
    if emulator is not None:
        emulator.stop()


def firestore_toml(project: str, host: str, **extra: object) -> str:
    """A ``[sinks.firestore]`` table on ``project`` with small backoff (for the gateway fixture)."""
    lines = [f'project_id = "{project}"', f'emulator_host = "{host}"', "backoff_initial = 0.05",
             "backoff_max = 0.5", "max_attempts = 4"]
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}" for k, v in extra.items()]
    return "[sinks.firestore]\n" + "\n".join(lines) + "\n"


async def storage_gateway(gateway, request, backends: str, name: str):
    """A gateway whose sinks are jsonl and storage, plus Firestore (on a fresh project named
    after ``name``) when ``backends`` is "storage+firestore"."""
    table = ""
    if backends != "storage":
        table = firestore_toml(f"{name}-{uuid.uuid4().hex[:12]}",
                               request.getfixturevalue("firestore_emulator"))
    return await gateway(sinks=SINKS_TOML + table)


@pytest.fixture
def firestore_project(firestore_emulator) -> str:
    """A project id of this test's own."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def firestore_table(firestore_emulator, firestore_project) -> str:
    """The ``[sinks.firestore]`` table for this test's project."""
    return firestore_toml(firestore_project, firestore_emulator)
