"""A `dna-stun` process for tests: its TOML file, start, readiness, metrics, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent


def free_port(host: str, kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class StunNode:
    proc: subprocess.Popen[bytes]
    udp: tuple[str, int]
    http: str
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.http}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def stun_toml(
    host: str, udp_port: int, http_port: int, extra_relay: str = "",
    allowed: tuple[str, ...] = ("127.0.0.0/8",),
) -> str:  # fmt: skip
    listed = ", ".join(f'"{cidr}"' for cidr in allowed)
    return (
        f'log_level = "info"\n[server]\nhost = "{host}"\nudp_port = {udp_port}\n'
        f'[auth]\nrealm = "test"\nusers = ["u:p"]\nauth_secret = "shared"\n'
        f"[relay]\nallowed_peers = [{listed}]\n{extra_relay}"
        f'[ops]\nhttp_host = "{host}"\nhttp_port = {http_port}\n'
    )


@contextlib.contextmanager
def stun_node(
    root: Path, host: str = "127.0.0.1", extra_relay: str = "",
    allowed: tuple[str, ...] = ("127.0.0.0/8",),
) -> Iterator[StunNode]:  # fmt: skip
    node = _started(root, host, extra_relay, allowed)
    try:
        yield node
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)


# How dna-stun names a port it cannot bind (tests/stun/test_start_errors.py checks it).
TAKEN = "Address already in use"


def _started(root: Path, host: str, extra_relay: str, allowed: tuple[str, ...]) -> StunNode:
    """A ready dna-stun. Its ports are picked free, then bound by the node a moment later:
    one taken meanwhile (an outgoing connection's ephemeral port) means another try."""
    for attempt in range(3):
        udp_port, http_port = free_port(host), free_port(host, socket.SOCK_STREAM)
        config, log = root / "stun.toml", root / f"stun-{attempt}.log"
        config.write_text(stun_toml(host, udp_port, http_port, extra_relay, allowed))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(BIN / "dna-stun"), "run", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("DNA_")},
            )  # fmt: skip
        node = StunNode(proc, (host, udp_port), f"http://{host}:{http_port}", log)
        if _ready(node):
            return node
        if TAKEN not in log.read_text():
            raise RuntimeError(f"dna-stun exited:\n{log.read_text()}")
    raise RuntimeError(f"dna-stun found no free port in 3 tries:\n{log.read_text()}")


def _ready(node: StunNode) -> bool:
    """Wait for /readyz (True), or the process's exit (False)."""
    deadline = time.monotonic() + 60  # 8-14 s under 2 busy loops: room for more
    while node.proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{node.http}/readyz", timeout=1).status_code == 200:
                return True
        if time.monotonic() > deadline:
            node.proc.kill()
            node.proc.wait(10)
            raise RuntimeError(f"dna-stun not ready:\n{node.log.read_text()}")
        time.sleep(0.1)
    return False
