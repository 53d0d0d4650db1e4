"""The one address allocator: every node a test, a bench or `dna-testnet` starts on this
machine gets its loopback address here, never from a literal picked by hand.

Linux routes all of 127.0.0.0/8 to the loopback interface, so each node has an address
of its own and keeps the standard ports (UDP 7400, gRPC 7401, HTTP 7480), as it would on
its own machine. An allocator hands out each address once; it skips any address on which
something already listens (a testnet of `dna-testnet up`, another test run, a bench),
so two runs in one network namespace do not start nodes on top of each other.

Compose containers need no allocator: a container's address is its service name on the
compose network (`ComposeDriver.address`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator

from dna_testnet.topology import GRPC_PORT, HTTP_PORT, UDP_PORT

__all__ = ["LOOPBACK", "AddressesExhaustedError", "LoopbackAllocator", "address_free"]

LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")


class AddressesExhaustedError(RuntimeError):
    """No free address is left in the allocator's range."""


def address_free(ip: str) -> bool:
    """Nothing listens on ``ip``'s node ports now: the overlay's UDP port, the gRPC and
    HTTP TCP ports. SO_REUSEADDR, as the nodes themselves bind: a closed connection
    lingering in TIME_WAIT does not make an address busy, a listener does."""
    wanted = ((socket.SOCK_DGRAM, UDP_PORT), (socket.SOCK_STREAM, GRPC_PORT),
              (socket.SOCK_STREAM, HTTP_PORT))  # fmt: skip
    for kind, port in wanted:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError:
                return False
    return True


class LoopbackAllocator:
    """Distinct loopback addresses from ``first`` to ``last`` (inclusive), in order, each
    handed out once, skipping addresses whose host byte is 0 or 255 (read as network and
    broadcast addresses by people, if not by the kernel) and addresses already in use."""

    def __init__(self, first: str, last: str = "127.255.255.254", *, probe: bool = True):
        self.first, self.last = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
        for bound in (self.first, self.last):
            if bound not in LOOPBACK_NET:
                raise ValueError(f"{bound} is not a loopback address (127.0.0.0/8)")
        if self.first > self.last:
            raise ValueError(f"first address {first} is after last address {last}")
        self.probe = probe
        self._next = self.first
        self._lock = threading.Lock()

    def take(self, count: int) -> list[str]:
        """``count`` addresses never handed out before by this allocator and free now."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._lock:
            return [self._take_one() for _ in range(count)]

    def one(self) -> str:
        return self.take(1)[0]

    def _take_one(self) -> str:
        for candidate in self._candidates():
            ip = str(candidate)
            if not self.probe or address_free(ip):
                return ip
        raise AddressesExhaustedError(f"no free loopback address left in {self.first}-{self.last}")

    def _candidates(self) -> Iterator[ipaddress.IPv4Address]:
        while self._next <= self.last:
            candidate = self._next
            self._next += 1
            if candidate.packed[-1] not in (0, 255):
                yield candidate


def _process_block() -> str:
    """Where this process's addresses start: a /16 of 127.0.0.0/8 picked by PID (127.1-
    127.200), so concurrent runs (a test run and a bench, two sessions' test runs) start
    apart instead of racing for the same first addresses; 127.0.0.x is left to
    `dna-testnet up`'s fixed addresses."""
    return f"127.{1 + os.getpid() % 200}.0.1"


LOOPBACK = LoopbackAllocator(_process_block())
"""The process's allocator: tests, benches and tools of one process all take from it."""
