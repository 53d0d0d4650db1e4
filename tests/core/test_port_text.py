"""Ports and numbers read from text take ASCII digits only: ``str.isdigit`` also takes '²'
and other digits ``int()`` refuses, which turned a bad setting into a traceback."""

from __future__ import annotations

import pytest
from dna_core.errors import DnaError
from dna_core.overlay.aio.server import parse_addr
from dna_core.overlay.contact import Scope, address_scope
from dna_peer.network import parse_seeds


@pytest.mark.parametrize("port", ["²", "١٢", "7400²", "-1", "", "99999"])
def test_a_setting_with_a_port_that_is_not_ascii_digits_is_refused_by_name(port: str) -> None:
    with pytest.raises(ValueError, match=r"bootstrap: .* is not host:port"):
        parse_addr(f"10.0.0.1:{port}", key="bootstrap")
    with pytest.raises(DnaError, match="bootstrap address"):
        parse_seeds(f"10.0.0.1:{port}")


def test_ascii_ports_parse() -> None:
    assert parse_addr("[2001:db8::1]:7400") == ("2001:db8::1", 7400)
    assert parse_seeds("10.0.0.1:7400, [::1]:1") == [("10.0.0.1", 7400), ("::1", 1)]


@pytest.mark.parametrize("ip", ["1²7.0.0.1", "10.0.0.\u0661", "1.2.3.4²"])
def test_an_ipv4_address_with_other_digits_is_martian_not_an_error(ip: str) -> None:
    assert address_scope(ip) is Scope.MARTIAN
