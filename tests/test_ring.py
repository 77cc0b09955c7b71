"""Ring balance and movement (the B5 targets of docs/BENCH.md), deterministic seeds."""

from __future__ import annotations

import random
import uuid

import pytest

from zstack_mn.cluster.ring import EmptyRingError, HashRing, LiveRing
from zstack_mn.testing.uuids import seeded_uuids as uuids

KEYS = 100_000


@pytest.fixture(scope="module")
def keys() -> list[str]:
    return uuids(random.Random(20261125), KEYS)


@pytest.mark.parametrize("n", range(2, 11))
def test_largest_share_is_within_five_percent_of_fair(keys: list[str], n: int):
    nodes = uuids(random.Random(n), n)
    shares = HashRing(nodes).shares(keys)
    assert max(shares.values()) / (KEYS / n) <= 1.05


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_adding_or_removing_a_node_moves_only_its_share(keys: list[str], n: int):
    nodes = uuids(random.Random(100 + n), n + 1)
    small, big = HashRing(nodes[:-1]), HashRing(nodes)
    moved = sum(small.owner_of(k) != big.owner_of(k) for k in keys)
    ideal = KEYS / (n + 1)
    assert moved / ideal <= 1.1
    assert all(big.owner_of(k) == nodes[-1] for k in keys if small.owner_of(k) != big.owner_of(k))


def test_owner_is_the_same_in_every_process_and_order():
    nodes = ["b", "a", "c"]
    key = "6f1c7d0e-5ad4-4f3e-8b3a-1e0b7e6e1c11"
    assert HashRing(nodes).owner_of(key) == HashRing(reversed(nodes)).owner_of(key)
    assert HashRing(nodes).owner_of(key) == "a"


def test_live_ring_notifies_changes_only():
    ring = LiveRing("a", ["a"])
    seen: list[tuple[int, int]] = []
    ring.add_listener(lambda old, new: seen.append((len(old), len(new))))
    assert ring.add("b")
    assert not ring.add("b")
    assert ring.remove("b")
    assert not ring.remove("b")
    assert seen == [(1, 2), (2, 1)]
    assert ring.is_mine(str(uuid.uuid4()))
    with pytest.raises(EmptyRingError):
        HashRing().owner_of("x")
