"""What both ZStack protocols do once they have read a request: check the session, then log in,
query, or build the project's API message and start it as a job. The REST and RPC modules only
read their wire format into (API, parameters, session, job uuid) and write the answer back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.web.zstack import inventories
from zstack_mn.web.zstack.catalog import Context, Kind, ZApi
from zstack_mn.web.zstack.conditions import QuerySpec
from zstack_mn.web.zstack.jobs import JobRunner
from zstack_mn.web.zstack.queries import run_query
from zstack_mn.web.zstack.sessions import SessionGuard
from zstack_mn.web.zstack.wire import new_uuid

_JOB_UUID = re.compile(r"^[0-9a-f]{32}$")


def job_uuid_of(value: object) -> str | None:
    """A client-chosen job uuid (``X-Job-UUID``, RPC ``id``) when it is 32 lowercase hex."""
    return value if isinstance(value, str) and _JOB_UUID.match(value) else None


class ZStackApi:
    def __init__(self, portal: ApiPortal, guard: SessionGuard, jobs: JobRunner | None = None) -> None:
        settings = portal.ctx.settings
        self.portal = portal
        self.guard = guard
        self.jobs = jobs or JobRunner(portal)
        self.context = Context(kvm_agent_url=settings.kvm_agent_url)
        self.job_timeout = settings.job_timeout

    async def session_api(self, api: ZApi, params: Mapping[str, Any]) -> dict[str, Any]:
        """LogInByAccount, LogOut, ValidateSession: the reply body (RPC field names)."""
        if api.name == "LogInByAccount":
            return {"inventory": inventories.session(await self.guard.login(params))}
        if api.name == "LogOut":
            await self.guard.logout(params.get("sessionUuid"))
            return {}
        assert api.name == "ValidateSession"
        return {"validSession": await self.guard.validate(params.get("sessionUuid"))}

    async def query(self, api: ZApi, session: object, spec: Callable[[], QuerySpec]) -> dict[str, Any]:
        """A query's reply; ``spec`` reads the query's parameters once the session is known good."""
        await self.guard.require(session)
        return await run_query(self.portal, api, spec())

    async def submit(self, api: ZApi, params: Mapping[str, Any], session: object, job_uuid: str | None) -> str:
        """Check the session, build the message (refusing bad fields before anything is
        written), record the job and start it; returns the job uuid."""
        assert api.kind is Kind.ACTION
        await self.guard.require(session)
        msg = api.build(params, self.context)
        job = job_uuid or new_uuid()
        await self.jobs.submit(api, msg, job, self.job_timeout)
        return job
