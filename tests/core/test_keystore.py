"""Private keys at rest: Argon2id + AES-256-GCM, clear errors, bounded parameters."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity, keystore
from dna_core.crypto.keystore import KdfParams
from dna_core.errors import MalformedError, WrongPassphraseError
from dna_core.wire import encode_message
from dna_core.wire.gen.dna.v1 import keystore_pb2

FAST = KdfParams(memory_kib=1024, iterations=1, lanes=1)  # tests only: real files use 64 MiB


def test_round_trip_and_public_part_without_passphrase(alice: Identity) -> None:
    data = keystore.lock(alice, "s3cret", FAST)
    assert keystore.read_public(data) == alice.public
    assert keystore.unlock(data, "s3cret").seeds() == alice.seeds()
    assert alice.seeds() not in data


def test_default_parameters_are_rfc9106_second_recommendation() -> None:
    assert KdfParams() == KdfParams(memory_kib=65536, iterations=3, lanes=4)


def test_wrong_passphrase_fails_cleanly(alice: Identity) -> None:
    data = keystore.lock(alice, "s3cret", FAST)
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        keystore.unlock(data, "S3cret")
    with pytest.raises(WrongPassphraseError):
        keystore.unlock(data, "")


@pytest.mark.parametrize("field", ["salt", "nonce", "ciphertext", "iterations", "memory_kib"])
def test_altered_file_fails_like_a_wrong_passphrase(alice: Identity, field: str) -> None:
    msg = keystore_pb2.EncryptedIdentity.FromString(keystore.lock(alice, "pw", FAST))
    value = getattr(msg, field)
    if isinstance(value, bytes):
        setattr(msg, field, bytes([value[0] ^ 1]) + value[1:])
    else:
        setattr(msg, field, value + 1)
    with pytest.raises(WrongPassphraseError):
        keystore.unlock(encode_message(msg), "pw")


def test_swapped_public_keys_are_detected(alice: Identity, bob: Identity) -> None:
    msg = keystore_pb2.EncryptedIdentity.FromString(keystore.lock(alice, "pw", FAST))
    msg.public_keys.CopyFrom(bob.public.to_proto())
    with pytest.raises(WrongPassphraseError):  # the fingerprint is in the associated data
        keystore.unlock(encode_message(msg), "pw")


@pytest.mark.parametrize(
    ("memory_kib", "iterations", "lanes"),
    [(2 * 1024 * 1024, 1, 1), (1024, 65, 1), (1024, 1, 17), (4, 1, 1), (1024, 0, 1)],
)
def test_parameters_beyond_the_caps_are_refused_before_deriving(
    alice: Identity, memory_kib: int, iterations: int, lanes: int
) -> None:
    msg = keystore_pb2.EncryptedIdentity.FromString(keystore.lock(alice, "pw", FAST))
    msg.memory_kib, msg.iterations, msg.lanes = memory_kib, iterations, lanes
    with pytest.raises(MalformedError):
        keystore.unlock(encode_message(msg), "pw")


def test_unknown_version_or_kdf_is_refused(alice: Identity) -> None:
    for field, value in (("version", 2), ("kdf", 7)):
        msg = keystore_pb2.EncryptedIdentity.FromString(keystore.lock(alice, "pw", FAST))
        setattr(msg, field, value)
        with pytest.raises(MalformedError, match="unknown"):
            keystore.read_public(encode_message(msg))
