"""schemathesis, a fuzzer that reads ``/openapi.json``, run as a user runs it (its command line,
``--checks all``, every phase including the stateful one, the project's ``schemathesis.toml``)
against the embedded node and against a 3-node cluster. Zero failures: no 500, no status, content
type or body the document does not state, no schema-valid request refused, no schema-violating
one accepted, 405s with ``Allow``, and no resource that outlives its deletion.

The seed is fixed and the budget small, so ``make test`` stays within its time. With
``--run-slow`` (``make fault-full``) one more run takes many more examples and a random seed,
printed to replay it. The hypothesis fuzzing in ``test_http_fuzz.py`` stays: it checks that a
refused request writes nothing, which schemathesis cannot see."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import pytest

from tests.embedded import embedded_node, session_headers
from zstack_mn.config import ZSTACK_DEFAULT_PASSWORD
from zstack_mn.testing.cluster import ADMIN_PASSWORD, ClusterHarness, add_hosts_and_vms

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "schemathesis.toml"
SEED = 17
EXAMPLES = 40
CLUSTER_EXAMPLES = 25
SLOW_EXAMPLES = 1000
RUN_DEADLINE = 300.0
AUTH_VARIABLE = "ZSTACK_MN_SCHEMATHESIS_AUTH"


async def schemathesis(
    base_url: str,
    workdir: Path,
    *,
    examples: int,
    seed: int,
    deadline: float = RUN_DEADLINE,
    password: str = ZSTACK_DEFAULT_PASSWORD,
) -> tuple[int, str]:
    """Run the schemathesis command line against ``base_url`` in ``workdir`` (where it keeps its
    cache), with the project's configuration and hooks and a session of ``admin`` for the plain
    API (``schemathesis.toml`` reads it from ZSTACK_MN_SCHEMATHESIS_AUTH); (exit status, its
    report)."""
    auth = (await session_headers(base_url, password))["Authorization"]
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color", "run"),
        *(f"{base_url}/openapi.json", "--checks", "all", "--seed", str(seed), "--max-examples", str(examples)),
        *("--continue-on-failure", "--generation-database", "none"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=workdir,
        env={
            **os.environ,
            AUTH_VARIABLE: auth,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), deadline)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def passed(status: int, report: str) -> bool:
    return status == 0 and "FAILURES" not in report and "ERRORS" not in report


@pytest.mark.timeout(RUN_DEADLINE + 60)
async def test_schemathesis_finds_nothing_on_the_embedded_node(tmp_path: Path):
    async with embedded_node(tmp_path) as node:
        status, report = await schemathesis(node.http_url, tmp_path, examples=EXAMPLES, seed=SEED)
    assert passed(status, report), report[-6000:]


@pytest.mark.integration
@pytest.mark.cluster
@pytest.mark.timeout(RUN_DEADLINE + 120)
async def test_schemathesis_finds_nothing_on_a_three_node_cluster(harness: ClusterHarness):
    agent = await harness.start_agent()
    nodes = await harness.start_nodes(3)
    await harness.wait_rings_agree(nodes, 30)
    async with harness.client(harness.urls()) as client:
        await add_hosts_and_vms(client, agent, 6, hosts=2)
    status, report = await schemathesis(
        nodes[0].url, harness.workdir, examples=CLUSTER_EXAMPLES, seed=SEED, password=ADMIN_PASSWORD
    )
    assert passed(status, report), report[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_schemathesis_long_run_with_a_random_seed(request: pytest.FixtureRequest, tmp_path: Path):
    if not request.config.getoption("--run-slow"):
        pytest.skip("the long schemathesis run needs --run-slow (make fault-full)")
    seed = random.randrange(2**31)
    print(f"schemathesis seed {seed}")
    async with embedded_node(tmp_path) as node:
        status, report = await schemathesis(node.http_url, tmp_path, examples=SLOW_EXAMPLES, seed=seed, deadline=3000)
    assert passed(status, report), f"seed {seed}\n{report[-6000:]}"
