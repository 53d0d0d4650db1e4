"""Real node processes on distinct loopback addresses, for integration tests.

Each node is a `dna-bootstrap run` OS process with its own TOML file, key file
and log under a temporary directory; tests SIGKILL, SIGTERM and restart them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
UDP_PORT, GRPC_PORT, HTTP_PORT = 7400, 7401, 7480


@dataclass
class NodeProcess:
    name: str
    ip: str
    root: Path
    bootstraps: list[str]
    puzzle_bits: int = 4
    command: str = "dna-bootstrap"
    extra_toml: str = ""  # more sections, e.g. [storage] for dna-storage-node
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def udp(self) -> tuple[str, int]:
        return (self.ip, UDP_PORT)

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def write_config(self) -> None:
        seeds = ", ".join(f'"{b}"' for b in self.bootstraps)
        self.config_path.write_text(
            f'log_level = "info"\n[node]\nhost = "{self.ip}"\nudp_port = {UDP_PORT}\n'
            f'grpc_port = {GRPC_PORT}\nkey_file = "{self.root / (self.name + ".key")}"\n'
            f"puzzle_bits = {self.puzzle_bits}\n[overlay]\nbootstrap = [{seeds}]\n"
            f'allow_loopback = true\n[ops]\nhttp_host = "{self.ip}"\nhttp_port = {HTTP_PORT}\n'
            + self.extra_toml
        )

    def start(self) -> None:
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / self.command), "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("DNA_")},
        )

    def http(self, path: str) -> httpx.Response:
        return httpx.get(f"http://{self.ip}:{HTTP_PORT}{path}", timeout=2.0)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http("/status").json()
        return data

    def is_ready(self) -> bool:
        try:
            return self.http("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(nodes: list[NodeProcess], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for node in list(pending):
            if not node.alive():
                raise AssertionError(f"{node.name} exited:\n{node.tail()}")
            if node.is_ready():
                pending.remove(node)
        time.sleep(0.2)
    if pending:
        raise AssertionError(f"not ready: {[n.name for n in pending]}\n{pending[0].tail()}")


def make_cluster(root: Path, count: int, bootstraps: int = 3) -> list[NodeProcess]:
    """Nodes on 127.0.0.2, .3, ...; the first ``bootstraps`` are the well-known ones."""
    ips = [f"127.0.0.{i + 2}" for i in range(count)]
    seeds = [f"{ip}:{UDP_PORT}" for ip in ips[:bootstraps]]
    return [NodeProcess(f"node{i}", ip, root, seeds) for i, ip in enumerate(ips)]


def stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        if node.alive():
            node.kill()
