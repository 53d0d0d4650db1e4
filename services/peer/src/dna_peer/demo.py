"""`dna demo`: what exists today, end to end in one process.

Two identities are made, bob's is locked at rest and reopened, alice publishes a
signed identity record, pays proof of work for a mailbox write, seals a message
to bob; bob opens it; a replay and a tampered copy are refused. Sizes and timings
are printed at each step. No network: `dna-testnet demo` runs the networked flow
(a testnet, a mailbox, presence and the direct path).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

from dna_core.crypto import (
    Identity,
    ReplayGuard,
    keystore,
    open_envelope,
    open_record,
    pow,
    seal,
    sign_record,
)
from dna_core.crypto.primitives import sha256
from dna_core.errors import ProtocolError
from dna_core.overlay import record_key
from dna_core.wire import common_pb2, envelope_pb2, records_pb2

T = TypeVar("T")
POW_BITS = 16


class _Out:
    """Where the demo reports: lines for people, or (``--json``) one JSON object a line:
    {"step", "ms"} per timed step, {"note"} per detail, {"refused", "error"} per attack
    turned away, {"complete": true} at the end."""

    json = False

    @classmethod
    def say(cls, text: str, **fields: object) -> None:
        if cls.json:
            print(json.dumps(fields or {"note": text.strip()}), flush=True)
        else:
            print(text, flush=True)


def _step(title: str, fn: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = fn()
    ms = 1000 * (time.perf_counter() - started)
    _Out.say(f"  {title:<58} {ms:8.2f} ms", step=title, ms=round(ms, 3))
    return result


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def run_demo(*, as_json: bool = False) -> None:
    _Out.json = as_json
    _Out.say(
        "DNA Messenger v2 demo: post-quantum sealed envelopes"
        " (ML-KEM-768+X25519, ML-DSA-65+Ed25519)\n"
    )
    alice = _step("alice creates an identity", Identity.generate)
    bob = _step("bob creates an identity", Identity.generate)
    _Out.say(f"    alice {alice.fingerprint.hex()[:32]}…  bob {bob.fingerprint.hex()[:32]}…")
    _Out.say(f"    public key set: {len(bob.public.encode())} bytes, fingerprint 32 bytes")

    locked = _step(
        "bob locks his keys (Argon2id 64 MiB, AES-256-GCM)",
        lambda: keystore.lock(bob, "correct horse"),
    )
    bob = _step(
        "bob unlocks them with his passphrase", lambda: keystore.unlock(locked, "correct horse")
    )
    _Out.say(f"    key file: {len(locked)} bytes")

    payload = records_pb2.IdentityRecord(display_name="alice")
    record = _step(
        "alice signs her identity record",
        lambda: sign_record(
            alice,
            kind=common_pb2.RECORD_KIND_IDENTITY,
            key=record_key(common_pb2.RECORD_KIND_IDENTITY, alice.fingerprint),
            seq=1,
            now_ms=_now_ms(),
            ttl_ms=86_400_000,
            payload=payload.SerializeToString(),
        ),
    )
    _step("anyone verifies it", lambda: open_record(record, now_ms=_now_ms()))
    _Out.say(f"    signed record: {len(record)} bytes")

    text = envelope_pb2.Payload(
        text=envelope_pb2.Text(body="Hello Bob, this is post-quantum.")
    ).SerializeToString()
    envelope = _step(
        "alice seals a message to bob (first contact: keys inside)",
        lambda: seal(alice, bob.public, text, now_ms=_now_ms(), include_sender_keys=True),
    )
    later = _step(
        "alice seals a second one (keys already known)",
        lambda: seal(alice, bob.public, text, now_ms=_now_ms()),
    )
    _Out.say(
        f"    envelope: {len(envelope)} bytes first contact, {len(later)} bytes after;"
        f" payload {len(text)} bytes"
    )
    proof, attempts = _step(
        f"alice pays {POW_BITS}-bit proof of work for the mailbox write",
        lambda: pow.solve(sha256(envelope), POW_BITS, now_ms=_now_ms()),
    )
    _step(
        "a storage node verifies the proof (one hash)",
        lambda: pow.verify(proof, sha256(envelope), required=POW_BITS, now_ms=_now_ms()),
    )
    _Out.say(f"    {attempts} hashes tried")

    guard = ReplayGuard()
    opened = _step(
        "bob opens and verifies it",
        lambda: open_envelope(envelope, bob, now_ms=_now_ms(), replay_guard=guard),
    )
    body = envelope_pb2.Payload.FromString(opened.payload).text.body
    _Out.say(
        f"    from {opened.sender.fingerprint.hex()[:32]}…"
        f" (alice: {opened.sender == alice.public}): {body!r}"
    )

    tampered = bytearray(later)
    tampered[len(tampered) // 2] ^= 0x01
    for title, data in (
        ("the same envelope replayed", envelope),
        ("a copy with one flipped bit", bytes(tampered)),
    ):
        try:
            open_envelope(
                data,
                bob,
                now_ms=_now_ms(),
                replay_guard=guard,
                resolve_sender={alice.fingerprint: alice.public}.get,
            )
        except ProtocolError as exc:
            _Out.say(f"  refused: {title:<44} ({type(exc).__name__}: {exc.reason})",
                     refused=title, error=f"{type(exc).__name__}: {exc.reason}")  # fmt: skip
        else:
            raise SystemExit(f"demo failed: {title} was accepted")
    _Out.say("\ndemo complete", complete=True)
