"""Redis fixtures for the outbox tests: the journal tests' shared redis-server (imported, not
copied) and a redis-server of a test's own that the test may kill."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from gateway.testing import free_port
from tests.journal import conftest as _journal

# Bound to names here so a test module can re-export them (``redis_url = redis_fixtures.redis_url``)
redis_server = _journal.redis_server
redis_url = _journal.redis_url


@pytest.fixture
def own_redis(tmp_path):
    """(url, start): a redis-server of this test's own on 127.0.0.1, AOF with fsync on every
    write; ``start()`` (re)starts it on the same port and data directory."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make install installs Debian's redis-server)")
    import redis

    port = free_port()
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "yes", "--appendfsync", "always",
                                 "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        client = redis.Redis(port=port)
        try:
            for _ in range(200):
                try:
                    client.ping()
                    break
                except (redis.exceptions.BusyLoadingError, redis.ConnectionError):
                    time.sleep(0.05)
        finally:
            client.close()
        return proc

    yield f"redis://127.0.0.1:{port}/0", start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
