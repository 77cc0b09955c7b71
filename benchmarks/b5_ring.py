"""B5: ring balance (largest share ÷ fair share) and moved fraction (÷ ideal), 2–10 nodes, 100,000
random uuids: zstack-mn's rendezvous ring beside uhashring (defaults and 1,000 virtual nodes)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from uhashring import HashRing as UHashRing

from zstack_mn.cluster.ring import HashRing
from zstack_mn.testing.uuids import seeded_uuids

KEYS = 100_000
SIZES = range(2, 11)
STEPS = 3


def _measure(make: Callable[[list[str]], Callable[[str], str]], keys: list[str], seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    worst_share, worst_moved, per_n = 0.0, 0.0, {}
    lookup_us = 0.0
    for n in SIZES:
        nodes = seeded_uuids(rnd, n + 1)
        small, big = make(nodes[:-1]), make(nodes)
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        owners = [small(k) for k in keys]
        lookup_us = (time.perf_counter() - t0) / len(keys) * 1e6
        for o in owners:
            counts[o] = counts.get(o, 0) + 1
        share = max(counts.values()) / (len(keys) / n)
        moved = sum(o != big(k) for o, k in zip(owners, keys, strict=True)) / (len(keys) / (n + 1))
        per_n[n] = {"largestShare": round(share, 4), "movedVsIdeal": round(moved, 4)}
        worst_share, worst_moved = max(worst_share, share), max(worst_moved, moved)
    return {
        "worstShare": round(worst_share, 4),
        "worstMoved": round(worst_moved, 4),
        "lookupUsAt10": round(lookup_us, 2),
        "byNodes": per_n,
    }


async def run(url: str, prefix: str, seconds: float, progress: Any) -> dict[str, Any]:
    keys = seeded_uuids(random.Random(1), KEYS)
    out = {"rendezvous (zstack-mn)": _measure(lambda nodes: HashRing(nodes).owner_of, keys, 7)}
    progress.update(1)
    out["uhashring default (160 vnodes)"] = _measure(lambda nodes: UHashRing(nodes=nodes).get_node, keys, 7)
    progress.update(1)
    out["uhashring 1000 vnodes"] = _measure(lambda nodes: UHashRing(nodes=nodes, vnodes=1000).get_node, keys, 7)
    progress.update(1)
    return out
