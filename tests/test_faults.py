"""More rows of FAULTS.md on real processes, RabbitMQ and PostgreSQL, under steady load: a node
joining, a rolling restart, and a RabbitMQ restart."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.cluster_helpers import three_nodes_with_vms
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.messages import ZStackError
from zstack_mn.testing import servers
from zstack_mn.testing.cluster import ClusterHarness

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(300)]


class Load:
    """Workers flipping VMs (stop ↔ start) through a multi-URL client; records every outcome."""

    def __init__(self, client: Client, vms: list[str], workers: int = 8) -> None:
        self.client = client
        self.free: asyncio.Queue[str] = asyncio.Queue()
        for v in vms:
            self.free.put_nowait(v)
        self.state = dict.fromkeys(vms, "Running")
        self.ok = 0
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(workers)]

    async def _worker(self) -> None:
        while not self._stop.is_set():
            vm = await self.free.get()
            try:
                op = self.client.stop_vm if self.state[vm] == "Running" else self.client.start_vm
                self.state[vm] = (await asyncio.wait_for(op(vm), 60))["state"]
                self.ok += 1
            except (ZStackError, TimeoutError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.free.put_nowait(vm)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 90)


async def test_a_node_joining_under_load_takes_its_share_and_nothing_fails(harness: ClusterHarness):
    nodes, _, client, vms = await three_nodes_with_vms(harness, 40)
    async with Client.http(harness.urls(), timeout=60) as c:
        load = Load(c, vms)
        await asyncio.sleep(1)
        newcomer = await harness.start_node()
        everyone = {n.uuid for n in harness.nodes}
        took = await harness.wait_until(lambda: harness.rings_agree(everyone), 10, "every ring has the newcomer")
        await asyncio.sleep(2)
        await load.stop()
    assert load.errors == [] and load.ok > 0
    old, new = HashRing({n.uuid for n in nodes}), HashRing(everyone)
    moved = [v for v in vms if old.owner_of(v) != new.owner_of(v)]
    assert all(new.owner_of(v) == newcomer.uuid for v in moved)
    assert 0 < len(moved) < len(vms) / 2
    print(f"join: every ring agreed {took:.2f}s after the newcomer was ready; {len(moved)}/{len(vms)} VMs moved")
    await client.close()


async def test_rolling_restart_costs_a_multi_url_client_nothing(harness: ClusterHarness):
    nodes, _, client, vms = await three_nodes_with_vms(harness, 24)
    async with Client.http(harness.urls(), timeout=60) as c:
        load = Load(c, vms)
        for old in list(nodes):
            old.signal(signal.SIGTERM)
            await asyncio.to_thread(old.popen.wait, 60)
            assert old.popen.returncode == 0
            await harness.start_node(port=old.port)
            live = {n.uuid for n in harness.nodes if n.alive}
            await harness.wait_until(lambda live=live: harness.rings_agree(live), 15, "rings agree after a restart")
        await asyncio.sleep(1)
        await load.stop()
    assert load.errors == [], load.errors[:5]
    assert load.ok > 0
    await client.close()


async def test_rabbitmq_restart_under_load_nodes_come_back(harness: ClusterHarness):
    nodes, _, client, vms = await three_nodes_with_vms(harness, 12)
    entry = nodes[0]
    local = {v for v in vms if HashRing({n.uuid for n in nodes}).owner_of(v) == entry.uuid}
    async with Client.http([entry.url], timeout=20) as c:
        try:
            assert servers.rabbitmqctl("stop_app").returncode == 0
            outcomes = dict(zip(vms, await asyncio.wait_for(
                asyncio.gather(*(c.stop_vm(v) for v in vms), return_exceptions=True), 30
            ), strict=True))
        finally:
            assert servers.rabbitmqctl("start_app").returncode == 0
    for v, outcome in outcomes.items():
        if v in local:
            assert isinstance(outcome, dict) and outcome["state"] == "Stopped", outcome
        else:
            assert isinstance(outcome, ZStackError) and outcome.retryable, outcome
    assert set(vms) - local, "every VM is local to the entry node: the outage was not exercised"
    async with Client.http(harness.urls(), timeout=20) as c:
        back = await harness.wait_until(lambda: _all_serve(c, vms), 60, "every VM served again", interval=0.5)
    assert all(n.alive for n in nodes), "a node died of a broker restart"
    assert await harness.rings_agree({n.uuid for n in nodes}), "a broker restart changed membership"
    print(f"broker restart: every VM served again {back:.1f}s after start_app")
    await client.close()


async def _all_serve(c: Client, vms: list[str]) -> bool:
    try:
        for v in vms:
            await c.reboot_vm(v) if (await c.query_vms(uuid=v))["inventories"][0]["state"] == "Running" else await c.start_vm(v)
    except ZStackError:
        return False
    return True
