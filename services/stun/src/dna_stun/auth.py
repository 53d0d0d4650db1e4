"""Long-term credentials (RFC 8489 section 9.2): static users, time-limited shared-secret users,
and the server's nonces.

Time-limited credentials are coturn's ``use-auth-secret`` (the "TURN REST API" draft): an
operator's service hands a client ``username = "<expiry-unix>:<user>"`` and
``password = base64(HMAC-SHA1(secret, username))``; the server recomputes the password from the
username, so it needs no user database, and refuses the username once its expiry has passed,
or while its expiry is further ahead than the longest lifetime the operator allows (a credential
valid for years is a static password that nobody can revoke short of rotating the secret).

Nonces are stateless: the expiry and an HMAC over (expiry, client IP) under a key only this
process knows, so a flood of unauthenticated requests costs no memory, a nonce from another
client address is refused, and a restart makes every old nonce stale (clients retry on 438).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable, Mapping

from dna_stun.message import long_term_key

__all__ = [
    "CLOCK_SKEW_S",
    "DEFAULT_MAX_CREDENTIAL_LIFETIME_S",
    "Credentials",
    "Nonces",
    "auth_secret_password",
    "time_limited",
    "userhash",
]

# "<expiry-unix>:<name>": ASCII digits only (``str.isdigit`` also takes "²" or "٣", which
# ``int`` refuses or reads), at most 12 of them (the year 33658: no overflow anywhere).
_TIME_LIMITED = re.compile(r"([0-9]{1,12}):(.*)", re.DOTALL)


def time_limited(username: str) -> tuple[int, str] | None:
    """(expiry, name) of a time-limited username ``"<expiry-unix>:<name>"``, else None."""
    match = _TIME_LIMITED.fullmatch(username)
    return None if match is None else (int(match[1]), match[2])


def auth_secret_password(secret: str, username: str) -> str:
    """The password of a time-limited username (coturn's use-auth-secret)."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def userhash(username: str, realm: str) -> bytes:
    """USERHASH: SHA-256(username ":" realm) (RFC 8489 section 14.4)."""
    return hashlib.sha256(f"{username}:{realm}".encode()).digest()


DEFAULT_MAX_CREDENTIAL_LIFETIME_S = 86_400  # a day: the TURN REST API draft's suggested ttl
# How far the clock of the service minting credentials may run ahead of the relay's: a
# credential minted with exactly the maximum lifetime is then still accepted.
CLOCK_SKEW_S = 300


class Credentials:
    """The keys a username's messages may be signed with, or why there are none:
    ``unknown_user``, ``expired_credential`` or ``lifetime_too_long`` (a time-limited
    username whose expiry is more than ``max_lifetime`` seconds ahead, and ``CLOCK_SKEW_S``)."""

    def __init__(
        self,
        realm: str,
        users: Mapping[str, str],
        auth_secrets: Iterable[str] = (),
        max_lifetime: float = DEFAULT_MAX_CREDENTIAL_LIFETIME_S,
    ) -> None:
        self.realm = realm
        self.max_lifetime = max_lifetime
        self._keys = {user: long_term_key(user, realm, pw) for user, pw in users.items()}
        self._by_hash = {userhash(user, realm): user for user in users}
        self._secrets = tuple(s for s in auth_secrets if s)

    def keys_for(self, username: str, now: float) -> tuple[list[bytes], str]:
        static = self._keys.get(username)
        if static is not None:
            return [static], ""
        parsed = time_limited(username)
        if not self._secrets or parsed is None:
            return [], "unknown_user"
        if parsed[0] <= now:
            return [], "expired_credential"
        if parsed[0] - now > self.max_lifetime + CLOCK_SKEW_S:
            return [], "lifetime_too_long"
        # One key per configured secret: an operator rotates by adding the new secret before
        # the old one's last credentials expire; the integrity check finds which one signed.
        return [
            long_term_key(username, self.realm, auth_secret_password(secret, username))
            for secret in self._secrets
        ], ""

    def user_for_hash(self, hashed: bytes) -> str | None:
        """The static user behind a USERHASH (time-limited users cannot be found so: their
        username is not known in advance)."""
        return self._by_hash.get(hashed)


class Nonces:
    """Issues and checks nonces bound to a client IP and valid for ``lifetime`` seconds
    (at most ``MAX_LIFETIME_S``).

    A nonce is 8 characters (base64url of 6 bytes): the low 16 bits of its expiry (whole
    seconds) and 32 bits of HMAC over the whole expiry and the client IP. Short, because it
    goes in every 401, and a 401 may go to a forged source: the relay sends no answer of more
    than three times an unproven request (``dna_stun.core.MAX_UNPROVEN_GROWTH``), and the
    smallest request a 401 must answer is a bare 20-byte Refresh (RFC 8656 section 7.3 asks
    for no attribute): 60 bytes, of which the header, ERROR-CODE and NONCE leave 20 for the
    realm. The checker finds the full expiry again: the times after ``now`` and at most
    ``lifetime`` ahead that end in those 16 bits (one, or two for a lifetime over 18 hours),
    and takes the one the HMAC verifies. 32 bits of HMAC are enough here: a forged nonce is
    worth something only with a password's key, and its guesses cannot be seen (the answers
    go to the address the nonce is bound to)."""

    MAX_LIFETIME_S = 86_400.0

    def __init__(self, lifetime: float, key: bytes | None = None) -> None:
        if not 0 < lifetime <= self.MAX_LIFETIME_S:
            raise ValueError(f"a nonce lifetime is over 0 and at most {self.MAX_LIFETIME_S} s")
        self.lifetime = lifetime
        self._key = key if key is not None else secrets.token_bytes(32)

    def _mac(self, expiry: int, client_ip: str) -> bytes:
        return hmac.new(self._key, f"{expiry}|{client_ip}".encode(), hashlib.sha256).digest()[:4]

    def issue(self, client_ip: str, now: float) -> str:
        expiry = int(now + self.lifetime)
        raw = (expiry & 0xFFFF).to_bytes(2, "big") + self._mac(expiry, client_ip)
        return base64.urlsafe_b64encode(raw).decode()

    def check(self, nonce: str, client_ip: str, now: float) -> bool:
        # ASCII only: b64decode raises ValueError on other text (a client's NONCE).
        if len(nonce) != 8 or not nonce.isascii():
            return False
        try:
            raw = base64.b64decode(nonce, altchars=b"-_", validate=True)
        except binascii.Error:
            return False
        low, mac = int.from_bytes(raw[:2], "big"), raw[2:]
        first = math.floor(now) + 1  # the earliest expiry still valid: now < expiry
        expiry = first + (low - first) % 0x10000
        while expiry <= now + self.lifetime:
            if hmac.compare_digest(mac, self._mac(expiry, client_ip)):
                return True
            expiry += 0x10000
        return False
