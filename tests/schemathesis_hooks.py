"""schemathesis hooks (named in ``schemathesis.toml``).

An ``Idempotency-Key`` names one request: the server answers every request that carries a key it
has seen with that key's first outcome (a create retried after its resource was deleted gets the
create's reply, not a new resource). schemathesis draws header values from a small space and
sends one key with unrelated requests, then reports the replayed answers as resources "not found
after their creation" or "still there after their deletion". So each well-formed key is made
unique per call, its fuzzed text kept as a prefix; a malformed one (empty, too long) is sent as
drawn.
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis

KEY = "Idempotency-Key"
MAX_KEY = 200
SUFFIX = 37


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    key = case.headers.get(KEY)
    if isinstance(key, str) and 1 <= len(key) <= MAX_KEY:
        case.headers[KEY] = f"{key[: MAX_KEY - SUFFIX]}-{uuid.uuid4()}"
