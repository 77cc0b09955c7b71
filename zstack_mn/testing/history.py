"""The client side of the fault suite: steady API load from several clients, and the history of
every request they sent (its idempotency key, when it went out, what came back and when).

Each worker is one client that knows every node URL (as a real user's tooling would) and owns a
set of VMs exclusively, so the operations on one VM form a sequence whose expected outcome is
known: the checker (``zstack_mn.testing.checker``) reconciles that sequence with the database and
the agent.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from zstack_mn.client import Client, HttpTransport
from zstack_mn.messages import ZStackError
from zstack_mn.services.vm_states import TRANSIENT
from zstack_mn.testing.cluster import ADMIN_PASSWORD

OK, ERROR, TIMEOUT, HUNG = "ok", "error", "timeout", "hung"
HUNG_GRACE_S = 1.0
STATE_POLL_BOUND_S = 30.0


@dataclass
class Op:
    """One API request as its client saw it (times are ``time.monotonic``, machine-wide)."""

    seq: int
    worker: int
    kind: str
    vm: str
    key: str
    sent: float
    answered: float | None = None
    outcome: str = ""
    state: str | None = None
    code: str | None = None
    retryable: bool | None = None
    detail: str = ""
    handled_by: str | None = None


class History:
    """Every request sent during a run, in the order sent."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.ops: list[Op] = []

    async def record(
        self,
        worker: int,
        kind: str,
        vm: str,
        call: Callable[[str], Awaitable[dict[str, Any]]],
        *,
        key: str | None = None,
        client: Client | None = None,
    ) -> Op:
        """Send one request (under a fresh idempotency key unless ``key`` is given: the same key
        sent twice is the same request); never raises for the request's outcome."""
        key = key or str(uuidlib.uuid4())
        op = Op(len(self.ops), worker, kind, vm, key, time.monotonic())
        self.ops.append(op)
        try:
            result = await asyncio.wait_for(call(key), self.deadline + HUNG_GRACE_S)
        except TimeoutError:
            op.outcome = HUNG
        except ZStackError as exc:
            op.outcome = TIMEOUT if exc.code.name == "TIMEOUT" else ERROR
            op.code, op.retryable, op.detail = exc.code.name, exc.retryable, exc.description[:200]
        except Exception as exc:  # the history must hold whatever happened, including client bugs
            op.outcome, op.code, op.detail = ERROR, type(exc).__name__, str(exc)[:200]
        else:
            op.outcome = OK
            op.handled_by = client.last_handled_by if client is not None else None
            inventory = result.get("inventory", result)
            op.state = inventory.get("state")
            if kind == "create":
                op.vm = inventory.get("uuid", op.vm)
        op.answered = time.monotonic() if op.outcome != HUNG else None
        return op

    def as_json(self) -> list[dict[str, Any]]:
        """Every request, for the run's directory (``history.json``)."""
        return [asdict(op) for op in self.ops]


class VmCall(Protocol):
    """A client's VM operation (``Client.stop_vm`` and its siblings)."""

    def __call__(self, uuid: str, *, key: str | None = None) -> Awaitable[dict[str, Any]]: ...


def with_key(call: VmCall, vm: str) -> Callable[[str], Awaitable[dict[str, Any]]]:
    """``call(vm, key=...)`` as ``History.record`` sends it: one argument, the idempotency key."""
    return lambda key: call(vm, key=key)


def make_client(urls: list[str], deadline: float, attempt_timeout: float) -> Client:
    """A multi-URL HTTP client with the run's deadline and per-attempt fail-over bound."""
    transport = HttpTransport(list(urls), password=ADMIN_PASSWORD, attempt_timeout=attempt_timeout)
    return Client(transport, deadline)


class Workload:
    """``workers`` clients flipping their VMs (stop, start, reboot) and now and then creating one."""

    def __init__(
        self,
        urls: list[str],
        vms: dict[str, str],
        history: History,
        *,
        workers: int = 6,
        create_ratio: float = 0.05,
        max_vms_per_worker: int = 8,
        attempt_timeout: float = 5.0,
        seed: int = 0,
    ) -> None:
        self.history = history
        self.create_ratio = create_ratio
        self.max_vms = max_vms_per_worker
        self._rng = random.Random(seed)
        self._stop = asyncio.Event()
        owned: list[dict[str, str]] = [{} for _ in range(workers)]
        for i, (vm, state) in enumerate(sorted(vms.items())):
            owned[i % workers][vm] = state
        self._clients = [
            make_client(urls[i % len(urls) :] + urls[: i % len(urls)], history.deadline, attempt_timeout)
            for i in range(workers)
        ]
        self._tasks = [
            asyncio.get_running_loop().create_task(self._worker(i, owned[i]), name=f"load-{i}") for i in range(workers)
        ]

    async def _worker(self, index: int, vms: dict[str, str]) -> None:
        client = self._clients[index]
        record = self.history.record
        while not self._stop.is_set():
            if not vms or (len(vms) < self.max_vms and self._rng.random() < self.create_ratio):
                op = await record(
                    index,
                    "create",
                    "",
                    lambda k: client.create_vm(f"w{index}", cpu_num=1, memory_size="64M", key=k),
                    client=client,
                )
                if op.outcome == OK:
                    vms[op.vm] = op.state or "Running"
                continue
            vm = self._rng.choice(sorted(vms))
            state = vms[vm]
            if state == "Running":
                kind = self._rng.choice(("stop", "reboot"))
            elif state == "Stopped":
                kind = "start"
            else:
                settled = await self._settled_state(client, vm)
                if settled in ("Running", "Stopped"):
                    vms[vm] = settled
                else:
                    del vms[vm]
                continue
            call: VmCall = {"stop": client.stop_vm, "start": client.start_vm, "reboot": client.reboot_vm}[kind]
            op = await record(index, kind, vm, with_key(call, vm), client=client)
            vms[vm] = op.state if op.outcome == OK and op.state else await self._settled_state(client, vm)

    async def _settled_state(self, client: Client, vm: str) -> str:
        """The VM's state once it is out of any transient state (bounded; "Unknown" if not)."""
        deadline = time.monotonic() + STATE_POLL_BOUND_S
        delay = 0.1
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                found = (await client.query_vms(uuid=vm))["inventories"]
            except ZStackError:
                found = None
            if found is not None:
                if not found:
                    return "Gone"
                if found[0]["state"] not in TRANSIENT:
                    return str(found[0]["state"])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return "Unknown"

    async def stop(self) -> None:
        """Stop issuing requests and wait for every request in flight (each has a deadline)."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), self.history.deadline + STATE_POLL_BOUND_S + 5)
        for client in self._clients:
            await client.close()
