"""The error types of DNA Messenger, mapped to wire codes in one place.

``ProtocolError`` and its subclasses mean *the other side broke the contract*
(bytes from the network or a file that do not parse, verify or fit). Every
decoder in ``dna_core`` either returns a validated object or raises one of these,
never anything else. Each carries a human ``reason``, the gRPC status name an
adapter should answer with, and a ``kind``: a short stable token naming the refusal, which
adapters use as a metrics label (``reason`` is for people and varies; a label must not).
A class gives its default ``kind``; a raise site that knows better passes its own
(``MalformedError("blob too large: ...", kind="size")``).

``RemoteError`` and its subclasses mean *a call to another node failed*: the
clients (`dna_core.rpc_errors`) turn every gRPC failure into one of these, with
the status name the call ended with, so code above them never sees grpc types.
"""

from __future__ import annotations

import os
from pathlib import Path


class DnaError(Exception):
    """Base of every error raised on purpose by DNA Messenger code."""


def cannot_open(path: Path, exc: BaseException) -> DnaError:
    """The one-line reason a node cannot use a file it keeps its state in, with the likely
    cause when its directory is not writable (SQLite says only "unable to open database
    file" for a read-only mount)."""
    why = f"cannot open {path}: {exc}"
    directory = path.parent
    if directory.is_dir() and not os.access(directory, os.W_OK):
        why += f" ({directory} is not writable: a read-only file system, or another owner)"
    return DnaError(why)


class ProtocolError(DnaError):
    """Input from elsewhere is invalid; ``reason`` says why. Nothing was changed."""

    grpc_code = "INVALID_ARGUMENT"
    kind = "other"

    def __init__(self, reason: str, *, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if kind is not None:
            self.kind = kind


class MalformedError(ProtocolError):
    """The bytes do not decode: bad encoding, wrong sizes, unknown version, over a cap."""

    kind = "malformed"


class VerificationError(ProtocolError):
    """Decodes, but a signature, AEAD tag, fingerprint, key proof or proof of work fails."""

    grpc_code = "PERMISSION_DENIED"
    kind = "verification"


class ExpiredError(ProtocolError):
    """Outside its validity window (expired, or timestamped too far in the future)."""

    grpc_code = "FAILED_PRECONDITION"
    kind = "expired"


class ReplayError(ProtocolError):
    """Authentic, but already seen: a replay presented as new."""

    grpc_code = "ALREADY_EXISTS"
    kind = "replay"


class ConflictError(ProtocolError):
    """Valid, but loses to what is held: a lower sequence number, a name already taken."""

    grpc_code = "FAILED_PRECONDITION"
    kind = "conflict"


class CapacityError(ProtocolError):
    """Refused for lack of room or budget (store full, rate or quota exceeded)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "capacity"


class RemoteError(DnaError):
    """A call to another node failed; ``grpc_code`` is the gRPC status name it ended with
    and ``details`` what the node (or the transport) said. ``retry_after_ms`` (> 0) is the
    node's own word that it refused over a rate limit and when a retry will pass (the
    ``retry-after-ms`` trailer of a unary call, a session refusal's field); 0 otherwise."""

    def __init__(self, grpc_code: str, details: str, retry_after_ms: int = 0) -> None:
        super().__init__(f"{grpc_code}: {details}")
        self.grpc_code, self.details = grpc_code, details
        self.retry_after_ms = retry_after_ms


class UnavailableError(RemoteError):
    """The node did not answer, or could not serve now (down, timed out, cancelled, over
    its rate or capacity): another node, or the same one later, may succeed."""


class RefusedError(RemoteError):
    """The node answered and refused the request: asked again, it would refuse again."""


class ClosedError(DnaError):
    """A client (or its pool) was used after its ``close``: this caller broke the contract,
    no node did. Nothing was sent and no stream opened."""


class WrongPassphraseError(DnaError):
    """The passphrase does not open this key file (or the file was altered)."""
