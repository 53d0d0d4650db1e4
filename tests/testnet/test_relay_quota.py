"""The testnets' STUN/TURN relay: every peer signs in as the one testnet user, so that
user's allocation quota is the relay's whole capacity, not one person's 10."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from dna_stun.config import StunServiceConfig
from dna_testnet.topology import stun_toml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            # (a configuration read, nothing bound: a documentation address, not one of
            # the harness's loopback addresses)
            stun_toml("192.0.2.11", http_host="192.0.2.11", allowed_peers=("192.0.2.0/24",)),
            id="local",
        ),
        pytest.param((ROOT / "deploy/compose/nodes/stun1.toml").read_text(), id="compose"),
    ],
)
def test_the_shared_testnet_user_may_hold_every_allocation(text: str) -> None:
    relay = StunServiceConfig.model_validate(tomllib.loads(text)).relay
    assert relay.max_allocations_per_user >= relay.max_allocations
