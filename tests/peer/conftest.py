"""A local testnet (3 bootstrap + 6 storage processes on 127.0.0.200-208) per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dna_testnet.network import Testnet
from process_mark import starts_processes


@pytest.fixture(scope="module")
@starts_processes
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testnet]:
    net = Testnet(tmp_path_factory.mktemp("testnet"), first=200)
    try:
        net.up()
        yield net
    finally:
        net.down()
