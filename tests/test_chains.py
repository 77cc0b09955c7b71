"""Per-resource chains: serial and ordered per key, concurrent across keys without a bound, freed."""

from __future__ import annotations

import asyncio

from zstack_mn.services.chains import Chains


async def test_one_key_runs_serially_in_submission_order():
    chains = Chains()
    running = 0
    order: list[int] = []
    overlap = False

    async def work(i: int) -> None:
        nonlocal running, overlap
        async with chains.slot("vm-1"):
            running += 1
            overlap |= running > 1
            await asyncio.sleep(0.001 * (i % 3))
            order.append(i)
            running -= 1

    await asyncio.gather(*(work(i) for i in range(50)))
    assert order == list(range(50))
    assert not overlap
    assert len(chains) == 0


async def test_different_keys_all_run_at_once():
    """No slot limit: ten thousand operations waiting on agents are ten thousand suspended tasks."""
    chains = Chains()
    running = peak = 0
    gate = asyncio.Event()

    async def work(key: str) -> None:
        nonlocal running, peak
        async with chains.slot(key):
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

    tasks = [asyncio.create_task(work(f"vm-{i}")) for i in range(10_000)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert peak == 10_000
    gate.set()
    await asyncio.gather(*tasks)
    assert len(chains) == 0
