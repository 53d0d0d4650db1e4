"""Storage fixtures: a real SQLite file per backend and one real ``redis-server`` per session.

A backend is bound to the event loop that opened it (the SQLite worker threads answer on it,
the Redis connections live on it), so each test gets one ``asyncio.Runner`` (``stores.run``)
and opens its backends inside it with ``await stores.open(kind)``; every open is isolated (a
new file, or a new key prefix on the shared server) and closed at teardown.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_mark import starts_processes
from storage.redis_process import own_redis, start_redis
from storage.storage_harness import Stores

__all__ = ["own_redis"]  # a fixture, for the tests here


@pytest.fixture(scope="session")
@starts_processes
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    s = Stores(lambda: str(request.getfixturevalue("redis_url")), tmp_path)
    yield s
    s.close()


# The redis kind starts the session's redis-server (redis_url): a process test.
@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.process)])
def kind(request: pytest.FixtureRequest) -> str:
    """Which backend a contract test runs against (every contract test runs on both)."""
    value: str = request.param
    if value == "redis":
        request.getfixturevalue("redis_url")  # start (or fail loudly) before the test body
    return value
