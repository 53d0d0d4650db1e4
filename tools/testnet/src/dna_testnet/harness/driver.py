"""What every way of running nodes offers: a `Driver` acts on one node by name (start,
stop, kill -9, restart, pause, resume, wipe; its address, readiness and log), and a
`Cluster` is a topology's nodes on one driver.

Three drivers implement it: `LocalDriver` (OS processes on loopback addresses, for the
integration tests, the benches and `dna-testnet`), `ComposeDriver` (the containers of a
docker-compose project) and `KubernetesDriver` (pods of the Helm chart on a real cluster,
through kubectl). A test or a scenario written against `Cluster` and `Driver` runs on any
of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from dna_core.hostport import host_port

from dna_testnet.topology import GRPC_PORT, HTTP_PORT, UDP_PORT, NodeSpec, Topology

__all__ = ["Cluster", "Driver", "NodeAddress", "NotReadyError"]


@dataclass(frozen=True)
class NodeAddress:
    """Where a node is reached: a loopback IP (local), a service name on the compose
    network, or a pod's DNS name (Kubernetes); the standard ports unless told."""

    host: str
    udp_port: int = UDP_PORT
    grpc_port: int = GRPC_PORT
    http_port: int = HTTP_PORT

    @property
    def udp(self) -> tuple[str, int]:
        return (self.host, self.udp_port)

    @property
    def seed(self) -> str:
        """As a node's configuration lists a bootstrap node: ``host:udp_port``."""
        return host_port(self.host, self.udp_port)

    @property
    def grpc_target(self) -> str:
        return host_port(self.host, self.grpc_port)


class NotReadyError(RuntimeError):
    """Nodes did not turn ready in time, or one exited while starting."""


@runtime_checkable
class Driver(Protocol):
    """Acts on one node of a cluster by its name (a topology `NodeSpec.name`)."""

    def start(self, name: str) -> None:
        """Start the node (its configuration and disk as they are)."""

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """Graceful stop: SIGTERM, SIGKILL after ``timeout``."""

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, no cleanup."""

    def restart(self, name: str) -> None:
        """Graceful stop, then start."""

    def pause(self, name: str) -> None:
        """Freeze the node (SIGSTOP, `docker pause`): it holds its sockets and answers
        nothing, as a hung machine would."""

    def resume(self, name: str) -> None:
        """Thaw a paused node."""

    def wipe(self, name: str) -> None:
        """Lose the stopped node's disk (key, records, mailboxes): it starts as a new node."""

    def address(self, name: str) -> NodeAddress: ...

    def is_running(self, name: str) -> bool:
        """The node's process or container exists and has not exited."""

    def is_ready(self, name: str) -> bool:
        """The node answers /readyz with 200."""

    def logs(self, name: str) -> str:
        """What the node has logged so far."""


D = TypeVar("D", bound=Driver)


@dataclass
class Cluster(Generic[D]):
    """A topology's nodes, run by one driver."""

    topology: Topology
    driver: D

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.topology.nodes]

    @property
    def storage(self) -> list[str]:
        return [spec.name for spec in self.topology.storage]

    @property
    def bootstraps(self) -> list[str]:
        return [spec.name for spec in self.topology.bootstraps]

    def spec(self, name: str) -> NodeSpec:
        for spec in self.topology.nodes:
            if spec.name == name:
                return spec
        raise KeyError(f"no node {name!r} in this cluster: {', '.join(self.names)}")

    def address(self, name: str) -> NodeAddress:
        return self.driver.address(name)

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """The bootstrap nodes' overlay addresses, as clients take them."""
        return [self.address(name).udp for name in self.bootstraps]

    def start(self, names: Iterable[str] | None = None, timeout: float = 90.0) -> None:
        """Start ``names`` (every node by default) and wait until all are ready."""
        chosen = list(self.names if names is None else names)
        for name in chosen:
            self.driver.start(name)
        self.wait_ready(chosen, timeout)

    def wait_ready(self, names: Sequence[str] | None = None, timeout: float = 90.0) -> None:
        """Every node of ``names`` ready; one that exits meanwhile fails at once, with its log."""
        deadline = time.monotonic() + timeout
        pending = list(self.names if names is None else names)
        while pending:
            for name in list(pending):
                if not self.driver.is_running(name):
                    raise NotReadyError(f"{name} exited:\n{_tail(self.driver.logs(name))}")
                if self.driver.is_ready(name):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise NotReadyError(
                    f"not ready after {timeout:.0f} s: {pending}\n"
                    f"{_tail(self.driver.logs(pending[0]))}"
                )
            if pending:
                time.sleep(0.2)

    def kill_all(self) -> None:
        """SIGKILL every running node (the end of a test: nothing to wait for)."""
        for name in self.names:
            if self.driver.is_running(name):
                self.driver.kill(name)

    def stop_all(self, timeout: float = 15.0) -> None:
        for name in self.names:
            if self.driver.is_running(name):
                self.driver.stop(name, timeout)

    @contextmanager
    def running(self, timeout: float = 90.0) -> Iterator[Cluster[D]]:
        """Every node started and ready; every node killed at the end, whatever happened."""
        try:
            self.start(timeout=timeout)
            yield self
        finally:
            self.kill_all()


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])
