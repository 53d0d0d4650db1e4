"""An identity's private keys at rest: Argon2id (RFC 9106) then AES-256-GCM.

The file keeps the public key set in the clear (so the fingerprint shows without
the passphrase) and binds it, with the KDF parameters and salt, as associated
data: changing any of them makes decryption fail like a wrong passphrase would.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from dna_core.crypto import primitives as p
from dna_core.crypto.keys import SEEDS_SIZE, Identity, PublicKeySet
from dna_core.errors import MalformedError, VerificationError, WrongPassphraseError
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import keystore_pb2

KEYSTORE_VERSION = 1
KDF_ARGON2ID = 1
SALT_SIZE = 16
MAX_KEYSTORE_BYTES = 8192
# Caps a key file may ask for, so a crafted file cannot make us allocate or spin forever.
MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
MAX_ITERATIONS = 64
MAX_LANES = 16
_AAD_LABEL = p.label("keystore")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost. The default is RFC 9106's second recommendation (64 MiB, t=3, p=4)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        if not 1 <= self.lanes <= MAX_LANES:
            raise MalformedError(f"keystore: lanes {self.lanes} outside 1..{MAX_LANES}")
        if not 8 * self.lanes <= self.memory_kib <= MAX_MEMORY_KIB:
            raise MalformedError(
                f"keystore: memory {self.memory_kib} KiB outside the allowed range"
            )
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise MalformedError(
                f"keystore: iterations {self.iterations} outside 1..{MAX_ITERATIONS}"
            )

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        kdf = Argon2id(
            salt=salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(passphrase.encode())


def _aad(params: KdfParams, salt: bytes, public: PublicKeySet) -> bytes:
    return (
        _AAD_LABEL
        + struct.pack(
            ">BBIII",
            KEYSTORE_VERSION,
            KDF_ARGON2ID,
            params.memory_kib,
            params.iterations,
            params.lanes,
        )
        + salt
        + public.fingerprint
    )


def lock(identity: Identity, passphrase: str, params: KdfParams | None = None) -> bytes:
    """Encrypt the identity's seeds under ``passphrase``; returns the key file bytes."""
    params = params or KdfParams()
    params.check()
    salt, nonce = os.urandom(SALT_SIZE), os.urandom(p.AES_GCM_NONCE)
    key = params.derive(passphrase, salt)
    ciphertext = AESGCM(key).encrypt(nonce, identity.seeds(), _aad(params, salt, identity.public))
    msg = keystore_pb2.EncryptedIdentity(
        version=KEYSTORE_VERSION,
        kdf=keystore_pb2.KDF_ARGON2ID,
        memory_kib=params.memory_kib,
        iterations=params.iterations,
        lanes=params.lanes,
        salt=salt,
        nonce=nonce,
        public_keys=identity.public.to_proto(),
        ciphertext=ciphertext,
    )
    return encode_message(msg)


def read_public(data: bytes) -> PublicKeySet:
    """The public key set of a key file, without the passphrase."""
    return _decode(data)[0]


def unlock(data: bytes, passphrase: str) -> Identity:
    """Decrypt a key file. Raises WrongPassphraseError or MalformedError."""
    public, params, msg = _decode(data)
    key = params.derive(passphrase, msg.salt)
    try:
        seeds = AESGCM(key).decrypt(msg.nonce, msg.ciphertext, _aad(params, msg.salt, public))
    except InvalidTag:
        raise WrongPassphraseError("wrong passphrase (or the key file was altered)") from None
    identity = Identity(seeds)
    if identity.public != public:
        raise VerificationError("keystore: private keys do not match the stored public keys")
    return identity


def _decode(data: bytes) -> tuple[PublicKeySet, KdfParams, keystore_pb2.EncryptedIdentity]:
    msg = decode_message(
        keystore_pb2.EncryptedIdentity, data, max_size=MAX_KEYSTORE_BYTES, what="key file"
    )
    if msg.version != KEYSTORE_VERSION:
        raise MalformedError(f"key file: unknown version {msg.version}")
    if msg.kdf != keystore_pb2.KDF_ARGON2ID:
        raise MalformedError(f"key file: unknown KDF {msg.kdf}")
    if len(msg.salt) != SALT_SIZE or len(msg.nonce) != p.AES_GCM_NONCE:
        raise MalformedError("key file: salt or nonce has the wrong size")
    if len(msg.ciphertext) != SEEDS_SIZE + p.AES_GCM_TAG:
        raise MalformedError("key file: ciphertext has the wrong size")
    params = KdfParams(msg.memory_kib, msg.iterations, msg.lanes)
    params.check()
    return PublicKeySet.from_proto(msg.public_keys), params, msg
