"""Property-based fuzzing of the HTTP API (hypothesis): whatever the input, never a 5xx, every
error has a code and a description, and bad input writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.embedded import embedded_node
from zstack_mn.node import Node

pytestmark = pytest.mark.timeout(240)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["name", "cpuNum", "memorySize", "hostUuid", "uuid", "agentUrl", "stateEvent", "limit", "x"]
)
param_dicts = st.dictionaries(
    field_names, json_values | st.sampled_from(["1G", "-1", "0", "web", "enable"]), max_size=5
)
uuids = st.sampled_from(["6f1c7d0e-5ad4-4f3e-8b3a-1e0b7e6e1c11", "not-a-uuid", "", "%00", "a" * 300])
actions = st.sampled_from(
    ["startVmInstance", "stopVmInstance", "rebootVmInstance", "migrateVm", "reconnectHost", "changeHostState", "nope"]
)

requests = st.one_of(
    st.tuples(
        st.just("POST"),
        st.just("/v1/vm-instances"),
        st.one_of(st.builds(lambda p: {"params": p}, param_dicts), json_values),
    ),
    st.tuples(
        st.just("POST"), st.just("/v1/hosts"), st.one_of(st.builds(lambda p: {"params": p}, param_dicts), json_values)
    ),
    st.tuples(
        st.just("PUT"),
        uuids.map(lambda u: f"/v1/vm-instances/{u}/actions"),
        st.builds(lambda a, p: {a: p}, actions, param_dicts),
    ),
    st.tuples(
        st.just("PUT"),
        uuids.map(lambda u: f"/v1/hosts/{u}/actions"),
        st.builds(lambda a, p: {a: p}, actions, param_dicts),
    ),
    st.tuples(st.just("DELETE"), uuids.map(lambda u: f"/v1/vm-instances/{u}"), st.none()),
    st.tuples(st.just("DELETE"), uuids.map(lambda u: f"/v1/hosts/{u}"), st.none()),
    st.tuples(
        st.just("GET"),
        st.sampled_from(["/v1/vm-instances", "/v1/hosts", "/v1/management-nodes"]).flatmap(
            lambda p: st.sampled_from(["", "?limit=0", "?limit=5000", "?start=-1", "?state=Running", "?limit=abc"]).map(
                lambda q: p + q
            )
        ),
        st.none(),
    ),
    st.tuples(st.just("GET"), uuids.map(lambda u: f"/v1/vm-instances/{u}"), st.none()),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture
async def node(fuzz_dir: Path) -> AsyncIterator[Node]:
    async with embedded_node(fuzz_dir, agent_timeout=2.0) as n:
        yield n


async def test_fuzzed_requests_never_get_a_5xx(node: Node):
    seen: list[tuple[str, str, int]] = []
    async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(requests)
        def run(req: tuple[str, str, object]) -> None:
            seen.append(req)  # type: ignore[arg-type]

        run()
        for method, path, body in seen:
            resp = await http.request(method, path, json=body)
            assert resp.status_code < 500, (method, path, body, resp.text)
            if resp.status_code >= 400:
                err = resp.json()["error"]
                assert err["code"], (method, path, body, resp.text)
                assert err["description"], (method, path, body, resp.text)
    assert len(seen) >= 100
