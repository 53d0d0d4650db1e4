"""Address-validation tokens (BEP 5's `token`, QUIC's address validation).

A token proves that whoever sends a request can receive at the address it
claims: it was mailed there earlier. token = HMAC-SHA256(secret, epoch || ip ||
port)[:16], accepted for the current and the previous epoch, so nothing has to
be remembered per address.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

TOKEN_SIZE = 16


class AddressTokens:
    def __init__(self, secret: bytes, *, epoch_s: float = 300.0) -> None:
        self._secret = secret
        self._epoch_s = epoch_s

    def issue(self, addr: tuple[str, int], now: float) -> bytes:
        return self._mac(addr, int(now // self._epoch_s))

    def valid(self, token: bytes, addr: tuple[str, int], now: float) -> bool:
        if len(token) != TOKEN_SIZE:
            return False
        epoch = int(now // self._epoch_s)
        return any(hmac.compare_digest(token, self._mac(addr, e)) for e in (epoch, epoch - 1))

    def _mac(self, addr: tuple[str, int], epoch: int) -> bytes:
        ip, port = addr
        msg = struct.pack(">qH", epoch, port) + ip.encode()
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:TOKEN_SIZE]
