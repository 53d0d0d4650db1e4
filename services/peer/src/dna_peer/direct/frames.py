"""Datagram fragmentation for the direct channel (sans-I/O).

Handshake messages carry post-quantum keys and signatures (~7.6 KB) and a message may
be up to 192 KiB, while a UDP datagram through NATs and TURN relays should stay under
the path MTU. So every unit the channel sends (a handshake message or a sealed record)
is cut into fragments of at most ``FRAGMENT_BYTES``, each a datagram:

    kind (1) | transfer ID (4, big-endian) | index (2) | count (2) | chunk

and put back together by ``Reassembler``, which holds a bounded number of unfinished
units (the oldest is dropped first) and refuses a fragment longer than ``FRAGMENT_BYTES``
(a datagram may carry 64 KiB), so a flood of fragments costs at most
``MAX_PENDING * MAX_FRAGMENTS * FRAGMENT_BYTES`` (4.5 MB) per channel.
Fragments carry no integrity of their own: the reassembled unit is authenticated by the
channel (signatures in the handshake, AEAD on records).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from dna_core.errors import MalformedError

HELLO, WELCOME, RECORD = 1, 2, 3
KINDS = frozenset({HELLO, WELCOME, RECORD})
FRAGMENT_BYTES = 1100  # + 9 header + IP/UDP/TURN framing stays under a 1280-byte path MTU
MAX_FRAGMENTS = 256  # 281 KB: a 192 KiB envelope and its framing fit
MAX_PENDING = 16  # unfinished units held at once
_HEADER = struct.Struct(">BIHH")


@dataclass(frozen=True)
class Unit:
    kind: int
    transfer: int
    data: bytes


def fragment(kind: int, transfer: int, data: bytes) -> list[bytes]:
    """``data`` as datagrams; raises ``MalformedError`` if it cannot be sent as one unit."""
    chunks = [data[i : i + FRAGMENT_BYTES] for i in range(0, len(data), FRAGMENT_BYTES)] or [b""]
    if len(chunks) > MAX_FRAGMENTS:
        raise MalformedError(f"direct: a unit of {len(data)} bytes is over the fragment cap")
    return [_HEADER.pack(kind, transfer, i, len(chunks)) + c for i, c in enumerate(chunks)]


class Reassembler:
    def __init__(self) -> None:
        self._pending: OrderedDict[tuple[int, int], dict[int, bytes]] = OrderedDict()
        self._counts: dict[tuple[int, int], int] = {}

    def add(self, datagram: bytes) -> Unit | None:
        """The unit this fragment completes, if any; raises ``MalformedError`` on a
        fragment that cannot be one of ours."""
        if len(datagram) < _HEADER.size:
            raise MalformedError("direct: datagram shorter than a fragment header")
        kind, transfer, index, count = _HEADER.unpack_from(datagram)
        if kind not in KINDS or not 0 < count <= MAX_FRAGMENTS or index >= count:
            raise MalformedError("direct: fragment header out of range")
        if len(datagram) - _HEADER.size > FRAGMENT_BYTES:  # ours are cut at FRAGMENT_BYTES
            raise MalformedError(f"direct: a fragment of {len(datagram)} bytes is over the cap")
        key = (kind, transfer)
        if self._counts.setdefault(key, count) != count:
            raise MalformedError("direct: fragment count differs from earlier fragments")
        parts = self._pending.setdefault(key, {})
        parts[index] = datagram[_HEADER.size :]
        if len(parts) < count:
            self._evict_over_cap()
            return None
        del self._pending[key], self._counts[key]
        return Unit(kind, transfer, b"".join(parts[i] for i in range(count)))

    def _evict_over_cap(self) -> None:
        while len(self._pending) > MAX_PENDING:
            key, _ = self._pending.popitem(last=False)
            self._counts.pop(key, None)
