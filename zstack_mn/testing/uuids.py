"""Reproducible resource uuids for ring tests and benchmarks: the same seed gives the same uuids
in every process and run.

    keys = seeded_uuids(random.Random(20261125), 100_000)
"""

from __future__ import annotations

import random
import uuid


def seeded_uuids(rnd: random.Random, n: int) -> list[str]:
    """``n`` version-4 uuids drawn from ``rnd``."""
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(n)]
