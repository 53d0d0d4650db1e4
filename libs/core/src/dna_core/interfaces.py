"""This host's interface addresses (ifaddr), as text: what a STUN/TURN relay listening on a
wildcard counts as its own, and what a device gathers ICE host candidates on."""

from __future__ import annotations

import ifaddr

__all__ = ["interface_addresses"]


def interface_addresses() -> list[str]:
    """Every address of every interface, IPv6 ones with their zone if ifaddr gives one."""
    return [
        ip.ip if isinstance(ip.ip, str) else ip.ip[0]  # ifaddr gives IPv6 as (ip, flow, scope)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
    ]
