"""Cross-implementation checks of ML-KEM-768 (FIPS 203) and ML-DSA-65 (FIPS 204).

The messenger itself uses only ``cryptography`` (OpenSSL-backed, version >= 47) for its
post-quantum primitives. This module cross-checks that implementation against two independent
pure-Python reference implementations from PyPI:

* ``kyber-py`` (module ``kyber_py.ml_kem``) for ML-KEM, and
* ``dilithium-py`` (module ``dilithium_py.ml_dsa``) for ML-DSA.

Both references are *test-only* dev dependencies: they are slow, not constant-time and not
hardened, and product code must never import them. They are here purely as independent oracles so
that a wrong parameter set, a byte-order slip, a swapped return tuple or a mis-handled context
string in the production path shows up as a disagreement between two codebases.

What is checked:

* ML-KEM-768: the same 64-byte seed ``d || z`` yields byte-identical encapsulation keys and
  interchangeable decapsulation keys; encapsulation in one implementation decapsulates in the
  other, in both directions; and the implicit-rejection value for a tampered ciphertext is the
  same in both (and equals ``J(z || c)`` computed here with ``hashlib``).
* ML-DSA-65: the same 32-byte seed ``xi`` yields byte-identical public keys; signatures verify
  across implementations in both directions, with an empty and a non-empty context string; and a
  wrong context, a wrong message or a single flipped signature byte is rejected by both.

Fixed seeds keep the main cases reproducible; small Hypothesis properties (few examples, as the
references are pure Python) add random seeds, messages, contexts and tamper positions.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
from dilithium_py.ml_dsa import ML_DSA_65
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from kyber_py.ml_kem import ML_KEM_768

# --- FIPS 203 / FIPS 204 sizes -------------------------------------------------------------------

MLKEM_SEED_LEN = 64  # d || z
MLKEM768_EK_LEN = 1184  # 384 * k + 32, k = 3
MLKEM768_DK_LEN = 2400  # 768 * k + 96 (expanded form, as kyber-py stores it)
MLKEM768_CT_LEN = 1088  # 32 * (du * k + dv)
MLKEM_SS_LEN = 32

MLDSA_SEED_LEN = 32  # xi
MLDSA65_PK_LEN = 1952
MLDSA65_SIG_LEN = 3309

# Hypothesis: the references are pure Python (a few ms to ~100 ms per operation), so keep the
# example count small; no deadline (timing varies by machine); no example database on disk; and no
# shrinking: random key/seed bytes do not shrink to anything more readable, and shrinking through
# the slow references would turn one failure into minutes of runtime (the failing example is still
# reported verbatim).
PROPERTY_SETTINGS = settings(
    max_examples=8,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
)

# --- fixed inputs --------------------------------------------------------------------------------

KEM_SEEDS: list[bytes] = [
    bytes(MLKEM_SEED_LEN),
    bytes(range(MLKEM_SEED_LEN)),
    b"\xff" * MLKEM_SEED_LEN,
    hashlib.sha3_512(b"dna-messenger/tests/pq-interop/mlkem768").digest(),
]
DSA_SEEDS: list[bytes] = [
    bytes(MLDSA_SEED_LEN),
    bytes(range(MLDSA_SEED_LEN)),
    b"\xff" * MLDSA_SEED_LEN,
    hashlib.sha3_256(b"dna-messenger/tests/pq-interop/mldsa65").digest(),
]
SEED_IDS = ["zeros", "counting", "ones", "sha3-derived"]
# Encapsulation randomness m for the reference's deterministic (internal) encapsulation.
ENCAPS_RANDOMNESS = hashlib.sha3_256(b"dna-messenger/tests/pq-interop/encaps-m").digest()

MESSAGE = b"DNA Messenger v2 interop test message \x00\x01\x02\xff"
CONTEXTS: list[bytes] = [b"", b"dna-messenger/v2/identity-sig"]
CONTEXT_IDS = ["empty-context", "non-empty-context"]

# Ciphertext positions to tamper with: first byte (in u), last byte of u, first and last of v.
CT_FLIP_POSITIONS = [0, 959, 960, MLKEM768_CT_LEN - 1]
# Signature positions: c~ (first byte), z (first / middle), hint area (first byte and last byte,
# the latter being a hint offset).
SIG_FLIP_POSITIONS = [0, 48, 1700, MLDSA65_SIG_LEN - 61, MLDSA65_SIG_LEN - 1]


# --- helpers -------------------------------------------------------------------------------------


def flip_byte(data: bytes, index: int, mask: int = 0xFF) -> bytes:
    """Return ``data`` with the byte at ``index`` XOR-ed with the non-zero ``mask``."""
    assert mask != 0
    tampered = bytearray(data)
    tampered[index] ^= mask
    return bytes(tampered)


def other_context(ctx: bytes) -> bytes:
    """A context string that differs from ``ctx`` (and is still at most 255 bytes)."""
    if not ctx:
        return b"\x00"
    return ctx[:-1] + bytes([ctx[-1] ^ 0x01])


def ref_kem_keys(seed: bytes) -> tuple[bytes, bytes]:
    """kyber-py key derivation from the 64-byte seed ``d || z``: (ek, expanded dk)."""
    ek, dk = ML_KEM_768.key_derive(seed)
    return bytes(ek), bytes(dk)


def ref_kem_encaps(ek: bytes, m: bytes | None = None) -> tuple[bytes, bytes]:
    """kyber-py encapsulation: (shared secret, ciphertext); deterministic when ``m`` is given."""
    if m is None:
        key, ct = ML_KEM_768.encaps(ek)
    else:
        key, ct = ML_KEM_768._encaps_internal(ek, m)
    return bytes(key), bytes(ct)


def ref_kem_decaps(dk: bytes, ct: bytes) -> bytes:
    return bytes(ML_KEM_768.decaps(dk, ct))


def fips203_j(z: bytes, ct: bytes) -> bytes:
    """FIPS 203 J(z || c) = SHAKE256(z || c, 32 bytes): the implicit-rejection key."""
    return hashlib.shake_256(z + ct).digest(MLKEM_SS_LEN)


def ref_dsa_keys(seed: bytes) -> tuple[bytes, bytes]:
    """dilithium-py key derivation from the 32-byte seed ``xi``: (pk, expanded sk)."""
    pk, sk = ML_DSA_65.key_derive(seed)
    return bytes(pk), bytes(sk)


def ref_dsa_sign(sk: bytes, msg: bytes, ctx: bytes, *, deterministic: bool = False) -> bytes:
    return bytes(ML_DSA_65.sign(sk, msg, ctx=ctx, deterministic=deterministic))


def ref_dsa_verifies(pk: bytes, msg: bytes, sig: bytes, ctx: bytes) -> bool:
    result = ML_DSA_65.verify(pk, msg, sig, ctx=ctx)
    assert isinstance(result, bool)
    return result


def crypto_dsa_verifies(pk: bytes, msg: bytes, sig: bytes, ctx: bytes) -> bool:
    public_key = mldsa.MLDSA65PublicKey.from_public_bytes(pk)
    try:
        public_key.verify(sig, msg, context=ctx)
    except InvalidSignature:
        return False
    return True


# --- ML-KEM-768 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", KEM_SEEDS, ids=SEED_IDS)
def test_mlkem768_same_seed_gives_identical_encapsulation_key(seed: bytes) -> None:
    crypto_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    ref_ek, _ = ref_kem_keys(seed)

    crypto_ek = crypto_key.public_key().public_bytes_raw()
    assert crypto_key.private_bytes_raw() == seed
    assert len(crypto_ek) == MLKEM768_EK_LEN
    assert crypto_ek == ref_ek


@pytest.mark.parametrize("seed", KEM_SEEDS, ids=SEED_IDS)
def test_mlkem768_same_seed_gives_interchangeable_decapsulation_keys(seed: bytes) -> None:
    crypto_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    ref_ek, ref_dk = ref_kem_keys(seed)
    assert len(ref_dk) == MLKEM768_DK_LEN

    # A secret cryptography encapsulates to its own key is recovered by the reference's dk...
    shared_secret, ciphertext = crypto_key.public_key().encapsulate()
    assert crypto_key.decapsulate(ciphertext) == shared_secret
    assert ref_kem_decaps(ref_dk, ciphertext) == shared_secret

    # ...and one the reference encapsulates to its own ek is recovered by cryptography's key.
    ref_secret, ref_ciphertext = ref_kem_encaps(ref_ek, ENCAPS_RANDOMNESS)
    assert ref_kem_decaps(ref_dk, ref_ciphertext) == ref_secret
    assert crypto_key.decapsulate(ref_ciphertext) == ref_secret


@pytest.mark.parametrize("seed", KEM_SEEDS, ids=SEED_IDS)
def test_mlkem768_cryptography_encapsulates_reference_decapsulates(seed: bytes) -> None:
    ref_ek, ref_dk = ref_kem_keys(seed)
    public_key = mlkem.MLKEM768PublicKey.from_public_bytes(ref_ek)

    shared_secret, ciphertext = public_key.encapsulate()  # documented order: (secret, ct)

    assert len(ref_ek) == MLKEM768_EK_LEN
    assert len(ciphertext) == MLKEM768_CT_LEN
    assert len(shared_secret) == MLKEM_SS_LEN
    assert ref_kem_decaps(ref_dk, ciphertext) == shared_secret


@pytest.mark.parametrize("deterministic", [True, False], ids=["fixed-m", "random-m"])
@pytest.mark.parametrize("seed", KEM_SEEDS, ids=SEED_IDS)
def test_mlkem768_reference_encapsulates_cryptography_decapsulates(
    seed: bytes, deterministic: bool
) -> None:
    private_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    ek = private_key.public_key().public_bytes_raw()

    shared_secret, ciphertext = ref_kem_encaps(ek, ENCAPS_RANDOMNESS if deterministic else None)

    assert len(ek) == MLKEM768_EK_LEN
    assert len(ciphertext) == MLKEM768_CT_LEN
    assert len(shared_secret) == MLKEM_SS_LEN
    assert private_key.decapsulate(ciphertext) == shared_secret


def test_mlkem768_reference_encapsulates_to_generated_cryptography_key() -> None:
    private_key = mlkem.MLKEM768PrivateKey.generate()
    ek = private_key.public_key().public_bytes_raw()

    shared_secret, ciphertext = ref_kem_encaps(ek)

    assert len(ciphertext) == MLKEM768_CT_LEN
    assert len(shared_secret) == MLKEM_SS_LEN
    assert private_key.decapsulate(ciphertext) == shared_secret


@pytest.mark.parametrize("position", CT_FLIP_POSITIONS)
@pytest.mark.parametrize("seed", KEM_SEEDS, ids=SEED_IDS)
def test_mlkem768_implicit_rejection_agrees(seed: bytes, position: int) -> None:
    crypto_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    _, ref_dk = ref_kem_keys(seed)
    shared_secret, ciphertext = crypto_key.public_key().encapsulate()
    tampered = flip_byte(ciphertext, position)

    crypto_rejection = crypto_key.decapsulate(tampered)
    ref_rejection = ref_kem_decaps(ref_dk, tampered)

    assert len(crypto_rejection) == MLKEM_SS_LEN
    assert crypto_rejection == ref_rejection
    assert crypto_rejection != shared_secret
    # Both return FIPS 203's implicit-rejection key J(z || c'), z being the seed's second half.
    assert crypto_rejection == fips203_j(seed[32:], tampered)


@PROPERTY_SETTINGS
@given(
    seed=st.binary(min_size=MLKEM_SEED_LEN, max_size=MLKEM_SEED_LEN),
    m=st.binary(min_size=32, max_size=32),
    position=st.integers(min_value=0, max_value=MLKEM768_CT_LEN - 1),
    mask=st.integers(min_value=1, max_value=0xFF),
)
def test_mlkem768_agrees_with_reference_on_random_seeds(
    seed: bytes, m: bytes, position: int, mask: int
) -> None:
    crypto_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    ref_ek, ref_dk = ref_kem_keys(seed)

    # Same seed, same encapsulation key.
    assert crypto_key.public_key().public_bytes_raw() == ref_ek

    # cryptography -> reference (cryptography only sees the reference's ek bytes).
    secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(ref_ek).encapsulate()
    assert ref_kem_decaps(ref_dk, ciphertext) == secret

    # reference -> cryptography.
    ref_secret, ref_ciphertext = ref_kem_encaps(ref_ek, m)
    assert crypto_key.decapsulate(ref_ciphertext) == ref_secret

    # Implicit rejection of a tampered ciphertext agrees.
    tampered = flip_byte(ref_ciphertext, position, mask)
    rejection = crypto_key.decapsulate(tampered)
    assert rejection == ref_kem_decaps(ref_dk, tampered) == fips203_j(seed[32:], tampered)
    assert rejection != ref_secret


# --- ML-DSA-65 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", DSA_SEEDS, ids=SEED_IDS)
def test_mldsa65_same_seed_gives_identical_public_key(seed: bytes) -> None:
    crypto_key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
    ref_pk, _ = ref_dsa_keys(seed)

    crypto_pk = crypto_key.public_key().public_bytes_raw()
    assert crypto_key.private_bytes_raw() == seed
    assert len(crypto_pk) == MLDSA65_PK_LEN
    assert crypto_pk == ref_pk


@pytest.mark.parametrize("ctx", CONTEXTS, ids=CONTEXT_IDS)
@pytest.mark.parametrize("seed", DSA_SEEDS, ids=SEED_IDS)
def test_mldsa65_cryptography_signs_reference_verifies(seed: bytes, ctx: bytes) -> None:
    crypto_key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
    pk = crypto_key.public_key().public_bytes_raw()

    signature = crypto_key.sign(MESSAGE, context=ctx)

    assert len(signature) == MLDSA65_SIG_LEN
    assert ref_dsa_verifies(pk, MESSAGE, signature, ctx)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "hedged"])
@pytest.mark.parametrize("ctx", CONTEXTS, ids=CONTEXT_IDS)
@pytest.mark.parametrize("seed", DSA_SEEDS, ids=SEED_IDS)
def test_mldsa65_reference_signs_cryptography_verifies(
    seed: bytes, ctx: bytes, deterministic: bool
) -> None:
    ref_pk, ref_sk = ref_dsa_keys(seed)

    signature = ref_dsa_sign(ref_sk, MESSAGE, ctx, deterministic=deterministic)

    assert len(signature) == MLDSA65_SIG_LEN
    # Verifying via from_public_bytes raises InvalidSignature on failure.
    mldsa.MLDSA65PublicKey.from_public_bytes(ref_pk).verify(signature, MESSAGE, context=ctx)


def test_mldsa65_none_context_is_empty_context_in_both_directions() -> None:
    crypto_key = mldsa.MLDSA65PrivateKey.from_seed_bytes(DSA_SEEDS[-1])
    pk = crypto_key.public_key().public_bytes_raw()
    _, ref_sk = ref_dsa_keys(DSA_SEEDS[-1])

    crypto_signature = crypto_key.sign(MESSAGE)  # context=None
    assert ref_dsa_verifies(pk, MESSAGE, crypto_signature, b"")

    ref_signature = ref_dsa_sign(ref_sk, MESSAGE, b"")
    crypto_key.public_key().verify(ref_signature, MESSAGE)  # context=None


def _signatures_from_both(seed: bytes, msg: bytes, ctx: bytes) -> tuple[bytes, dict[str, bytes]]:
    """(pk, {implementation: signature over msg under ctx}) for the key derived from ``seed``."""
    crypto_key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
    ref_pk, ref_sk = ref_dsa_keys(seed)
    signatures = {
        "cryptography": crypto_key.sign(msg, context=ctx),
        "reference": ref_dsa_sign(ref_sk, msg, ctx),
    }
    # Sanity: both genuine signatures are accepted by both before we tamper with anything.
    for signature in signatures.values():
        assert crypto_dsa_verifies(ref_pk, msg, signature, ctx)
        assert ref_dsa_verifies(ref_pk, msg, signature, ctx)
    return ref_pk, signatures


@pytest.mark.parametrize("ctx", CONTEXTS, ids=CONTEXT_IDS)
@pytest.mark.parametrize("seed", DSA_SEEDS[:2], ids=SEED_IDS[:2])
def test_mldsa65_wrong_context_rejected_by_both(seed: bytes, ctx: bytes) -> None:
    pk, signatures = _signatures_from_both(seed, MESSAGE, ctx)
    wrong_contexts = {other_context(ctx), ctx + b"\x00"} - {ctx}

    for signer, signature in signatures.items():
        for wrong in wrong_contexts:
            assert not crypto_dsa_verifies(pk, MESSAGE, signature, wrong), signer
            assert not ref_dsa_verifies(pk, MESSAGE, signature, wrong), signer


@pytest.mark.parametrize("ctx", CONTEXTS, ids=CONTEXT_IDS)
@pytest.mark.parametrize("seed", DSA_SEEDS[:2], ids=SEED_IDS[:2])
def test_mldsa65_wrong_message_rejected_by_both(seed: bytes, ctx: bytes) -> None:
    pk, signatures = _signatures_from_both(seed, MESSAGE, ctx)
    wrong_messages = [MESSAGE + b"\x00", MESSAGE[:-1], flip_byte(MESSAGE, 0, 0x01), b""]

    for signer, signature in signatures.items():
        for wrong in wrong_messages:
            assert not crypto_dsa_verifies(pk, wrong, signature, ctx), signer
            assert not ref_dsa_verifies(pk, wrong, signature, ctx), signer


@pytest.mark.parametrize("ctx", CONTEXTS, ids=CONTEXT_IDS)
@pytest.mark.parametrize("seed", DSA_SEEDS[:2], ids=SEED_IDS[:2])
def test_mldsa65_flipped_signature_byte_rejected_by_both(seed: bytes, ctx: bytes) -> None:
    pk, signatures = _signatures_from_both(seed, MESSAGE, ctx)

    for signer, signature in signatures.items():
        for position in SIG_FLIP_POSITIONS:
            for mask in (0x01, 0xFF):
                tampered = flip_byte(signature, position, mask)
                label = f"{signer} sig, byte {position} ^ {mask:#04x}"
                assert not crypto_dsa_verifies(pk, MESSAGE, tampered, ctx), label
                assert not ref_dsa_verifies(pk, MESSAGE, tampered, ctx), label


@PROPERTY_SETTINGS
@given(
    seed=st.binary(min_size=MLDSA_SEED_LEN, max_size=MLDSA_SEED_LEN),
    msg=st.binary(max_size=256),
    ctx=st.binary(max_size=255),
    position=st.integers(min_value=0, max_value=MLDSA65_SIG_LEN - 1),
    mask=st.integers(min_value=1, max_value=0xFF),
)
def test_mldsa65_agrees_with_reference_on_random_seeds(
    seed: bytes, msg: bytes, ctx: bytes, position: int, mask: int
) -> None:
    crypto_key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
    ref_pk, ref_sk = ref_dsa_keys(seed)

    # Same seed, same public key.
    assert crypto_key.public_key().public_bytes_raw() == ref_pk

    crypto_signature = crypto_key.sign(msg, context=ctx)
    ref_signature = ref_dsa_sign(ref_sk, msg, ctx)
    assert len(crypto_signature) == len(ref_signature) == MLDSA65_SIG_LEN

    # Both directions verify.
    assert ref_dsa_verifies(ref_pk, msg, crypto_signature, ctx)
    assert crypto_dsa_verifies(ref_pk, msg, ref_signature, ctx)

    # Tampering is rejected by both, whichever implementation signed.
    for signature in (crypto_signature, ref_signature):
        tampered = flip_byte(signature, position, mask)
        assert not crypto_dsa_verifies(ref_pk, msg, tampered, ctx)
        assert not ref_dsa_verifies(ref_pk, msg, tampered, ctx)
        wrong_ctx = other_context(ctx)
        assert not crypto_dsa_verifies(ref_pk, msg, signature, wrong_ctx)
        assert not ref_dsa_verifies(ref_pk, msg, signature, wrong_ctx)
        assert not crypto_dsa_verifies(ref_pk, msg + b"\x00", signature, ctx)
        assert not ref_dsa_verifies(ref_pk, msg + b"\x00", signature, ctx)
