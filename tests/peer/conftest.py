"""A local testnet (3 bootstrap + 6 storage processes, on addresses from the harness's
allocator) per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster import free_ips
from dna_testnet.network import Testnet
from process_mark import starts_processes


@pytest.fixture(scope="module")
@starts_processes
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testnet]:
    net = Testnet(tmp_path_factory.mktemp("testnet"), addresses=free_ips(9))
    try:
        net.up()
        yield net
    finally:
        net.down()
