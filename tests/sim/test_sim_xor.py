"""Ground truth: xor_closest and the bucket ranges against brute force."""

from __future__ import annotations

import random

import pytest
from dna_sim.xor import bucket_range, xor_closest


@pytest.mark.parametrize("seed", range(5))
def test_xor_closest_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    keys = sorted(rng.getrandbits(256) for _ in range(rng.choice((5, 50, 700))))
    for _ in range(50):
        target = rng.choice((rng.getrandbits(256), rng.choice(keys)))
        count = rng.choice((1, 3, 20))
        want = sorted(range(len(keys)), key=lambda i: keys[i] ^ target)[:count]
        assert xor_closest(keys, target, count) == want, (seed, target, count)


@pytest.mark.parametrize("seed", range(3))
def test_bucket_range_holds_exactly_the_bucket(seed: int) -> None:
    rng = random.Random(seed)
    keys = sorted(rng.getrandbits(256) for _ in range(400))
    local = keys[rng.randrange(len(keys))]
    for index in (255, 254, 250, 248, 0):
        start, end = bucket_range(keys, local, index)
        want = [k for k in keys if (k ^ local).bit_length() - 1 == index]
        assert keys[start:end] == want, (seed, index)
