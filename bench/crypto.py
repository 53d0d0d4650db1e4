"""The crypto suite against the raw ``cryptography`` calls it is made of.

``uv run python -m bench.crypto [--rounds R] [--n N] [--quick]``

Each figure runs our function and a baseline that makes the same primitive calls
directly, with the same keys and the same input sizes, taking turns every few calls
within each round (see ``bench.harness.measure``). The baseline is what a minimal
hand-written implementation must pay: besides the listed calls it serializes the
ephemeral X25519 key (seal), parses the received one (open) and joins the signature
into the plaintext, but has no protobuf, headers, replay guard or checks.

* ``crypto.seal``    envelope.seal, 256-byte payload, sender keys not included
                     vs ML-KEM-768 encapsulate + X25519 keygen/exchange + HKDF + HKDFExpand
                     + ML-DSA-65 sign + Ed25519 sign + AES-256-GCM encrypt
* ``crypto.open``    envelope.open_envelope (new ReplayGuard per call, resolver returns a
                     cached PublicKeySet) vs ML-KEM decapsulate + X25519 exchange + HKDF
                     + HKDFExpand + AES-GCM decrypt + ML-DSA-65 verify + Ed25519 verify
* ``crypto.sign``    signature.sign, 256-byte message vs ML-DSA-65 sign + Ed25519 sign
* ``crypto.verify``  signature.verify vs ML-DSA-65 verify + Ed25519 verify (parsed keys)
* ``crypto.pow_verify``  pow.verify of a 16-bit proof vs one SHA-256 of the same input size

Throughputs in ops/s (ratio = ours / baseline, target >= 0.8 for seal/open/sign/verify),
plus p50/p99 latencies in µs (ratio = baseline / ours) except for pow_verify, whose
~1 µs calls are timed in a tight loop only.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from dna_core.crypto import envelope, kem, signature
from dna_core.crypto import pow as pow_
from dna_core.crypto import primitives as p
from dna_core.crypto.envelope import ReplayGuard
from dna_core.crypto.keys import SEEDS_SIZE, Identity, PublicKeySet

from bench import harness

PAYLOAD_SIZE = 256
POW_DIFFICULTY = 16
SIGN_DOMAIN = b"bench"
CRYPTOGRAPHY = "cryptography"  # the baseline's name in the JSON lines
SHA256 = "hashlib.sha256"
Op = harness.Op

# Operations per round: (default, --quick). Sized for a ~35 s default run on 2 cores.
# Seal and sign get the most calls: ML-DSA signing is hedged and rejection-sampled, so one
# call takes anywhere from ~0.3 to ~2 ms (coefficient of variation ~0.7), and a round must
# average that out; open and verify are steady.
SIZES: dict[str, tuple[int, int]] = {
    "seal": (800, 10),
    "open": (600, 20),
    "sign": (800, 10),
    "verify": (800, 20),
    "pow_verify": (50_000, 500),
}


def seeded_identity(name: str) -> Identity:
    """Deterministic keys (as in tests/conftest.py), so runs use the same identities."""
    return Identity(hashlib.shake_256(f"dna-bench-identity/{name}".encode()).digest(SEEDS_SIZE))


def _filler(size: int, tag: bytes) -> bytes:
    """Deterministic stand-in bytes of a given size."""
    return hashlib.shake_256(tag).digest(size)


@dataclass
class Fixture:
    """Keys, inputs and sizes shared by the figures (built once, outside the timing)."""

    sender: Identity
    recipient: Identity
    sender_public: PublicKeySet  # the cached key set the resolver returns
    now_ms: int
    payload: bytes
    envelope: bytes
    signed_size: int  # the hybrid-signature transcript inside an envelope
    aead_info_size: int
    aead_plaintext_size: int
    kem_ikm_tail_size: int  # combiner input after the two shared secrets


def make_fixture() -> Fixture:
    sender, recipient = seeded_identity("alice"), seeded_identity("bob")
    now_ms = harness.now_ms()
    payload = _filler(PAYLOAD_SIZE, b"payload")
    env = envelope.seal(sender, recipient.public, payload, now_ms=now_ms)
    # Sizes of what the suite feeds its primitives (private helpers: the exact layouts).
    header = envelope.Header(recipient.fingerprint, now_ms, bytes(envelope.MESSAGE_ID_SIZE))
    signed = signature._transcript(
        envelope._SIG_DOMAIN, envelope._signed_bytes(header, sender.fingerprint, payload)
    )
    return Fixture(
        sender=sender,
        recipient=recipient,
        sender_public=sender.public,
        now_ms=now_ms,
        payload=payload,
        envelope=env,
        signed_size=len(signed),
        aead_info_size=len(envelope._AEAD_INFO + header.transcript()),
        aead_plaintext_size=len(envelope.decode_envelope(env).ciphertext) - p.AES_GCM_TAG,
        kem_ikm_tail_size=2 * p.X25519_PUBLIC + p.ML_KEM_768_CIPHERTEXT + p.ML_KEM_768_PUBLIC,
    )


@dataclass
class Figure:
    """One comparison: our operation, its baselines, and what goes into ``params``."""

    ours: Op
    baselines: dict[str, Op]
    params: dict[str, Any]
    per_call: bool = True  # time calls one by one (p50/p99); off for ~1 µs operations


def _raw_envelope_ops(fx: Fixture) -> tuple[Op, Op, dict[str, Any]]:
    """Seal and open made of raw ``cryptography`` calls only, on the same keys and sizes.

    What the suite adds on top (protobuf encoding and canonical decoding, header and
    transcript building, the replay guard, checks) is exactly what the ratio measures.
    """
    kem_public = fx.recipient.public.ml_kem_key()
    x_public = fx.recipient.public.x25519_key()
    kem_private, x_private = fx.recipient.ml_kem, fx.recipient.x25519
    dsa, ed = fx.sender.ml_dsa, fx.sender.ed25519
    dsa_public, ed_public = fx.sender_public.ml_dsa_key(), fx.sender_public.ed25519_key()
    salt = kem._COMBINER_SALT
    ikm_tail = _filler(fx.kem_ikm_tail_size, b"ikm-tail")
    info = _filler(fx.aead_info_size, b"aead-info")
    aad = _filler(envelope.HEADER_SIZE, b"aad")
    message = _filler(fx.signed_size, b"signed")
    rest = _filler(fx.aead_plaintext_size - p.HYBRID_SIGNATURE_SIZE, b"plaintext")
    key_nonce = 32 + p.AES_GCM_NONCE

    def raw_seal() -> tuple[bytes, bytes, bytes]:
        ss_pq, ct_pq = kem_public.encapsulate()
        ephemeral = X25519PrivateKey.generate()
        ct_x = ephemeral.public_key().public_bytes_raw()
        ss_x = ephemeral.exchange(x_public)
        shared = HKDF(hashes.SHA256(), 32, salt=salt, info=b"").derive(ss_pq + ss_x + ikm_tail)
        okm = HKDFExpand(hashes.SHA256(), key_nonce, info=info).derive(shared)
        plaintext = dsa.sign(message) + ed.sign(message) + rest
        return ct_pq, ct_x, AESGCM(okm[:32]).encrypt(okm[32:], plaintext, aad)

    sealed = raw_seal()

    def raw_open() -> bytes:
        ct_pq, ct_x, ciphertext = sealed
        ss_pq = kem_private.decapsulate(ct_pq)
        ss_x = x_private.exchange(X25519PublicKey.from_public_bytes(ct_x))
        shared = HKDF(hashes.SHA256(), 32, salt=salt, info=b"").derive(ss_pq + ss_x + ikm_tail)
        okm = HKDFExpand(hashes.SHA256(), key_nonce, info=info).derive(shared)
        plaintext = AESGCM(okm[:32]).decrypt(okm[32:], ciphertext, aad)
        dsa_public.verify(plaintext[: p.ML_DSA_65_SIGNATURE], message)
        ed_public.verify(plaintext[p.ML_DSA_65_SIGNATURE : p.HYBRID_SIGNATURE_SIZE], message)
        return plaintext

    raw_open()  # the baseline must really decrypt and verify
    sizes = {
        "payload_bytes": PAYLOAD_SIZE,
        "envelope_bytes": len(fx.envelope),
        "signed_bytes": fx.signed_size,
        "aead_plaintext_bytes": fx.aead_plaintext_size,
    }
    return raw_seal, raw_open, sizes


def seal_and_open(fx: Fixture) -> dict[str, Figure]:
    raw_seal, raw_open, sizes = _raw_envelope_ops(fx)
    sender, recipient_public = fx.sender, fx.recipient.public

    def ours_seal() -> bytes:
        return envelope.seal(sender, recipient_public, fx.payload, now_ms=fx.now_ms)

    def resolve(_fingerprint: bytes) -> PublicKeySet:
        return fx.sender_public

    def ours_open() -> envelope.OpenedMessage:
        # A new guard per call: the same envelope is opened again and again, which a
        # shared guard would refuse as a replay. Its cost is part of ours.
        return envelope.open_envelope(
            fx.envelope,
            fx.recipient,
            now_ms=fx.now_ms,
            replay_guard=ReplayGuard(),
            resolve_sender=resolve,
        )

    if ours_open().payload != fx.payload:
        raise AssertionError("open_envelope did not give the payload back")
    return {
        "seal": Figure(
            ours_seal, {CRYPTOGRAPHY: raw_seal}, {**sizes, "include_sender_keys": False}
        ),
        "open": Figure(
            ours_open, {CRYPTOGRAPHY: raw_open}, {**sizes, "replay_guard": "new per call"}
        ),
    }


def sign_and_verify(fx: Fixture) -> dict[str, Figure]:
    sender, public = fx.sender, fx.sender_public
    message = _filler(PAYLOAD_SIZE, b"message")
    transcript = signature._transcript(SIGN_DOMAIN, message)  # what both halves sign
    dsa, ed = sender.ml_dsa, sender.ed25519
    dsa_public, ed_public = public.ml_dsa_key(), public.ed25519_key()
    hybrid = signature.sign(sender, SIGN_DOMAIN, message)
    sig_pq, sig_ed = hybrid[: p.ML_DSA_65_SIGNATURE], hybrid[p.ML_DSA_65_SIGNATURE :]

    def ours_sign() -> bytes:
        return signature.sign(sender, SIGN_DOMAIN, message)

    def raw_sign() -> tuple[bytes, bytes]:
        return dsa.sign(transcript), ed.sign(transcript)

    def ours_verify() -> None:
        signature.verify(public, SIGN_DOMAIN, message, hybrid)

    def raw_verify() -> None:
        dsa_public.verify(sig_pq, transcript)
        ed_public.verify(sig_ed, transcript)

    ours_verify()  # both must accept
    raw_verify()
    params = {"message_bytes": PAYLOAD_SIZE, "signed_bytes": len(transcript)}
    return {
        "sign": Figure(ours_sign, {CRYPTOGRAPHY: raw_sign}, params),
        "verify": Figure(ours_verify, {CRYPTOGRAPHY: raw_verify}, params),
    }


def pow_verify(fx: Fixture) -> dict[str, Figure]:
    payload_hash = hashlib.sha256(b"bench pow payload").digest()
    proof, _attempts = pow_.solve(payload_hash, POW_DIFFICULTY, now_ms=fx.now_ms)
    hashed = _filler(len(pow_._LABEL) + len(payload_hash) + 8 + 8, b"pow-input")
    sha256 = hashlib.sha256

    def ours() -> None:
        pow_.verify(proof, payload_hash, required=POW_DIFFICULTY, now_ms=fx.now_ms)

    def raw() -> bytes:
        return sha256(hashed).digest()

    ours()
    params = {"difficulty": POW_DIFFICULTY, "hashed_bytes": len(hashed)}
    return {"pow_verify": Figure(ours, {SHA256: raw}, params, per_call=False)}


BUILDERS: tuple[Callable[[Fixture], dict[str, Figure]], ...] = (
    seal_and_open,
    sign_and_verify,
    pow_verify,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.arg_parser(__doc__.splitlines()[0] if __doc__ else "crypto benchmark")
    args = parser.parse_args(argv)
    rounds = harness.rounds_from(args)
    harness.print_machine()
    started = time.perf_counter()
    fx = make_fixture()
    for build in BUILDERS:
        for name, figure in build(fx).items():
            n = harness.n_from(args, *SIZES[name])
            result = harness.measure(
                figure.ours, n, baselines=figure.baselines, rounds=rounds, per_call=figure.per_call
            )
            harness.report_comparison(
                f"crypto.{name}",
                result,
                n,
                figure.params,
                rounds=rounds,
                latencies=figure.per_call,
            )
    print(f"bench.crypto: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
