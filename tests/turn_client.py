"""A minimal sans-I/O STUN/TURN client over our codec, for driving the server core in tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dna_stun import attributes as attr
from dna_stun.message import Class, Message, Method, encode, long_term_key, parse

Addr = tuple[str, int]


@dataclass
class Client:
    username: str
    password: str
    realm: str = ""
    nonce: bytes = b""
    sha256: bool = False
    last_tid: bytes = field(default=b"")

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def request(
        self,
        method: int,
        attributes: list[tuple[int, bytes]] | None = None,
        *,
        peers: tuple[Addr, ...] = (),
        auth: bool = True,
    ) -> bytes:
        """A request; ``peers`` become XOR-PEER-ADDRESS attributes (XORed with its ID)."""
        self.last_tid = os.urandom(12)
        attrs = list(attributes or [])
        attrs += [(attr.XOR_PEER_ADDRESS, attr.encode_xor_address(p, self.last_tid)) for p in peers]
        if auth and self.nonce:
            attrs += [
                (attr.USERNAME, self.username.encode()),
                (attr.REALM, self.realm.encode()),
                (attr.NONCE, self.nonce),
            ]
            return encode(method, Class.REQUEST, self.last_tid, attrs, key=self.key,
                          sha256=self.sha256)  # fmt: skip
        return encode(method, Class.REQUEST, self.last_tid, attrs)

    def learn(self, response: bytes) -> Message:
        """Parse a response; a 401/438 teaches the realm and nonce."""
        message = parse(response)
        realm, nonce = message.get(attr.REALM), message.get(attr.NONCE)
        if realm is not None and nonce is not None:
            self.realm, self.nonce = realm.decode(), nonce
        return message

    def allocate_attrs(self) -> list[tuple[int, bytes]]:
        return [(attr.REQUESTED_TRANSPORT, attr.requested_transport())]


def error_code(message: Message) -> int | None:
    value = message.get(attr.ERROR_CODE)
    return None if value is None else attr.decode_error_code(value)[0]


def is_success(message: Message, method: int) -> bool:
    return message.cls == Class.SUCCESS and message.method == method


__all__ = ["Client", "Method", "error_code", "is_success"]
