"""The open-file limit a node needs for the connections its settings allow.

A node may hold ``max_in_flight`` HTTP connections and ``agent_max_connections`` (plus the
control connections) agent connections at once, besides its database pool and broker
connection. Many systems start a process with a soft limit of 1,024 open files, under the
defaults: the thousand-and-first connection would fail with EMFILE, seen by a caller as an
agent or server error. A node raises its soft limit towards what it needs (never beyond the
hard limit, which only an administrator can raise) and says so when the hard limit is short.

    needed = files_needed(settings); raise_file_limit(needed)
"""

from __future__ import annotations

import resource

import structlog

from zstack_mn.agent.client import CONTROL_CONNECTIONS
from zstack_mn.config import Settings

log = structlog.get_logger(__name__)

MARGIN = 256
"""Files beyond the connections: the broker and liveness connections, logs, the loop's own."""


def files_needed(s: Settings) -> int:
    """Open files the node may need at once under ``s``."""
    return s.max_in_flight + s.agent_max_connections + CONTROL_CONNECTIONS + s.db_pool_size + s.db_max_overflow + MARGIN


def raise_file_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (at most the hard limit); never lower it.
    Returns the soft limit in force afterwards; a warning names the setting when it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", soft=soft, wanted=target, error=str(exc))
            target = soft
        else:
            log.info("raised the open-file limit", was=soft, now=target)
    if target < needed:
        log.warning(
            "the open-file limit is lower than the connections the settings allow; raise it (ulimit -n, "
            "LimitNOFILE=) or lower ZSTACK_MN_MAX_IN_FLIGHT / ZSTACK_MN_AGENT_MAX_CONNECTIONS",
            limit=target,
            needed=needed,
        )
    return target
