"""Key material as text: `dna identity export` prints it, `dna identity import` reads it.

    -----BEGIN DNA PUBLIC KEY SET-----
    fingerprint: 3fa2...
    <base64, 64 characters a line>
    -----END DNA PUBLIC KEY SET-----

Safe to print on a terminal, paste in a mail or keep next to other backups; the bytes
inside are exactly the binary formats of `docs/crypto.md` (a public key set, or a key file
still locked under its passphrase).
"""

from __future__ import annotations

import base64
import binascii
import re

from dna_core.errors import MalformedError

PUBLIC = "DNA PUBLIC KEY SET"
LOCKED_KEY_FILE = "DNA LOCKED KEY FILE"
_BLOCK = re.compile(
    r"-----BEGIN (?P<kind>[A-Z ]+)-----\n(?P<body>.*?)\n-----END (?P=kind)-----", re.S
)


def armor(kind: str, data: bytes, fingerprint: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    return "\n".join([f"-----BEGIN {kind}-----", f"fingerprint: {fingerprint.hex()}", *lines,
                      f"-----END {kind}-----", ""])  # fmt: skip


def dearmor(text: bytes) -> tuple[str, bytes]:
    """(kind, bytes) of the first armored block in ``text``; MalformedError if none."""
    match = _BLOCK.search(text.decode("utf-8", errors="replace").replace("\r\n", "\n"))
    if match is None:
        raise MalformedError("no -----BEGIN DNA ...----- block")
    body = "".join(line for line in match["body"].splitlines() if ":" not in line)
    try:
        return match["kind"], base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"the {match['kind']} block is not valid base64") from None


def is_armored(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN DNA ")
