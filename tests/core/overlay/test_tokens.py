"""Address-validation tokens (dna_core.overlay.tokens): HMAC over (epoch, ip, port),
accepted for the epoch they were issued in and the next one only."""

from __future__ import annotations

import pytest
from dna_core.overlay.tokens import TOKEN_SIZE, AddressTokens
from hypothesis import given
from hypothesis import strategies as st

EPOCH = 300.0
ADDR = ("198.18.0.7", 4000)


@pytest.fixture
def tokens() -> AddressTokens:
    return AddressTokens(b"s" * 32, epoch_s=EPOCH)


def test_valid_in_its_epoch_and_the_next(tokens: AddressTokens) -> None:
    token = tokens.issue(ADDR, 100.0)  # epoch 0
    assert len(token) == TOKEN_SIZE
    for now in (100.0, 0.0, 299.999, 300.0, 450.0, 599.999):
        assert tokens.valid(token, ADDR, now), now


def test_invalid_after_two_epochs_and_before_issue_epoch(tokens: AddressTokens) -> None:
    token = tokens.issue(ADDR, 400.0)  # epoch 1
    assert not tokens.valid(token, ADDR, 900.0)  # epoch 3
    assert not tokens.valid(token, ADDR, 600.0 * 10)
    assert not tokens.valid(token, ADDR, 299.0)  # epoch 0: not yet issued


def test_same_epoch_same_token(tokens: AddressTokens) -> None:
    """Stateless: nothing is remembered per address, so a token is a pure function."""
    assert tokens.issue(ADDR, 0.0) == tokens.issue(ADDR, 299.0)
    assert tokens.issue(ADDR, 0.0) != tokens.issue(ADDR, 300.0)


@pytest.mark.parametrize(
    "other",
    [
        ("198.18.0.8", 4000),
        ("198.18.0.7", 4001),
        ("198.18.0.70", 400),  # the same characters, split differently
        ("::ffff:198.18.0.7", 4000),
    ],
)
def test_bound_to_ip_and_port(tokens: AddressTokens, other: tuple[str, int]) -> None:
    token = tokens.issue(ADDR, 10.0)
    assert not tokens.valid(token, other, 10.0)
    assert tokens.issue(other, 10.0) != token


def test_bound_to_the_secret(tokens: AddressTokens) -> None:
    token = tokens.issue(ADDR, 10.0)
    assert not AddressTokens(b"t" * 32, epoch_s=EPOCH).valid(token, ADDR, 10.0)


@pytest.mark.parametrize("size", [0, 1, TOKEN_SIZE - 1, TOKEN_SIZE + 1, 32])
def test_wrong_size_is_invalid(tokens: AddressTokens, size: int) -> None:
    token = tokens.issue(ADDR, 10.0)
    candidate = (token * 3)[:size]
    assert not tokens.valid(candidate, ADDR, 10.0)


@given(st.binary(min_size=TOKEN_SIZE, max_size=TOKEN_SIZE), st.floats(0, 1e9))
def test_forged_tokens_are_invalid(forged: bytes, now: float) -> None:
    tokens = AddressTokens(b"s" * 32, epoch_s=EPOCH)
    if forged not in (tokens.issue(ADDR, now), tokens.issue(ADDR, now - EPOCH)):
        assert not tokens.valid(forged, ADDR, now)


@given(st.integers(0, TOKEN_SIZE - 1), st.integers(1, 255))
def test_tampered_tokens_are_invalid(position: int, mask: int) -> None:
    tokens = AddressTokens(b"s" * 32, epoch_s=EPOCH)
    token = bytearray(tokens.issue(ADDR, 10.0))
    token[position] ^= mask
    assert not tokens.valid(bytes(token), ADDR, 10.0)
