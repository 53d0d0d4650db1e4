"""A TCP relay: accepts connections on one address and relays each, both ways, over a new
connection of its own to an upstream address.

Nodes put one in front of their gRPC server (the "connection guard", docs/operations.md):
grpcio has no accept hook, so it cannot cap connections per source, and one address could
hold every connection the node allows. The relay asks its `ConnectionCaps` at accept and
closes a connection over a cap at once; the gRPC server listens on loopback behind it.
Benchmarks and tests use the same relay with ``upstream_source`` to make a client look as
if it came from another address (gRPC Python cannot bind a channel's source address).

The upstream sees the relay's own address, so the relay remembers which client each of its
upstream connections carries: `grpc_peer` turns gRPC's ``context.peer()`` of a relayed call
back into the client's address, for rate limits and logs.

Relaying is protocol-level (no StreamReader, no task per direction): what one socket
receives is written to the other in the same callback, and a side whose writes back up
pauses reading on the other side, so a client that does not read holds at most one write
buffer per direction. When either socket closes, the other is closed after what it still
has to send, or aborted after ``LINGER_S`` if its peer does not read. A client's half-close
is passed on to the upstream; the upstream's ends the link (servers do not half-close, and a
link kept half open would hold its client's slot for as long as the client likes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from dna_core.hostport import host_port
from dna_core.ops.connections import ConnectionCaps
from dna_core.ops.listen import tcp_listener
from dna_core.ratelimit import grpc_peer_ip

__all__ = ["UPSTREAM_UNREACHABLE", "TcpRelay"]

LINGER_S = 5.0  # how long a closed link may take to flush to a peer that reads slowly
# How long a closed link's client is still named by `grpc_peer`: gRPC may run a call whose
# bytes arrived before the close, and that call must see its client, not the relay.
FORGET_AFTER_S = 10.0
UPSTREAM_UNREACHABLE = "upstream_unreachable"  # the refusal reason when upstream is down
# Bytes a side buffers for a slow reader before it pauses the other side. asyncio's 64 KiB
# default would pause a bulk stream every few reads.
WRITE_BUFFER_HIGH = 256 * 1024
READ_SIZE = 256 * 1024  # the most one read takes from a socket

Address = tuple[str, int]


class _Side(asyncio.BufferedProtocol):
    """One socket of a link: writes what it receives to the other side's socket.

    It reads into its relay's one buffer (``received``) and hands the other side a copy of
    exactly what arrived. A plain Protocol costs far more: asyncio reads into a new 256 KiB
    bytes object each time, which glibc maps, shrinks and unmaps (mmap, mremap, munmap: three
    system calls a read, measured as half the relay's CPU per round trip)."""

    transport: asyncio.Transport
    other: _Side

    def __init__(self, received: memoryview, link: _Link | None = None) -> None:
        self.received, self.link = received, link
        # What arrived for this side before its socket was connected, and whether the
        # other side ended meanwhile: held until `flush_early`. (A client's first bytes can
        # beat the upstream connection: before Python 3.11.x a new transport starts reading
        # even when connection_made paused it, as Debian's 3.11.2 in our images does.)
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.received

    def buffer_updated(self, nbytes: int) -> None:
        # A copy: the transport may keep what it cannot send at once (Python 3.12+ keeps
        # the object itself), and the buffer is the next read's.
        self.other.send(bytes(self.received[:nbytes]))

    def send(self, data: bytes) -> None:
        """Write ``data`` to this side's socket, or hold it until the socket is connected
        (then the sender stops reading: one read at most is held)."""
        if hasattr(self, "transport"):
            self.transport.write(data)
        else:
            self.early.append(data)
            self.other.transport.pause_reading()

    def send_eof(self) -> None:
        if hasattr(self, "transport"):
            self.transport.write_eof()
        else:
            self.early_eof = True

    def flush_early(self) -> None:
        """Send what was held for this side, now that its socket is connected."""
        for data in self.early:
            self.transport.write(data)
        self.early.clear()
        if self.early_eof:
            self.transport.write_eof()

    def eof_received(self) -> bool:
        # The upstream ended: the link closes (after what is left reaches the client).
        # Kept half open, a client that never closes would hold its slot forever.
        return False

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.close()


class _Accepted(_Side):
    """The client's side: created by the listener, linked (or refused) once connected."""

    def __init__(self, relay: TcpRelay) -> None:
        super().__init__(relay.received)
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.accepted(self)

    def eof_received(self) -> bool:
        # The client's half-close is passed on: the upstream decides when the link ends.
        self.other.send_eof()
        return True


class _Link:
    """One relayed connection: the client's socket and the relay's own to upstream."""

    def __init__(self, relay: TcpRelay, client: _Accepted, address: Address) -> None:
        self.relay, self.client, self.address = relay, client, address
        self.upstream = _Side(relay.received, self)
        client.link, client.other, self.upstream.other = self, self.upstream, client
        self.upstream_end: Address | None = None
        self.closed = False
        # Nothing is read from the client until the upstream is connected and the client's
        # address is on record under the upstream port: grpc cannot see a byte before that.
        client.transport.pause_reading()
        self.connecting = asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: self.upstream, *self.relay.upstream, local_addr=self.relay.local_addr
            )
        except OSError:
            self.relay.refused(UPSTREAM_UNREACHABLE)
            self.close()
            return
        if self.closed:  # the client left while we connected
            self.upstream.transport.abort()
            return
        end = cast(Address, self.upstream.transport.get_extra_info("sockname")[:2])
        self.upstream_end = end
        self.relay.relaying(end, self)  # before any byte reaches grpc
        self.upstream.flush_early()
        self.client.transport.resume_reading()

    def abort(self) -> None:
        """Drop both sockets now, unflushed."""
        for side in (self.client, self.upstream):
            transport = getattr(side, "transport", None)
            if transport is not None:
                transport.abort()
        self.close()

    def close(self) -> None:
        """Either socket closed: close the other (once), release the client's slot."""
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        for side in (self.client, self.upstream):
            transport = getattr(side, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()  # after what is buffered is sent...
                loop.call_later(LINGER_S, transport.abort)  # ...by a peer that reads
        if not self.connecting.done():
            self.connecting.cancel()
        self.relay.closed(self)


def _upstream_end(peer: str) -> Address | None:
    """A gRPC peer string (``ipv4:127.0.0.1:P``) as the (address, port) it names, or None."""
    port = peer.rpartition(":")[2]
    return (grpc_peer_ip(peer), int(port)) if port.isascii() and port.isdigit() else None


class TcpRelay:
    """Relays connections accepted on ``host:port`` (`start`) to ``upstream``.

    ``caps``: refuse a connection over them (closed at once, ``on_refused(reason)`` told).
    ``upstream_source``: the local address upstream connections leave from.
    As an async context manager it listens on 127.0.0.1, an ephemeral port (`address`).
    """

    def __init__(
        self,
        upstream: Address,
        *,
        upstream_source: str | None = None,
        caps: ConnectionCaps | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.local_addr = None if upstream_source is None else (upstream_source, 0)
        self.caps = caps
        self._on_refused = on_refused
        self._server: asyncio.Server | None = None
        # every socket of this relay reads into this buffer: one event loop, one read at a time
        self.received = memoryview(bytearray(READ_SIZE))
        self._links: set[_Link] = set()
        # upstream end (our address, port) -> the client's address: see `grpc_peer`
        self._by_upstream_end: dict[Address, Address] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 1024) -> int:
        """Listen; returns the bound port. A bind failure raises ``OSError`` (the socket's
        own: "Address already in use")."""
        sock = tcp_listener(host, port, backlog=backlog)  # Nagle off on what it accepts
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Accepted(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        return self.port

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("TcpRelay is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """``host:port`` to dial instead of the upstream."""
        if self._server is None:
            raise RuntimeError("TcpRelay is not started")
        host = self._server.sockets[0].getsockname()[0]
        return host_port(host, self.port)

    @property
    def open(self) -> int:
        """Connections relayed (or connecting upstream) now."""
        return len(self._links)

    def grpc_peer(self, peer: str) -> str:
        """gRPC's peer of a call that came through this relay (``ipv4:127.0.0.1:P``, the
        relay's own upstream end) -> the client's (``ipv4:203.0.113.5:40000``); any other
        peer is returned as given."""
        end = _upstream_end(peer)
        client = None if end is None else self._by_upstream_end.get(end)
        if client is None:
            return peer
        host, client_port = client
        return f"ipv6:[{host}]:{client_port}" if ":" in host else f"ipv4:{host}:{client_port}"

    def cut(self, peer: str) -> bool:
        """Drop the relayed connection a gRPC call came in on (``peer``: the call's peer as
        grpc sees it, the relay's upstream end). For a client that leaves answers unread:
        grpc frees what it holds for a connection only once the connection ends. False if
        no such connection is open."""
        end = _upstream_end(peer)
        for link in self._links:
            if link.upstream_end == end:
                link.abort()
                return True
        return False

    # -- called by the links ---------------------------------------------------------------

    def accepted(self, client: _Accepted) -> None:
        address = cast(Address, client.transport.get_extra_info("peername")[:2])
        reason = None if self.caps is None else self.caps.admit(address[0])
        if reason is not None:
            client.transport.abort()  # no buffers, no reply: the descriptor back at once
            self.refused(reason)
            return
        self._links.add(_Link(self, client, address))

    def refused(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

    def relaying(self, upstream_end: Address, link: _Link) -> None:
        self._by_upstream_end[upstream_end] = link.address

    def closed(self, link: _Link) -> None:
        self._links.discard(link)
        if self.caps is not None:
            self.caps.release(link.address[0])
        if link.upstream_end is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(FORGET_AFTER_S, self._forget, link.upstream_end, link.address)

    def _forget(self, end: Address, client: Address) -> None:
        # Only this link's entry (the very tuple), not a newer link's on a reused port. Only
        # addresses wait here, not links: a churn of connections holds little memory.
        if self._by_upstream_end.get(end) is client:
            del self._by_upstream_end[end]

    # -- shutdown --------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening and cut every relayed connection. Idempotent."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
