"""Redis fixtures for the outbox tests: the journal tests' (imported, not copied): the shared
redis-server, and a redis-server of a test's own that the test may kill."""

from __future__ import annotations

from tests.journal import conftest as _journal

# Bound to names here so a test module can re-export them (``redis_url = redis_fixtures.redis_url``)
redis_server = _journal.redis_server
redis_url = _journal.redis_url
own_redis = _journal.own_redis
