"""`dna-stun`'s configuration: TOML + ``DNA_STUN__SECTION__KEY`` variables."""

from __future__ import annotations

import ipaddress
import resource
from typing import Annotated

from dna_core.ops.config import (
    ConfigModel,
    LogLevelSetting,
    OpsSection,
    Port,
    Secret,
    SecretStr,
    Strings,
)
from pydantic import Field, Strict, field_validator, model_validator

from dna_stun import attributes as attr
from dna_stun.auth import DEFAULT_MAX_CREDENTIAL_LIFETIME_S, Nonces
from dna_stun.policy import DEFAULT_DENIED

__all__ = ["ENV_PREFIX", "AuthSection", "RelaySection", "ServerSection", "StunServiceConfig"]

ENV_PREFIX = "DNA_STUN"
# Bounds of values that go on the wire: a setting past them would start a server whose every
# answer failed to encode (an internal error per request), so they are refused at load.
UINT32_MAX = 0xFFFFFFFF  # LIFETIME (RFC 8656 section 18.2)
# REALM (RFC 8489 allows 127 characters) goes in every 401, which the relay keeps under three
# times the request it answers (dna_stun.core.MAX_UNPROVEN_GROWTH). The smallest request a 401
# must answer is a bare Refresh, 20 bytes (RFC 8656 requires no attribute of it), so its 401
# may be 60: header 20, ERROR-CODE without its phrase 8, NONCE 12 (dna_stun.auth.Nonces) leave
# 20 for REALM, whose value is then at most 16 bytes. A longer realm left such a client
# unanswered.
MAX_REALM_BYTES = 16
MAX_NONCE_LIFETIME_S = Nonces.MAX_LIFETIME_S  # a day
# A nonce's expiry is whole seconds: one valid under a second was stale when issued, and one
# valid for less than a client's round trip and retry is stale when the retry comes back, so
# every signed request got 438 and no allocation was ever made.
MIN_NONCE_LIFETIME_S = 10.0
MAX_CREDENTIAL_LIFETIME_S = 365 * 86_400  # a credential valid longer is a static user
SecretStrings = Annotated[tuple[SecretStr, ...], Strict(False)]


class ServerSection(ConfigModel):
    """Where the server listens and relays."""

    host: str = "127.0.0.1"
    """The address clients reach the STUN/TURN port at; the UDP socket binds here (a wildcard
    such as 0.0.0.0 needs `relay_host`)."""
    udp_port: Port = 3478
    """The STUN/TURN port (3478 is STUN's)."""
    host_ipv6: str = ""
    """An IPv6 address to listen on as well (the same `udp_port`) when `host` is IPv4: one
    socket per address answers from the address a client used. (A wildcard `::` serves
    both families on one socket, but the kernel picks the source of each answer: right
    only on a host with one address per family.)"""
    relay_host: str = ""
    """The address relay sockets bind to and clients are told; unset: `host`."""
    relay_host_ipv6: str = ""
    """An IPv6 address for the relays of allocations that ask for one (RFC 8656
    REQUESTED-ADDRESS-FAMILY), beside an IPv4 `relay_host` (or `host`); unset: relays of
    the one family of `relay_host`. An allocation that does not ask gets IPv4 (refused
    with 440 when there is no IPv4 relay address), as RFC 8656 section 7.2 requires."""
    relay_port_min: Port = 49152
    """Lowest relay port (RFC 8656 suggests the dynamic range 49152-65535)."""
    relay_port_max: Port = 65535
    """Highest relay port."""

    @field_validator("host", "host_ipv6", "relay_host", "relay_host_ipv6")
    @classmethod
    def _is_ip(cls, value: str) -> str:
        if not value:
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:  # a name would be resolved by nobody: the relay binds the address
            raise ValueError(
                f"{value!r} is not an IP address: set the address clients reach (the relay "
                "binds it, and tells it to clients in every relayed address)"
            ) from None
        return value

    @model_validator(mode="after")
    def _range(self) -> ServerSection:
        if not 0 < self.relay_port_min <= self.relay_port_max:
            raise ValueError("relay_port_min must be 1..relay_port_max")
        # Clients are told the relay address: a wildcard would tell them nothing.
        if ipaddress.ip_address(self.relay_ip()).is_unspecified:
            raise ValueError("relay_host must be an address clients reach (host is a wildcard)")
        if self.host_ipv6:
            listen6 = ipaddress.ip_address(self.host_ipv6)
            if listen6.version != 6 or listen6.is_unspecified:
                raise ValueError("host_ipv6 must be an IPv6 address clients reach")
            if ipaddress.ip_address(self.host).version == 6:
                raise ValueError("host_ipv6 is set: host must be IPv4")
        if self.relay_host_ipv6:
            ip6 = ipaddress.ip_address(self.relay_host_ipv6)
            if ip6.version != 6 or ip6.is_unspecified:
                raise ValueError("relay_host_ipv6 must be an IPv6 address clients reach")
            if ipaddress.ip_address(self.relay_ip()).version == 6:
                raise ValueError("relay_host_ipv6 is set: relay_host (or host) must be IPv4")
        return self

    def relay_ip(self) -> str:
        return self.relay_host or self.host

    def relay_ips(self) -> dict[int, str]:
        """The relay address of each family (`attr.FAMILY_IPV4`, `attr.FAMILY_IPV6`)."""
        main = self.relay_ip()
        ips = {
            attr.FAMILY_IPV6 if ipaddress.ip_address(main).version == 6 else attr.FAMILY_IPV4: main
        }
        if self.relay_host_ipv6:
            ips[attr.FAMILY_IPV6] = self.relay_host_ipv6
        return ips


