"""Real ``redis-server`` processes for tests, durably configured (AOF, fsync always): the
session's shared one (``start_redis``) and one a test may kill and restart on the same port
and AOF (``RedisProcess``: a restart under a node)."""

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


def start_redis(workdir: Path, password: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server durably configured (AOF, fsync always) and wait for PING; with
    ``password``, one that requires it (the URL carries it).

    A server that exits at once most likely lost the race for its port: try another.
    """
    for _ in range(3):
        port = _free_port()
        proc, url = _redis_on(workdir, port, password=password)
        if _wait_for_ping(proc, url):
            return proc, url
        proc.kill()
        proc.wait()
    pytest.fail(f"redis-server did not answer PING:\n{(workdir / 'redis.log').read_text()}")


def _redis_on(
    workdir: Path, port: int, appendfsync: str = "always", password: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    auth = ["--requirepass", password] if password else []
    with (workdir / "redis.log").open("ab") as log:
        proc = subprocess.Popen(
            [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", appendfsync, "--dir", str(workdir),
             *auth],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"


class RedisProcess:
    """A redis-server of one test's own, durably configured, that the test may kill and
    start again on the same port and data directory (its AOF): a restart under a node."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc, self.url = start_redis(workdir)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save (the AOF has every acknowledged write)."""
        self.proc.kill()
        self.proc.wait()

    def start(self, *, appendfsync: str = "always") -> None:
        """Start it again (its AOF loaded); ``appendfsync`` as a restart from another
        configuration would set it."""
        self.proc, url = _redis_on(self.workdir, self.port, appendfsync)
        if not _wait_for_ping(self.proc, url):
            pytest.fail(
                f"redis-server did not restart:\n{(self.workdir / 'redis.log').read_text()}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_for_ping(proc: subprocess.Popen[bytes], url: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with redis.Redis.from_url(url, socket_timeout=0.5) as client:
                client.ping()
            return True
        except redis.ConnectionError:
            time.sleep(0.02)
    return False


@pytest.fixture
@starts_processes
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server for this test alone (it may kill and restart it)."""
    workdir = tmp_path / "own-redis"
    workdir.mkdir()
    server = RedisProcess(workdir)
    yield server
    server.stop()
