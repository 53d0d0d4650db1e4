"""The one error the codec raises."""

from __future__ import annotations

from dna_core.errors import DnaError


class StunProtocolError(DnaError):
    """Bytes that are not a well-formed STUN message, ChannelData or attribute; ``reason`` is a
    short label for metrics (``malformed``, ``bad_fingerprint``, ``bad_attribute``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
