"""People on a test network: profiles in a temporary directory, real `dna_peer` peers."""

from __future__ import annotations

import os
from pathlib import Path

from dna_core.crypto import Identity
from dna_peer.peer import Peer, open_peer
from dna_peer.profile import Profile

PASSPHRASE = "test passphrase"


class People:
    """Creates and reopens peers; names get a random suffix so tests sharing a network
    never collide on a name claim."""

    def __init__(self, root: Path, seeds: list[tuple[str, int]]) -> None:
        self.root, self.seeds = root, seeds
        self.suffix = os.urandom(3).hex()

    def name(self, who: str) -> str:
        return f"{who}-{self.suffix}"

    def profile(self, who: str) -> Profile:
        return Profile(self.root / who)

    async def new(self, who: str, *, publish: bool = True) -> Peer:
        self.profile(who).create(Identity.generate(), PASSPHRASE)
        peer = await self.open(who)
        if publish:
            await peer.publish(who.capitalize(), self.name(who))
        return peer

    async def open(self, who: str) -> Peer:
        return await open_peer(self.profile(who), PASSPHRASE, self.seeds)
