"""What docs/protocol.md states about identifiers is what the code computes.

Each identifier is computed here from the doc's own words with hashlib alone (no dna_core
helper), checked against the worked examples the doc prints, and against the code. A doc
that drops a byte of the formula (as it once dropped the label's length byte) or a code
change to the format fails here.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dna_core.crypto import primitives
from dna_core.mailbox import mailbox_id
from dna_core.overlay import name_key, record_key
from dna_core.wire import common_pb2

PROTOCOL_MD = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
FINGERPRINT = bytes(range(32))  # the doc's "fingerprint 000102…1f"


def doc_label(x: str) -> bytes:
    """label(x) as the doc defines it: u8(len(s)) || s, with s = "dna/v1/" + x."""
    s = f"dna/v1/{x}".encode("ascii")
    return bytes([len(s)]) + s


def doc_example(row_start: str) -> bytes:
    """The identifier in the doc's worked-example row that starts with ``row_start``."""
    match = re.search(
        rf"^\s*\| {re.escape(row_start)}.*\| `([0-9a-f]{{64}})` \|$", PROTOCOL_MD, re.M
    )
    assert match, f"docs/protocol.md has no example row {row_start!r}"
    return bytes.fromhex(match.group(1))


def test_the_doc_spells_out_the_mailbox_label_byte_by_byte() -> None:
    match = re.search(r'`label\("mailbox"\)` is the 15 bytes `([0-9a-f ]+)`', PROTOCOL_MD)
    assert match, 'docs/protocol.md no longer spells out label("mailbox")'
    spelled = bytes.fromhex(match.group(1))
    assert spelled == doc_label("mailbox") == primitives.label("mailbox")
    assert len(spelled) == 15 and spelled[0] == 14


def test_mailbox_id_as_the_doc_states_it() -> None:
    assert 'mailbox ID = `SHA-256(label("mailbox") || fingerprint)`' in PROTOCOL_MD
    by_the_doc = hashlib.sha256(doc_label("mailbox") + FINGERPRINT).digest()
    assert by_the_doc == doc_example("mailbox ID of fingerprint `000102…1f`")
    assert mailbox_id(FINGERPRINT) == by_the_doc


def test_record_keys_as_the_doc_states_them() -> None:
    assert "`SHA-256(label(kind) || fingerprint)` for kind `identity`" in PROTOCOL_MD
    identity = hashlib.sha256(doc_label("identity") + FINGERPRINT).digest()
    assert identity == doc_example("identity record key of that fingerprint")
    assert record_key(common_pb2.RECORD_KIND_IDENTITY, FINGERPRINT) == identity
    for kind, name in [
        (common_pb2.RECORD_KIND_PRESENCE, "presence"),
        (common_pb2.RECORD_KIND_KEY_ROTATION, "rotation"),
    ]:
        assert (
            record_key(kind, FINGERPRINT) == hashlib.sha256(doc_label(name) + FINGERPRINT).digest()
        )


def test_name_claim_key_as_the_doc_states_it() -> None:
    assert '`SHA-256(label("name") || normalized name)`' in PROTOCOL_MD
    by_the_doc = hashlib.sha256(doc_label("name") + b"alice").digest()
    assert by_the_doc == doc_example("name claim key of `alice`")
    assert name_key("Alice") == by_the_doc  # normalized: NFKC and casefold
