"""Storage fixtures: a real SQLite file per backend and one real ``redis-server`` per session.

A backend is bound to the event loop that opened it (the SQLite worker threads answer on it,
the Redis connections live on it), so each test gets one ``asyncio.Runner`` (``stores.run``)
and opens its backends inside it with ``await stores.open(kind)``; every open is isolated (a
new file, or a new key prefix on the shared server) and closed at teardown.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from process_mark import starts_processes
from storage.storage_harness import Stores

REDIS_SERVER = "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_binary() -> str:
    binary = shutil.which("redis-server") or REDIS_SERVER
    if not Path(binary).exists():
        pytest.fail(
            "redis-server is not installed (apt-get install redis-server): the Redis backend "
            "contract tests need a real server and are never skipped",
            pytrace=False,
        )
    return binary


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server durably configured (AOF, fsync always) and wait for PING.

    A server that exits at once most likely lost the race for its port: try another.
    """
    binary = _redis_binary()
    for _ in range(3):
        port = _free_port()
        with (workdir / "redis.log").open("ab") as log:
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        if _wait_for_ping(proc, url):
            return proc, url
        proc.kill()
        proc.wait()
    pytest.fail(f"redis-server did not answer PING:\n{(workdir / 'redis.log').read_text()}")


def _wait_for_ping(proc: subprocess.Popen[bytes], url: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with redis.Redis.from_url(url, socket_timeout=0.5) as client:
                client.ping()
            return True
        except redis.ConnectionError:
            time.sleep(0.02)
    return False


@pytest.fixture(scope="session")
@starts_processes
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = _start_redis(tmp_path_factory.mktemp("redis"))
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
