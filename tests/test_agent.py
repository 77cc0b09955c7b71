"""The simulated agent's guarantees the fault checker relies on: one effect per op id, fencing of
a replaced owner, and an audit of who worked on which VM when."""

from __future__ import annotations

import httpx
import pytest

from zstack_mn.agent.client import NODE_HEADER
from zstack_mn.agent.simulator import SimulatedAgent, create_app


@pytest.fixture
async def agent():
    sim = SimulatedAgent()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(sim)), base_url="http://agent") as http:
        yield sim, http


async def start(http: httpx.AsyncClient, op_id: str, fence: int, node: str) -> httpx.Response:
    return await http.post(
        "/hosts/h1/vms/vm-1/start", json={"opId": op_id, "fence": fence}, headers={NODE_HEADER: node}
    )


async def test_an_op_id_is_applied_once(agent):
    sim, http = agent
    assert (await start(http, "op-1", 1, "n1")).json()["state"] == "Running"
    assert (await start(http, "op-1", 1, "n2")).json()["state"] == "Running"
    assert sim.effects == {"op-1": 1}
    assert sim.duplicates == 1
    assert (await http.get("/hosts/h1/ops/op-1")).json()["state"] == "applied"
    assert (await http.get("/hosts/h1/ops/op-2")).json()["state"] == "unknown"


async def test_a_lower_fence_is_refused_and_audited_as_refused(agent):
    sim, http = agent
    assert (await start(http, "op-1", 5, "new-owner")).status_code == 200
    late = await start(http, "op-2", 4, "old-owner")
    assert late.status_code == 409
    assert "stale fence" in late.json()["detail"]
    assert "op-2" not in sim.effects
    audit = (await http.get("/admin/audit")).json()["entries"]
    assert [(e["node"], e["outcome"]) for e in audit] == [
        ("new-owner", "Running"),
        ("old-owner", "rejected:stale-fence"),
    ]
