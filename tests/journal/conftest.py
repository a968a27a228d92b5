"""A real redis-server on 127.0.0.1 (Debian's redis-server, installed by make install)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

from gateway.testing import free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """redis://127.0.0.1:<port>/0 of a server with per-write durability (AOF, fsync always)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make install installs Debian's redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always",
                             "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_url(redis_server):
    """A URL with a key prefix of its own, so that tests never see each other's data."""
    return f"{redis_server}?prefix=t{uuid.uuid4().hex[:10]}"


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
