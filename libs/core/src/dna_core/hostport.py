"""``host:port`` as text, the one way every display, log line, setting and gRPC target
writes it: an IPv6 address in brackets (RFC 3986 §3.2.2, as `parse_addr` and the seeds'
parser read it back), so ``[fd00::1]:7000`` and not ``fd00::1:7000``, whose port cannot
be told from the address."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """``host:port``, IPv6 in brackets (a host given in brackets already is kept)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