class AuthSection(ConfigModel):
    """Long-term credentials (RFC 8489 9.2): static users and/or a shared secret."""

    # maxLength (characters, at most the bytes) lets the chart's schema refuse most long
    # realms at `helm lint` rather than in a crash-looping pod; the validator counts bytes.
    realm: str = Field(
        default="dna", min_length=1, json_schema_extra={"maxLength": MAX_REALM_BYTES}
    )
    """The realm clients hash into their key, 1-16 bytes (UTF-8): it is in every 401, and an
    answer to an unauthenticated request is at most three times its size, so a longer realm
    would leave the smallest request to challenge (a bare Refresh, 20 bytes) unanswered."""
    users: Annotated[SecretStrings, Secret()] = ()
    """Static users, each "name:password"."""
    auth_secret: SecretStr = SecretStr("")
    """Time-limited credentials (coturn's use-auth-secret): a username "<expiry-unix>:<name>"
    with password base64(HMAC-SHA1(auth_secret, username)) is valid until its expiry."""
    previous_auth_secret: SecretStr = SecretStr("")
    """During a rotation, the secret before `auth_secret`, still accepted."""
    max_credential_lifetime_s: int = Field(
        default=DEFAULT_MAX_CREDENTIAL_LIFETIME_S, ge=60, le=MAX_CREDENTIAL_LIFETIME_S
    )
    """The furthest ahead a time-limited username's expiry may be (seconds from now, at most
    a year; 5 minutes more are allowed for the clock of the service minting credentials to
    run ahead): one expiring later is refused (401 "Credential Lifetime Too Long", counted
    `lifetime_too_long`), as a credential nobody can revoke short of rotating the secret.
    The service minting credentials must hand out lifetimes up to this; it is also how long
    a rotated-out `previous_auth_secret` must stay."""
    nonce_lifetime_s: float = Field(default=600.0, ge=MIN_NONCE_LIFETIME_S, le=MAX_NONCE_LIFETIME_S)
    """Seconds a nonce stays valid (10 s to a day); then the client gets 438 and retries."""

    @field_validator("realm")
    @classmethod
    def _realm(cls, realm: str) -> str:
        if len(realm.encode()) > MAX_REALM_BYTES:
            raise ValueError(
                f"the realm is {len(realm.encode())} bytes (UTF-8), at most {MAX_REALM_BYTES}: "
                "it goes in every 401 challenge, which must fit three times the smallest "
                "request (a bare Refresh, 20 bytes) or that client is never answered; choose "
                "a shorter realm "
                '(e.g. "dna" or your domain\'s first label); clients learn it from the 401'
            )
        return realm

    @field_validator("users")
    @classmethod
    def _users(cls, users: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        names = [user.reveal().partition(":")[0] for user in users]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # one of the passwords would silently stop working
            raise ValueError(f"user names listed twice: {', '.join(twice)}")
        for user in users:
            name, colon, password = user.reveal().partition(":")
            if not name or not colon or not password:
                raise ValueError('each user is "name:password"')
            if len(name.encode()) > attr.MAX_USERNAME_BYTES:  # no USERNAME could carry it
                raise ValueError(f"a user name is at most {attr.MAX_USERNAME_BYTES} bytes")
        return users

    def user_passwords(self) -> dict[str, str]:
        return dict(u.reveal().split(":", 1) for u in self.users)

    def secrets(self) -> list[str]:
        return [s.reveal() for s in (self.auth_secret, self.previous_auth_secret) if s.reveal()]


class RelaySection(ConfigModel):
    """Allocations: their lifetimes, quotas, bandwidth, and where they may relay to."""

    default_lifetime_s: int = Field(default=600, ge=60, le=UINT32_MAX)
    """An allocation's lifetime unless the client asks for longer (RFC 8656: 600)."""
    max_lifetime_s: int = Field(default=3600, ge=60, le=UINT32_MAX)
    """The longest lifetime granted per request (RFC 8656: 3600)."""
    max_allocations: int = Field(default=1000, ge=1)
    """Allocations at once in total; then 508."""
    max_allocations_per_user: int = Field(default=10, ge=1)
    """Allocations at once per username; then 486."""
    max_permissions: int = Field(default=64, ge=1)
    """Peer addresses one allocation may have permissions for."""
    max_channels: int = Field(default=64, ge=1, le=4096)
    """Channel bindings one allocation may hold, then 508 (RFC 8656 allows 4096, ~300 bytes
    each in the relay: 1.2 MB an allocation, 1.2 GB at 1000 allocations)."""
    bandwidth_bytes_per_s: int = Field(default=1_000_000, ge=0)
    """Relayed bytes per second per allocation, both directions; 0: no cap."""
    allowed_peers: Strings = ()
    """CIDRs relaying may reach even though they are denied by default (test networks only,
    e.g. "127.0.0.0/8"); the server's own listening port is never allowed."""
    denied_peers: Strings = ()
    """CIDRs refused on top of the defaults (private, loopback, link-local, multicast, ...)."""

    @field_validator("allowed_peers", "denied_peers")
    @classmethod
    def _cidrs(cls, cidrs: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f'{cidr!r} is not an address or network: write one as "10.0.0.0/8", '
                    '"2001:db8::/32" or "192.0.2.7"'
                ) from None
        return cidrs

    @model_validator(mode="after")
    def _lifetimes(self) -> RelaySection:
        if self.default_lifetime_s > self.max_lifetime_s:
            raise ValueError("default_lifetime_s must not exceed max_lifetime_s")
        return self

    def denied(self) -> tuple[str, ...]:
        return DEFAULT_DENIED + self.denied_peers


class StunServiceConfig(ConfigModel):
    """A STUN/TURN node's configuration."""

    server: ServerSection = ServerSection()
    auth: AuthSection = AuthSection()
    relay: RelaySection = RelaySection()
    ops: OpsSection = OpsSection()
    log_level: LogLevelSetting = "info"
    """Log lines below this level are dropped (any case: "INFO" is "info")."""


# Descriptors besides the relay sockets: the listening sockets, ops HTTP connections, logs.
OTHER_DESCRIPTORS = 64


def config_warnings(config: StunServiceConfig, open_files_limit: int | None = None) -> list[str]:
    """Settings that work but are most likely a mistake on a public node.
    ``open_files_limit``: what the node raises its own to (default: the hard limit)."""
    warnings = []
    if open_files_limit is None:
        open_files_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    needed = config.relay.max_allocations + OTHER_DESCRIPTORS  # a relay socket each
    if open_files_limit != resource.RLIM_INFINITY and needed > open_files_limit:
        warnings.append(
            f"[relay] max_allocations = {config.relay.max_allocations} needs about {needed} "
            f"file descriptors (a relay socket each) but the open-files limit is "
            f"{open_files_limit}: past it allocations are refused (508) and the ops endpoints "
            "cannot accept connections; raise the hard limit (systemd LimitNOFILE) or lower "
            "max_allocations"
        )
    if not config.auth.users and not config.auth.secrets():
        warnings.append(
            "no [auth] users or auth_secret: every TURN request will be refused; set "
            'auth_secret (time-limited credentials) or users = ["name:password"]'
        )
    warnings += _rotation_warnings(config.auth)
    ports = config.server.relay_port_max - config.server.relay_port_min + 1
    if ports < config.relay.max_allocations:  # a relay port each, per relay address
        warnings.append(
            f"the relay port range {config.server.relay_port_min}-"
            f"{config.server.relay_port_max} holds {ports} ports, fewer than max_allocations = "
            f"{config.relay.max_allocations}: past them allocations are refused (508, "
            "no_relay_port), each after trying to bind many taken ports; widen the range "
            "(and the firewall's) or lower [relay] max_allocations"
        )
    if config.relay.allowed_peers:
        warnings.append(
            f"[relay] allowed_peers opens {', '.join(config.relay.allowed_peers)} to relaying: "
            "for test networks only"
        )
    if ipaddress.ip_address(config.server.host).is_loopback and not config.relay.allowed_peers:
        warnings.append(
            f"server.host is {config.server.host}: other machines cannot reach it; set "
            "[server] host to the address clients reach"
        )
    return warnings


def _rotation_warnings(auth: AuthSection) -> list[str]:
    """A secret rotation half done: the relay works, but not as the operator meant."""
    current, previous = auth.auth_secret.reveal(), auth.previous_auth_secret.reveal()
    if previous and not current:
        return [
            "[auth] previous_auth_secret is set but auth_secret is not: only credentials of "
            "the old secret work; set the new secret in auth_secret"
        ]
    if previous and previous == current:
        return [
            "[auth] previous_auth_secret is auth_secret: the rotation has not happened; set "
            "auth_secret to the new secret"
        ]
    return []
